"""The run machine, driven by hand: every transition, with exact values."""

from __future__ import annotations

import numpy as np
import pytest

from conclave.core.errors import LocalProtocolError
from conclave.core.parameters import Parameters
from conclave.core.rounds import RunMachine, Stage, Timer
from conclave.core.rounds.events import (
    AggregateComputed,
    AggregateInOrder,
    ArmTimer,
    CloseRound,
    CommitRound,
    DeadlinePassed,
    EvaluationReceived,
    FailRun,
    FinishRun,
    ParticipantJoined,
    ParticipantLost,
    RecordContribution,
    Reply,
    RunStarted,
    StartRound,
    UpdateReceived,
)
from conclave.core.spec import RunSpec
from conclave.core.types import (
    ContributionStatus,
    Evaluation,
    RoundStatus,
    TaskKind,
    Update,
    Verdict,
)


def make_spec(**sel: int) -> RunSpec:
    selection = "\n".join(f"{k} = {v}" for k, v in sel.items())
    return RunSpec.from_toml(f"""
[run]
name = "t"
rounds = 2
seed = 7
[task]
trainer = "x.y:z"
[task.config]
lr = 0.5
[selection]
{selection}
[evaluation]
every_rounds = 0
[deadlines]
round_timeout_s = 10
""")


def params(*values: float) -> Parameters:
    return Parameters.from_arrays({"w": np.array(values, dtype=np.float32)})


def update(machine: RunMachine, who: str, values: tuple[float, ...], n: int, rnd: int | None = None) -> Update:
    return Update(run_id=machine.run_id, round=machine.round if rnd is None else rnd,
                  participant=who, num_examples=n, parameters=params(*values),
                  metrics={"train_loss": 1.0})


def of(cmds: list[object], kind: type) -> list:  # type: ignore[type-arg]
    return [c for c in cmds if isinstance(c, kind)]


def started(min_participants: int = 2, quorum: int = 1, per_round: int = 0) -> RunMachine:
    m = RunMachine(run_id="r1", spec=make_spec(min_participants=min_participants,
                                               min_quorum=quorum,
                                               participants_per_round=per_round),
                   initial=params(0.0, 0.0))
    assert m.handle(RunStarted()) == [ArmTimer(timer=Timer.JOIN, round=1, attempt=0,
                                               timeout_s=600.0)]
    assert m.stage is Stage.WAITING
    return m


def test_waits_for_min_participants_then_selects_everyone() -> None:
    m = started()
    assert m.handle(ParticipantJoined("b")) == []
    cmds = m.handle(ParticipantJoined("a"))
    assert cmds[0] == StartRound(round=1, kind=TaskKind.FIT, attempt=1, selected=("a", "b"))
    assert m.stage is Stage.TRAINING
    task = m.task_for("a")
    assert task is not None and task.round == 1 and task.config["lr"] == 0.5
    assert isinstance(task.config["seed"], int) and task.config["seed"] != m.task_for("b").config["seed"]  # type: ignore[union-attr]
    assert m.task_for("stranger") is None


def test_fedavg_commit_is_example_weighted_mean() -> None:
    m = started()
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    c1 = m.handle(UpdateReceived(update(m, "a", (1.0, 2.0), 1)))
    assert of(c1, Reply)[0].verdict.accepted
    assert of(c1, CommitRound) == []
    c2 = m.handle(UpdateReceived(update(m, "b", (4.0, 8.0), 3)))
    commit = of(c2, CommitRound)[0]
    np.testing.assert_allclose(commit.parameters.flat, [(1 + 12) / 4, (2 + 24) / 4])
    assert commit.metrics["examples"] == 4.0 and commit.metrics["train_loss"] == 1.0
    assert of(c2, StartRound)[0].round == 2


