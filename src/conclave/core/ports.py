"""Interfaces (Protocols) that adapters implement and the coordinator/participant use."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from conclave.core.parameters import Parameters
from conclave.core.records import (
    CheckpointRecord,
    ContributionRecord,
    ParticipantEvent,
    RoundRecord,
    RunRecord,
)
from conclave.core.types import (
    Config,
    Declined,
    EvaluateResult,
    Evaluation,
    FitResult,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    RoundStatus,
    RunStatus,
    SecAggStep,
    StageInput,
    TaskAssignment,
    TaskKind,
    TrainerContext,
    Update,
    Verdict,
)


@runtime_checkable
class Trainer(Protocol):
    """User code that trains and evaluates a model on local data.

    ``set_weights`` receives parameters that may be shared and read-only (the in-memory
    transport hands every virtual participant one view of the global model): copy them into
    your model, never write into them. ``fit`` returns parameters the trainer will not write
    to again (a fresh buffer, or one it replaces on the next ``set_weights``).
    """

    def get_weights(self) -> Parameters: ...

    def set_weights(self, parameters: Parameters) -> None: ...

    def fit(self, config: Config) -> FitResult: ...

    def evaluate(self, config: Config) -> EvaluateResult: ...


TrainerFactory = Callable[[TrainerContext], Trainer]


class Ledger(Protocol):
    """The coordinator's durable record. Every write is durable when the call returns."""

    def transaction(self) -> AbstractContextManager[None]:
        """Group the writes made inside into one durable transaction (nesting allowed)."""
        ...

    def create_run(self, run: RunRecord) -> None: ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def runs(self) -> Sequence[RunRecord]: ...

    def set_run_status(self, run_id: str, status: RunStatus, reason: str = "") -> None: ...

    def record_participant_event(self, event: ParticipantEvent) -> None: ...

    def record_participant_events(self, events: Sequence[ParticipantEvent]) -> None:
        """Several events at once, in order (a round's selection tasks many participants)."""
        ...

    def participant_events(
        self, run_id: str, participant: str | None = None
    ) -> Sequence[ParticipantEvent]: ...

    def start_round(self, record: RoundRecord) -> None: ...

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
        """Close a round without a new global model (an evaluation round, or a failure)."""
        ...

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
        """Atomically store the new global model (and the strategy's state, if it has one)
        as a checkpoint and mark the FIT round committed with the checkpoint's digest. When
        this returns, both are durable."""
        ...

    def invalidate_round(self, run_id: str, round: int, reason: str) -> None:
        """Mark ``round`` and every later round FAILED with ``reason``, their accepted
        contributions SUPERSEDED, and forget their checkpoints, so they can be run again
        (recovery from a corrupt checkpoint)."""
        ...

    def supersede_contributions(self, run_id: str, round: int, reason: str) -> None:
        """Mark the accepted FIT contributions of ``round`` SUPERSEDED (their attempt failed:
        they are in no model), adding ``reason`` to theirs."""
        ...

    def rounds(self, run_id: str) -> Sequence[RoundRecord]: ...

    def record_contribution(self, record: ContributionRecord) -> None: ...

    def contributions(
        self, run_id: str, round: int | None = None
    ) -> Sequence[ContributionRecord]: ...

    def checkpoints(self, run_id: str) -> Sequence[CheckpointRecord]: ...

    def load_checkpoint(self, run_id: str, round: int) -> Parameters:
        """Read a checkpoint back, checking its digest (CheckpointCorrupted if it differs)."""
        ...

    def load_strategy_state(self, run_id: str, round: int) -> Parameters | None:
        """The strategy state checkpointed with round ``round``'s model (None: none was),
        checked like ``load_checkpoint``."""
        ...

    def prune_checkpoints(self, run_id: str, *, keep_last: int, keep_every: int) -> list[int]:
        """Delete checkpoints except the newest ``keep_last`` and every round divisible by
        ``keep_every`` (0: none extra); the newest is never deleted. Returns the rounds
        deleted, ascending. Rounds keep their ``model_digest``."""
        ...

    def latest_checkpoint(self, run_id: str) -> tuple[int, Parameters, list[str]] | None:
        """The newest checkpoint that loads and matches its digest, as (round, parameters,
        problems): walking back past damaged or missing ones, ``problems`` holds one line per
        checkpoint skipped. None when no checkpoint of the run is usable."""
        ...

    def spool_update(
        self, run_id: str, round: int, participant: str, parameters: Parameters
    ) -> None:
        """Keep an accepted update of the round in progress so that it survives a crash of
        the coordinator (durable when this returns); replaces one spooled before."""
        ...

    def spooled_participants(self, run_id: str, round: int) -> Sequence[str]:
        """The participants with a spooled update in ``round``, sorted."""
        ...

    def load_spooled(self, run_id: str, round: int, participant: str) -> Parameters:
        """Read a spooled update back, checking its digest (CheckpointCorrupted if damaged,
        LedgerError if there is none)."""
        ...

    def clear_spool(self, run_id: str, up_to_round: int) -> None:
        """Delete the spooled updates of every round <= ``up_to_round``."""
        ...

    def close(self) -> None: ...


class CoordinatorService(Protocol):
    """What participants call on the coordinator, whatever the transport.

    The coordinator implements it; ``transport.memory`` hands it over in-process and
    ``transport.grpc`` exposes it as a gRPC server (and offers a client implementing the same
    Protocol to participants). Unknown run ids, unknown participants and wrong protocol versions
    raise ``RemoteProtocolError``; the content of a submission is judged in the returned
    ``Verdict`` (accepted, or rejected with the reason) and recorded in the ledger.
    """

    def join(self, request: JoinRequest) -> JoinReply: ...

    def heartbeat(
        self, run_id: str, participant: str, telemetry: Mapping[str, float]
    ) -> HeartbeatReply: ...

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment: ...

    def submit_update(self, update: Update) -> Verdict: ...

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict: ...

    def decline_task(self, declined: Declined) -> Verdict:
        """The participant cannot do its task (its trainer failed): stop waiting for it."""
        ...

    def fetch_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, wait_s: float
    ) -> StageInput:
        """Secure aggregation: what ``participant`` needs for ``step`` of ``round`` (long poll)."""
        ...

    def submit_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, payload: bytes
    ) -> Verdict:
        """Secure aggregation: one stage message (payloads can be many MB: stream them)."""
        ...
