"""A coordinator killed by SIGKILL at five points and restarted on the
same state directory resumes the run; participants reconnect on their own; the final model is
bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import coordinator_address as _address
from procs import kill_all
from procs import spawn as _spawn

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fed-heart-disease.toml"


def _spec(tmp: Path, secure: bool, momentum: bool = False) -> Path:
    text = (EXAMPLE.read_text()
            .replace("rounds = 15", "rounds = 4")
            .replace("every_rounds = 1", "every_rounds = 2")
            .replace("heartbeat_interval_s = 1.0", "heartbeat_interval_s = 0.5")
            .replace("lost_after_heartbeats = 10", "lost_after_heartbeats = 60"))
    if secure:
        text += "\n[secure_aggregation]\nstage_timeout_s = 20\n"
    if momentum:  # FedAvgM: the velocity must survive the crash in the checkpoint
        text = text.replace('name = "fedavg"', 'name = "fedavgm"\nserver_momentum = 0.5')
        assert "fedavgm" in text
    path = tmp / ("secure.toml" if secure else "momentum.toml" if momentum else "plain.toml")
    path.write_text(text)
    return path


def _reference(tmp: Path, spec: Path) -> str:
    out = tmp / f"reference-{spec.stem}"
    done = subprocess.run([sys.executable, "-m", "conclave", "simulate", str(spec),
                           "--state-dir", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return str(json.loads((out / "summary.json").read_text())["model_digest"])


@pytest.mark.parametrize(
    ("point", "secure", "momentum"),
    [("selection:2", False, False), ("upload:3", False, False),
     ("aggregation:3", False, False), ("commit:2", False, False), ("unmask:2", True, False),
     ("upload:3", False, True)],
)
def test_killed_coordinator_resumes_to_the_same_model(tmp_path: Path, point: str,
                                                      secure: bool, momentum: bool) -> None:
    spec = _spec(tmp_path, secure, momentum)
    state = tmp_path / "state"
    log = tmp_path / "coordinator.log"
    first = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(state),
                    "--crash-at", point], log)
    procs = [first]
    try:
        address = _address(log, first)
        for i in range(4):
            procs.append(_spawn(["participant", "--coordinator", address, "--name",
                                 f"hospital-{i}"], tmp_path / f"hospital-{i}.log"))
        assert first.wait(timeout=120) == -signal.SIGKILL, log.read_text()
        second = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(state),
                         "--address", address], log)
        procs.append(second)
        assert second.wait(timeout=180) == 0, log.read_text()
        for p in procs[1:5]:
            assert p.wait(timeout=60) == 0
    finally:
        kill_all(procs)
    text = log.read_text()
    assert "resuming run" in text
    summary = json.loads((state / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_committed"] == 4
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]  # both processes' rounds
    assert summary["model_digest"] == _reference(tmp_path, spec)


def test_a_coordinator_stopped_by_sigterm_is_resumed_by_the_same_command(tmp_path: Path) -> None:
    """A clean stop (SIGTERM) records the run as interrupted and exits 130 without telling the
    participants the run is over; they keep retrying, and the restarted coordinator resumes
    the run to the same model as an uninterrupted one."""
    import re

    spec = tmp_path / "long.toml"
    spec.write_text(_spec(tmp_path, False).read_text().replace("rounds = 4", "rounds = 40"))
    state = tmp_path / "state"
    log = tmp_path / "coordinator.log"
    first = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(state)], log)
    procs = [first]
    try:
        address = _address(log, first)
        for i in range(4):
            procs.append(_spawn(["participant", "--coordinator", address, "--name",
                                 f"hospital-{i}"], tmp_path / f"hospital-{i}.log"))
        end = time.monotonic() + 60
        while not re.search(r"round +[3-9]\d*/40", log.read_text()):
            assert first.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.02)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 130, log.read_text()
        interrupted = json.loads((state / "summary.json").read_text())
        assert interrupted["status"] == "interrupted"
        assert 0 < interrupted["rounds_committed"] < 40
        assert all(p.poll() is None for p in procs[1:]), "a participant left the run"
        second = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(state),
                         "--address", address], log)
        procs.append(second)
        assert second.wait(timeout=180) == 0, log.read_text()
        for p in procs[1:5]:
            assert p.wait(timeout=60) == 0
    finally:
        kill_all(procs)
    assert "resuming run" in log.read_text()
    summary = json.loads((state / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_committed"] == 40
    assert summary["model_digest"] == _reference(tmp_path, spec)