def test_rejects_nan_wrong_shape_duplicate_stale_and_unselected() -> None:
    m = started(quorum=1, min_participants=3)
    for p in "abc":
        m.handle(ParticipantJoined(p))
    bad = m.handle(UpdateReceived(update(m, "a", (float("nan"), 1.0), 5)))
    rec = of(bad, RecordContribution)[0]
    assert rec.status is ContributionStatus.REJECTED and "NaN" in rec.reason
    shape = Update(run_id="r1", round=1, participant="b", num_examples=2,
                   parameters=params(1.0, 2.0, 3.0))
    rec = of(m.handle(UpdateReceived(shape)), RecordContribution)[0]
    assert rec.status is ContributionStatus.REJECTED and "wrong shapes" in rec.reason
    # a second try for the same round is a duplicate
    dup = of(m.handle(UpdateReceived(update(m, "a", (1.0, 1.0), 5))), Reply)[0]
    assert not dup.verdict.accepted and "duplicate" in dup.verdict.reason
    stale = of(m.handle(UpdateReceived(update(m, "c", (1.0, 1.0), 5, rnd=7))), RecordContribution)[0]
    assert stale.status is ContributionStatus.LATE and "stale" in stale.reason
    # the round goes on with the others: c's valid update commits it
    cmds = m.handle(UpdateReceived(update(m, "c", (3.0, 3.0), 5)))
    np.testing.assert_allclose(of(cmds, CommitRound)[0].parameters.flat, [3.0, 3.0])


def test_deadline_commits_on_quorum_and_records_dropped() -> None:
    m = started(quorum=2, min_participants=3)
    for p in "abc":
        m.handle(ParticipantJoined(p))
    m.handle(UpdateReceived(update(m, "a", (2.0, 2.0), 1)))
    m.handle(UpdateReceived(update(m, "b", (4.0, 4.0), 1)))
    cmds = m.handle(DeadlinePassed(Timer.FIT, 1, 1))
    dropped = of(cmds, RecordContribution)
    assert [(d.participant, d.status) for d in dropped] == [("c", ContributionStatus.DROPPED)]
    np.testing.assert_allclose(of(cmds, CommitRound)[0].parameters.flat, [3.0, 3.0])


def test_stale_deadline_is_ignored() -> None:
    m = started()
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    assert m.handle(DeadlinePassed(Timer.FIT, 1, 99)) == []
    assert m.handle(DeadlinePassed(Timer.FIT, 5, 1)) == []


