"""The one filter model shared by every query command, the exports and the review page.

Filters arrive as strings (command-line options or the page's query string) and are parsed by one
function, :func:`parse`, into a frozen :class:`Filters`; :meth:`Filters.to_params` turns them back
into the same strings (links on the page, the ``query`` echoed in JSON exports). Every problem is
reported at once, with the option it concerns.

Rules (documented here once; docs/ANALYST.md repeats them for analysts)

``gender`` / ``uncertain`` - the decision is **re-cut at query time** from the stored p(male) with
    ``threshold`` t and ``margin`` m (defaults: the configuration's ``pipeline.gender`` values):
    male when p >= t + m, female when p <= t - m, uncertain in between (with m = 0: male when
    p >= t, else female) - exactly :func:`daemon.pipeline.classify.decide`. The label stored at
    analysis time is kept as ``model_gender``; changing t or m never needs the models again.
``final_gender`` - the analyst's label where a review confirmed or corrected the face (female,
    male or not_face), otherwise the query-time decision.
``minors`` - ``likely``: age + k * age_std < 18 (even the upper end of the estimate's spread is
    under 18: few false alarms); ``possible``: age - k * age_std < 18 (the lower end is under 18:
    few misses). k is ``minor_k`` (default 1, i.e. one standard deviation of the age model's
    output distribution). Faces without an age estimate never match.
``path_prefix`` - the recorded absolute path starts with the text (exact, case-sensitive).
``path_glob`` - the whole absolute path matches a shell-style pattern: ``*`` any run of characters
    *including* ``/``, ``?`` one character, ``[abc]``/``[!abc]`` a class. Case-sensitive.
``root``, ``seen_since``/``seen_until``, ``status``, ``reason`` - about the files (paths) of an
    image: an image (and its faces) matches when at least one of its paths matches them all, and
    the path shown is the first matching one. ``seen`` is when the path was first discovered.
    Dates: ``2024-05-01``, ``2024-05-01T13:30``, ``...Z`` or ``...+02:00`` (naive = local time),
    seconds since the epoch, or relative ``90m``, ``36h``, ``7d`` (that long before now).
``sha256`` - full hash or a prefix of at least 6 hex digits.
``taken_from`` / ``taken_to`` - the capture time the image's EXIF records (DateTimeOriginal, by
    the camera's own clock, no zone), at or after / before ``2024-05-01`` or ``2024-05-01T13:30``.
    ``device`` - the camera make or model contains the text (case-insensitive); ``has_gps`` - the
    EXIF records a position. Images without capture metadata never match these.
``bundle`` - ``latest`` (default: each image's most recent analysis), ``all`` (every analysis),
    or a bundle key (or a prefix of one).
``review`` - ``reviewed``, ``unreviewed``, ``confirmed``, ``corrected`` or ``ignored``.
``after`` / ``before`` - keyset ("seek") paging: the rows strictly after (before) a row, given as
    that row's sort key in the text :func:`cursor_text` writes (the review page's next and
    previous links carry them; a page deep in the list costs what the first one does). Which
    values form the key depends on the list and the sort; :mod:`daemon.queries.read` checks them.
    ``offset`` skips rows instead (simple, but the skipped rows are still read).
Several values of one option are alternatives (OR); different options must all hold (AND).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from daemon.config import GenderConfig
from daemon.store.schema import FILE_STATES

GENDERS = ("female", "male", "uncertain")
FINAL_GENDERS = ("female", "male", "uncertain", "not_face")
REVIEW_STATES = ("reviewed", "unreviewed", "confirmed", "corrected", "ignored")
MINOR_RULES = ("likely", "possible")
FACE_SORTS = ("path", "sha256", "p_male", "age", "width", "score", "seen", "id")
IMAGE_SORTS = ("path", "sha256", "size", "seen", "faces")
ADULT_AGE = 18.0


class FilterError(ValueError):
    """Bad filter values; ``problems`` lists each as ``--option: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Cut:
    """The gender decision applied at query time (see the module docstring); the defaults are
    the configuration's."""

    threshold: float = GenderConfig.threshold
    margin: float = GenderConfig.uncertain_margin


