"""Value objects shared by every layer."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from conclave.core.parameters import Parameters

PROTOCOL_VERSION = 1
"""Wire protocol version. Every message carries it; the coordinator rejects others."""

Scalar = bool | int | float | str
Config = Mapping[str, Scalar]
Metrics = Mapping[str, float]


class TaskKind(enum.Enum):
    FIT = "fit"
    EVALUATE = "evaluate"


class SecAggStep(enum.Enum):
    """Steps of a secure-aggregation round as seen on the wire.

    ``fetch_stage(step)`` returns what a participant needs in order to produce ``step``'s
    message: SETUP -> the round's setup, SHARE -> the neighbours' advertised keys,
    MASKED_INPUT -> the encrypted shares addressed to it, UNMASK -> the unmask request.
    ``submit_stage(step)`` carries ADVERTISE, SHARE, MASKED_INPUT and UNMASK messages.
    """

    SETUP = "setup"
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"


class ContributionStatus(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    LATE = "late"
    DROPPED = "dropped"
    SUPERSEDED = "superseded"
    """Was accepted, but its attempt failed or its round was redone: in no model."""


class RoundStatus(enum.Enum):
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"


class RunStatus(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    """The coordinator was stopped (signal) before the run ended; committed rounds are kept."""


class ParticipantState(enum.Enum):
    JOINED = "joined"
    TASKED = "tasked"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    LOST = "lost"
    """Missed its heartbeats: presumed gone until it is heard from again."""
    DROPPED = "dropped"
    """Answered no task this time (deadline passed, trainer failed, nothing at a secure
    step); still a member."""
    REJOINED = "rejoined"
    LEFT = "left"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainerContext:
    """What a trainer factory is told when it builds a trainer.

    ``participant`` is None on the coordinator, which builds a trainer only to read the
    initial weights; participants get their own name (e.g. ``hospital-0``).
    """

    participant: str | None
    seed: int
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    parameters: Parameters
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateResult:
    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """What one participant is asked to do in one round."""

    run_id: str
    round: int
    kind: TaskKind
    config: Config
    parameters: Parameters
    deadline_s: float
    digest: str = ""
    """``parameters.digest()`` when the coordinator already knows it (saves re-hashing)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    """A participant's answer to a FIT task, as received by the coordinator."""

    run_id: str
    round: int
    participant: str
    num_examples: int
    parameters: Parameters
    metrics: Metrics = field(default_factory=dict)
    train_seconds: float = 0.0
    digest: str = ""
    """``parameters.digest()``, when the sender or the transport has already computed (and the
    transport verified) it; the coordinator computes it when empty."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """A participant's answer to an EVALUATE task."""

    run_id: str
    round: int
    participant: str
    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Declined:
    """A participant's answer to a task it cannot do (its trainer failed), with the reason."""

    run_id: str
    round: int
    participant: str
    kind: TaskKind
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The coordinator's answer to a submission."""

    accepted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinRequest:
    participant: str
    protocol_version: int = PROTOCOL_VERSION
    capabilities: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinReply:
    run_id: str
    heartbeat_interval_s: float
    current_round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatReply:
    has_task: bool
    run_finished: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAssignment:
    """The reply to FetchTask: a task, nothing yet, or the news that the run is over."""

    task: Task | None
    run_finished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StageInput:
    """The reply to ``fetch_stage``: the payload, nothing yet, or an abort with the reason
    (the round closed, failed, or the participant was dropped from it)."""

    payload: bytes | None
    aborted: bool = False
    reason: str = ""
