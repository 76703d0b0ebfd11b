"""Fuzzing the page's query parameters and the CLI's filter options (Hypothesis, seeded and
bounded), on SQLite and PostgreSQL: whatever arrives, the answer is a page or a clear refusal
(never a 500, never a traceback), each within a generous time bound. Also the glob matcher
against Python's fnmatch on arbitrary patterns."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

pytest.importorskip("hypothesis", reason="the test extra is not installed: pip install -e '.[test]'")
pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from daemon import config  # noqa: E402
from daemon.cli import main  # noqa: E402
from daemon.queries import filters as flt  # noqa: E402
from daemon.web import create_app  # noqa: E402
from tests.query_fixtures import Evidence, Synth, world  # noqa: E402, F401 - fixtures

PORT = 8765
BOUND_S = 15.0  # per request or command: generous (a normal one takes milliseconds)
# seeded (derandomized) and small in CI; FORENSIC_GENDER_FUZZ_EXAMPLES=5000 hunts longer, with fresh randomness
EXAMPLES = int(os.environ.get("FORENSIC_GENDER_FUZZ_EXAMPLES", "70"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 70, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])

INTERESTING = ["", " ", "nan", "inf", "-inf", "-1", "0", "1", "0.5", "1e400", "1e308", "-0.5", "9" * 30, "-" + "9" * 25, "1_0",
               "[z-a]", "[", "]", "[!]", "*a*a*a*a*a*a*a*a*aX", "*" * 50, "?" * 200, "\x00", "a\x00b", "\x1b[2J", "\u202e", "\ufffd",
               "female", "male,uncertain", "not_face", "likely", "possible", "latest", "all", "aaaa", "abcdef", "0" * 64, "p_male",
               "-age", "faces:desc", "seen", "7d", "36h", "1700000000", "2024-05-01", "2024-05-01T13:30Z", "0001-01-01", "true",
               "reviewed", "unreviewed", "done", "failed", "truncated", "/ev", "/ev/", "/ev/a/one.jpg", "/ev/a/one.jpg,x,1,1,1",
               ",,,", "1,2", "0.5,3", "'", '"', "%", "_", "\\", "é" * 100, "𝄞"]
NAMES = sorted(flt.OPTION) + [o.lstrip("-") for o in flt.OPTION.values()] + ["colour", "", "x" * 70, "--limit", "size", "saved", "csrf"]

values = st.one_of(
    st.sampled_from(INTERESTING),
    st.text(max_size=30),
    st.text(alphabet="*?[]!^-a/\\.x", max_size=25),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.from_regex(r"[0-9a-f]{1,70}", fullmatch=True),
)
params = st.lists(st.tuples(st.sampled_from(NAMES), values), max_size=8)


@pytest.fixture
def fuzz_db(world: tuple[Synth, Evidence]) -> Iterator[dict]:
    """The synthetic database plus a real evidence tree recorded in it (so that the media routes
    decode something); the tree is checked unchanged after the fuzzing (by ``world``)."""
    syn, ev = world
    yield {"url": syn.url, "sha": [*syn.sha.values(), *ev.sha.values()], "face": [*syn.face.values(), *ev.face.values()], "ev": ev}


def test_the_glob_matcher_is_fnmatch_without_its_traps() -> None:
    """Our matcher agrees with fnmatch wherever fnmatch has the documented rules ([^...] is a
    negation for us, a literal ^ for fnmatch; empty ranges are refused by us)."""

    @FUZZ
    @given(pattern=st.text(alphabet="*?[]!-ab/\\\n", max_size=14), path=st.text(alphabet="ab/-]\\[\n!", max_size=14))
    def check(pattern: str, path: str) -> None:
        try:
            flt.compile_glob(pattern)
        except ValueError as err:
            assert "empty range" in str(err) or "stars" in str(err)
            return
        assert flt.glob_match(pattern, path) is fnmatch.fnmatchcase(path, pattern), (pattern, path)

    check()


def _route(data: st.DataObject, db: dict) -> str:
    face = data.draw(st.one_of(st.sampled_from(db["face"]), st.integers(min_value=0, max_value=10**25)), label="face")
    sha = data.draw(st.one_of(st.sampled_from(db["sha"]), st.from_regex(r"[0-9a-f]{64}", fullmatch=True), st.text(max_size=70)), label="sha")
    sha = quote(sha, safe="")
    return data.draw(st.sampled_from([
        "/", "/faces", "/images", "/stats", f"/faces/{face}", f"/images/{sha}", f"/media/image/{sha}.jpg",
        f"/media/annotated/{sha}.jpg", f"/media/face/{face}.jpg",
    ]), label="route")


def test_no_query_breaks_the_page(fuzz_db: dict) -> None:
    app = create_app(config.parse({"database": fuzz_db["url"]}, check_paths=False), port=PORT)
    client = TestClient(app, base_url=f"http://127.0.0.1:{PORT}")
    seen: dict[int, int] = {}

    @FUZZ
    @given(data=st.data(), ps=params)
    def check(data: st.DataObject, ps: list[tuple[str, str]]) -> None:
        route = _route(data, fuzz_db)
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='', errors='surrogatepass')}" for k, v in ps)
        t0 = time.monotonic()
        r = client.get(route + ("?" + query if query else ""))
        took = time.monotonic() - t0
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404, 414), (route, ps, r.status_code, r.text[:500])
        assert "Traceback" not in r.text and took < BOUND_S, (route, ps, took)
        if r.status_code == 400 and route in ("/", "/faces", "/images"):
            assert 'id="problems"' in r.text  # the page says what is wrong, in the form

    try:
        check()
    finally:
        app.close()
    assert seen.get(200) and seen.get(400), seen  # the fuzzing reached both pages and refusals
    fuzz_db["ev"].assert_unchanged()


CLI_CMDS = {
    "faces": ["--format", "table"], "images": ["--format", "json"], "stats": [], "export": ["--format", "csv"],
}
STATS_OPTIONS = ("path_prefix", "path_glob", "root", "seen_since", "seen_until", "status", "bundle", "threshold", "margin",
                 "gender", "age_min", "age_max", "width_min", "score_min", "review")


def test_no_filter_option_breaks_the_commands(fuzz_db: dict) -> None:
    argv_values = st.one_of(values, st.sampled_from(["\udcff", "/ev/\udc80x", "--", "-x"]))

    @FUZZ
    @given(cmd=st.sampled_from(sorted(CLI_CMDS)), opts=st.lists(st.tuples(st.sampled_from(sorted(flt.OPTION)), argv_values), max_size=6))
    def check(cmd: str, opts: list[tuple[str, str]]) -> None:
        argv = [cmd, "--db", fuzz_db["url"], *CLI_CMDS[cmd]]
        for name, v in opts:
            if cmd == "stats" and name not in STATS_OPTIONS:
                continue
            argv.append("--uncertain" if name == "uncertain" else f"{flt.OPTION[name]}={v}")
        argv = [a for a in argv if "\x00" not in a]  # a real argv cannot hold NUL
        out, err = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exit_:  # argparse: an option without its value, and the like
                rc = exit_.code
        took = time.monotonic() - t0
        assert rc in (0, 2), (argv, rc, err.getvalue()[-800:])
        assert "Traceback" not in err.getvalue() and took < BOUND_S, (argv, took, err.getvalue()[-800:])
        if rc == 2:
            assert err.getvalue().strip(), argv  # a refusal says why

    check()
    fuzz_db["ev"].assert_unchanged()