@dataclass(frozen=True)
class Filters:
    gender: tuple[str, ...] = ()
    final_gender: tuple[str, ...] = ()
    p_male_min: float | None = None
    p_male_max: float | None = None
    uncertain: bool = False
    threshold: float | None = None
    margin: float | None = None
    age_min: float | None = None
    age_max: float | None = None
    minors: str | None = None
    minor_k: float = 1.0
    width_min: float | None = None
    width_max: float | None = None
    score_min: float | None = None
    path_prefix: tuple[str, ...] = ()
    path_glob: tuple[str, ...] = ()
    root: tuple[str, ...] = ()
    seen_since: float | None = None
    seen_until: float | None = None
    sha256: tuple[str, ...] = ()
    bundle: str = "latest"
    status: tuple[str, ...] = ()
    reason: tuple[str, ...] = ()
    review: tuple[str, ...] = ()
    taken_from: str | None = None
    taken_to: str | None = None
    device: tuple[str, ...] = ()
    has_gps: bool = False
    sort: str = "path"
    limit: int | None = None
    offset: int = 0
    after: str | None = None
    before: str | None = None
    # the raw text of relative dates, so links and echoes keep "7d" rather than a timestamp
    raw: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def cut(self, default: Cut = Cut()) -> Cut:
        return Cut(default.threshold if self.threshold is None else self.threshold,
                   default.margin if self.margin is None else self.margin)

    @property
    def face_level(self) -> bool:
        """Whether any filter is about faces (the images command then keeps only images that
        have at least one matching face)."""
        return any((self.gender, self.final_gender, self.p_male_min is not None, self.p_male_max is not None,
                    self.uncertain, self.age_min is not None, self.age_max is not None, self.minors,
                    self.width_min is not None, self.width_max is not None, self.score_min is not None, self.review))

    @property
    def capture_level(self) -> bool:
        """Whether any filter is about the capture metadata (EXIF) of the images."""
        return any((self.taken_from is not None, self.taken_to is not None, self.device, self.has_gps))

    @property
    def file_level(self) -> bool:
        return any((self.path_prefix, self.path_glob, self.root, self.seen_since is not None,
                    self.seen_until is not None, self.status, self.reason))

    def to_params(self, *, paging: bool = True) -> list[tuple[str, str]]:
        """The non-default filters as (name, text) pairs: :func:`parse` gives them back.
        ``paging=False`` leaves out limit, offset, after and before."""
        out: list[tuple[str, str]] = []
        default = Filters()
        for f in fields(self):
            if f.name == "raw" or (not paging and f.name in PAGING):
                continue
            v = getattr(self, f.name)
            if v == getattr(default, f.name):
                continue
            if f.name in self.raw:
                out.append((f.name, self.raw[f.name]))
            elif isinstance(v, tuple):
                out.extend((f.name, x) for x in v)
            elif isinstance(v, bool):
                out.append((f.name, "1"))
            else:
                out.append((f.name, _fmt(v)))
        return out

    def to_json(self) -> dict:
        d: dict = {}
        for k, v in self.to_params(paging=False):
            if isinstance(getattr(Filters(), k), tuple):
                d.setdefault(k, []).append(v)
            else:
                d[k] = v
        return d

    def page(self, limit: int | None, offset: int = 0) -> Filters:
        """The same filters on another page (no keyset position)."""
        return replace(self, limit=limit, offset=offset, after=None, before=None)

    def seek(self, *, after: str | None = None, before: str | None = None) -> Filters:
        """The same filters and page size, the rows after (or before) a cursor (no offset)."""
        return replace(self, offset=0, after=after, before=before)


PAGING = ("limit", "offset", "after", "before")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return repr(v) if v != int(v) else str(int(v)) if abs(v) < 1e15 else repr(v)
    return str(v)


# --------------------------------------------------------------------------------------------
# Keyset positions ("cursors"): a row's sort key as text
#
# The values are joined with commas: numbers as Python writes them (floats exactly, by repr), an
# empty field for NULL, text as it is. At most one field is free text (a path); it may hold
# commas, since the fields around it are split off from either end.

