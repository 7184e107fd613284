"""Recovery from the ledger: corrupt checkpoints are skipped and their rounds redone; the
resumed run ends with the same model as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conclave.coordinator.recovery import recover, unfinished_run
from conclave.core.spec import RunSpec
from conclave.core.types import RoundStatus, RunStatus, TaskKind
from conclave.ledger.sqlite import SqliteLedger
from conclave.simulation.engine import Simulation
from conclave.trainers.noise import make_trainer

SPEC = """
[run]
name = "recover"
rounds = 5
seed = 9
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "64"
[selection]
min_participants = 3
[evaluation]
every_rounds = 0
[simulation]
participants = 3
"""


def test_a_truncated_checkpoint_is_reported_and_the_previous_one_is_used(tmp_path: Path) -> None:
    spec = RunSpec.from_toml(SPEC)
    with SqliteLedger(tmp_path) as ledger:
        sim = Simulation(spec=spec, ledger=ledger, factory=make_trainer)
        sim.run()
        run_id = sim.coordinator.run_id
        final = sim.coordinator.summary()["model_digest"]
        # pretend the coordinator died after round 4 and round 4's checkpoint was cut short
        ledger.set_run_status(run_id, RunStatus.INTERRUPTED, "test")
        ckpt = next(c for c in ledger.checkpoints(run_id) if c.round == 5)
        Path(ckpt.path).write_bytes(Path(ckpt.path).read_bytes()[:-10])
        run = unfinished_run(ledger, spec.source)
        assert run is not None and run.run_id == run_id
        found = recover(ledger, run)
        assert found.point.completed_rounds == 4
        accepted4 = {c.participant: c.digest for c in ledger.contributions(run_id, 4)
                     if c.kind is TaskKind.FIT and c.status.value == "accepted"}
        assert len(accepted4) == 3 and found.point.committed_digests == accepted4
        assert found.problems and "round 5" in found.problems[0]
        assert "truncated" in found.problems[0]
        fit5 = next(r for r in ledger.rounds(run_id) if r.round == 5 and r.kind is TaskKind.FIT)
        assert fit5.status is RoundStatus.FAILED and "checkpoint unusable" in fit5.reason
        # resuming redoes round 5 and reaches the same model
        resumed = Simulation(spec=spec, ledger=ledger, factory=make_trainer, resume=found)
        resumed.run()
        assert resumed.coordinator.summary()["model_digest"] == final
        assert ledger.get_run(run_id).status is RunStatus.FINISHED


def test_checkpoint_retention_keeps_the_newest_and_every_mth(tmp_path: Path) -> None:
    spec = RunSpec.from_toml(SPEC.replace("rounds = 5", "rounds = 7")
                             + "[checkpoints]\nkeep_last = 2\nkeep_every = 3\n")
    with SqliteLedger(tmp_path) as ledger:
        sim = Simulation(spec=spec, ledger=ledger, factory=make_trainer)
        sim.run()
        kept = sorted(c.round for c in ledger.checkpoints(sim.coordinator.run_id))
    assert kept == [3, 6, 7]
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*.ckpt")) == [
        "round-00003.ckpt", "round-00006.ckpt", "round-00007.ckpt"]


FEDAVGM = SPEC + '[strategy]\nname = "fedavgm"\nserver_lr = 1.0\nserver_momentum = 0.8\n'


def test_fedavgm_velocity_is_checkpointed_and_a_resumed_run_uses_it(tmp_path: Path) -> None:
    """The velocity lives in each round's checkpoint; a run resumed after round 3 reads it
    back and ends bit-identical to the uninterrupted run. Resumed without it, the run would
    end elsewhere: the check below fails if the state is not stored or not used."""
    import dataclasses

    spec = RunSpec.from_toml(FEDAVGM)
    with SqliteLedger(tmp_path) as ledger:
        sim = Simulation(spec=spec, ledger=ledger, factory=make_trainer)
        sim.run()
        run_id = sim.coordinator.run_id
        final = sim.coordinator.summary()["model_digest"]
        velocity = ledger.load_strategy_state(run_id, 5)
        assert velocity is not None and velocity.layout == ledger.load_checkpoint(run_id, 5).layout
        assert float(abs(velocity.flat).max()) > 0
        # the coordinator "died" after committing round 3
        ledger.invalidate_round(run_id, 4, "test: coordinator died")
        ledger.set_run_status(run_id, RunStatus.INTERRUPTED, "test")
        run = unfinished_run(ledger, spec.source)
        assert run is not None
        found = recover(ledger, run)
        assert found.point.completed_rounds == 3
        assert found.strategy_state == ledger.load_strategy_state(run_id, 3)
        resumed = Simulation(spec=spec, ledger=ledger, factory=make_trainer, resume=found)
        resumed.run()
        assert resumed.coordinator.summary()["model_digest"] == final
    with SqliteLedger(tmp_path / "forgetful") as other:
        plain = Simulation(spec=spec, ledger=other, factory=make_trainer)
        plain.run()
        rid = plain.coordinator.run_id
        other.invalidate_round(rid, 4, "test")
        other.set_run_status(rid, RunStatus.INTERRUPTED, "test")
        run = unfinished_run(other, spec.source)
        assert run is not None
        forgetful = dataclasses.replace(recover(other, run), strategy_state=None)
        again = Simulation(spec=spec, ledger=other, factory=make_trainer, resume=forgetful)
        again.run()
        assert again.coordinator.summary()["model_digest"] != final


def test_fedavgm_moves_the_model_differently_from_fedavg(tmp_path: Path) -> None:
    digests = []
    for text in (SPEC, FEDAVGM, FEDAVGM.replace("server_momentum = 0.8", "server_momentum = 0.0")):
        with SqliteLedger(tmp_path / str(len(digests))) as ledger:
            sim = Simulation(spec=RunSpec.from_toml(text), ledger=ledger, factory=make_trainer)
            sim.run()
            digests.append(sim.coordinator.summary()["model_digest"])
            params = ledger.load_checkpoint(sim.coordinator.run_id, 5)
            digests.append(params)
    fedavg, fedavgm, no_momentum = digests[1], digests[3], digests[5]
    assert digests[0] != digests[2]
    # momentum 0 and a unit step is FedAvg up to float32 rounding
    np.testing.assert_allclose(no_momentum.flat, fedavg.flat, atol=1e-5)
    assert not np.allclose(fedavgm.flat, fedavg.flat, atol=1e-4)
