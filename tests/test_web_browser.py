"""The review page end to end in headless Chromium (Debian's ``chromium`` package, driven by
Playwright): list, filter, open an image, open a face, record a review, see it in the list,
download the annotated image. Screenshots go to ``reports/test-output/`` (or
``$FORENSIC_GENDER_TEST_OUTPUT``).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python
package (never ``playwright install``: the system browser is used). Skipped with a message when
either is missing, except in CI, where that is a failure."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests import query_fixtures, web_fixtures
from tests.query_fixtures import DevDB
from tests.web_fixtures import OUT, until

dev_db, browser, browser_db, serve_page = query_fixtures.dev_db, web_fixtures.browser, web_fixtures.browser_db, web_fixtures.serve_page


@pytest.fixture
def server(browser_db: str, dev_db: DevDB, serve_page: Callable[[str], str]) -> tuple[str, DevDB]:
    """The review page over a SQLite copy of the dev database: (its address, the dev database)."""
    return serve_page(browser_db), dev_db


def test_review_page_end_to_end(browser, server) -> None:  # noqa: ANN001
    import cv2

    base, db = server
    OUT.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = ctx.new_page()
    try:
        # the list
        page.goto(base + "/faces")
        rows = page.locator("tr.face")
        assert rows.count() > 20
        assert "face(s) match" in page.inner_text("#summary")
        until(page, "Array.from(document.querySelectorAll('img.thumb')).slice(0, 5).every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUT / "review-1-faces.png"))
        # page through by the links (keyset positions of the last / first row shown) and back
        page.goto(base + "/faces?sort=-p_male&limit=7")
        first = [r.get_attribute("data-face-id") for r in page.locator("tr.face").all()]
        assert len(first) == 7 and page.locator("#prev").count() == 0
        page.click("#next")
        page.wait_for_url(re.compile(r".*after=.*"))
        second = [r.get_attribute("data-face-id") for r in page.locator("tr.face").all()]
        assert len(second) == 7 and not set(first) & set(second)
        p_males = [float(x) for x in page.locator("tr.face td:nth-child(4)").all_inner_texts()]
        assert p_males == sorted(p_males, reverse=True)
        page.click("#prev")
        page.wait_for_url(re.compile(r".*before=.*"))
        assert [r.get_attribute("data-face-id") for r in page.locator("tr.face").all()] == first
        assert page.locator("#prev").count() == 0 and page.locator("#next").count() == 1
        # filter with the form
        page.goto(base + "/faces")
        page.select_option("select[name=gender]", "female")
        page.fill("input[name=path_glob]", "*/wider/*")
        page.click("#apply")
        page.wait_for_url(re.compile(r".*gender=female.*"))
        genders = page.locator("tr.face td:nth-child(3)").all_inner_texts()
        paths = page.locator("tr.face td.path a").all_inner_texts()
        assert genders and set(genders) == {"female"} and all("/wider/" in p for p in paths)
        # open an image: the picture loads and its boxes are links
        page.locator("tr.face td.path a").first.click()
        page.wait_for_url(re.compile(r".*/images/[0-9a-f]{64}$"))
        until(page, "document.querySelector('#picture img').complete && document.querySelector('#picture img').naturalWidth > 0")
        boxes = page.locator("#picture a.box")
        assert boxes.count() >= 1
        page.screenshot(path=str(OUT / "review-2-image.png"), full_page=True)
        # download the annotated image
        with page.expect_download() as dl:
            page.click("#download")
        saved = OUT / dl.value.suggested_filename
        dl.value.save_as(str(saved))
        width = page.evaluate("document.querySelector('#picture img').naturalWidth")
        assert cv2.imread(str(saved)).shape[1] == width
        # open a face by clicking its box
        boxes.first.click()
        page.wait_for_url(re.compile(r".*/faces/\d+$"))
        face_id = int(page.url.rsplit("/", 1)[1])
        until(page, "document.querySelector('#face-large').complete && document.querySelector('#face-large').naturalWidth > 0")
        assert re.match(r"\d\.\d{4}", page.inner_text("#p-male"))
        # record a review
        page.select_option("#status", "corrected")
        page.select_option("#label", "male")
        page.fill("#note", "browser test: moustache visible")
        page.fill("#reviewer", "analyst-1")
        page.click("#save")
        page.wait_for_url(re.compile(rf".*/faces/{face_id}\?saved=1$"))
        assert page.is_visible("#saved")
        assert page.inner_text("#review-now").startswith("corrected: male by analyst-1")
        assert page.inner_text("#final") == "male"
        page.screenshot(path=str(OUT / "review-3-face.png"), full_page=True)
        # and see it in the list
        page.goto(base + "/faces?review=reviewed")
        listed = page.locator("tr.face")
        assert listed.count() == 1 and listed.first.get_attribute("data-face-id") == str(face_id)
        assert page.inner_text("tr.face td.review") == "corrected: male"
        page.screenshot(path=str(OUT / "review-4-reviewed.png"))
        print(f"screenshots in {OUT}: review-1-faces.png ... review-4-reviewed.png")
    finally:
        ctx.close()