CURSOR_KINDS = ("text", "hex", "int", "float")


def cursor_text(values: Sequence[object]) -> str:
    """The text of a position (see :func:`cursor_values`)."""
    out = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, float):
            out.append(repr(v))
        else:
            out.append(str(v))
    return ",".join(out)


def cursor_values(text: str, kinds: Sequence[tuple[str, bool]]) -> tuple:
    """Typed values from the text of a position. ``kinds``: (kind, nullable) per field, kind one of
    :data:`CURSOR_KINDS`. Raises ValueError saying what was expected."""
    n = len(kinds)
    free = [i for i, (k, _) in enumerate(kinds) if k == "text"]
    if len(free) > 1:
        raise ValueError("a position has at most one text field")
    if free:
        i = free[0]
        head = text.split(",", i) if i else [text]
        if len(head) < i + 1:
            raise ValueError(f"has {len(head)} field(s), expected {n}")
        tail = head[i].rsplit(",", n - i - 1) if n - i - 1 else [head[i]]
        parts = head[:i] + tail
    else:
        parts = text.split(",")
    if len(parts) != n:
        raise ValueError(f"has {len(parts)} field(s), expected {n}")
    out: list = []
    for part, (kind, nullable) in zip(parts, kinds):
        if part == "":
            if not nullable:
                raise ValueError(f"has an empty {kind} field where a value is required")
            out.append(None)
        elif kind == "int":
            if not re.fullmatch(r"-?[0-9]{1,19}", part) or not -INT64_MAX <= int(part) <= INT64_MAX:
                raise ValueError(f"field {part[:40]!r} must be a whole number from {-INT64_MAX} to {INT64_MAX}")
            out.append(int(part))
        elif kind == "float":
            try:
                out.append(_float(part))
            except ValueError as err:
                raise ValueError(f"field {err}") from None
        elif kind == "hex":
            if not re.fullmatch(r"[0-9a-f]{1,64}", part):
                raise ValueError(f"field {part[:80]!r} must be a SHA-256 in lower-case hex")
            out.append(part)
        else:
            out.append(part)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Path globs: parsed once, matched without backtracking
#
# A pattern is split at its ``*`` into segments; every other token (a character, ``?``, a class)
# matches exactly one character, so each segment has a fixed length. A path matches when the
# first segment matches at its start, the last at its end, and the middle ones in order in
# between, each at its leftmost place (leftmost is never worse for a fixed-length segment). Each
# segment is found by one scan, so a match costs O(len(path) * len(pattern)) whatever the
# pattern: ``*a*a*a*a*aX`` against a long path of ``a`` is as cheap as any other.
#
# SQLite evaluates this matcher (registered as the SQL function ``fg_glob``); PostgreSQL gets
# the same tokens as an anchored regular expression with no groups, no alternation and no
# quantifier but ``.*``, which its automaton-based engine matches in time linear in the path for
# a given pattern (no backtracking either). Both come from one token list, so both databases
# give the same answer.

MAX_GLOB_CHARS = 1024
MAX_GLOB_STARS = 32


@dataclass(frozen=True)
class Glob:
    """A parsed path glob. ``segments``: the star-separated parts, each a tuple of tokens: a
    one-character string (itself), None (``?``: any one character), or a class
    ``(negated, ((lo, hi), ...))`` of inclusive code-point ranges."""

    pattern: str
    segments: tuple[tuple[object, ...], ...]


