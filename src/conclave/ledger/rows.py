"""Conversions between SQLite rows of the ledger tables and the core record types.

Malformed stored values raise ``ValueError``; the ledger maps it to ``LedgerError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from conclave.core.records import ContributionRecord, RoundRecord, RunRecord
from conclave.core.types import ContributionStatus, RoundStatus, RunStatus, TaskKind

ROUND_COLUMNS = (
    "run_id, round, kind, status, selected, started_at, finished_at, model_digest, metrics, "
    "reason, attempt"
)
# What to select from a version-1 database opened read-only (it cannot be migrated).
ROUND_COLUMNS_V1 = ROUND_COLUMNS.replace("attempt", "1 AS attempt")
CONTRIBUTION_COLUMNS = (
    "run_id, round, kind, participant, status, weight, metrics, digest, reason, received_at, "
    "train_seconds"
)
RUN_COLUMNS = "run_id, name, spec_toml, seed, status, reason, created_at"


def dump_metrics(metrics: Mapping[str, float]) -> str:
    return json.dumps({str(k): float(v) for k, v in metrics.items()})


def load_metrics(text: str) -> dict[str, float]:
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"metrics must be a JSON object, got {text!r}")
    return {str(k): float(v) for k, v in loaded.items()}


def run_record(row: tuple[Any, ...]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        name=row[1],
        spec_toml=row[2],
        seed=row[3],
        status=RunStatus(row[4]),
        reason=row[5],
        created_at=row[6],
    )


def round_record(row: tuple[Any, ...]) -> RoundRecord:
    run_id, round, kind, status, selected, started_at, finished_at = row[:7]
    digest, metrics, reason, attempt = row[7:]
    chosen = json.loads(selected)
    if not isinstance(chosen, list):
        raise ValueError(f"selected must be a JSON list, got {selected!r}")
    return RoundRecord(
        run_id=str(run_id),
        round=int(round),
        kind=TaskKind(kind),
        status=RoundStatus(status),
        selected=tuple(str(p) for p in chosen),
        started_at=float(started_at),
        finished_at=None if finished_at is None else float(finished_at),
        model_digest=str(digest),
        metrics=load_metrics(metrics),
        reason=str(reason),
        attempt=int(attempt),
    )


def contribution_record(row: tuple[Any, ...]) -> ContributionRecord:
    run_id, round, kind, participant, status, weight, metrics, digest, reason, at, secs = row
    return ContributionRecord(
        run_id=str(run_id),
        round=int(round),
        kind=TaskKind(kind),
        participant=str(participant),
        status=ContributionStatus(status),
        weight=int(weight),
        metrics=load_metrics(metrics),
        digest=str(digest),
        reason=str(reason),
        received_at=float(at),
        train_seconds=float(secs),
    )
