"""The SQLite ledger's connection discipline: one connection behind a lock, transactions.

``SqliteLedger`` subclasses ``SqliteTransactions`` and sets the state declared here. Writes go
through ``_write`` (one durable transaction, or part of the enclosing ``transaction()``), reads
through ``_read``; both turn ``sqlite3`` errors into ``LedgerError`` naming the database. The
module also holds the run-existence checks and the round query that several methods share.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from conclave.core.errors import LedgerError
from conclave.core.records import RoundRecord
from conclave.core.types import TaskKind
from conclave.ledger.rows import ROUND_COLUMNS, round_record


class SqliteTransactions:
    """The connection, lock and transaction depth of a ``SqliteLedger``."""

    _db_path: Path
    _read_only: bool
    _lock: threading.RLock
    _tx_depth: int
    _known_runs: set[str]
    _conn: sqlite3.Connection | None

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One durable transaction (or part of the enclosing ``transaction()``); sqlite3
        errors become ``LedgerError``."""
        with self._lock:
            conn = self._connection()
            if self._read_only:
                raise LedgerError(f"cannot {what}: the ledger {self._db_path} is open read-only")
            if self._tx_depth:
                try:
                    yield conn
                except sqlite3.Error as exc:
                    raise LedgerError(f"cannot {what} in {self._db_path}: {exc}") from exc
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot {what} in {self._db_path}: {exc}") from exc

    def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None:
        # Runs are never deleted: a run id seen once needs no second look.
        if run_id not in self._known_runs:
            require_run(conn, run_id)
            self._known_runs.add(run_id)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the writes made inside into one durable transaction (nesting allowed): the
        coordinator records everything one event changed at once, before it answers."""
        with self._lock:
            conn = self._connection()
            outermost = self._tx_depth == 0
            if outermost and not self._read_only:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise LedgerError(f"cannot begin a transaction in {self._db_path}: "
                                      f"{exc}") from exc
            self._tx_depth += 1
            try:
                yield
            except BaseException:
                self._tx_depth -= 1
                if outermost and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._tx_depth -= 1
            if outermost and conn.in_transaction:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise LedgerError(f"cannot commit to {self._db_path}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except (sqlite3.Error, ValueError) as exc:
                raise LedgerError(f"cannot {what} from {self._db_path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"the ledger {self._db_path} is closed")
        return self._conn

    def _check_run(self, run_id: str, what: str, *, write: bool) -> None:
        """Raise unless ``run_id`` exists (and, for a write, the ledger is writable)."""
        with self._read(what) as conn:
            if write and self._read_only:
                raise LedgerError(f"cannot {what}: the ledger {self._db_path} is open read-only")
            self._require_run(conn, run_id)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# -- queries shared by several methods --------------------------------------------------------
def unknown_run(run_id: str) -> LedgerError:
    return LedgerError(f"unknown run {run_id!r}")


def run_exists(conn: sqlite3.Connection, run_id: str) -> bool:
    return conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None


def require_run(conn: sqlite3.Connection, run_id: str) -> None:
    if not run_exists(conn, run_id):
        raise unknown_run(run_id)


def fetch_round(
    conn: sqlite3.Connection, run_id: str, round: int, kind: TaskKind
) -> RoundRecord | None:
    row = conn.execute(
        f"SELECT {ROUND_COLUMNS} FROM rounds WHERE run_id = ? AND round = ? AND kind = ?",
        (run_id, round, kind.value),
    ).fetchone()
    return None if row is None else round_record(row)