def _class_items(body: str, pattern: str) -> tuple[tuple[str, str], ...]:
    items: list[tuple[str, str]] = []
    k = 0
    while k < len(body):
        c = body[k]
        if k + 2 < len(body) and body[k + 1] == "-":
            d = body[k + 2]
            if c > d:
                raise ValueError(f"has the empty range {c}-{d} in the class [{body}] of {pattern!r}; "
                                 f"write the lower character first ({d}-{c})")
            items.append((c, d))
            k += 3
        else:
            items.append((c, c))
            k += 1
    return tuple(items)


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str) -> Glob:
    """Parse a path glob (see the module docstring): ``*`` any run of characters, ``/``
    included; ``?`` one character; ``[abc]``, ``[a-z]``, ``[!abc]`` / ``[^abc]`` a class (a ``]``
    first in the class is a member; an unclosed ``[`` is a literal). Everything else, a
    backslash included, stands for itself. Raises ValueError for a class with an empty range
    (``[z-a]``), a pattern longer than :data:`MAX_GLOB_CHARS` or with more than
    :data:`MAX_GLOB_STARS` stars."""
    if len(pattern) > MAX_GLOB_CHARS:
        raise ValueError(f"must be at most {MAX_GLOB_CHARS} characters, got {len(pattern)}")
    segments: list[tuple[object, ...]] = []
    cur: list[object] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            segments.append(tuple(cur))
            cur = []
            while i + 1 < n and pattern[i + 1] == "*":  # ** is *
                i += 1
        elif c == "?":
            cur.append(None)
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                cur.append("[")
            else:
                body = pattern[i + 1:j]
                neg = body[:1] in ("!", "^")
                cur.append((neg, _class_items(body[1:] if neg else body, pattern)))
                i = j
        else:
            cur.append(c)
        i += 1
    segments.append(tuple(cur))
    if len(segments) - 1 > MAX_GLOB_STARS:
        raise ValueError(f"must have at most {MAX_GLOB_STARS} stars, got {len(segments) - 1}")
    return Glob(pattern, tuple(segments))


def _esc(c: str) -> str:
    """One character as a regular-expression escape that Python's re and PostgreSQL's AREs read
    alike (letters and digits stand for themselves)."""
    if c.isascii() and c.isalnum():
        return c
    o = ord(c)
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def _token_regex(t: object) -> str:
    if t is None:
        return "."
    if isinstance(t, str):
        return _esc(t)
    neg, items = t  # type: ignore[misc]
    body = "".join(_esc(lo) if lo == hi else f"{_esc(lo)}-{_esc(hi)}" for lo, hi in items)
    return "[" + ("^" if neg else "") + body + "]"


def glob_to_pg_regex(pattern: str) -> str:
    """The anchored PostgreSQL regular expression (``path ~ regex``) equal to the glob."""
    g = compile_glob(pattern)
    return "^" + ".*".join("".join(_token_regex(t) for t in seg) for seg in g.segments) + "$"


@functools.lru_cache(maxsize=256)
def _matcher(pattern: str) -> Callable[[str], bool]:
    g = compile_glob(pattern)
    segs = [(re.compile("".join(_token_regex(t) for t in seg), re.DOTALL), len(seg)) for seg in g.segments]
    if len(segs) == 1:
        only, n = segs[0]
        return lambda path: len(path) == n and only.fullmatch(path) is not None
    (first, n0), (last, nl), middle = segs[0], segs[-1], segs[1:-1]

    def match(path: str) -> bool:
        end = len(path) - nl
        if end < n0 or first.match(path) is None or last.fullmatch(path, end) is None:
            return False
        pos = n0
        for seg, _n in middle:
            m = seg.search(path, pos, end)
            if m is None:
                return False
            pos = m.end()
        return True

    return match


def glob_match(pattern: str | None, path: str | None) -> bool | None:
    """Whether the whole ``path`` matches the glob ``pattern`` (None if either is NULL): the
    SQLite function ``fg_glob``. Linear in the path for a given pattern."""
    if pattern is None or path is None:
        return None
    return _matcher(pattern)(path)


# --------------------------------------------------------------------------------------------
# Parsing

