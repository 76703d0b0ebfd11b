"""Engine set-up per dialect and schema migrations.

SQLite: WAL, foreign keys on, a busy timeout, and write transactions that begin IMMEDIATE (a
deferred transaction that reads and then writes fails at once with "database is locked",
ignoring the busy timeout). Read-only engines use plain deferred transactions.
PostgreSQL: pre-ping, and migrations serialized by an advisory lock so that several hosts
starting at once create the schema exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from daemon.store import schema

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
    if database and database != ":memory:":
        parent = Path(database).parent
        if not readonly:
            parent.mkdir(parents=True, exist_ok=True)
        elif not Path(database).exists():
            raise StoreError(f"database: {database} does not exist; run `forensic-gender scan` or the service first, or pass --db")
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

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


def _v1(conn: Connection) -> None:
    schema.metadata.create_all(conn)


def _v2_reviews(conn: Connection) -> None:
    from daemon.store.reviews import migrate_v2

    migrate_v2(conn)


def _v3_sort_indexes(conn: Connection) -> None:
    schema.migrate_v3(conn)


# Each migration runs in its own transaction; index i brings the schema to version i + 1.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2_reviews, _v3_sort_indexes, schema.migrate_v4,
                                                   schema.migrate_v5]
SCHEMA_VERSION = len(MIGRATIONS)


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
            if attempt == 29:
                raise StoreError(f"database {engine.url.render_as_string(hide_password=True)}: cannot migrate the schema ({err.orig}); is the server up?") from err
            time.sleep(min(2.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


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
            log.info("migrating database schema %d -> %d", version, version + 1)
            MIGRATIONS[version](conn)
            if version == 0:
                conn.execute(schema.meta.insert().values(key="schema_version", value="1"))
            else:
                conn.execute(schema.meta.update().where(schema.meta.c.key == "schema_version").values(value=str(version + 1)))


def open_store_engine(url: str) -> Engine:
    """A writable engine with the schema migrated."""
    engine = open_engine(url)
    migrate(engine)
    return engine
