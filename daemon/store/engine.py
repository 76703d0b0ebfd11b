"""Engine set-up per dialect, and running the schema migrations (:mod:`daemon.store.migrations`).

SQLite: WAL, foreign keys on, a busy timeout, and write transactions that begin IMMEDIATE (a
deferred transaction that reads and then writes fails at once with "database is locked",
ignoring the busy timeout). Read-only engines use plain deferred transactions.
PostgreSQL: pre-ping, and migrations serialized by an advisory lock so that several hosts
starting at once create the schema exactly once.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from daemon.store import schema
from daemon.store.migrations import LATEST, STEPS

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK = 7_305_151_001  # arbitrary advisory-lock key for this application


class StoreError(Exception):
    """The database cannot be used (bad URL, unreachable, newer schema than this code)."""


def open_engine(url: str, *, readonly: bool = False) -> Engine:
    """An engine for ``url`` with the per-dialect settings above (no schema changes)."""
    try:
        u = make_url(url)
    except ArgumentError as err:
        raise StoreError(f"database: {url!r} is not a database URL; use sqlite:///path/to/file.db or postgresql+psycopg://user@host/db") from err
    try:
        if u.get_backend_name() == "sqlite":
            return _sqlite(url, u.database, readonly)
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    except (NoSuchModuleError, ModuleNotFoundError) as err:
        raise StoreError(f"database: no driver for {u.drivername!r} ({err}); for PostgreSQL install the extra: pip install 'forensic-gender[postgres]' and use postgresql+psycopg://") from err


def _sqlite(url: str, database: str | None, readonly: bool) -> Engine:
    memory = not database or database == ":memory:" or database.startswith("file:")
    path = None if memory else os.path.abspath(database)
    creator = None
    if path is not None:
        parent = os.path.dirname(path)
        if not readonly:
            _check_writable(path)
            os.makedirs(parent, exist_ok=True)
        else:
            if not os.path.exists(path):
                raise StoreError(f"database: {path} does not exist; run `forensic-gender scan` or the service first, or pass --db")
            creator = functools.partial(_connect_readonly, path)
    args = {"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    engine = create_engine(url, connect_args=args, creator=creator) if creator else create_engine(url, connect_args=args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def require_writable(url: str) -> None:
    """Raise :class:`StoreError` with what to do when ``url`` is a SQLite database this user
    cannot write (call before anything else touches its folder, e.g. a lock file beside it).
    Other databases: nothing to check here."""
    try:
        u = make_url(url)
    except ArgumentError:
        return
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        _check_writable(os.path.abspath(u.database))


def _check_writable(path: str) -> None:
    """Raise :class:`StoreError` saying what to do when a writable SQLite database cannot be
    kept at ``path``: the file, or the folder that must hold it and its ``-wal`` / ``-shm``
    files, is read-only for this user (or on a read-only file system)."""
    parent = os.path.dirname(path)
    folder = parent
    while folder and not os.path.exists(folder):  # the nearest folder that exists is where it would be created
        folder = os.path.dirname(folder)
    who = _user()
    fix = ("give that user write access (chown or chmod the folder), or point --db / database: at a writable place, "
           "e.g. sqlite:////var/lib/forensic-gender/forensic-gender.db")
    if folder and not os.access(folder, os.W_OK):
        what = "the folder" if folder == parent else f"the folder {parent} does not exist and its parent"
        raise StoreError(f"database: {path} must be in a folder this user ({who}) may write, but {what} {folder} is read-only "
                         f"(the database needs its -wal and -shm files beside it); {fix}; read-only commands (stats, faces, "
                         "images, show, export, serve --no-review) can read it as it is")
    for p in (path, path + "-wal", path + "-shm"):
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise StoreError(f"database: {p} must be writable by this user ({who}), but it is read-only; {fix}")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only SQLite connection (``mode=ro``: nothing is ever written, not even a journal).

    A database in write-ahead-log mode needs its ``-shm`` index to be read; when the folder is
    read-only and no ``-shm``/``-wal`` exists (the last writer closed cleanly: every committed
    change is in the main file), the database is opened ``immutable``: nothing can be written
    there, and a writer, which would first have to create the ``-wal`` file, is not running. A
    ``-wal`` left without its index (a writer that died) cannot be read from a read-only folder:
    that is refused with what to do, rather than reading stale data."""
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as err:
        conn.close()
        name = getattr(err, "sqlite_errorname", "")
        if name not in ("SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN", "SQLITE_READONLY_CANTINIT", "SQLITE_READONLY_RECOVERY"):
            raise
        if os.path.exists(path + "-wal"):
            raise StoreError(
                f"database: {path} cannot be read: its write-ahead log {path}-wal must be indexed in {path}-shm, which "
                f"cannot be created in the read-only folder {os.path.dirname(path)} ({err}); open the database once as a user "
                "who may write that folder (any forensic-gender command, e.g. `forensic-gender stats`), or copy the "
                "database with its -wal file to a writable folder and pass that with --db") from err
    log.info("database %s: its folder is read-only and it has no write-ahead log; opened as an immutable file", path)
    conn = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    return conn


# The steps themselves, by number and name, are in :mod:`daemon.store.migrations`; this module
# runs them. ``MIGRATIONS[i]`` brings the schema to version i + 1.
MIGRATIONS: list[Callable[[Connection], None]] = [step.apply for step in STEPS]
SCHEMA_VERSION = LATEST


def schema_version(conn: Connection) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    if not conn.dialect.has_table(conn, "meta"):
        return 0
    row = conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")).first()
    return int(row[0]) if row else 0


def migrate(engine: Engine) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`, one transaction per step; safe when several
    processes or hosts call it at once. Returns the version."""
    for attempt in range(30):
        try:
            return _migrate(engine)
        except OperationalError as err:
            if _readonly_error(err):
                raise StoreError(f"database {engine.url.render_as_string(hide_password=True)}: cannot write ({err.orig}); "
                                 "the database file or its folder is read-only for this user: give it write access, or use a "
                                 "writable --db") from err
            if attempt == 29:
                raise StoreError(f"database {engine.url.render_as_string(hide_password=True)}: cannot migrate the schema ({err.orig}); is the server up?") from err
            time.sleep(min(2.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


def _readonly_error(err: OperationalError) -> bool:
    """Whether ``err`` says the database cannot be written at all (retrying cannot help)."""
    name = getattr(err.orig, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_READONLY") or "readonly database" in str(err.orig)


def _migrate(engine: Engine) -> int:
    while True:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema is version {version}, this forensic-gender knows up to {SCHEMA_VERSION}; upgrade forensic-gender"
                )
            if version == SCHEMA_VERSION:
                return version
            step = STEPS[version]
            log.info("migrating database schema %d -> %d (%s)", version, step.version, step.name)
            step.apply(conn)
            if version == 0:
                conn.execute(schema.meta.insert().values(key="schema_version", value="1"))
            else:
                conn.execute(schema.meta.update().where(schema.meta.c.key == "schema_version").values(value=str(version + 1)))


def open_store_engine(url: str) -> Engine:
    """A writable engine with the schema migrated."""
    engine = open_engine(url)
    migrate(engine)
    return engine
