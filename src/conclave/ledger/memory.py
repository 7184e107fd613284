"""An in-memory ledger for tests and simulations that need no state directory.

It follows the same contract as ``SqliteLedger`` (the contract tests run against both):
the same errors for unknown runs and illegal round transitions, the same ordering, and
checkpoints and spooled updates kept as encoded bytes that are digest-checked when read back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from conclave.core.errors import LedgerError
from conclave.core.parameters import Parameters
from conclave.core.records import (
    CheckpointRecord,
    ContributionRecord,
    ParticipantEvent,
    RoundRecord,
    RunRecord,
)
from conclave.core.types import ContributionStatus, RoundStatus, RunStatus, TaskKind
from conclave.ledger.checkpoint_file import (
    decode_checkpoint,
    decode_checkpoint_with_state,
    encode_checkpoint,
)
from conclave.ledger.lifecycle import (
    SPOOLED_UPDATE,
    check_committable,
    check_finishable,
    check_startable,
    checkpoint_relpath,
    checkpoints_to_prune,
    latest_usable,
    round_sort_key,
    spool_file_name,
    spool_round_folder,
    spool_run_relpath,
)

_RoundKey = tuple[int, TaskKind]


class _RunState:
    """Everything recorded about one run."""

    __slots__ = ("blobs", "checkpoints", "contributions", "events", "record", "rounds", "spool")

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.rounds: dict[_RoundKey, RoundRecord] = {}
        self.events: list[ParticipantEvent] = []
        self.contributions: list[ContributionRecord] = []
        self.checkpoints: dict[int, CheckpointRecord] = {}
        self.blobs: dict[int, bytes] = {}
        self.spool: dict[int, dict[str, bytes]] = {}


class MemoryLedger:
    """A ``Ledger`` held in process memory; thread-safe; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _RunState] = {}
        self._closed = False

    def __enter__(self) -> MemoryLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs -------------------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> None:
        with self._lock:
            self._check_open()
            if run.run_id in self._runs:
                raise LedgerError(f"run {run.run_id!r} already exists")
            self._runs[run.run_id] = _RunState(run)

    def get_run(self, run_id: str) -> RunRecord:
        with self._lock:
            return self._run(run_id).record

    def runs(self) -> Sequence[RunRecord]:
        with self._lock:
            self._check_open()
            return sorted((s.record for s in self._runs.values()), key=lambda r: r.created_at)

    def set_run_status(self, run_id: str, status: RunStatus, reason: str = "") -> None:
        with self._lock:
            state = self._run(run_id)
            state.record = dataclasses.replace(state.record, status=status, reason=reason)

    # -- participants -----------------------------------------------------------------------
    def record_participant_event(self, event: ParticipantEvent) -> None:
        self.record_participant_events((event,))

    def record_participant_events(self, events: Sequence[ParticipantEvent]) -> None:
        with self._lock:
            for run_id in {e.run_id for e in events}:
                self._run(run_id)  # every run must exist before anything is recorded
            for event in events:
                self._run(event.run_id).events.append(event)

    def participant_events(
        self, run_id: str, participant: str | None = None
    ) -> Sequence[ParticipantEvent]:
        with self._lock:
            events = self._run(run_id).events
            return [e for e in events if participant is None or e.participant == participant]

    # -- rounds -----------------------------------------------------------------------------
    def start_round(self, record: RoundRecord) -> None:
        with self._lock:
            state = self._run(record.run_id)
            key = (record.round, record.kind)
            check_startable(state.rounds.get(key), record)
            state.rounds[key] = dataclasses.replace(
                record, selected=tuple(record.selected), metrics=_metrics(record.metrics, {})
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
        with self._lock:
            state = self._run(run_id)
            current = check_finishable(state.rounds.get((round, kind)), run_id, round, kind, status)
            state.rounds[(round, kind)] = dataclasses.replace(
                current,
                status=status,
                finished_at=finished_at,
                metrics=_metrics(metrics, current.metrics),
                reason=reason,
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes to memory are immediate; nothing to group."""
        yield

    def invalidate_round(self, run_id: str, round: int, reason: str) -> None:
        with self._lock:
            state = self._run(run_id)
            for key, record in list(state.rounds.items()):
                if key[0] >= round:
                    state.rounds[key] = dataclasses.replace(
                        record, status=RoundStatus.FAILED, reason=reason)
            for r in [r for r in state.checkpoints if r >= round]:
                del state.checkpoints[r]
            self._supersede(state, lambda r: r >= round, reason)

    def supersede_contributions(self, run_id: str, round: int, reason: str) -> None:
        with self._lock:
            self._supersede(self._run(run_id), lambda r: r == round, reason)

    @staticmethod
    def _supersede(state: _RunState, rounds: Callable[[int], bool], reason: str) -> None:
        state.contributions[:] = [
            dataclasses.replace(c, status=ContributionStatus.SUPERSEDED,
                                reason=f"{c.reason}; {reason}" if c.reason else reason)
            if rounds(c.round) and c.kind is TaskKind.FIT
            and c.status is ContributionStatus.ACCEPTED else c
            for c in state.contributions
        ]

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
        with self._lock:
            state = self._run(run_id)
            current = check_committable(state.rounds.get((round, TaskKind.FIT)), run_id, round)
            blob = encode_checkpoint(parameters, state=strategy_state)
            digest = parameters.digest()
            checkpoint = CheckpointRecord(
                run_id=run_id,
                round=round,
                digest=digest,
                path=f"memory:{checkpoint_relpath(run_id, round)}",
                nbytes=len(blob),
            )
            state.rounds[(round, TaskKind.FIT)] = dataclasses.replace(
                current,
                status=RoundStatus.COMMITTED,
                finished_at=finished_at,
                model_digest=digest,
                metrics=_metrics(metrics, current.metrics),
            )
            state.checkpoints[round] = checkpoint
            state.blobs[round] = blob
            return checkpoint

    def rounds(self, run_id: str) -> Sequence[RoundRecord]:
        with self._lock:
            return sorted(self._run(run_id).rounds.values(), key=round_sort_key)

    # -- contributions ----------------------------------------------------------------------
    def record_contribution(self, record: ContributionRecord) -> None:
        with self._lock:
            state = self._run(record.run_id)
            state.contributions.append(
                dataclasses.replace(record, metrics=_metrics(record.metrics, {}))
            )

    def contributions(self, run_id: str, round: int | None = None) -> Sequence[ContributionRecord]:
        with self._lock:
            found = self._run(run_id).contributions
            return [c for c in found if round is None or c.round == round]

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoints(self, run_id: str) -> Sequence[CheckpointRecord]:
        with self._lock:
            found = self._run(run_id).checkpoints
            return [found[r] for r in sorted(found)]

    def load_checkpoint(self, run_id: str, round: int) -> Parameters:
        return self._load_checkpoint(run_id, round)[0]

    def load_strategy_state(self, run_id: str, round: int) -> Parameters | None:
        return self._load_checkpoint(run_id, round)[1]

    def _load_checkpoint(self, run_id: str, round: int) -> tuple[Parameters, Parameters | None]:
        with self._lock:
            state = self._run(run_id)
            if round not in state.checkpoints:
                raise LedgerError(f"run {run_id!r} has no checkpoint for round {round}")
            record, blob = state.checkpoints[round], state.blobs[round]
        return decode_checkpoint_with_state(blob, source=record.path,
                                            expected_digest=record.digest)

    def prune_checkpoints(self, run_id: str, *, keep_last: int, keep_every: int) -> list[int]:
        with self._lock:
            state = self._run(run_id)
            doomed = checkpoints_to_prune(
                state.checkpoints, keep_last=keep_last, keep_every=keep_every
            )
            for round in doomed:
                del state.checkpoints[round], state.blobs[round]
            return doomed

    def latest_checkpoint(self, run_id: str) -> tuple[int, Parameters, list[str]] | None:
        rounds = [c.round for c in self.checkpoints(run_id)]
        return latest_usable(rounds, lambda r: self.load_checkpoint(run_id, r))

    # -- update spool -----------------------------------------------------------------------
    def spool_update(
        self, run_id: str, round: int, participant: str, parameters: Parameters
    ) -> None:
        spool_file_name(participant)  # the same names are refused as on disk
        blob = encode_checkpoint(parameters)  # a copy: later writes to the caller's arrays
        with self._lock:
            self._run(run_id).spool.setdefault(round, {})[participant] = blob

    def spooled_participants(self, run_id: str, round: int) -> Sequence[str]:
        with self._lock:
            return sorted(self._run(run_id).spool.get(round, {}))

    def load_spooled(self, run_id: str, round: int, participant: str) -> Parameters:
        with self._lock:
            blob = self._run(run_id).spool.get(round, {}).get(participant)
        if blob is None:
            raise LedgerError(
                f"no spooled update of {participant!r} for round {round} of run {run_id!r}"
            )
        source = f"memory:{spool_run_relpath(run_id)}/{spool_round_folder(round)}/"
        return decode_checkpoint(
            blob, source=source + spool_file_name(participant), what=SPOOLED_UPDATE
        )

    def clear_spool(self, run_id: str, up_to_round: int) -> None:
        with self._lock:
            spool = self._run(run_id).spool
            for round in [r for r in spool if r <= up_to_round]:
                del spool[round]

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # -- helpers ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("the ledger is closed")

    def _run(self, run_id: str) -> _RunState:
        self._check_open()
        try:
            return self._runs[run_id]
        except KeyError:
            raise LedgerError(f"unknown run {run_id!r}") from None


def _metrics(new: Mapping[str, float] | None, old: Mapping[str, float]) -> dict[str, float]:
    source = old if new is None else new
    return {str(k): float(v) for k, v in source.items()}
