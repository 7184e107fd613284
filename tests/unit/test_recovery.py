"""Recovery from the ledger: corrupt checkpoints are skipped and their rounds redone; the
resumed run ends with the same model as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

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