_MULTI = {"gender", "final_gender", "path_prefix", "path_glob", "root", "sha256", "status", "reason", "review", "device"}
_BOOLS = {"uncertain", "has_gps"}
_TAKEN = {"taken_from", "taken_to"}
_TAKEN_FORM = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?$")
_FLOATS = {"p_male_min", "p_male_max", "threshold", "margin", "age_min", "age_max", "minor_k", "width_min", "width_max", "score_min"}
_DATES = {"seen_since", "seen_until"}
_HEX = re.compile(r"^[0-9a-f]+$")
_REL = re.compile(r"^([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# Bounds on what one request or command may ask for (each refused with a message, never a 500).
MAX_VALUES = 100  # values of one multi-valued filter (path_prefix, sha256, ...)
MAX_ITEMS = 300  # filter values in one request or command, all options together
MAX_TEXT_CHARS = 16_384  # one value: a recorded path is at most PATH_MAX bytes, each at most 4 characters
MAX_INT = 1_000_000_000  # limit and offset
MAX_MAGNITUDE = 1e9  # any number filter (ages, widths, scores...)
MAX_MINOR_K = 100.0
INT64_MAX = 2**63 - 1  # a whole number in a position (ids, sizes, counts)

OPTION = {f.name: "--" + f.name.replace("_", "-") for f in fields(Filters) if f.name != "raw"}


def check_text(text: str, *, limit: int = MAX_TEXT_CHARS) -> None:
    """Raise ValueError unless ``text`` can reach either database: at most ``limit`` characters,
    no NUL (PostgreSQL text cannot hold one), no lone surrogate (undecodable bytes of a command
    line, which no recorded value contains: paths are recorded with ``\\xHH`` escapes)."""
    if len(text) > limit:
        raise ValueError(f"must be at most {limit} characters, got {len(text)}")
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise ValueError(f"must be valid text, got undecodable bytes in {text[:80]!r}; paths are matched in their "
                         "recorded form (bytes that are not UTF-8 as \\xHH)")


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time as seconds since the epoch (see the module docstring for the forms)."""
    t = text.strip()
    m = _REL.match(t.lower())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    if re.fullmatch(r"[0-9]{9,11}(\.[0-9]{1,9})?", t):
        return float(t)
    try:
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
        return dt.timestamp()  # naive -> local time
    except (ValueError, OverflowError, OSError) as err:
        raise ValueError(f"must be a date such as 2024-05-01 or 2024-05-01T13:30Z, epoch seconds, or 36h / 7d ago, got {text[:80]!r}") from err


def parse_taken(text: str) -> str:
    """A camera-local capture time as the stored text (``2024-05-01T00:00:00``); no zone, because
    ``taken_at`` is the time the camera's clock showed."""
    m = _TAKEN_FORM.match(text.strip())
    if m:
        y, mo, d, h, mi, sec = (int(g or 0) for g in m.groups())
        try:
            return datetime(y, mo, d, h, mi, sec).strftime("%Y-%m-%dT%H:%M:%S")
        except ValueError:
            pass
    raise ValueError(f"must be a camera-local date such as 2024-05-01 or 2024-05-01T13:30 (no zone), got {text[:80]!r}")


def parse_int(text: str, *, low: int = 0, high: int = MAX_INT) -> int:
    """A whole number in [low, high] written in ASCII digits; ValueError saying the range."""
    t = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,19}", t) or not low <= int(t) <= high:
        raise ValueError(f"must be a whole number from {low} to {high}, got {t[:40]!r}")
    return int(t)


