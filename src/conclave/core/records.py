"""What the ledger stores: plain records, written by the coordinator and read by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from conclave.core.types import (
    ContributionStatus,
    Metrics,
    ParticipantState,
    RoundStatus,
    RunStatus,
    TaskKind,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    run_id: str
    name: str
    spec_toml: str
    seed: int
    status: RunStatus
    created_at: float
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRecord:
    run_id: str
    round: int
    kind: TaskKind
    status: RoundStatus
    selected: tuple[str, ...]
    started_at: float
    finished_at: float | None = None
    model_digest: str = ""
    metrics: Metrics = field(default_factory=dict)
    reason: str = ""
    attempt: int = 1
    """Which attempt of this round the record describes: a round that missed its quorum is
    started again (replacing its record) with ``attempt + 1``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContributionRecord:
    run_id: str
    round: int
    kind: TaskKind
    participant: str
    status: ContributionStatus
    weight: int = 0
    metrics: Metrics = field(default_factory=dict)
    digest: str = ""
    reason: str = ""
    received_at: float = 0.0
    train_seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantEvent:
    run_id: str
    participant: str
    state: ParticipantState
    at: float
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRecord:
    run_id: str
    round: int
    digest: str
    path: str
    nbytes: int
