"""A pool of inference worker processes, one file at a time each, with crash and hang isolation.

Each worker loads the pipeline once, then takes ``Task``s over its own pipe and answers with an
outcome, in order. A worker holds up to ``depth`` tasks (default 2: the one it is analysing and
the next one, already in its pipe), so it never waits for the parent to record a result and
hand it more work; a task that was queued but not started when its worker died is handed to the
replacement worker as if nothing had happened (only the task being analysed counts as crashed).
Workers never write to the database (one writer: the parent); they may read it to skip content
already analysed under the current model bundle. A worker that dies (segfault, abort, OOM kill)
or exceeds ``file_timeout`` on a file is replaced, and the file comes back as
:class:`Crashed` so the writer can retry it a bounded number of times and then quarantine it.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from daemon.config import PipelineConfig
from daemon.pipeline import images, reading
from daemon.pipeline.analyze import ImageResult
from daemon.states import Reason

log = logging.getLogger(__name__)

# Test-only hook: a worker aborts (as a crashing decoder would) on any path containing this
# marker. Only read from the environment of the worker process; unset in production.
ABORT_MARKER_ENV = "FORENSIC_GENDER_TEST_ABORT_MARKER"


@dataclass(frozen=True)
class Task:
    """One file to analyse: its OS path and, for evidence under a root, the root and the inode
    discovery saw (the reader opens it beneath the root and checks it is that file)."""

    file_id: int
    path: str
    root: str | None = None
    inode: int | None = None


@dataclass(frozen=True)
class Analysed:
    file_id: int
    result: ImageResult


@dataclass(frozen=True)
class Linked:
    file_id: int
    sha256: str
    md5: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Failed:
    file_id: int
    reason: Reason
    error: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Crashed:
    file_id: int
    reason: Reason  # worker_crashed | worker_timeout
    error: str


@dataclass(frozen=True)
class Progress:
    """Not an outcome: a worker analysing a long file (a video, frame by frame) is not hung."""

    file_id: int


Outcome = Analysed | Linked | Failed | Crashed


class WorkerStartError(Exception):
    """A worker could not load the pipeline (models missing, wrong file...)."""


def _worker_main(conn: Connection, cfg: PipelineConfig, db_url: str | None, threads: int) -> None:
    """Entry point of a worker process."""
    from daemon.pipeline.analyze import load_pipeline
    from daemon.store.engine import open_engine

    marker = os.environ.get(ABORT_MARKER_ENV)
    try:
        pipeline = load_pipeline(cfg, threads=threads)
        engine = open_engine(db_url, readonly=True) if db_url else None
    except Exception as err:  # reported to the parent, which fails start-up with the message
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", pipeline.bundle_key, pipeline.bundle))
    todo: deque = deque()
    while True:
        try:
            if not todo:
                todo.append(conn.recv())
            while conn.poll(0):  # a stop request overtakes queued tasks: stop after the current file
                todo.append(conn.recv())
        except EOFError:
            return
        if None in todo:
            return
        task = todo.popleft()
        if marker and marker in task.path:
            os.abort()
        conn.send(_process(pipeline, engine, task, functools.partial(conn.send, Progress(task.file_id))))


def _process(pipeline, engine, task: Task, progress: Callable[[], None] | None = None) -> Outcome:  # noqa: ANN001
    from daemon.pipeline.sessions import ModelOutputError
    from daemon.store.writer import analysed

    seen: list[reading.FileHash] = []

    def known(fh: reading.FileHash) -> bool:  # hashed: analysed already under this bundle?
        seen.append(fh)
        if engine is None:
            return False
        with engine.connect() as conn:
            return analysed(conn, fh.sha256, pipeline.bundle_key)

    def failed(reason: Reason, error: str) -> Failed:
        h = seen[0] if seen else None
        return Failed(task.file_id, reason, error, *((h.sha256, h.md5, h.size) if h else ()))

    try:
        got = pipeline.analyze_path(task.path, root=task.root, inode=task.inode, known=known, progress=progress)
        if isinstance(got, ImageResult):
            return Analysed(task.file_id, got)
        return Linked(task.file_id, got.sha256, got.md5, got.size, got.mtime_ns)
    except images.ImageError as err:
        return failed(err.reason, str(err))
    except ModelOutputError as err:
        return failed(Reason.MODEL_OUTPUT, str(err))
    except MemoryError:
        return failed(Reason.OUT_OF_MEMORY, "decoding or analysing the file ran out of memory")
    except Exception as err:  # a bug: keep going, but record it loudly
        log.error("internal error on %s:\n%s", task.path, traceback.format_exc())
        return failed(Reason.INTERNAL_ERROR, f"{type(err).__name__}: {err}")


class _Worker:
    def __init__(self, ctx, cfg: PipelineConfig, db_url: str | None, threads: int) -> None:  # noqa: ANN001
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, cfg, db_url, threads), daemon=True)
        self.proc.start()
        child.close()
        self.tasks: deque[Task] = deque()  # sent and not answered yet, in order; tasks[0] is running
        self.since = 0.0  # when tasks[0] started (at the latest)


class WorkerPool:
    """``n`` worker processes. Use from one thread: ``submit`` when ``free()``, then ``poll``.

    ``free()`` counts task slots: each worker takes up to ``depth`` tasks (the one it analyses
    and ``depth - 1`` queued behind it), so that it never idles while the caller records.
    """

    def __init__(self, n: int, cfg: PipelineConfig, *, db_url: str | None, file_timeout: float = 120.0,
                 threads: int = 1, start_timeout: float = 300.0, depth: int = 2) -> None:
        self.n, self.cfg, self.db_url, self.file_timeout, self.threads = n, cfg, db_url, file_timeout, threads
        self.start_timeout = start_timeout
        self.depth = max(1, depth)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self.bundle_key = ""
        self.bundle: dict = {}
        self.restarts = 0

    def start(self) -> None:
        """Start every worker and wait until each has loaded its models."""
        self._workers = [self._spawn() for _ in range(self.n)]
        for w in self._workers:
            self._await_ready(w)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.cfg, self.db_url, self.threads)

    def _await_ready(self, w: _Worker) -> None:
        if not w.conn.poll(self.start_timeout):
            raise WorkerStartError(f"a worker did not load its models within {self.start_timeout:.0f} s")
        try:
            msg = w.conn.recv()
        except EOFError as err:
            raise WorkerStartError(f"a worker died while loading its models (exit code {w.proc.exitcode})") from err
        if msg[0] == "error":
            raise WorkerStartError(msg[1])
        self.bundle_key, self.bundle = msg[1], msg[2]

    def free(self) -> int:
        return sum(self.depth - len(w.tasks) for w in self._workers)

    def busy(self) -> list[Task]:
        """Every task handed out and not answered yet (analysing or queued)."""
        return [t for w in self._workers for t in w.tasks]

    def submit(self, task: Task) -> None:
        """Give ``task`` to the least loaded worker (an idle one first)."""
        w = min((w for w in self._workers if len(w.tasks) < self.depth), key=lambda w: len(w.tasks))
        self._send(w, task)

    def _send(self, w: _Worker, task: Task) -> None:
        if not w.tasks:
            w.since = time.monotonic()
        w.tasks.append(task)
        w.conn.send(task)

    def poll(self, timeout: float) -> list[Outcome]:
        """Wait up to ``timeout`` s for outcomes; replaces dead or hung workers."""
        active = [w for w in self._workers if w.tasks]
        out: list[Outcome] = []
        if not active:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return out
        ready = wait([w.conn for w in active] + [w.proc.sentinel for w in active], timeout)
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if not w.tasks:
                continue
            if w.conn in ready:
                try:
                    while w.tasks and w.conn.poll(0):  # every answer already there, in order
                        msg = w.conn.recv()
                        w.since = now  # progress on tasks[0], or the next queued task started when this answer was sent
                        if not isinstance(msg, Progress):
                            out.append(msg)
                            w.tasks.popleft()
                except (EOFError, OSError):
                    pass
                if not w.tasks:
                    continue
                if w.proc.is_alive() and w.proc.sentinel not in ready and now - w.since <= self.file_timeout:
                    continue
            dead = w.proc.sentinel in ready or not w.proc.is_alive()
            hung = now - w.since > self.file_timeout
            if dead or hung:
                if hung and not dead:
                    w.proc.kill()
                w.proc.join(5)
                task = w.tasks.popleft()
                reason = Reason.WORKER_TIMEOUT if hung and not dead else Reason.WORKER_CRASHED
                detail = (f"analysis took longer than {self.file_timeout:.0f} s; the worker was killed" if reason == Reason.WORKER_TIMEOUT
                          else f"the worker process died (exit code {w.proc.exitcode}) while analysing this file")
                log.error("%s: %s", task.path, detail)
                out.append(Crashed(task.file_id, reason, detail))
                queued = list(w.tasks)
                self._workers[i] = self._spawn()
                self._await_ready(self._workers[i])
                self.restarts += 1
                for t in queued:  # never started: the replacement takes them, no attempt counted
                    self._send(self._workers[i], t)
        return out

    def close(self) -> None:
        """Stop the workers (after their current file; queued tasks are dropped: callers
        release what ``busy()`` still lists)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
        self._workers = []