def test_quorum_miss_retries_with_fresh_selection_then_fails() -> None:
    m = started(quorum=2, min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    for attempt in (1, 2, 3):
        m.handle(UpdateReceived(update(m, "a", (1.0, 1.0), 1)))
        cmds = m.handle(DeadlinePassed(Timer.FIT, 1, attempt))
        closes = of(cmds, CloseRound)
        assert closes[0].status is RoundStatus.FAILED and "quorum not reached" in closes[0].reason
    assert of(cmds, FailRun) and m.stage is Stage.FAILED
    assert m.rounds_committed == 0


def test_lost_participant_is_dropped_and_round_closes() -> None:
    m = started(quorum=1)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    m.handle(UpdateReceived(update(m, "a", (1.0, 1.0), 1)))
    cmds = m.handle(ParticipantLost("b"))
    assert of(cmds, RecordContribution)[0].status is ContributionStatus.DROPPED
    assert of(cmds, CommitRound)


def test_join_timeout_fails_run() -> None:
    m = started(min_participants=3)
    m.handle(ParticipantJoined("a"))
    cmds = m.handle(DeadlinePassed(Timer.JOIN, 1, 0))
    assert "only 1 participant(s) available, 3 needed" in of(cmds, FailRun)[0].reason


def test_full_run_with_final_evaluation() -> None:
    m = started(per_round=1, min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    for _ in range(2):
        (chosen,) = [p for p in "ab" if m.task_for(p) is not None]
        cmds = m.handle(UpdateReceived(update(m, chosen, (1.0, 1.0), 1)))
    assert m.stage is Stage.EVALUATING and m.kind is TaskKind.EVALUATE
    m.handle(EvaluationReceived(Evaluation(run_id="r1", round=2, participant="a", loss=0.5,
                                           num_examples=10, metrics={"accuracy": 0.8})))
    cmds = m.handle(EvaluationReceived(Evaluation(run_id="r1", round=2, participant="b",
                                                  loss=1.0, num_examples=30,
                                                  metrics={"accuracy": 0.4})))
    close = of(cmds, CloseRound)[0]
    assert close.kind is TaskKind.EVALUATE
    assert close.metrics["accuracy"] == pytest.approx((0.8 * 10 + 0.4 * 30) / 40)
    assert close.metrics["mean_accuracy"] == pytest.approx(0.6)
    fin = of(cmds, FinishRun)[0]
    assert fin.rounds_committed == 2 and fin.final_evaluation["a"]["accuracy"] == 0.8
    assert m.finished
    # b lost our reply and sends the same answer again: acknowledged, nothing recorded
    again = m.handle(EvaluationReceived(Evaluation(run_id="r1", round=2, participant="b",
                                                   loss=1.0, num_examples=30,
                                                   metrics={"accuracy": 0.4})))
    assert again == [Reply(verdict=Verdict(accepted=True, reason="already accepted"))]
    other = m.handle(EvaluationReceived(Evaluation(run_id="r1", round=2, participant="b",
                                                   loss=0.9, num_examples=30)))
    assert of(other, Reply)[0].verdict.accepted is False


def test_selection_is_deterministic_and_independent_of_join_order() -> None:
    def chosen(order: str) -> tuple[str, ...]:
        m = started(per_round=2, min_participants=2)
        cmds: list[object] = []
        for p in order:
            cmds += m.handle(ParticipantJoined(p))
        return of(cmds, StartRound)[0].selected

    assert chosen("ab") == ("a", "b")
    # with 2 needed, the round starts as soon as the second joins
    assert chosen("xyz") == chosen("yxz")


def test_double_start_is_a_local_error() -> None:
    m = started()
    with pytest.raises(LocalProtocolError):
        m.handle(RunStarted())


def test_round_metrics_average_only_over_participants_that_reported_them() -> None:
    m = started()
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    nan = Update(run_id="r1", round=1, participant="a", num_examples=1,
                 parameters=params(1.0, 1.0), metrics={"train_loss": float("nan")})
    assert of(m.handle(UpdateReceived(nan)), Reply)[0].verdict.accepted
    cmds = m.handle(UpdateReceived(update(m, "b", (1.0, 1.0), 3)))
    assert of(cmds, CommitRound)[0].metrics["train_loss"] == 1.0


def test_the_same_update_sent_again_is_accepted_once() -> None:
    m = started(min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    u = update(m, "a", (1.0, 2.0), 3)
    first = m.handle(UpdateReceived(u, digest=u.parameters.digest()))
    again = m.handle(UpdateReceived(u, digest=u.parameters.digest()))
    assert of(first, Reply)[0].verdict.accepted and of(again, Reply)[0].verdict.accepted
    assert of(again, Reply)[0].verdict.reason == "already accepted"
    assert of(again, RecordContribution) == []  # recorded once
    different = update(m, "a", (9.0, 9.0), 3)
    dup = m.handle(UpdateReceived(different, digest=different.parameters.digest()))
    assert "duplicate" in of(dup, Reply)[0].verdict.reason


def test_the_same_update_for_a_retried_attempt_counts_again() -> None:
    """A participant retrains the unchanged global model with the same seed after a failed
    attempt, so its update (and digest) is the same: it must count for the new attempt, not be
    acknowledged as a resubmission of the discarded one (which left the round to its deadline)."""
    m = started(quorum=2, min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    u = update(m, "a", (1.0, 2.0), 3)
    m.handle(UpdateReceived(u, digest=u.parameters.digest()))
    failed = m.handle(ParticipantLost("b", "missed heartbeats"))
    assert of(failed, CloseRound)[0].status is RoundStatus.FAILED
    m.handle(ParticipantJoined("b"))  # b is back; attempt 2 waits for it
    again = m.handle(UpdateReceived(u, digest=u.parameters.digest()))
    rec = of(again, RecordContribution)
    assert [r.status for r in rec] == [ContributionStatus.ACCEPTED]
    assert of(again, Reply)[0].verdict.reason != "already accepted"
    v = update(m, "b", (3.0, 4.0), 1)
    commit = of(m.handle(UpdateReceived(v, digest=v.parameters.digest())), CommitRound)[0]
    np.testing.assert_allclose(commit.parameters.flat, [(3 + 3) / 4, (6 + 4) / 4])


def test_out_of_order_arrivals_are_aggregated_in_canonical_order() -> None:
    m = started(min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    m.handle(UpdateReceived(update(m, "b", (4.0, 8.0), 3)))
    cmds = m.handle(UpdateReceived(update(m, "a", (1.0, 2.0), 1)))
    (ask,) = of(cmds, AggregateInOrder)
    assert ask.contributors == (("a", 1), ("b", 3)) and of(cmds, CommitRound) == []
    done = m.handle(AggregateComputed(1, params(3.25, 6.5)))
    assert of(done, CommitRound)[0].parameters.flat.tolist() == [3.25, 6.5]


def test_an_aggregate_that_overflows_float32_is_not_committed() -> None:
    """Two finite updates whose weighted sum passes float32's range: the attempt fails with
    the reason and the global model stays what it was."""
    m = started(quorum=2, min_participants=2)
    m.handle(ParticipantJoined("a"))
    m.handle(ParticipantJoined("b"))
    m.handle(UpdateReceived(update(m, "a", (3e38, 1.0), 1)))
    cmds = m.handle(UpdateReceived(update(m, "b", (3e38, 1.0), 1)))
    assert of(cmds, CommitRound) == []
    closed = of(cmds, CloseRound)[0]
    assert closed.status is RoundStatus.FAILED and "not finite" in closed.reason
    assert m.global_parameters.flat.tolist() == [0.0, 0.0]
    assert of(cmds, StartRound)[0].attempt == 2


def test_after_a_restart_a_resent_update_of_the_committed_round_is_acknowledged() -> None:
    """The coordinator committed round 1, then died before p0 heard its update was accepted;
    resumed, it knows p0's digest from the ledger and says "already accepted", not "stale"."""
    from conclave.core.rounds.resume import ResumePoint

    m = RunMachine(run_id="r1", spec=make_spec(min_participants=2), initial=params(1.0, 1.0),
                   resume=ResumePoint(completed_rounds=1, committed_digests={"p0": "abc"}))
    m.handle(RunStarted())
    m.handle(ParticipantJoined("p0"))
    m.handle(ParticipantJoined("p1"))
    assert m.round == 2
    resent = update(m, "p0", (1.0, 2.0), 3, rnd=1)
    cmds = m.handle(UpdateReceived(resent, "abc"))
    assert cmds == [Reply(verdict=Verdict(accepted=True, reason="already accepted"))]
    other = m.handle(UpdateReceived(resent, "different"))  # not the accepted one: stale
    assert of(other, RecordContribution)[0].status is ContributionStatus.LATE


def test_with_secure_aggregation_names_without_an_identity_key_do_not_count() -> None:
    """They can never be selected, so they must not start a round that then has too few."""
    spec = RunSpec.from_toml(make_spec(min_participants=3, min_quorum=2).source
                             + "[secure_aggregation]\n")
    m = RunMachine(run_id="r1", spec=spec, initial=params(0.0, 0.0))
    m.handle(RunStarted())
    assert m.handle(ParticipantJoined("a", identity_key=b"\x01" * 32)) == []
    assert m.handle(ParticipantJoined("bare-1")) == []
    assert m.handle(ParticipantJoined("bare-2")) == []
    assert m.stage is Stage.WAITING
    assert m.handle(ParticipantJoined("b", identity_key=b"\x02" * 32)) == []
    cmds = m.handle(ParticipantJoined("c", identity_key=b"\x03" * 32))
    assert of(cmds, StartRound)[0].selected == ("a", "b", "c")
