"""A trainer that returns nonsense (a metric that is not a number, a fractional example count,
a loss that is a string) fails its own task with the reason; the run goes on without it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conclave.core.spec import RunSpec
from conclave.core.types import ContributionStatus, TaskKind, TrainerContext
from conclave.ledger.memory import MemoryLedger
from conclave.simulation.engine import Simulation
from conclave.trainers.noise import NoiseTrainer, make_trainer

SPEC = """
[run]
name = "odd-trainer"
rounds = 2
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "8"
[selection]
min_participants = 3
min_quorum = 2
[deadlines]
round_timeout_s = 5
[simulation]
participants = 3
"""


class Odd(NoiseTrainer):
    def __init__(self, how: str) -> None:
        super().__init__(dim=8, sigma=1e-3, examples=1, seed=0)
        self.how = how

    def fit(self, config):  # type: ignore[no-untyped-def]
        fit = super().fit(config)
        if self.how == "metric":
            return replace(fit, metrics={"train_loss": "low"})
        return replace(fit, num_examples=2.5)

    def evaluate(self, config):  # type: ignore[no-untyped-def]
        ev = super().evaluate(config)
        return replace(ev, loss="fine") if self.how == "loss" else ev


@pytest.mark.parametrize("how", ["metric", "examples", "loss"])
def test_a_trainer_returning_nonsense_sits_its_task_out(how: str) -> None:
    def factory(ctx: TrainerContext) -> NoiseTrainer:
        return Odd(how) if ctx.participant == "participant-1" else make_trainer(ctx)

    ledger = MemoryLedger()
    sim = Simulation(spec=RunSpec.from_toml(SPEC), ledger=ledger, factory=factory)
    result = sim.run()
    assert result.summary["status"] == "finished" and result.summary["rounds_committed"] == 2
    odd = next(a for a in sim.agents if a.name == "participant-1")
    assert odd.stats.failures and all("participant-1: trainer." in f for f in odd.stats.failures)
    kind = TaskKind.EVALUATE if how == "loss" else TaskKind.FIT
    mine = [c for c in ledger.contributions(result.run_id)
            if c.participant == "participant-1" and c.kind is kind]
    assert mine and all(c.status is ContributionStatus.DROPPED for c in mine)
    # the participant said why, so the ledger has the reason and nobody waited for it
    assert all(c.reason.startswith(f"trainer failed: trainer.{kind.value} returned")
               for c in mine), [c.reason for c in mine]
    rounds = [r for r in ledger.rounds(result.run_id) if r.kind is kind]
    assert all(r.finished_at - r.started_at < 5 for r in rounds)  # round_timeout_s = 5


class Broken(NoiseTrainer):
    def fit(self, config):  # type: ignore[no-untyped-def]
        raise RuntimeError("data file /data/x.csv not found")


def test_a_trainer_that_raises_declines_and_the_round_closes_without_waiting() -> None:
    def factory(ctx: TrainerContext) -> NoiseTrainer:
        if ctx.participant == "participant-2":
            return Broken(dim=8, sigma=1e-3, examples=1, seed=0)
        return make_trainer(ctx)

    ledger = MemoryLedger()
    spec = RunSpec.from_toml(SPEC.replace("round_timeout_s = 5", "round_timeout_s = 900"))
    result = Simulation(spec=spec, ledger=ledger, factory=factory).run()
    assert result.summary["rounds_committed"] == 2
    fits = [c for c in ledger.contributions(result.run_id)
            if c.participant == "participant-2" and c.kind is TaskKind.FIT]
    assert [c.status for c in fits] == [ContributionStatus.DROPPED] * 2
    assert fits[0].reason == ("trainer failed: trainer.fit failed: RuntimeError: "
                              "data file /data/x.csv not found")
    for r in ledger.rounds(result.run_id):
        assert r.finished_at - r.started_at < 900, r  # closed on the decline, not the deadline
