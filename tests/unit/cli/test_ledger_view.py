"""``render_ledger``: the text tables and the JSON document behind ``conclave ledger show``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conclave.cli.ledger_view import render_ledger
from conclave.core.errors import LedgerError
from conclave.core.parameters import Parameters
from conclave.core.ports import Ledger
from conclave.core.records import ContributionRecord, ParticipantEvent, RoundRecord, RunRecord
from conclave.core.types import (
    ContributionStatus,
    ParticipantState,
    RoundStatus,
    RunStatus,
    TaskKind,
)
from conclave.ledger import MemoryLedger, SqliteLedger

T0 = 1_700_000_000.0
RUN = "run-b"
MODEL = Parameters.from_arrays({"w": np.arange(4.0), "b": np.ones(2)})


def populate(ledger: Ledger) -> None:
    """An older finished run, and a newer one with a committed, a failed and an eval round."""
    ledger.create_run(
        RunRecord(
            run_id="run-a",
            name="old",
            spec_toml="",
            seed=1,
            status=RunStatus.FINISHED,
            created_at=1,
        )
    )
    ledger.create_run(
        RunRecord(
            run_id=RUN, name="heart", spec_toml="", seed=42, status=RunStatus.RUNNING, created_at=T0
        )
    )
    for name in ("h0", "h1"):
        ledger.record_participant_event(
            ParticipantEvent(run_id=RUN, participant=name, state=ParticipantState.JOINED, at=T0 + 1)
        )
    ledger.start_round(round_record(1, TaskKind.FIT, started=T0 + 2))
    add(ledger, 1, "h0", ContributionStatus.ACCEPTED, at=T0 + 3, metrics={"loss": 0.75})
    add(ledger, 1, "h0", ContributionStatus.REJECTED, at=T0 + 3.5, reason="duplicate submission")
    add(ledger, 1, "h1", ContributionStatus.ACCEPTED, at=T0 + 4, metrics={"loss": float("nan")})
    ledger.commit_round(RUN, 1, MODEL, finished_at=T0 + 6.5, metrics={"loss": 0.5})
    ledger.start_round(round_record(1, TaskKind.EVALUATE, started=T0 + 7))
    ledger.finish_round(
        RUN,
        1,
        TaskKind.EVALUATE,
        RoundStatus.COMMITTED,
        finished_at=T0 + 8,
        metrics={"loss": 0.5, "accuracy": 0.8125},
    )
    ledger.record_participant_event(
        ParticipantEvent(
            run_id=RUN,
            participant="h1",
            state=ParticipantState.LOST,
            at=T0 + 9,
            detail="silent 30s",
        )
    )
    ledger.start_round(round_record(2, TaskKind.FIT, started=T0 + 10))
    add(ledger, 2, "h1", ContributionStatus.LATE, at=T0 + 25, reason="after the deadline")
    ledger.finish_round(
        RUN, 2, TaskKind.FIT, RoundStatus.FAILED, finished_at=T0 + 20, reason="quorum not reached"
    )


def round_record(number: int, kind: TaskKind, *, started: float) -> RoundRecord:
    return RoundRecord(
        run_id=RUN,
        round=number,
        kind=kind,
        status=RoundStatus.RUNNING,
        selected=("h0", "h1"),
        started_at=started,
    )


def add(
    ledger: Ledger,
    number: int,
    participant: str,
    status: ContributionStatus,
    *,
    at: float,
    reason: str = "",
    metrics: dict[str, float] | None = None,
) -> None:
    ledger.record_contribution(
        ContributionRecord(
            run_id=RUN,
            round=number,
            kind=TaskKind.FIT,
            participant=participant,
            status=status,
            weight=100 if status is ContributionStatus.ACCEPTED else 0,
            metrics=metrics or {},
            reason=reason,
            received_at=at,
        )
    )


@pytest.fixture
def ledger() -> MemoryLedger:
    memory = MemoryLedger()
    populate(memory)
    return memory


def row(text: str, *cells: str) -> bool:
    """Is there a line holding these cells in order, separated only by spaces?"""
    pattern = r"^\s*" + r"\s+".join(re.escape(c) for c in cells) + r"\s*$"
    return re.search(pattern, text, re.MULTILINE) is not None


def test_text_shows_the_most_recent_run(ledger: MemoryLedger) -> None:
    text = render_ledger(ledger)
    assert row(text, "run", RUN)
    assert row(text, "seed", "42")
    assert row(text, "status", "running")
    assert row(text, "other runs", "run-a")
    digest = MODEL.digest()[:12]
    assert row(text, "1", "fit", "committed", "2", "4.50", digest, "loss=0.5")
    assert row(text, "1", "evaluate", "committed", "2", "1.00", "-", "loss=0.5 accuracy=0.8125")
    assert row(text, "2", "fit", "failed", "2", "10.00", "-", "-", "quorum not reached")
    assert row(text, "1", "fit", "h0", "rejected", "-", "-", "duplicate submission")
    assert row(text, "2", "fit", "h1", "late", "-", "-", "after the deadline")
    assert row(text, "h1", "lost", "1", "1")
    assert "contributions (4)" in text


def test_text_for_an_older_run(ledger: MemoryLedger) -> None:
    text = render_ledger(ledger, run_id="run-a")
    assert row(text, "run", "run-a")
    assert row(text, "other runs", RUN)
    assert "rounds (0)" in text
    assert text.count("(none)") == 3


def test_participant_history_is_chronological(ledger: MemoryLedger) -> None:
    text = render_ledger(ledger, participant="h1")
    history = text.split("history of h1", 1)[1]
    assert row(history, "+1.000", "event", "joined")
    assert row(history, "+4.000", "fit round 1", "accepted", "weight=100 loss=nan")
    assert row(history, "+9.000", "event", "lost", "silent 30s")
    assert row(history, "+25.000", "fit round 2", "late", "after the deadline")
    order = [history.index(mark) for mark in ("+1.000", "+4.000", "+9.000", "+25.000")]
    assert order == sorted(order)
    assert "h0" not in history


def test_json_document(ledger: MemoryLedger) -> None:
    doc = json.loads(render_ledger(ledger, as_json=True))
    assert doc["run"]["run_id"] == RUN
    assert doc["run"]["status"] == "running"
    assert [(r["round"], r["kind"], r["status"]) for r in doc["rounds"]] == [
        (1, "fit", "committed"),
        (1, "evaluate", "committed"),
        (2, "fit", "failed"),
    ]
    assert doc["rounds"][0]["model_digest"] == MODEL.digest()
    assert doc["rounds"][0]["selected"] == ["h0", "h1"]
    assert len(doc["contributions"]) == 4
    assert [c["status"] for c in doc["contributions"]] == [
        "accepted",
        "rejected",
        "accepted",
        "late",
    ]
    assert doc["contributions"][2]["metrics"] == {"loss": None}  # NaN is not JSON
    assert [(e["participant"], e["state"]) for e in doc["participants"]] == [
        ("h0", "joined"),
        ("h1", "joined"),
        ("h1", "lost"),
    ]
    assert [c["round"] for c in doc["checkpoints"]] == [1]


def test_json_for_one_participant(ledger: MemoryLedger) -> None:
    doc = json.loads(render_ledger(ledger, as_json=True, participant="h0"))
    assert len(doc["contributions"]) == 2
    assert {c["participant"] for c in doc["contributions"]} == {"h0"}
    assert [e["state"] for e in doc["participants"]] == ["joined"]


def test_errors(ledger: MemoryLedger) -> None:
    with pytest.raises(LedgerError, match="'nobody'"):
        render_ledger(ledger, participant="nobody")
    with pytest.raises(LedgerError, match="'run-z'"):
        render_ledger(ledger, run_id="run-z")
    with pytest.raises(LedgerError, match="no runs"):
        render_ledger(MemoryLedger())


def test_sqlite_read_only_renders_like_memory(ledger: MemoryLedger, tmp_path: Path) -> None:
    with SqliteLedger(tmp_path) as writer:
        populate(writer)
    with SqliteLedger.open_read_only(tmp_path) as reader:
        assert render_ledger(reader) == render_ledger(ledger)
        assert render_ledger(reader, participant="h1") == render_ledger(ledger, participant="h1")
        doc = json.loads(render_ledger(reader, as_json=True))
    assert doc["checkpoints"][0]["path"].endswith("round-00001.ckpt")
    assert len(doc["contributions"]) == 4


def test_cells_escape_control_characters_and_are_cut_short() -> None:
    from conclave.cli.ledger_view import _cell

    assert _cell("hospital-1") == "hospital-1"
    assert _cell("a\n\x1b[31mred") == "a\\n\\x1b[31mred"
    long = _cell("x" * 5000)
    assert long.startswith("x" * 200) and long.endswith("(5000 characters)") and len(long) < 260