def parse(values: Mapping[str, Sequence[str] | str] | Iterable[tuple[str, str]], *, now: float | None = None) -> Filters:
    """Filters from text values keyed by field name (``p_male_min``) or option (``--p-male-min``
    / ``p-male-min``). Empty values are ignored (an empty form field). Raises
    :class:`FilterError` listing every problem; every value is bounded (see :data:`MAX_VALUES`,
    :data:`MAX_ITEMS`, :data:`MAX_TEXT_CHARS`, :data:`MAX_GLOB_CHARS`, :data:`MAX_INT`)."""
    items: list[tuple[str, str]] = []
    if isinstance(values, Mapping):
        for k, v in values.items():
            items.extend((k, x) for x in ([v] if isinstance(v, str) or v is None else v) if x is not None)
    else:
        items = [(k, v) for k, v in values]
    if len(items) > MAX_ITEMS:
        raise FilterError([f"filters: at most {MAX_ITEMS} filter values may be given at once, got {len(items)}; "
                           "narrow the query (a root, a path prefix) instead of listing every value"])
    problems: list[str] = []
    kw: dict = {}
    raw: dict[str, str] = {}
    known = set(OPTION)
    for key, text in items:
        key = str(key)
        name = key.lstrip("-").replace("-", "_")
        if name not in known:
            problems.append(f"{key[:60]}: unknown filter; known filters are {', '.join(OPTION.values())}")
            continue
        text = str(text) if name in ("after", "before") else str(text).strip()
        if text == "" and name not in _BOOLS:
            continue
        opt = OPTION[name]
        try:
            check_text(text, limit=4096 if name in ("after", "before") else MAX_TEXT_CHARS)
            if name in _MULTI:
                kw.setdefault(name, [])
                for part in (p.strip() for p in (text.split(",") if name in ("gender", "final_gender", "status", "review") else [text])):
                    if part:
                        kw[name].append(_one(name, part))
                if len(kw[name]) > MAX_VALUES:
                    raise ValueError(f"takes at most {MAX_VALUES} values (alternatives), got {len(kw[name])}; "
                                     "use a shorter list or a broader filter (a prefix, a glob, a root)")
            elif name in _FLOATS:
                v = _float(text)
                top = MAX_MINOR_K if name == "minor_k" else MAX_MAGNITUDE
                if abs(v) > top:
                    raise ValueError(f"must be between {-top:g} and {top:g}, got {text[:40]!r}")
                kw[name] = v
            elif name in _DATES:
                kw[name] = parse_when(text, now)
                if not re.fullmatch(r"[\d.]+", text):
                    raw[name] = text
            elif name in _TAKEN:
                kw[name] = parse_taken(text)
            elif name in _BOOLS:
                low = text.lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(f"must be true or false, got {text[:40]!r}")
                kw[name] = low in _TRUE
            elif name == "minors":
                low = text.lower()
                if low in _TRUE:
                    low = "likely"
                if low not in MINOR_RULES:
                    raise ValueError(f"must be one of {', '.join(MINOR_RULES)}, got {text[:40]!r}")
                kw[name] = low
            elif name == "bundle":
                low = text.lower()
                if low not in ("latest", "all") and not (_HEX.match(low) and 4 <= len(low) <= 32):
                    raise ValueError(f"must be latest, all or a model bundle key (hex, at least 4 digits), got {text[:40]!r}")
                kw[name] = low
            elif name == "sort":
                low = text.lower()
                key_, _, way = low.lstrip("-").partition(":")
                desc = low.startswith("-") or way == "desc"
                if key_ not in FACE_SORTS + IMAGE_SORTS or way not in ("", "asc", "desc"):
                    raise ValueError(f"must be one of {', '.join(sorted(set(FACE_SORTS + IMAGE_SORTS)))}, descending as "
                                     f"KEY:desc or -KEY, got {text[:40]!r}")
                kw[name] = ("-" if desc else "") + key_
            elif name in ("after", "before"):
                kw[name] = text
            elif name in ("limit", "offset"):
                n = parse_int(text)
                kw[name] = (n or None) if name == "limit" else n
        except ValueError as err:
            problems.append(f"{opt}: {err}")
    for name in _MULTI:
        if name in kw:
            kw[name] = tuple(dict.fromkeys(kw[name]))
    f = Filters(**kw, raw=raw) if not problems else Filters()
    if not problems:
        problems.extend(check(f))
    if problems:
        raise FilterError(problems)
    return f


