"""The SQLite ledger's database: its tables, the schema version stored in
``PRAGMA user_version`` (with migrations from older versions), and opening connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conclave.core.errors import LedgerError

SCHEMA_VERSION = 2

# How to bring a database of version ``n`` up to ``n + 1``.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE rounds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",),
}

_TABLES = """
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    spec_toml   TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE TABLE rounds (
    run_id        TEXT NOT NULL REFERENCES runs(run_id),
    round         INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL,
    selected      TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL,
    model_digest  TEXT NOT NULL DEFAULT '',
    metrics       TEXT NOT NULL DEFAULT '{}',
    reason        TEXT NOT NULL DEFAULT '',
    attempt       INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (run_id, round, kind)
);
CREATE TABLE participant_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL REFERENCES runs(run_id),
    participant  TEXT NOT NULL,
    state        TEXT NOT NULL,
    at           REAL NOT NULL,
    detail       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX participant_events_by_run ON participant_events (run_id, participant);
CREATE TABLE contributions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT NOT NULL REFERENCES runs(run_id),
    round          INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    participant    TEXT NOT NULL,
    status         TEXT NOT NULL,
    weight         INTEGER NOT NULL,
    metrics        TEXT NOT NULL DEFAULT '{}',
    digest         TEXT NOT NULL DEFAULT '',
    reason         TEXT NOT NULL DEFAULT '',
    received_at    REAL NOT NULL,
    train_seconds  REAL NOT NULL
);
CREATE INDEX contributions_by_round ON contributions (run_id, round);
CREATE TABLE checkpoints (
    run_id  TEXT NOT NULL REFERENCES runs(run_id),
    round   INTEGER NOT NULL,
    digest  TEXT NOT NULL,
    path    TEXT NOT NULL,
    nbytes  INTEGER NOT NULL,
    PRIMARY KEY (run_id, round)
);
"""


def connect_read_write(db_path: Path, timeout_s: float, *,
                       power_loss_safe: bool = False) -> sqlite3.Connection:
    """Open (creating or migrating) the database in WAL mode, ``synchronous=FULL`` when it
    must survive power loss, else ``NORMAL`` (survives the process dying)."""
    conn = sqlite3.connect(
        db_path, timeout=timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"cannot put {db_path} in WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if power_loss_safe else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        # a damaged page found now is an error naming the file, not a run built on it
        problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise LedgerError(f"ledger {db_path} is damaged ({' '.join(str(problem).split())}); "
                              "restore it from a backup or move it away")
        ensure_schema(conn, str(db_path))
    except BaseException:
        conn.close()
        raise
    return conn


def connect_read_only(db_path: Path, timeout_s: float) -> tuple[sqlite3.Connection, int]:
    """Open an existing database for reading; returns it with its schema version (an older
    version cannot be migrated through a read-only connection: the caller adapts)."""
    uri = f"{db_path.as_uri()}?mode=ro"
    conn = sqlite3.connect(
        uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA query_only = ON")
        version = schema_version(conn)
        check_version(version, str(db_path))
    except BaseException:
        conn.close()
        raise
    return conn, version


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def ensure_schema(conn: sqlite3.Connection, source: str) -> None:
    """Create the tables in a new database, or check an existing one and migrate it to
    ``SCHEMA_VERSION`` (all in one transaction: a failed migration changes nothing).

    ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        if version == 0:
            if _has_tables(conn):
                raise LedgerError(f"{source} holds tables but is not a Conclave ledger")
            for statement in _TABLES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        else:
            check_version(version, source)
            if version < SCHEMA_VERSION:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def check_version(version: int, source: str) -> None:
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{source} has ledger schema version {version}; this Conclave reads up to "
            f"{SCHEMA_VERSION}. Upgrade Conclave to open it."
        )
    if version < 1:
        raise LedgerError(f"{source} is not a Conclave ledger (schema version {version})")


def _has_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    return int(row[0]) > 0
