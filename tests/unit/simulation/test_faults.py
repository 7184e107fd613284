"""Fault injection in simulations: the [faults] table."""

from __future__ import annotations

from collections import Counter

import pytest

from conclave.core.errors import ConfigError
from conclave.core.spec import RunSpec
from conclave.core.types import ContributionStatus, RoundStatus, TaskKind
from conclave.ledger.memory import MemoryLedger
from conclave.simulation.engine import Simulation
from conclave.simulation.faults import FaultPlan
from conclave.trainers.noise import make_trainer

SPEC = """
[run]
name = "faulty"
rounds = 6
seed = 3
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "50"
[selection]
min_participants = 8
min_quorum = 4
[evaluation]
every_rounds = 0
[simulation]
participants = 10
[faults]
drop_probability = 0.2
slow = ["participant-9"]
[[faults.crash]]
participant = "participant-7"
round = 3
step = "fit"
[[faults.partition]]
participants = ["participant-0", "participant-1"]
from_round = 2
to_round = 3
"""


def run(text: str = SPEC) -> tuple[Simulation, MemoryLedger]:
    ledger = MemoryLedger()
    sim = Simulation(spec=RunSpec.from_toml(text), ledger=ledger, factory=make_trainer)
    sim.run()
    return sim, ledger


def fit_outcomes(ledger: MemoryLedger, run_id: str) -> dict[tuple[str, int], ContributionStatus]:
    return {(c.participant, c.round): c.status for c in ledger.contributions(run_id)
            if c.kind is TaskKind.FIT}


def test_faults_happen_as_planned_and_the_run_survives_them() -> None:
    sim, ledger = run()
    run_id = sim.coordinator.run_id
    assert sim.coordinator.status.value == "finished"
    out = fit_outcomes(ledger, run_id)
    for r in (2, 3):  # partitioned away
        assert out[("participant-0", r)] is ContributionStatus.DROPPED
        assert out[("participant-1", r)] is ContributionStatus.DROPPED
    assert out[("participant-0", 4)] is ContributionStatus.ACCEPTED
    # crashed for good in round 3: dropped then, never selected again
    assert out[("participant-7", 3)] is ContributionStatus.DROPPED
    assert not [k for k in out if k[0] == "participant-7" and k[1] > 3]
    # the slow participant always misses the deadline; its answers arrive late
    statuses = Counter(s for (p, _), s in out.items() if p == "participant-9")
    assert statuses[ContributionStatus.ACCEPTED] == 0
    late = [c for c in ledger.contributions(run_id) if c.participant == "participant-9"
            and c.status is ContributionStatus.LATE]
    assert late and all("stale" in c.reason for c in late)
    drops = sum(1 for (p, r), s in out.items() if s is ContributionStatus.DROPPED
                and p not in ("participant-0", "participant-1", "participant-7", "participant-9"))
    assert 2 <= drops <= 20  # drop_probability 0.2 over ~6 x 7 tasks


def test_faulty_runs_replay_exactly() -> None:
    a, la = run()
    b, lb = run()
    assert fit_outcomes(la, a.coordinator.run_id) == fit_outcomes(lb, b.coordinator.run_id)
    assert a.coordinator.summary()["model_digest"] == b.coordinator.summary()["model_digest"]


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"drop_probability": 1.5}, "faults.drop_probability"),
        ({"slow": ["nobody"]}, "faults.slow"),
        ({"crash": [{"participant": "participant-1", "round": 0}]}, "faults.crash[0].round"),
        ({"crash": [{"participant": "participant-1", "round": 2, "step": "dance"}]},
         "faults.crash[0].step"),
        ({"partition": [{"participants": ["participant-1"], "from_round": 3, "to_round": 2}]},
         "faults.partition[0].from_round"),
        ({"typo": 1}, "faults.typo"),
    ],
)
def test_bad_fault_tables_are_named(table: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        FaultPlan.from_table(table, seed=0, names=("participant-1", "participant-2"))
    assert info.value.field == field


def test_a_retried_round_draws_its_drops_afresh() -> None:
    plan = FaultPlan.from_table({"drop_probability": 0.5}, seed=3, names=("a", "b", "c"))
    firsts = [plan.silent(p, r) for p in "abc" for r in range(1, 30)]
    seconds = [plan.silent(p, r, attempt=2) for p in "abc" for r in range(1, 30)]
    assert firsts != seconds
    assert [plan.silent(p, r, attempt=1) for p in "abc" for r in range(1, 30)] == firsts
    # a run whose first attempts miss quorum finishes on retries
    spec = RunSpec.from_toml("""
[run]
name = "retries"
rounds = 8
seed = 42
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "16"
[selection]
min_participants = 4
min_quorum = 3
max_round_attempts = 6
[deadlines]
round_timeout_s = 5
[evaluation]
every_rounds = 0
[simulation]
participants = 4
[faults]
drop_probability = 0.3
""")
    ledger = MemoryLedger()
    result = Simulation(spec=spec, ledger=ledger, factory=make_trainer).run()
    assert result.summary["status"] == "finished", result.summary["reason"]
    fits = [r for r in ledger.rounds(result.run_id) if r.kind is TaskKind.FIT]
    retried = [r.round for r in fits if r.attempt > 1 and r.status is RoundStatus.COMMITTED]
    assert retried
    # what a failed attempt accepted is in no model: marked superseded, with the reason
    superseded = [c for c in ledger.contributions(result.run_id, retried[0])
                  if c.status is ContributionStatus.SUPERSEDED]
    assert superseded and all("attempt failed: quorum not reached" in c.reason
                              for c in superseded)
    accepted = [c for c in ledger.contributions(result.run_id, retried[0])
                if c.status is ContributionStatus.ACCEPTED and c.kind is TaskKind.FIT]
    committed = next(r for r in fits if r.round == retried[0] and r.status is RoundStatus.COMMITTED)
    assert len(accepted) == committed.metrics["contributions"]