def _float(text: str) -> float:
    t = text.strip()
    if len(t) > 40 or not re.fullmatch(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?(nan|inf|infinity)", t, re.IGNORECASE):
        raise ValueError(f"must be a number, got {t[:40]!r}")
    v = float(t)
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {t!r}")
    return v


def _one(name: str, text: str) -> str:
    low = text.lower()
    if name == "gender":
        if low not in GENDERS:
            raise ValueError(f"must be one of {', '.join(GENDERS)}, got {text[:40]!r}")
        return low
    if name == "final_gender":
        low = low.replace("-", "_")
        if low not in FINAL_GENDERS:
            raise ValueError(f"must be one of {', '.join(FINAL_GENDERS)}, got {text[:40]!r}")
        return low
    if name == "status":
        if low not in FILE_STATES:
            raise ValueError(f"must be one of {', '.join(FILE_STATES)}, got {text[:40]!r}")
        return low
    if name == "review":
        if low not in REVIEW_STATES:
            raise ValueError(f"must be one of {', '.join(REVIEW_STATES)}, got {text[:40]!r}")
        return low
    if name == "reason":
        if not re.fullmatch(r"[a-z0-9_]{1,32}", low):
            raise ValueError(f"must be a failure reason such as truncated or not_an_image, got {text[:40]!r}")
        return low
    if name == "sha256":
        if not (_HEX.match(low) and 6 <= len(low) <= 64):
            raise ValueError(f"must be a SHA-256 in hex or a prefix of at least 6 hex digits, got {text[:80]!r}")
        return low
    if name == "root":
        return text.rstrip("/") or "/"
    if name == "device":
        if len(text) > 200:
            raise ValueError(f"must be at most 200 characters (a camera make or model), got {len(text)}")
        return text
    if name == "path_glob":
        compile_glob(text)  # a bad class range or an over-long pattern is refused here, not in SQL
    return text  # path_prefix, path_glob


def check(f: Filters) -> list[str]:
    """Consistency problems of already-typed filters (ranges, the cut)."""
    out = []
    for lo, hi in (("p_male_min", "p_male_max"), ("age_min", "age_max"), ("width_min", "width_max"), ("seen_since", "seen_until"),
                   ("taken_from", "taken_to")):
        a, b = getattr(f, lo), getattr(f, hi)
        if a is not None and b is not None and a > b:
            out.append(f"{OPTION[lo]}/{OPTION[hi]}: the range is empty ({a} > {b})")
    for name in ("p_male_min", "p_male_max"):
        v = getattr(f, name)
        if v is not None and not 0 <= v <= 1:
            out.append(f"{OPTION[name]}: must be a probability between 0 and 1, got {v}")
    if f.threshold is not None and not 0 < f.threshold < 1:
        out.append(f"--threshold: must be between 0 and 1 (exclusive), got {f.threshold}")
    if f.margin is not None and f.margin < 0:
        out.append(f"--margin: must be >= 0, got {f.margin}")
    if f.threshold is not None and f.margin is not None and f.margin >= min(f.threshold, 1 - f.threshold) and f.margin > 0:
        out.append(f"--margin: must leave both labels reachable (< {min(f.threshold, 1 - f.threshold):g} with threshold {f.threshold}), got {f.margin}")
    if f.minor_k < 0:
        out.append(f"--minor-k: must be >= 0, got {f.minor_k}")
    if f.after is not None and f.before is not None:
        out.append("--after/--before: give one of them (the rows after a position, or the rows before it), not both")
    if f.offset and (f.after is not None or f.before is not None):
        out.append(f"--offset: cannot be combined with --{'after' if f.after is not None else 'before'}; "
                   "a position already says where the page starts")
    for name in ("width_min", "width_max", "score_min", "age_min", "age_max"):
        v = getattr(f, name)
        if v is not None and v < 0:
            out.append(f"{OPTION[name]}: must be >= 0, got {v}")
    return out


def check_cut(cut: Cut) -> list[str]:
    if not 0 < cut.threshold < 1:
        return [f"--threshold: must be between 0 and 1 (exclusive), got {cut.threshold}"]
    if cut.margin < 0 or (cut.margin > 0 and cut.margin >= min(cut.threshold, 1 - cut.threshold)):
        return [f"--margin: must be >= 0 and leave both labels reachable with threshold {cut.threshold}, got {cut.margin}"]
    return []


# --------------------------------------------------------------------------------------------
# Command-line options (the same names as the fields)

_HELP = {
    "gender": "query-time gender decision: female, male, uncertain (repeat or comma-separate for OR)",
    "final_gender": "gender after analyst reviews: female, male, uncertain, not_face",
    "p_male_min": "p(male) at least P", "p_male_max": "p(male) at most P",
    "uncertain": "only faces in the uncertain band of the cut (same as --gender uncertain)",
    "threshold": "decision threshold on p(male) (default: the configuration's, 0.5)",
    "margin": "half-width of the uncertain band (default: the configuration's, 0.2)",
    "age_min": "estimated age at least A", "age_max": "estimated age at most A",
    "minors": "likely (age + k*std < 18) or possible (age - k*std < 18); bare --minors means likely",
    "minor_k": "spread multiplier k for --minors (default 1)",
    "width_min": "face box width at least W pixels", "width_max": "face box width at most W pixels",
    "score_min": "detection score at least S",
    "path_prefix": "recorded path starts with TEXT", "path_glob": "whole path matches a shell pattern (* crosses /)",
    "root": "recorded evidence root", "seen_since": "path first seen at or after WHEN (date, epoch, or 36h/7d ago)",
    "seen_until": "path first seen before WHEN", "sha256": "content hash or a prefix (>= 6 hex digits)",
    "bundle": "latest (default), all, or a model bundle key", "status": "file state: " + ", ".join(FILE_STATES),
    "reason": "failure reason (truncated, not_an_image, ...)", "review": "reviewed, unreviewed, confirmed, corrected, ignored",
    "taken_from": "taken at or after WHEN by the camera's clock (EXIF DateTimeOriginal; 2024-05-01 or 2024-05-01T13:30)",
    "taken_to": "taken before WHEN by the camera's clock",
    "device": "camera make or model contains TEXT (case-insensitive; EXIF Make/Model)",
    "has_gps": "only images whose EXIF records a GPS position",
    "sort": "faces: " + ", ".join(FACE_SORTS) + "; images: " + ", ".join(IMAGE_SORTS) + "; descending: KEY:desc (or --sort=-KEY)",
    "limit": "at most N rows (0 = all)", "offset": "skip the first N rows",
    "after": "only the rows after this position (the sort key of a row, as the last command's 'more with' line gives it)",
    "before": "only the rows before this position (with --limit: the N rows just before it)",
}


def add_filter_args(p: argparse.ArgumentParser, *, limit: int | None = 50, only: Sequence[str] | None = None) -> None:
    """Add the filter options to ``p`` (values stay text; :func:`from_args` parses them)."""
    g = p.add_argument_group("filters")
    for name, opt in OPTION.items():
        if only is not None and name not in only:
            continue
        if name in _BOOLS:
            g.add_argument(opt, dest="f_" + name, action="store_const", const="1", help=_HELP[name])
        elif name == "minors":
            g.add_argument(opt, dest="f_" + name, nargs="?", const="likely", metavar="RULE", help=_HELP[name])
        elif name in _MULTI:
            g.add_argument(opt, dest="f_" + name, action="append", metavar=name.split("_")[-1].upper(), help=_HELP[name])
        else:
            default = str(limit or 0) if name == "limit" else None
            g.add_argument(opt, dest="f_" + name, default=default, metavar=name.split("_")[-1].upper(), help=_HELP[name])


def from_args(args: argparse.Namespace) -> Filters:
    """Filters from the command line. Paths typed there are names as the OS gives them
    (``surrogateescape`` text): ``--path-prefix``, ``--path-glob`` and ``--root`` are turned into
    the recorded form (:func:`daemon.paths.to_db`; a root also made absolute) before they are
    compared with recorded paths."""
    from daemon import paths

    pairs: list[tuple[str, str]] = []
    for name in OPTION:
        v = getattr(args, "f_" + name, None)
        if v is None:
            continue
        for x in (v if isinstance(v, list) else [v]):
            if name in ("path_prefix", "path_glob") and x:
                x = paths.to_db(x)
            elif name == "root" and x.strip():
                x = paths.user_path(x.strip())
            pairs.append((name, x))
    return parse(pairs)
