"""The README's main job, end to end: `conclave demo` with 4 participant processes over gRPC,
then `conclave simulate` of the same spec, then `conclave ledger show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def conclave(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conclave", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("demo")
    done = conclave("demo", "--state-dir", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FLamby FedAvg" in done.stdout and "hospital-3" in done.stdout
    return state


def test_demo_trains_15_rounds_to_flamby_accuracy(demo_dir: Path) -> None:
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["rounds_committed"] == 15
    per = summary["final"]["per_participant"]
    assert sorted(per) == [f"hospital-{i}" for i in range(4)]
    assert [int(per[f"hospital-{i}"]["num_examples"]) for i in range(4)] == [104, 89, 16, 45]
    assert summary["final"]["mean_accuracy"] >= 0.685
    # one checkpoint per committed round, on disk
    assert len(list((demo_dir / "checkpoints").rglob("*.ckpt"))) == 15


def test_simulate_matches_the_demo(demo_dir: Path, tmp_path: Path) -> None:
    done = conclave("simulate", "heart-disease", "--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    sim = json.loads((tmp_path / "summary.json").read_text())
    demo = json.loads((demo_dir / "summary.json").read_text())
    assert abs(sim["final"]["mean_accuracy"] - demo["final"]["mean_accuracy"]) <= 0.01
    assert sim["rounds_committed"] == 15


def test_ledger_show_reads_the_demo(demo_dir: Path) -> None:
    text = conclave("ledger", "show", str(demo_dir))
    assert text.returncode == 0, text.stderr
    assert "committed" in text.stdout and "hospital-2" in text.stdout
    js = conclave("ledger", "show", str(demo_dir), "--json")
    data = json.loads(js.stdout)
    fits = [r for r in data["rounds"] if r["kind"] == "fit"]
    assert len(fits) == 15 and all(r["status"] == "committed" for r in fits)
    accepted = [c for c in data["contributions"] if c["kind"] == "fit" and c["status"] == "accepted"]
    assert len(accepted) == 60


def test_every_participant_heard_the_end_and_exited_cleanly(demo_dir: Path) -> None:
    for i in range(4):
        log = (demo_dir / "logs" / f"hospital-{i}.log").read_text()
        assert "the coordinator ended the run; 15 fit and 15 evaluation task(s) done" in log
        assert "error" not in log.lower()
