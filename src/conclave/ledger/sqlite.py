"""The durable ledger: one SQLite database (WAL mode) plus checkpoint files in a state folder.

Layout of a state directory::

    <state_dir>/ledger.sqlite                        runs, rounds, events, contributions, ...
    <state_dir>/checkpoints/<run>/round-00001.ckpt   one global model per committed FIT round
    <state_dir>/spool/<run>/round-00002/<name>.upd   accepted updates of the round in progress

Every write method is one transaction with ``synchronous=FULL``: when it returns, the write
survives a crash or power loss. ``commit_round`` first writes the checkpoint file atomically,
then marks the round committed and records the checkpoint in one transaction, so a committed
round always has its checkpoint. One connection serves all threads, guarded by a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from conclave.core.errors import LedgerError
from conclave.core.parameters import Parameters
from conclave.core.records import (
    CheckpointRecord,
    ContributionRecord,
    ParticipantEvent,
    RoundRecord,
    RunRecord,
)
from conclave.core.types import (
    ContributionStatus,
    ParticipantState,
    RoundStatus,
    RunStatus,
    TaskKind,
)
from conclave.ledger.checkpoint_file import (
    delete_checkpoint_files,
    read_checkpoint_with_state,
    write_checkpoint,
)
from conclave.ledger.lifecycle import (
    check_committable,
    check_finishable,
    check_startable,
    checkpoint_relpath,
    checkpoints_to_prune,
    latest_usable,
    round_sort_key,
)
from conclave.ledger.rows import (
    CONTRIBUTION_COLUMNS,
    ROUND_COLUMNS,
    ROUND_COLUMNS_V1,
    RUN_COLUMNS,
    contribution_record,
    dump_metrics,
    round_record,
    run_record,
)
from conclave.ledger.schema import connect_read_only, connect_read_write
from conclave.ledger.spool import SpoolFolder
from conclave.ledger.transactions import (
    SqliteTransactions,
    fetch_round,
    run_exists,
    unknown_run,
)

DB_NAME = "ledger.sqlite"
LOCK_NAME = "ledger.lock"
_BUSY_TIMEOUT_S = 10.0


class SqliteLedger(SqliteTransactions):
    """A ``Ledger`` stored in ``state_dir`` (created if missing). Its connection, locking and
    transactions (``transaction()``, ``close()``) live in ``transactions``."""

    def __init__(self, state_dir: Path, *, read_only: bool = False,
                 power_loss_safe: bool = False) -> None:
        """``power_loss_safe``: fsync every transaction (SQLite ``synchronous=FULL``). By
        default (``NORMAL`` in WAL mode) every write is durable against the coordinator
        process dying (SIGKILL, crash) and the database stays consistent; a power cut or an
        operating-system crash may lose the last few transactions. Checkpoint and spool files
        are fsynced either way."""
        self._state_dir = Path(state_dir).resolve()
        self._db_path = self._state_dir / DB_NAME
        self._read_only = read_only
        self._lock = threading.RLock()
        self._tx_depth = 0
        self._known_runs = set()
        self._conn = None
        self._lock_fd: int | None = None
        self._spool = SpoolFolder(self._state_dir)
        # A version-1 database opened read-only cannot be migrated: read attempt as 1.
        self._round_columns = ROUND_COLUMNS
        try:
            if read_only:
                if not self._db_path.is_file():
                    raise LedgerError(f"no ledger in {self._state_dir} (missing {DB_NAME})")
                self._conn, version = connect_read_only(self._db_path, _BUSY_TIMEOUT_S)
                if version == 1:
                    self._round_columns = ROUND_COLUMNS_V1
            else:
                if self._state_dir.exists() and not self._state_dir.is_dir():
                    raise LedgerError(f"state directory {self._state_dir} is a file, not a "
                                      "folder")
                self._state_dir.mkdir(parents=True, exist_ok=True)
                self._lock_fd = _lock_state_dir(self._state_dir)
                self._conn = connect_read_write(self._db_path, _BUSY_TIMEOUT_S,
                                                power_loss_safe=power_loss_safe)
        except sqlite3.Error as exc:
            self.close()
            raise LedgerError(f"cannot open ledger {self._db_path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the state directory's lock

    @classmethod
    def open_read_only(cls, state_dir: Path) -> SqliteLedger:
        """Open an existing state directory for reading (``conclave ledger show``)."""
        return cls(state_dir, read_only=True)

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def db_path(self) -> Path:
        return self._db_path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs -------------------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> None:
        with self._write(f"create run {run.run_id!r}") as conn:
            if run_exists(conn, run.run_id):
                raise LedgerError(f"run {run.run_id!r} already exists")
            conn.execute(
                "INSERT INTO runs (run_id, name, spec_toml, seed, status, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    run.name,
                    run.spec_toml,
                    run.seed,
                    run.status.value,
                    run.reason,
                    run.created_at,
                ),
            )

    def get_run(self, run_id: str) -> RunRecord:
        with self._read(f"read run {run_id!r}") as conn:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                raise unknown_run(run_id)
            return run_record(row)

    def runs(self) -> Sequence[RunRecord]:
        with self._read("list runs") as conn:
            rows = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs ORDER BY created_at, rowid"
            ).fetchall()
            return [run_record(row) for row in rows]

    def set_run_status(self, run_id: str, status: RunStatus, reason: str = "") -> None:
        with self._write(f"set the status of run {run_id!r}") as conn:
            cursor = conn.execute(
                "UPDATE runs SET status = ?, reason = ? WHERE run_id = ?",
                (status.value, reason, run_id),
            )
            if cursor.rowcount == 0:
                raise unknown_run(run_id)

    # -- participants -----------------------------------------------------------------------
    def record_participant_event(self, event: ParticipantEvent) -> None:
        self.record_participant_events((event,))

    def record_participant_events(self, events: Sequence[ParticipantEvent]) -> None:
        if not events:
            return
        with self._write(f"record {len(events)} participant event(s)") as conn:
            for run_id in {e.run_id for e in events}:
                self._require_run(conn, run_id)
            conn.executemany(
                "INSERT INTO participant_events (run_id, participant, state, at, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                [(e.run_id, e.participant, e.state.value, e.at, e.detail) for e in events],
            )

    def participant_events(
        self, run_id: str, participant: str | None = None
    ) -> Sequence[ParticipantEvent]:
        with self._read(f"read participant events of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            sql = "SELECT run_id, participant, state, at, detail FROM participant_events "
            sql += "WHERE run_id = ?" + ("" if participant is None else " AND participant = ?")
            args = (run_id,) if participant is None else (run_id, participant)
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
            return [
                ParticipantEvent(
                    run_id=r[0],
                    participant=r[1],
                    state=ParticipantState(r[2]),
                    at=r[3],
                    detail=r[4],
                )
                for r in rows
            ]

    # -- rounds -----------------------------------------------------------------------------
    def start_round(self, record: RoundRecord) -> None:
        label = f"start round {record.round} of run {record.run_id!r}"
        with self._write(label) as conn:
            self._require_run(conn, record.run_id)
            check_startable(fetch_round(conn, record.run_id, record.round, record.kind), record)
            conn.execute(
                f"INSERT OR REPLACE INTO rounds ({ROUND_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.run_id,
                    record.round,
                    record.kind.value,
                    record.status.value,
                    json.dumps(list(record.selected)),
                    record.started_at,
                    record.finished_at,
                    record.model_digest,
                    dump_metrics(record.metrics),
                    record.reason,
                    record.attempt,
                ),
            )

    def finish_round(
        self,
        run_id: str,
        round: int,
        kind: TaskKind,
        status: RoundStatus,
        *,
        finished_at: float,
        metrics: Mapping[str, float] | None = None,
        reason: str = "",
    ) -> None:
        with self._write(f"finish round {round} of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            current = check_finishable(
                fetch_round(conn, run_id, round, kind), run_id, round, kind, status
            )
            conn.execute(
                "UPDATE rounds SET status = ?, finished_at = ?, metrics = ?, reason = ? "
                "WHERE run_id = ? AND round = ? AND kind = ?",
                (
                    status.value,
                    finished_at,
                    dump_metrics(current.metrics if metrics is None else metrics),
                    reason,
                    run_id,
                    round,
                    kind.value,
                ),
            )

    def invalidate_round(self, run_id: str, round: int, reason: str) -> None:
        with self._write(f"invalidate round {round} of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "UPDATE rounds SET status = ?, reason = ? WHERE run_id = ? AND round >= ?",
                (RoundStatus.FAILED.value, reason, run_id, round),
            )
            conn.execute("DELETE FROM checkpoints WHERE run_id = ? AND round >= ?",
                         (run_id, round))
            _supersede(conn, run_id, "round >= ?", round, reason)

    def supersede_contributions(self, run_id: str, round: int, reason: str) -> None:
        with self._write(f"supersede contributions of round {round} of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            _supersede(conn, run_id, "round = ?", round, reason)

    def commit_round(
        self,
        run_id: str,
        round: int,
        parameters: Parameters,
        *,
        finished_at: float,
        metrics: Mapping[str, float] | None = None,
        strategy_state: Parameters | None = None,
    ) -> CheckpointRecord:
        relpath = checkpoint_relpath(run_id, round)
        path = self._state_dir / relpath
        digest = parameters.digest()
        written = False
        try:
            with self._write(f"commit round {round} of run {run_id!r}") as conn:
                self._require_run(conn, run_id)
                current = check_committable(
                    fetch_round(conn, run_id, round, TaskKind.FIT), run_id, round
                )
                nbytes = write_checkpoint(path, parameters, digest=digest, state=strategy_state)
                written = True
                conn.execute(
                    "UPDATE rounds SET status = ?, finished_at = ?, model_digest = ?, "
                    "metrics = ? WHERE run_id = ? AND round = ? AND kind = ?",
                    (
                        RoundStatus.COMMITTED.value,
                        finished_at,
                        digest,
                        dump_metrics(current.metrics if metrics is None else metrics),
                        run_id,
                        round,
                        TaskKind.FIT.value,
                    ),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO checkpoints (run_id, round, digest, path, nbytes) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (run_id, round, digest, relpath.as_posix(), nbytes),
                )
        except BaseException:
            if written:
                path.unlink(missing_ok=True)
            raise
        return CheckpointRecord(
            run_id=run_id, round=round, digest=digest, path=str(path), nbytes=nbytes
        )

    def rounds(self, run_id: str) -> Sequence[RoundRecord]:
        with self._read(f"read rounds of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                f"SELECT {self._round_columns} FROM rounds WHERE run_id = ?", (run_id,)
            ).fetchall()
            return sorted((round_record(row) for row in rows), key=round_sort_key)

    # -- contributions ----------------------------------------------------------------------
    def record_contribution(self, record: ContributionRecord) -> None:
        label = f"record a contribution of {record.participant!r}"
        with self._write(label) as conn:
            self._require_run(conn, record.run_id)
            conn.execute(
                f"INSERT INTO contributions ({CONTRIBUTION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.run_id,
                    record.round,
                    record.kind.value,
                    record.participant,
                    record.status.value,
                    record.weight,
                    dump_metrics(record.metrics),
                    record.digest,
                    record.reason,
                    record.received_at,
                    record.train_seconds,
                ),
            )

    def contributions(self, run_id: str, round: int | None = None) -> Sequence[ContributionRecord]:
        with self._read(f"read contributions of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            sql = f"SELECT {CONTRIBUTION_COLUMNS} FROM contributions WHERE run_id = ?"
            sql += "" if round is None else " AND round = ?"
            args = (run_id,) if round is None else (run_id, round)
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
            return [contribution_record(row) for row in rows]

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoints(self, run_id: str) -> Sequence[CheckpointRecord]:
        with self._read(f"read checkpoints of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT run_id, round, digest, path, nbytes FROM checkpoints "
                "WHERE run_id = ? ORDER BY round",
                (run_id,),
            ).fetchall()
            return [self._checkpoint_record(row) for row in rows]

    def load_checkpoint(self, run_id: str, round: int) -> Parameters:
        return self._load_checkpoint(run_id, round)[0]

    def load_strategy_state(self, run_id: str, round: int) -> Parameters | None:
        return self._load_checkpoint(run_id, round)[1]

    def _load_checkpoint(self, run_id: str, round: int) -> tuple[Parameters, Parameters | None]:
        with self._read(f"read the checkpoint of round {round} of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT run_id, round, digest, path, nbytes FROM checkpoints "
                "WHERE run_id = ? AND round = ?",
                (run_id, round),
            ).fetchone()
            if row is None:
                raise LedgerError(f"run {run_id!r} has no checkpoint for round {round}")
            record = self._checkpoint_record(row)
        return read_checkpoint_with_state(Path(record.path), expected_digest=record.digest)

    def prune_checkpoints(self, run_id: str, *, keep_last: int, keep_every: int) -> list[int]:
        """Delete the rows in one transaction, then the files: a crash in between leaves
        only unreferenced files behind, never a row without its file."""
        with self._write(f"prune checkpoints of run {run_id!r}") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT round, path FROM checkpoints WHERE run_id = ?", (run_id,)
            ).fetchall()
            paths = {int(r): self._state_dir / p for r, p in rows}
            doomed = checkpoints_to_prune(paths, keep_last=keep_last, keep_every=keep_every)
            conn.executemany(
                "DELETE FROM checkpoints WHERE run_id = ? AND round = ?",
                [(run_id, r) for r in doomed],
            )
        delete_checkpoint_files([paths[r] for r in doomed])
        return doomed

    def latest_checkpoint(self, run_id: str) -> tuple[int, Parameters, list[str]] | None:
        rounds = [c.round for c in self.checkpoints(run_id)]
        return latest_usable(rounds, lambda r: self.load_checkpoint(run_id, r))

    # -- update spool -----------------------------------------------------------------------
    def spool_update(
        self, run_id: str, round: int, participant: str, parameters: Parameters
    ) -> None:
        self._check_run(run_id, f"spool an update of {participant!r}", write=True)
        self._spool.write(run_id, round, participant, parameters)

    def spooled_participants(self, run_id: str, round: int) -> Sequence[str]:
        self._check_run(run_id, f"list spooled updates of round {round}", write=False)
        return self._spool.participants(run_id, round)

    def load_spooled(self, run_id: str, round: int, participant: str) -> Parameters:
        self._check_run(run_id, f"read the spooled update of {participant!r}", write=False)
        return self._spool.read(run_id, round, participant)

    def clear_spool(self, run_id: str, up_to_round: int) -> None:
        self._check_run(run_id, f"clear spooled updates up to round {up_to_round}", write=True)
        self._spool.clear(run_id, up_to_round)

    def _checkpoint_record(self, row: tuple[Any, ...]) -> CheckpointRecord:
        return CheckpointRecord(
            run_id=row[0],
            round=row[1],
            digest=row[2],
            path=str(self._state_dir / row[3]),
            nbytes=row[4],
        )


def _supersede(conn: sqlite3.Connection, run_id: str, where: str, round: int,
               reason: str) -> None:
    conn.execute(
        "UPDATE contributions SET status = ?, "
        "reason = CASE WHEN reason = '' THEN ? ELSE reason || '; ' || ? END "
        f"WHERE run_id = ? AND {where} AND kind = ? AND status = ?",
        (ContributionStatus.SUPERSEDED.value, reason, reason, run_id, round,
         TaskKind.FIT.value, ContributionStatus.ACCEPTED.value),
    )


def _lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this process alone (an exclusive ``flock`` on
    ``ledger.lock``, holding the owner's pid), so two coordinators can never write one ledger.
    The operating system releases it when the process ends, however it ends (SIGKILL too)."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LedgerError(
            f"state directory {state_dir} is in use by another process (pid {owner}); two "
            "coordinators must not share one ledger: stop the other one first, or use "
            "another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd
