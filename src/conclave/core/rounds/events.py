"""Events fed into the run machine and commands it returns.

Events are past-tense facts; commands are imperatives the driver carries out (write the
ledger, arm a timer, answer a participant). Time never enters the machine except as
``DeadlinePassed``; the driver stamps wall-clock or simulated times on what it records.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from conclave.core.parameters import Parameters
from conclave.core.types import (
    ContributionStatus,
    Declined,
    Evaluation,
    Metrics,
    RoundStatus,
    SecAggStep,
    TaskKind,
    Update,
    Verdict,
)


class Stage(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    FINISHED = "finished"
    FAILED = "failed"


class Timer(enum.Enum):
    JOIN = "join"
    FIT = "fit"
    EVALUATE = "evaluate"
    SECAGG = "secagg"
    """The deadline of a secure-aggregation step after the first (which shares FIT's)."""


# -- events -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunStarted:
    pass


@dataclass(frozen=True, slots=True)
class ParticipantJoined:
    participant: str
    identity_key: bytes = b""
    """Raw Ed25519 public key, needed to take part in secure aggregation."""


@dataclass(frozen=True, slots=True)
class ParticipantLost:
    participant: str
    reason: str = "missed heartbeats"


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    update: Update
    digest: str = ""


@dataclass(frozen=True, slots=True)
class EvaluationReceived:
    evaluation: Evaluation


@dataclass(frozen=True, slots=True)
class StageReceived:
    """A secure-aggregation stage message from ``participant``."""

    participant: str
    round: int
    step: SecAggStep
    payload: bytes


@dataclass(frozen=True, slots=True)
class AggregateComputed:
    """The driver's answer to ``AggregateInOrder``: the weighted mean in canonical order."""

    round: int
    parameters: Parameters


@dataclass(frozen=True, slots=True)
class TaskDeclined:
    """A participant cannot do its task (its trainer failed)."""

    declined: Declined


@dataclass(frozen=True, slots=True)
class DeadlinePassed:
    timer: Timer
    round: int
    attempt: int


Event = (
    RunStarted | ParticipantJoined | ParticipantLost | UpdateReceived | EvaluationReceived
    | StageReceived | AggregateComputed | DeadlinePassed | TaskDeclined
)


# -- commands ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class StartRound:
    round: int
    kind: TaskKind
    attempt: int
    selected: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Substitute:
    """``participant`` takes over the task of ``replaces``, who was lost mid-round."""

    round: int
    attempt: int
    participant: str
    replaces: str
    selected: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ArmTimer:
    timer: Timer
    round: int
    attempt: int
    timeout_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordContribution:
    round: int
    kind: TaskKind
    participant: str
    status: ContributionStatus
    weight: int = 0
    metrics: Metrics = field(default_factory=dict)
    digest: str = ""
    reason: str = ""
    train_seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """The verdict on the submission that produced this batch of commands."""

    verdict: Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordStage:
    """A secure-aggregation step closed: who completed it, who has dropped so far."""

    round: int
    step: SecAggStep
    completed: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolUpdate:
    """Make an accepted update durable before the participant is told it was accepted (a
    restarted coordinator must still count it: the participant will not send it again)."""

    round: int
    participant: str
    parameters: Parameters


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateInOrder:
    """Updates arrived out of canonical (sorted) order: recompute the weighted mean from the
    spooled updates in sorted participant order, so the model never depends on arrival order,
    and answer with ``AggregateComputed``. ``streamed`` is the arrival-order result, for a
    driver that keeps no spool."""

    round: int
    contributors: tuple[tuple[str, int], ...]
    streamed: Parameters


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitRound:
    round: int
    parameters: Parameters
    metrics: Metrics
    strategy_state: Parameters | None = None
    """Checkpointed with the model: what the strategy carries into the next round."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseRound:
    """End a round that produced no new model: an evaluation round, or a failed attempt."""

    round: int
    kind: TaskKind
    status: RoundStatus
    metrics: Metrics = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishRun:
    rounds_committed: int
    final_evaluation: Mapping[str, Mapping[str, float]]
    """participant -> {"loss": ..., "accuracy": ..., "num_examples": ...}"""


@dataclass(frozen=True, slots=True, kw_only=True)
class FailRun:
    reason: str


Command = (
    StartRound | Substitute | ArmTimer | RecordContribution | Reply | RecordStage | SpoolUpdate
    | AggregateInOrder | CommitRound | CloseRound | FinishRun | FailRun
)
