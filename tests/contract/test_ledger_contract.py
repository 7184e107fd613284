"""The Ledger contract, run against every adapter (in memory and SQLite)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

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

RUN = "run-1"


@pytest.fixture(params=["memory", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    impl: Ledger = MemoryLedger() if request.param == "memory" else SqliteLedger(tmp_path)
    yield impl
    impl.close()


def make_run(run_id: str = RUN, created_at: float = 100.0) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        name="heart",
        spec_toml='[run]\nname = "heart"\n',
        seed=7,
        status=RunStatus.RUNNING,
        created_at=created_at,
    )


def make_round(
    round: int, kind: TaskKind = TaskKind.FIT, selected: tuple[str, ...] = ("a", "b")
) -> RoundRecord:
    return RoundRecord(
        run_id=RUN,
        round=round,
        kind=kind,
        status=RoundStatus.RUNNING,
        selected=selected,
        started_at=100.0 + round,
    )


def make_params(scale: float = 1.0) -> Parameters:
    return Parameters.from_arrays(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * scale, "b": np.full(3, -scale)}
    )


def contribution(
    participant: str, status: ContributionStatus, round: int = 1, reason: str = ""
) -> ContributionRecord:
    return ContributionRecord(
        run_id=RUN,
        round=round,
        kind=TaskKind.FIT,
        participant=participant,
        status=status,
        weight=10 if status is ContributionStatus.ACCEPTED else 0,
        metrics={"loss": 0.25},
        digest="ab" * 32,
        reason=reason,
        received_at=110.0 + round,
        train_seconds=1.5,
    )


# -- runs ------------------------------------------------------------------------------------
def test_create_and_get_run(ledger: Ledger) -> None:
    run = make_run()
    ledger.create_run(run)
    assert ledger.get_run(RUN) == run
    assert list(ledger.runs()) == [run]


def test_runs_are_listed_oldest_first(ledger: Ledger) -> None:
    ledger.create_run(make_run("late", created_at=50.0))
    ledger.create_run(make_run("early", created_at=10.0))
    ledger.create_run(make_run("tie", created_at=50.0))
    assert [r.run_id for r in ledger.runs()] == ["early", "late", "tie"]


def test_duplicate_run_is_refused(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    with pytest.raises(LedgerError, match="already exists"):
        ledger.create_run(make_run())


def test_set_run_status(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.set_run_status(RUN, RunStatus.FAILED, "quorum not reached in round 3")
    run = ledger.get_run(RUN)
    assert run.status is RunStatus.FAILED
    assert run.reason == "quorum not reached in round 3"
    assert run.seed == 7


UNKNOWN_RUN_CALLS: dict[str, Callable[[Ledger], object]] = {
    "get_run": lambda lg: lg.get_run("nope"),
    "set_run_status": lambda lg: lg.set_run_status("nope", RunStatus.FINISHED),
    "record_participant_event": lambda lg: lg.record_participant_event(
        ParticipantEvent(run_id="nope", participant="a", state=ParticipantState.JOINED, at=1.0)
    ),
    "participant_events": lambda lg: lg.participant_events("nope"),
    "start_round": lambda lg: lg.start_round(
        RoundRecord(
            run_id="nope",
            round=1,
            kind=TaskKind.FIT,
            status=RoundStatus.RUNNING,
            selected=(),
            started_at=1.0,
        )
    ),
    "finish_round": lambda lg: lg.finish_round(
        "nope", 1, TaskKind.FIT, RoundStatus.FAILED, finished_at=2.0
    ),
    "commit_round": lambda lg: lg.commit_round("nope", 1, make_params(), finished_at=2.0),
    "rounds": lambda lg: lg.rounds("nope"),
    "record_contribution": lambda lg: lg.record_contribution(
        ContributionRecord(
            run_id="nope",
            round=1,
            kind=TaskKind.FIT,
            participant="a",
            status=ContributionStatus.ACCEPTED,
        )
    ),
    "contributions": lambda lg: lg.contributions("nope"),
    "checkpoints": lambda lg: lg.checkpoints("nope"),
    "load_checkpoint": lambda lg: lg.load_checkpoint("nope", 1),
}


@pytest.mark.parametrize("method", sorted(UNKNOWN_RUN_CALLS))
def test_unknown_run_is_an_error_naming_it(ledger: Ledger, method: str) -> None:
    ledger.create_run(make_run())
    with pytest.raises(LedgerError, match="'nope'"):
        UNKNOWN_RUN_CALLS[method](ledger)


# -- participants ----------------------------------------------------------------------------
def test_participant_events_keep_order_and_filter(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    events = [
        ParticipantEvent(run_id=RUN, participant="a", state=ParticipantState.JOINED, at=5.0),
        ParticipantEvent(run_id=RUN, participant="b", state=ParticipantState.JOINED, at=4.0),
        ParticipantEvent(
            run_id=RUN, participant="a", state=ParticipantState.LOST, at=9.0, detail="timeout"
        ),
        ParticipantEvent(run_id=RUN, participant="a", state=ParticipantState.REJOINED, at=12.0),
    ]
    for event in events:
        ledger.record_participant_event(event)
    assert list(ledger.participant_events(RUN)) == events
    assert list(ledger.participant_events(RUN, "a")) == [events[0], events[2], events[3]]
    assert list(ledger.participant_events(RUN, "zed")) == []


# -- rounds ----------------------------------------------------------------------------------
def test_fit_and_evaluate_rounds_share_a_number(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(2, TaskKind.EVALUATE, ("c",)))
    ledger.start_round(make_round(1))
    ledger.start_round(make_round(2))
    rounds = ledger.rounds(RUN)
    assert [(r.round, r.kind) for r in rounds] == [
        (1, TaskKind.FIT),
        (2, TaskKind.FIT),
        (2, TaskKind.EVALUATE),
    ]
    assert rounds[2].selected == ("c",)
    assert rounds[0] == make_round(1)


def test_finish_round(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(1, TaskKind.EVALUATE))
    ledger.start_round(make_round(1, TaskKind.FIT))
    ledger.finish_round(
        RUN,
        1,
        TaskKind.EVALUATE,
        RoundStatus.COMMITTED,
        finished_at=130.5,
        metrics={"loss": 0.5, "accuracy": 0.75},
    )
    ledger.finish_round(
        RUN, 1, TaskKind.FIT, RoundStatus.FAILED, finished_at=131.0, reason="quorum not reached"
    )
    fit, evaluate = ledger.rounds(RUN)
    assert evaluate.status is RoundStatus.COMMITTED
    assert evaluate.finished_at == 130.5
    assert dict(evaluate.metrics) == {"loss": 0.5, "accuracy": 0.75}
    assert fit.status is RoundStatus.FAILED
    assert fit.reason == "quorum not reached"
    assert fit.model_digest == ""
    assert dict(fit.metrics) == {}


def test_finish_round_without_metrics_keeps_the_started_ones(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    start = RoundRecord(
        run_id=RUN,
        round=3,
        kind=TaskKind.EVALUATE,
        status=RoundStatus.RUNNING,
        selected=(),
        started_at=1.0,
        metrics={"epsilon": 1.25},
    )
    ledger.start_round(start)
    ledger.finish_round(RUN, 3, TaskKind.EVALUATE, RoundStatus.FAILED, finished_at=2.0)
    assert dict(ledger.rounds(RUN)[0].metrics) == {"epsilon": 1.25}


def test_illegal_round_transitions(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    with pytest.raises(LedgerError, match="never started"):
        ledger.finish_round(RUN, 1, TaskKind.FIT, RoundStatus.FAILED, finished_at=1.0)
    ledger.start_round(make_round(1))
    with pytest.raises(LedgerError, match="status running"):
        ledger.finish_round(RUN, 1, TaskKind.FIT, RoundStatus.RUNNING, finished_at=1.0)
    with pytest.raises(LedgerError, match="never started"):
        ledger.finish_round(RUN, 1, TaskKind.EVALUATE, RoundStatus.FAILED, finished_at=1.0)
    ledger.finish_round(RUN, 1, TaskKind.FIT, RoundStatus.FAILED, finished_at=2.0)
    with pytest.raises(LedgerError, match="already failed"):
        ledger.finish_round(RUN, 1, TaskKind.FIT, RoundStatus.COMMITTED, finished_at=3.0)
    bad_start = RoundRecord(
        run_id=RUN,
        round=5,
        kind=TaskKind.FIT,
        status=RoundStatus.COMMITTED,
        selected=(),
        started_at=1.0,
    )
    with pytest.raises(LedgerError, match="cannot start"):
        ledger.start_round(bad_start)


def test_restarting_an_unfinished_round_replaces_it(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(1, selected=("a",)))
    ledger.start_round(make_round(1, selected=("b", "c")))
    (only,) = ledger.rounds(RUN)
    assert only.selected == ("b", "c")
    assert only.status is RoundStatus.RUNNING


# -- commit and checkpoints ------------------------------------------------------------------
def test_commit_round_stores_model_and_marks_round(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(1))
    params = make_params(2.0)
    checkpoint = ledger.commit_round(RUN, 1, params, finished_at=150.0, metrics={"loss": 0.125})
    assert checkpoint.run_id == RUN
    assert checkpoint.round == 1
    assert checkpoint.digest == params.digest()
    assert checkpoint.nbytes > params.layout.nbytes
    (committed,) = ledger.rounds(RUN)
    assert committed.status is RoundStatus.COMMITTED
    assert committed.model_digest == params.digest()
    assert committed.finished_at == 150.0
    assert dict(committed.metrics) == {"loss": 0.125}
    assert list(ledger.checkpoints(RUN)) == [checkpoint]
    loaded = ledger.load_checkpoint(RUN, 1)
    assert loaded == params
    assert loaded.digest() == params.digest()
    assert loaded.names == ("w", "b")


def test_checkpoints_listed_by_round(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    for number in (2, 1, 3):
        ledger.start_round(make_round(number))
        ledger.commit_round(RUN, number, make_params(float(number)), finished_at=200.0)
    assert [c.round for c in ledger.checkpoints(RUN)] == [1, 2, 3]
    assert ledger.load_checkpoint(RUN, 3) == make_params(3.0)
    assert ledger.load_checkpoint(RUN, 1) != make_params(3.0)


def test_commit_needs_a_running_fit_round(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    with pytest.raises(LedgerError, match="never started"):
        ledger.commit_round(RUN, 1, make_params(), finished_at=1.0)
    ledger.start_round(make_round(1, TaskKind.EVALUATE))
    with pytest.raises(LedgerError, match="never started"):
        ledger.commit_round(RUN, 1, make_params(), finished_at=1.0)
    ledger.start_round(make_round(1))
    ledger.commit_round(RUN, 1, make_params(1.0), finished_at=2.0)
    with pytest.raises(LedgerError, match="already committed"):
        ledger.commit_round(RUN, 1, make_params(9.0), finished_at=3.0)
    with pytest.raises(LedgerError, match="already committed"):
        ledger.start_round(make_round(1))
    assert ledger.load_checkpoint(RUN, 1) == make_params(1.0)
    assert len(ledger.checkpoints(RUN)) == 1


def test_load_missing_checkpoint_is_an_error(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    with pytest.raises(LedgerError, match="no checkpoint for round 4"):
        ledger.load_checkpoint(RUN, 4)


# -- contributions ---------------------------------------------------------------------------
def test_contributions_keep_every_row_in_order(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    rows = [
        contribution("a", ContributionStatus.ACCEPTED),
        contribution("b", ContributionStatus.LATE, reason="after the deadline"),
        contribution("a", ContributionStatus.REJECTED, reason="duplicate submission"),
        contribution("a", ContributionStatus.ACCEPTED, round=2),
        contribution("c", ContributionStatus.DROPPED, round=1),
    ]
    for row in rows:
        ledger.record_contribution(row)
    assert list(ledger.contributions(RUN)) == rows
    assert list(ledger.contributions(RUN, round=1)) == [rows[0], rows[1], rows[2], rows[4]]
    assert list(ledger.contributions(RUN, round=2)) == [rows[3]]
    assert list(ledger.contributions(RUN, round=3)) == []
    duplicate = ledger.contributions(RUN)[2]
    assert (duplicate.participant, duplicate.status) == ("a", ContributionStatus.REJECTED)
    assert duplicate.reason == "duplicate submission"
    assert duplicate.train_seconds == 1.5


def test_stored_records_do_not_alias_caller_data(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    metrics = {"loss": 1.0}
    ledger.record_contribution(
        ContributionRecord(
            run_id=RUN,
            round=1,
            kind=TaskKind.FIT,
            participant="a",
            status=ContributionStatus.ACCEPTED,
            metrics=metrics,
        )
    )
    metrics["loss"] = 99.0
    assert dict(ledger.contributions(RUN)[0].metrics) == {"loss": 1.0}


def test_concurrent_writers(ledger: Ledger) -> None:
    ledger.create_run(make_run())

    def write(participant: str) -> None:
        for i in range(20):
            ledger.record_contribution(
                contribution(participant, ContributionStatus.ACCEPTED, round=i)
            )

    threads = [threading.Thread(target=write, args=(f"p{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    found = ledger.contributions(RUN)
    assert len(found) == 80
    for n in range(4):
        mine = [c.round for c in found if c.participant == f"p{n}"]
        assert mine == list(range(20))


def test_closed_ledger_refuses_calls(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.get_run(RUN)
    with pytest.raises(LedgerError, match="closed"):
        ledger.create_run(make_run("other"))
    ledger.close()  # closing twice is harmless
