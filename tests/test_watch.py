"""daemon.watch: the pure stability tracker (fake clock), the filter of names, and real watchdog
observers on real temporary folders (inotify, polling, a bindfs mount standing in for a network
share). No database and no models here; waits are bounded polls, never bare sleeps."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import RootConfig
from daemon.discovery import Filter
from daemon.watch import Change, RootWatch, StabilityTracker, Watcher, filtered, under
from tests.conftest import tree_manifest

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


SIG_A = (100, 1_000, 7)
SIG_B = (200, 2_000, 7)


# ------------------------------------------------------------------------------ the tracker


def test_tracker_takes_a_file_only_after_a_quiet_window() -> None:
    clock = FakeClock()
    t = StabilityTracker(2.0, clock=clock)
    assert t.observe("/r/a.jpg", "/r", SIG_A)
    assert t.due() == []
    clock.advance(1.999)
    assert t.due() == []
    assert t.settle("/r/a.jpg", SIG_A) == "waiting"
    clock.advance(0.001)
    assert t.due() == [("/r/a.jpg", "/r")]
    assert t.settle("/r/a.jpg", SIG_A) == "stable"
    assert "/r/a.jpg" not in t and len(t) == 0


@pytest.mark.parametrize(
    ("second_sig", "activity", "restarts"),
    [
        (SIG_B, False, True),   # a scan saw a different size/mtime: still being written
        (SIG_B, True, True),    # an event with a different signature
        (SIG_A, True, True),    # an event with the same signature: writes within one timestamp tick
        (SIG_A, False, False),  # a scan that sees the same signature is not activity
    ],
)
def test_tracker_restarts_the_quiet_period(second_sig, activity, restarts) -> None:  # noqa: ANN001
    clock = FakeClock()
    t = StabilityTracker(2.0, clock=clock)
    t.observe("/r/a.jpg", "/r", SIG_A)
    clock.advance(1.5)
    t.observe("/r/a.jpg", "/r", second_sig, activity=activity)
    clock.advance(0.6)  # 2.1 s after the first sighting, 0.6 s after the second
    assert (t.due() == []) is restarts


def test_tracker_settle_verdicts() -> None:
    clock = FakeClock()
    t = StabilityTracker(1.0, clock=clock)
    for p in ("/r/same", "/r/grew", "/r/gone"):
        t.observe(p, "/r", SIG_A)
    clock.advance(1.0)
    assert [p for p, _ in t.due()] == ["/r/same", "/r/grew", "/r/gone"]
    assert t.settle("/r/same", SIG_A) == "stable"
    assert t.settle("/r/grew", SIG_B) == "changed"
    assert t.settle("/r/gone", None) == "vanished"
    assert list(t.due()) == [] and len(t) == 1  # "grew" waits a full window again
    clock.advance(1.0)
    assert t.settle("/r/grew", SIG_B) == "stable"
    assert t.settle("/r/never-seen", SIG_A) == "changed" and t.settle("/r/never-seen", None) == "vanished"


def test_tracker_due_is_oldest_first_and_limited() -> None:
    clock = FakeClock()
    t = StabilityTracker(1.0, clock=clock)
    for i in range(5):
        t.observe(f"/r/{i}", "/r", SIG_A)
        clock.advance(0.1)
    t.observe("/r/0", "/r", SIG_B)  # changed: now the newest
    clock.advance(0.95)
    assert [p for p, _ in t.due()] == ["/r/1", "/r/2", "/r/3", "/r/4"]
    assert [p for p, _ in t.due(limit=2)] == ["/r/1", "/r/2"]
    clock.advance(0.5)
    assert [p for p, _ in t.due()][-1] == "/r/0"
    assert t.next_due_in() == 0.0


def test_tracker_is_bounded_and_forgets() -> None:
    clock = FakeClock()
    t = StabilityTracker(1.0, clock=clock, limit=3)
    assert all(t.observe(p, "/r", SIG_A) for p in ("/r/d/a", "/r/d/b", "/r/c"))
    assert t.full
    assert not t.observe("/r/new", "/r", SIG_A)   # the caller asks for a rescan instead
    assert t.observe("/r/c", "/r", SIG_B)         # known paths are still updated
    assert t.forget_under("/r/d/") == 2 and len(t) == 1
    assert t.forget("/r/c") and not t.forget("/r/c")
    assert t.next_due_in() is None
    with pytest.raises(ValueError, match="stability window"):
        StabilityTracker(-1)


def test_tracker_window_zero_takes_at_once_and_can_be_changed() -> None:
    clock = FakeClock()
    t = StabilityTracker(0.0, clock=clock)
    t.observe("/r/a", "/r", SIG_A)
    assert t.settle("/r/a", SIG_A) == "stable"
    t.set_window(5.0)
    t.observe("/r/b", "/r", SIG_A)
    clock.advance(4.9)
    assert t.due() == []


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("rel", "recursive", "accepted"),
    [
        ("photo.jpg", True, True),
        ("sub/dir/photo.jpg", True, True),
        ("sub/photo.jpg", False, False),       # a non-recursive root ignores sub-folders
        # no name is ignored: temporary names are taken once stable, OS side files are evidence too
        (".photo.jpg.Ab12Cd", True, True),     # rsync's temporary name
        ("photo.jpg.part", True, True),
        ("photo.tmp", True, True),
        ("~$report.jpg", True, True),
        ("._photo.jpg", True, True),           # macOS resource fork
        (".DS_Store", True, True),
        ("Thumbs.db", True, True),
        ("@eaDir/photo.jpg", True, True),      # Synology thumbnails of the evidence
        (".Trashes/photo.jpg", True, True),    # deleted files
        ("bad\udcff.jpg", True, True),        # a name that is not UTF-8 (surrogateescape)
        ("../outside.jpg", True, False),
        ("movie.mov", True, False),            # excluded by the root's pattern
    ],
)
def test_filtered_names(rel: str, recursive: bool, accepted: bool) -> None:
    cfg = RootConfig(path="/ev", recursive=recursive, exclude=("*.mov",))
    rw = RootWatch(cfg, Filter(cfg.include, cfg.exclude), "inotify")
    assert filtered(rw, os.path.normpath(os.path.join("/ev", rel))) is accepted


def test_under_picks_the_longest_root() -> None:
    assert under("/ev/a/b.jpg", ["/ev", "/ev/a"]) == "/ev/a"
    assert under("/evidence/x.jpg", ["/ev"]) is None
    assert under("/ev", ["/ev"]) == "/ev"


# ------------------------------------------------------------------------------ real observers


def wait_changes(w: Watcher, pred: Callable[[list[Change]], bool], timeout: float = 10.0,
                 what: str = "changes", health: bool = False) -> list[Change]:
    """Collect changes until ``pred(all so far)`` holds; fail after ``timeout`` seconds."""
    got: list[Change] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health:
            w.check_health()
        got.extend(w.changes())
        if pred(got):
            return got
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; got {got[:20]}")


def has(kind: str, path: str | None = None, **kw: str) -> Callable[[list[Change]], bool]:
    def pred(changes: list[Change]) -> bool:
        return any(c.kind == kind and (path is None or c.path == path) and all(getattr(c, k) == v for k, v in kw.items())
                   for c in changes)
    return pred


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Callable[..., Watcher]]]:
    root = tmp_path / "evidence"
    root.mkdir()
    watchers: list[Watcher] = []

    def make(**kw: object) -> Watcher:
        w = Watcher([RootConfig(path=str(root), **kw)])  # type: ignore[arg-type]
        w.start()
        watchers.append(w)
        return w

    yield root, make
    for w in watchers:
        w.stop()


def test_inotify_reports_create_rename_delete(watched) -> None:  # noqa: ANN001
    root, make = watched
    (root / "sub").mkdir()
    w = make()
    assert w.modes() == {str(root): "inotify"}
    a, b = root / "a.jpg", root / "sub" / "b.jpg"
    a.write_bytes(b"x" * 10)
    wait_changes(w, has("changed", str(a)), what="a created")
    a.rename(b)
    got = wait_changes(w, has("moved", str(a), dest=str(b)), what="a renamed")
    assert all(c.root == str(root) for c in got)
    b.unlink()
    wait_changes(w, has("deleted", str(b)), what="b deleted")
    (root / "sub" / "c.jpg").write_bytes(b"c")
    (root / "sub").rename(root / "renamed")
    wait_changes(w, lambda cs: has("dir_moved", str(root / "sub"))(cs)
                 and has("moved", str(root / "sub" / "c.jpg"), dest=str(root / "renamed" / "c.jpg"))(cs),
                 what="folder renamed with its file")
    shutil.rmtree(root / "renamed")
    wait_changes(w, has("dir_deleted", str(root / "renamed")), what="folder deleted")


def test_handler_errors_never_reach_watchdog(watched, monkeypatch) -> None:  # noqa: ANN001
    root, make = watched
    w = make()
    real = w._enqueue
    calls = {"n": 0}

    def flaky(r: str, event) -> None:  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected handler failure")
        real(r, event)

    monkeypatch.setattr(w, "_enqueue", flaky)
    (root / "first.jpg").write_bytes(b"1")  # its first event raises inside the handler
    deadline = time.monotonic() + 10
    while calls["n"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    (root / "second.jpg").write_bytes(b"2")
    got = wait_changes(w, lambda cs: has("changed", str(root / "second.jpg"))(cs)
                       and has("rescan", reason="handler_error")(cs), health=True,
                       what="later events and a rescan request after a handler error")
    assert w.roots[str(root)].restarts == 0  # the observer survived: nothing had to be restarted
    assert any(c.detail and "could not be handled" in c.detail for c in got)


def test_dead_observer_is_restarted_and_the_root_rescanned(watched) -> None:  # noqa: ANN001
    root, make = watched
    w = make()
    rw = w.roots[str(root)]
    rw.observer.stop()  # dies behind the watcher's back (as when a handler exception kills it)
    rw.observer.join(10)
    assert w.check_health() == [str(root)]
    assert rw.restarts == 1 and w._alive(rw.observer)
    (root / "after.jpg").write_bytes(b"z")
    wait_changes(w, lambda cs: has("rescan", reason="observer_restarted")(cs) and has("changed", str(root / "after.jpg"))(cs),
                 what="a rescan request and events from the new observer")
    assert w.check_health() == []  # healthy now


def test_watch_exhaustion_falls_back_to_polling(watched, monkeypatch) -> None:  # noqa: ANN001
    """When a probe watch fails with ENOSPC after scheduling, watchdog has silently skipped
    folders: the root polls instead, and the message names the sysctl. (The real exhaustion,
    in a user namespace with a tiny limit, is tested end to end in test_service.)"""
    root, make = watched
    probes = iter([errno.ENOSPC])
    w = Watcher([RootConfig(path=str(root), poll_interval=0.2)], probe=lambda p: next(probes, 0))
    w.start()
    try:
        assert w.modes() == {str(root): "polling"}
        got = wait_changes(w, has("rescan", reason="polling_fallback"), what="fallback notice")
        msg = next(c.detail for c in got if c.reason == "polling_fallback")
        assert "fs.inotify.max_user_watches" in msg and "sysctl" in msg and "polling" in msg
        (root / "polled.jpg").write_bytes(b"p")
        wait_changes(w, has("changed", str(root / "polled.jpg")), what="the polling observer to see a new file")
    finally:
        w.stop()


def test_inotify_overflow_is_detected(watched) -> None:  # noqa: ANN001
    root, make = watched
    try:
        old = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text("16")
    except OSError as err:
        pytest.skip(f"cannot lower fs.inotify.max_queued_events ({err}); run as root to test overflows")
    try:
        # the inotify instance takes the queue size when it is created, which may happen after
        # start() returns: keep the small size until an event shows that the watch is live
        w = make()
        (root / "probe.jpg").write_bytes(b"x")
        wait_changes(w, has("changed", str(root / "probe.jpg")), what="the watch to start")
    finally:
        QUEUE_SYSCTL.write_text(old)
    # bursts at C speed from four other processes (coreutils' touch), so that the watcher's
    # reader thread cannot keep up with a 16-event queue: the kernel drops events
    bursts = [subprocess.Popen(["touch", *(f"f{k}{i:05d}.jpg" for i in range(3000))], cwd=root) for k in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in bursts)
    got = wait_changes(w, has("rescan", reason="overflow"), what="an overflow notice")
    assert w.overflow_count >= 1
    assert "max_queued_events" in next(c.detail for c in got if c.reason == "overflow")


def test_lost_events_rescan_their_root_only(tmp_path: Path) -> None:
    """watchdog's EventsLostEvent (what it emits for an inotify overflow) reaches the handler and
    becomes one overflow rescan of the root it was lost under, counted, even with a full queue."""
    from watchdog.events import EventsLostEvent

    from daemon.watch import _Handler

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = Watcher([RootConfig(path=str(a)), RootConfig(path=str(b))], max_queued=0)
    w.start()
    try:
        for _ in range(2):
            _Handler(w, str(a)).dispatch(EventsLostEvent(str(a), is_directory=True))
        got = w.changes()
        assert [(c.kind, c.root, c.reason) for c in got] == [("rescan", str(a), "overflow")]
        assert "overflowed 2 time(s)" in (got[0].detail or "") and w.overflow_count == 2
        assert w.changes() == []
    finally:
        w.stop()


def test_queue_limit_turns_into_a_rescan(tmp_path: Path) -> None:
    root = tmp_path / "ev"
    root.mkdir()
    w = Watcher([RootConfig(path=str(root))], max_queued=5)
    w.start()
    try:
        for i in range(40):
            (root / f"f{i}.jpg").write_bytes(b"x")
        got = wait_changes(w, has("rescan", reason="queue_full"), what="a queue_full rescan")
        assert len([c for c in got if c.kind == "changed"]) <= 5 + 5  # bounded (one drain may refill)
    finally:
        w.stop()


# ------------------------------------------------------------------------------ network share


@pytest.fixture
def bindfs_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A read-only bindfs mount of a backing folder: writes to the backing folder are made
    "behind the watcher's back", as another host writing to a network share."""
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (apt-get install bindfs); it stands in for a network share")
    backing, mnt = tmp_path / "backing", tmp_path / "share"
    backing.mkdir()
    mnt.mkdir()
    r = subprocess.run(["bindfs", "-o", "ro", str(backing), str(mnt)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"bindfs cannot mount here (FUSE unavailable?): {r.stderr.strip()}")
    try:
        yield backing, mnt
    finally:
        unmount(mnt)


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True, timeout=30)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_polling_sees_writes_behind_the_watchers_back(bindfs_mount) -> None:  # noqa: ANN001
    backing, mnt = bindfs_mount
    (backing / "old.jpg").write_bytes(b"o")
    before = tree_manifest(backing)
    w = Watcher([RootConfig(path=str(mnt), polling=True, poll_interval=0.2)])
    w.start()
    try:
        assert w.modes() == {str(mnt): "polling"}
        (backing / "remote.jpg").write_bytes(b"written by another host")
        wait_changes(w, has("changed", str(mnt / "remote.jpg")), what="the polled share to show the new file")
        (backing / "remote.jpg").rename(backing / "renamed.jpg")
        wait_changes(w, has("moved", str(mnt / "remote.jpg"), dest=str(mnt / "renamed.jpg")), what="a rename on the share")
        assert w.root_intact(str(mnt))
        unmount(mnt)  # the share goes away: the mount point is an empty folder on another filesystem
        assert not w.root_intact(str(mnt))
    finally:
        w.stop()
    (backing / "renamed.jpg").rename(backing / "remote.jpg")
    (backing / "remote.jpg").unlink()
    assert tree_manifest(backing) == before
