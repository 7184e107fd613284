"""Secure aggregation end to end: a real coordinator, four participant processes, SecAgg+ over
gRPC, and one participant killed in the middle of the protocol (after sharing its keys, just
before sending its masked input). The round must still commit with the survivors' exact sum,
and the run's accuracy must match the plain run within 0.01."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import coordinator_address as _address
from procs import spawn as _spawn

from conclave.core.types import ContributionStatus, TaskKind
from conclave.ledger.sqlite import SqliteLedger

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fed-heart-disease.toml"
KILLED, KILL_ROUND = "hospital-1", 3


def test_secure_round_survives_a_participant_killed_mid_protocol(tmp_path: Path) -> None:
    spec = tmp_path / "secure.toml"
    # Every round starts once all four hospitals are available, and the dead one is noticed
    # within a second: only round 3 goes without it, whatever the machine's speed (with
    # rounds free to start without it, how many it missed would depend on its restart time).
    spec.write_text(EXAMPLE.read_text()
                    .replace("heartbeat_interval_s = 1.0", "heartbeat_interval_s = 0.5")
                    .replace("lost_after_heartbeats = 10", "lost_after_heartbeats = 2")
                    + "\n[secure_aggregation]\nprotocol = \"secagg+\"\nstage_timeout_s = 3\n")
    state = tmp_path / "state"
    coord_log = tmp_path / "coordinator.log"
    coord = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(state)], coord_log)
    procs = [coord]
    try:
        address = _address(coord_log, coord)
        for i in range(4):
            name = f"hospital-{i}"
            extra = ["--crash-at", f"masked_input:{KILL_ROUND}"] if name == KILLED else []
            procs.append(_spawn(["participant", "--coordinator", address, "--name", name,
                                 *extra], tmp_path / f"{name}.log"))
        victim = procs[2]
        assert victim.wait(timeout=120) == -signal.SIGKILL, (
            (tmp_path / f"{KILLED}.log").read_text())
        # the hospital comes back (a restarted process, with a new identity key)
        procs.append(_spawn(["participant", "--coordinator", address, "--name", KILLED],
                            tmp_path / f"{KILLED}-restarted.log"))
        assert coord.wait(timeout=180) == 0, coord_log.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=10)

    secure = json.loads((state / "summary.json").read_text())
    assert secure["status"] == "finished" and secure["rounds_committed"] == 15
    assert len(secure["final"]["per_participant"]) == 4

    with SqliteLedger.open_read_only(state) as ledger:
        run_id = ledger.runs()[0].run_id
        fit3 = [c for c in ledger.contributions(run_id, KILL_ROUND) if c.kind is TaskKind.FIT]
        status = {c.participant: c.status for c in fit3}
        assert status[KILLED] is ContributionStatus.DROPPED
        assert [status[f"hospital-{i}"] for i in (0, 2, 3)] == [ContributionStatus.ACCEPTED] * 3
        reason = next(c.reason for c in fit3 if c.participant == KILLED)
        assert "masked_input" in reason
        events = [e.detail for e in ledger.participant_events(run_id, KILLED)]
        assert f"secure aggregation round {KILL_ROUND}: completed share" in events
        assert f"secure aggregation round {KILL_ROUND}: nothing at masked_input" in events
        round3 = next(r for r in ledger.rounds(run_id)
                      if r.round == KILL_ROUND and r.kind is TaskKind.FIT)
        assert round3.metrics["contributions"] == 3.0

    plain = subprocess.run([sys.executable, "-m", "conclave", "simulate", str(EXAMPLE),
                            "--state-dir", str(tmp_path / "plain")], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    plain_summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert abs(secure["final"]["mean_accuracy"] - plain_summary["final"]["mean_accuracy"]) <= 0.01
