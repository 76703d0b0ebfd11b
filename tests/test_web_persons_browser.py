"""Persons on the review page end to end in headless Chromium (Debian's ``chromium`` package,
driven by Playwright): open the grid of persons, open a person, merge another person into it,
split a face off into a new person, name the person; then the database holds those decisions
(audited in ``person_decisions``, faces pinned) and ``recluster`` keeps them. Screenshots go to
``reports/test-output/`` (or ``$FORENSIC_GENDER_TEST_OUTPUT``).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python
package (never ``playwright install``: the system browser is used). Skipped with a message when
either is missing, except in CI, where that is a failure."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from sqlalchemy import select

from tests import query_fixtures, web_fixtures
from tests.web_fixtures import OUT, until

dev_db, browser, browser_db, serve_page = query_fixtures.dev_db, web_fixtures.browser, web_fixtures.browser_db, web_fixtures.serve_page


@pytest.fixture
def server(browser_db: str, serve_page: Callable[[str], str]) -> tuple[str, str]:
    """The review page over a SQLite copy of the dev database, its faces grouped by recluster:
    (its address, the database URL)."""
    from daemon.config import IdentityConfig
    from daemon.store.engine import open_store_engine
    from daemon.store.persons import recluster

    engine = open_store_engine(browser_db)
    recluster(engine, IdentityConfig())
    engine.dispose()
    return serve_page(browser_db), browser_db


def _faces(page) -> list[int]:  # noqa: ANN001
    return [int(x.get_attribute("data-face-id")) for x in page.locator("#faces .face").all()]


def _state(url: str) -> tuple[list[dict], dict[int, tuple[int, bool]], dict[int, tuple[str | None, int | None]]]:
    """(decisions, face -> (person, pinned), person -> (name, merged_into)) from the database."""
    from daemon.store import persons as ps
    from daemon.store.engine import open_engine

    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        decisions = [dict(r._mapping) for r in c.execute(select(ps.decisions).order_by(ps.decisions.c.id))]
        faces = {r.face_id: (r.person_id, bool(r.pinned)) for r in c.execute(select(ps.face_persons))}
        persons = {r.id: (r.name, r.merged_into) for r in c.execute(select(ps.persons))}
    engine.dispose()
    return decisions, faces, persons


def test_merge_split_and_name_a_person(browser, server) -> None:  # noqa: ANN001
    from daemon.config import IdentityConfig
    from daemon.store.engine import open_store_engine
    from daemon.store.persons import recluster

    base, url = server
    OUT.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    try:
        # the grid: persons with two faces or more, most faces first, each with a face that loads
        page.goto(base + "/persons")
        cards = page.locator("#persons a.person")
        assert cards.count() >= 3
        ids = [int(c.get_attribute("data-person-id")) for c in cards.all()]
        counts = [int(re.match(r"(\d+) face", t).group(1)) for t in page.locator("#persons .person .muted").all_inner_texts()]
        assert counts == sorted(counts, reverse=True) and min(counts) >= 2
        until(page, "Array.from(document.querySelectorAll('#persons img.thumb')).slice(0, 3).every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUT / "persons-1-grid.png"))
        keep, other = ids[0], ids[1]
        # open a person and say who reviews
        cards.first.click()
        page.wait_for_url(re.compile(rf".*/persons/{keep}$"))
        before = _faces(page)
        assert len(before) == counts[0]
        page.fill("#reviewer", "analyst-1")
        page.click("#use-reviewer")
        page.wait_for_url(re.compile(r".*reviewer=analyst-1$"))
        # merge another person into it
        page.fill("#other", str(other))
        page.click("#merge")
        page.wait_for_url(re.compile(rf".*/persons/{keep}\?saved=merged.*"))
        assert page.inner_text("#saved") == f"Person {other} was merged into this person."
        merged = _faces(page)
        assert len(merged) == counts[0] + counts[1] and set(before) < set(merged)
        page.screenshot(path=str(OUT / "persons-2-merged.png"), full_page=True)
        # split one face off into a new person of its own (the person field left empty)
        split = merged[-1]
        page.locator(f'#faces .face[data-face-id="{split}"] button.move').click()
        page.wait_for_url(re.compile(rf".*/persons/{keep}\?saved=moved.*"))
        new_person = int(re.search(r"person (\d+)", page.inner_text("#saved")).group(1))
        assert new_person not in ids and split not in _faces(page) and len(_faces(page)) == len(merged) - 1
        # name the person
        page.fill("#name", "Victim 1")
        page.click("#save-name")
        page.wait_for_url(re.compile(rf".*/persons/{keep}\?saved=named.*"))
        assert page.inner_text("#person-name") == "Victim 1"
        page.screenshot(path=str(OUT / "persons-3-named.png"), full_page=True)
        # the split face's own page names its new person; the merged person leads to the kept one
        page.goto(base + f"/faces/{split}")
        assert page.inner_text("#person").startswith(f"person {new_person}")
        page.goto(base + f"/persons/{other}")
        assert page.url.startswith(base + f"/persons/{keep}?") and page.inner_text("#person-name") == "Victim 1"
        # the grid shows the name; the search finds it
        page.goto(base + "/persons")
        page.fill("#name-filter", "victim")
        page.click("#apply")
        page.wait_for_url(re.compile(r".*name=victim.*"))
        assert [int(c.get_attribute("data-person-id")) for c in page.locator("#persons a.person").all()] == [keep]
        assert page.inner_text("#persons .person .name") == "Victim 1"
        print(f"screenshots in {OUT}: persons-1-grid.png ... persons-3-named.png")
    finally:
        ctx.close()
    # the database: every decision audited with the reviewer, the faces pinned
    decisions, faces, persons = _state(url)
    assert [d["action"] for d in decisions] == ["merge"] + ["assign"] * len(merged) + ["assign", "name"]
    assert {d["reviewer"] for d in decisions} == {"analyst-1"}
    assert (decisions[0]["person_id"], decisions[0]["other_id"]) == (keep, other)
    assert (decisions[-2]["face_id"], decisions[-2]["person_id"]) == (split, new_person) and decisions[-1]["name"] == "Victim 1"
    kept = [f for f in merged if f != split]
    assert all(faces[f] == (keep, True) for f in kept) and faces[split] == (new_person, True)
    assert persons[keep] == ("Victim 1", None) and persons[other][1] == keep
    # recluster keeps every decision
    engine = open_store_engine(url)
    recluster(engine, IdentityConfig())
    engine.dispose()
    _, faces2, persons2 = _state(url)
    assert all(faces2[f] == (keep, True) for f in kept) and faces2[split] == (new_person, True)
    assert persons2[keep] == ("Victim 1", None) and persons2[other][1] == keep
