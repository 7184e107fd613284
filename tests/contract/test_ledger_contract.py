"""The Ledger contract, run against every adapter (in memory and SQLite)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conclave.core.errors import CheckpointCorrupted, ConfigError, LedgerError
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
    "prune_checkpoints": lambda lg: lg.prune_checkpoints("nope", keep_last=1, keep_every=0),
    "latest_checkpoint": lambda lg: lg.latest_checkpoint("nope"),
    "spool_update": lambda lg: lg.spool_update("nope", 1, "a", make_params()),
    "spooled_participants": lambda lg: lg.spooled_participants("nope", 1),
    "load_spooled": lambda lg: lg.load_spooled("nope", 1, "a"),
    "clear_spool": lambda lg: lg.clear_spool("nope", 1),
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


def test_strategy_state_is_checkpointed_with_the_model(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(1))
    ledger.commit_round(RUN, 1, make_params(1.0), finished_at=2.0)
    ledger.start_round(make_round(2))
    velocity = make_params(-0.5)
    checkpoint = ledger.commit_round(RUN, 2, make_params(2.0), finished_at=3.0,
                                     strategy_state=velocity)
    assert checkpoint.digest == make_params(2.0).digest()  # the model's digest, as before
    assert ledger.load_strategy_state(RUN, 1) is None
    assert ledger.load_strategy_state(RUN, 2) == velocity
    assert ledger.load_checkpoint(RUN, 2) == make_params(2.0)
    assert ledger.latest_checkpoint(RUN) == (2, make_params(2.0), [])
    # damage to the state makes the whole checkpoint unusable: recovery walks back past it
    damage_checkpoint(ledger, 2, "flip")
    with pytest.raises(CheckpointCorrupted, match="strategy state"):
        ledger.load_strategy_state(RUN, 2)
    found = ledger.latest_checkpoint(RUN)
    assert found is not None and found[:2] == (1, make_params(1.0))
    with pytest.raises(LedgerError, match="no checkpoint for round 3"):
        ledger.load_strategy_state(RUN, 3)


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


# -- attempts --------------------------------------------------------------------------------
def test_round_attempt_round_trips_and_a_retry_replaces_the_record(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.start_round(make_round(1))
    assert ledger.rounds(RUN)[0].attempt == 1
    ledger.finish_round(RUN, 1, TaskKind.FIT, RoundStatus.FAILED, finished_at=2.0)
    retry = dataclasses.replace(make_round(1, selected=("c",)), attempt=2)
    ledger.start_round(retry)
    assert list(ledger.rounds(RUN)) == [retry]
    ledger.commit_round(RUN, 1, make_params(), finished_at=3.0)
    (committed,) = ledger.rounds(RUN)
    assert (committed.attempt, committed.status) == (2, RoundStatus.COMMITTED)


# -- update spool ----------------------------------------------------------------------------
def test_spooled_update_round_trips_with_its_digest(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    update = make_params(3.5)
    ledger.spool_update(RUN, 4, "site.a-1_x", update)
    loaded = ledger.load_spooled(RUN, 4, "site.a-1_x")
    assert loaded == update
    assert loaded.digest() == update.digest()
    assert loaded.names == ("w", "b")
    assert list(ledger.spooled_participants(RUN, 4)) == ["site.a-1_x"]
    assert list(ledger.spooled_participants(RUN, 5)) == []


def test_spool_keeps_a_copy_not_the_callers_arrays(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    update = make_params(1.0)
    ledger.spool_update(RUN, 1, "a", update)
    update.flat[:] = 42.0
    assert ledger.load_spooled(RUN, 1, "a") == make_params(1.0)


def test_spooled_participants_are_sorted_and_overwrite_replaces(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    for name in ("zed", "..", "a.b", "Alpha", "a"):
        ledger.spool_update(RUN, 2, name, make_params(1.0))
    ledger.spool_update(RUN, 2, "zed", make_params(7.0))
    ledger.spool_update(RUN, 3, "other", make_params(1.0))
    assert list(ledger.spooled_participants(RUN, 2)) == ["..", "Alpha", "a", "a.b", "zed"]
    assert ledger.load_spooled(RUN, 2, "zed") == make_params(7.0)
    assert ledger.load_spooled(RUN, 2, "..") == make_params(1.0)


def test_clear_spool_up_to_a_round(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    for round in (1, 2, 3, 4):
        ledger.spool_update(RUN, round, "a", make_params(float(round)))
    ledger.clear_spool(RUN, 2)
    assert [list(ledger.spooled_participants(RUN, r)) for r in (1, 2, 3, 4)] == [
        [],
        [],
        ["a"],
        ["a"],
    ]
    assert ledger.load_spooled(RUN, 3, "a") == make_params(3.0)
    ledger.clear_spool(RUN, 2)  # nothing left to clear: harmless
    ledger.clear_spool(RUN, 10)
    assert list(ledger.spooled_participants(RUN, 4)) == []


def test_missing_spooled_update_is_a_ledger_error(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.spool_update(RUN, 1, "a", make_params())
    with pytest.raises(LedgerError, match="no spooled update of 'b'") as info:
        ledger.load_spooled(RUN, 1, "b")
    assert not isinstance(info.value, CheckpointCorrupted)
    with pytest.raises(LedgerError, match="no spooled update of 'a' for round 2"):
        ledger.load_spooled(RUN, 2, "a")
    with pytest.raises(LedgerError, match="empty name"):
        ledger.spool_update(RUN, 1, "", make_params())


def test_spools_of_runs_are_separate(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    ledger.create_run(make_run("run-2"))
    ledger.spool_update(RUN, 1, "a", make_params(1.0))
    ledger.spool_update("run-2", 1, "b", make_params(2.0))
    ledger.clear_spool("run-2", 1)
    assert list(ledger.spooled_participants(RUN, 1)) == ["a"]
    assert list(ledger.spooled_participants("run-2", 1)) == []


# -- retention and recovery ------------------------------------------------------------------
def commit_rounds(ledger: Ledger, rounds: range) -> None:
    for number in rounds:
        ledger.start_round(make_round(number))
        ledger.commit_round(RUN, number, make_params(float(number)), finished_at=200.0 + number)


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "deleted", "remaining"),
    [
        (2, 0, [1, 2, 3, 4, 5, 6, 7, 8], [9, 10]),
        (3, 4, [1, 2, 3, 5, 6, 7], [4, 8, 9, 10]),
        (0, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9], [10]),
        (1, 3, [1, 2, 4, 5, 7, 8], [3, 6, 9, 10]),
        (20, 0, [], list(range(1, 11))),
    ],
)
def test_prune_checkpoints(
    ledger: Ledger, keep_last: int, keep_every: int, deleted: list[int], remaining: list[int]
) -> None:
    ledger.create_run(make_run())
    commit_rounds(ledger, range(1, 11))
    digests = {r.round: r.model_digest for r in ledger.rounds(RUN)}
    assert ledger.prune_checkpoints(RUN, keep_last=keep_last, keep_every=keep_every) == deleted
    assert [c.round for c in ledger.checkpoints(RUN)] == remaining
    assert {r.round: r.model_digest for r in ledger.rounds(RUN)} == digests
    for number in remaining:
        assert ledger.load_checkpoint(RUN, number) == make_params(float(number))
    for number in deleted:
        with pytest.raises(LedgerError, match=f"no checkpoint for round {number}"):
            ledger.load_checkpoint(RUN, number)
    assert ledger.prune_checkpoints(RUN, keep_last=keep_last, keep_every=keep_every) == []


def test_prune_refuses_negative_settings(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    commit_rounds(ledger, range(1, 3))
    with pytest.raises(ConfigError, match="keep_last"):
        ledger.prune_checkpoints(RUN, keep_last=-1, keep_every=0)
    with pytest.raises(ConfigError, match="keep_every"):
        ledger.prune_checkpoints(RUN, keep_last=1, keep_every=-2)
    assert [c.round for c in ledger.checkpoints(RUN)] == [1, 2]


def test_latest_checkpoint_of_a_healthy_run(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    assert ledger.latest_checkpoint(RUN) is None
    commit_rounds(ledger, range(1, 4))
    assert ledger.latest_checkpoint(RUN) == (3, make_params(3.0), [])


def damage_checkpoint(ledger: Ledger, round: int, how: str) -> None:
    """Truncate ("truncate"), flip a payload byte ("flip") or delete ("delete") a checkpoint."""
    if isinstance(ledger, SqliteLedger):
        path = Path(next(c.path for c in ledger.checkpoints(RUN) if c.round == round))
        data = path.read_bytes()
        if how == "delete":
            path.unlink()
        else:
            path.write_bytes(data[:-7] if how == "truncate" else flip_last_bytes(data))
        return
    assert isinstance(ledger, MemoryLedger)
    blobs = ledger._runs[RUN].blobs  # the in-memory "file"; no public way to damage it
    if how == "delete":
        blobs[round] = b""
    else:
        data = blobs[round]
        blobs[round] = data[:-7] if how == "truncate" else flip_last_bytes(data)


def flip_last_bytes(data: bytes) -> bytes:
    return data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:]


def test_latest_checkpoint_walks_back_past_a_truncated_one(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    commit_rounds(ledger, range(1, 4))
    damage_checkpoint(ledger, 3, "truncate")
    found = ledger.latest_checkpoint(RUN)
    assert found is not None
    round, parameters, problems = found
    assert (round, parameters) == (2, make_params(2.0))
    assert len(problems) == 1
    assert problems[0].startswith("round 3: checkpoint ")
    assert "round-00003.ckpt is truncated" in problems[0]


def test_latest_checkpoint_names_every_skipped_one(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    commit_rounds(ledger, range(1, 5))
    damage_checkpoint(ledger, 4, "flip")
    damage_checkpoint(ledger, 3, "delete")
    found = ledger.latest_checkpoint(RUN)
    assert found is not None
    assert found[:2] == (2, make_params(2.0))
    assert [p.split(":")[0] for p in found[2]] == ["round 4", "round 3"]
    assert "round-00004.ckpt is corrupted" in found[2][0]


def test_latest_checkpoint_is_none_when_all_are_corrupt(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    commit_rounds(ledger, range(1, 3))
    damage_checkpoint(ledger, 1, "flip")
    damage_checkpoint(ledger, 2, "truncate")
    assert ledger.latest_checkpoint(RUN) is None


def test_participant_events_in_a_batch_keep_their_order(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    batch = [ParticipantEvent(run_id=RUN, participant=p, state=ParticipantState.TASKED, at=5.0,
                              detail="fit round 1 attempt 1") for p in ("c", "a", "b")]
    ledger.record_participant_events(batch)
    ledger.record_participant_events([])
    assert list(ledger.participant_events(RUN)) == batch
    with pytest.raises(LedgerError, match="unknown run"):
        ledger.record_participant_events([dataclasses.replace(batch[0], run_id="nope")])
    assert list(ledger.participant_events(RUN)) == batch  # nothing of a refused batch


def test_superseded_contributions_are_marked_and_keep_their_reason(ledger: Ledger) -> None:
    ledger.create_run(make_run())
    for rnd in (1, 2, 3):
        ledger.record_contribution(contribution("a", ContributionStatus.ACCEPTED, rnd))
        ledger.record_contribution(contribution("b", ContributionStatus.REJECTED, rnd, "NaN"))
    ledger.supersede_contributions(RUN, 2, "attempt failed: quorum not reached")
    by_round = {(c.round, c.participant): c for c in ledger.contributions(RUN)}
    assert by_round[(2, "a")].status is ContributionStatus.SUPERSEDED
    assert by_round[(2, "a")].reason == "attempt failed: quorum not reached"
    assert by_round[(2, "b")].status is ContributionStatus.REJECTED  # only accepted ones
    assert by_round[(1, "a")].status is by_round[(3, "a")].status is ContributionStatus.ACCEPTED
    ledger.start_round(make_round(3))
    ledger.invalidate_round(RUN, 3, "checkpoint unusable")
    third = {c.participant: c for c in ledger.contributions(RUN, 3)}
    assert third["a"].status is ContributionStatus.SUPERSEDED
    assert third["a"].reason == "checkpoint unusable"
    assert [c.status for c in ledger.contributions(RUN, 1)][0] is ContributionStatus.ACCEPTED
