"""One process per participant name, over real gRPC: a second process under a live name is
told to wait; once the first falls silent the second takes the name over, and when the first
wakes up (a paused process, a healed partition) it is told it was replaced and stops, instead
of working on alongside its replacement."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from procs import kill_all
from procs import spawn as _spawn

pytestmark = pytest.mark.e2e

def _wait_for(pattern: str, log: Path, timeout_s: float = 60) -> re.Match[str]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {log}:\n{log.read_text()}")


def test_a_replaced_process_is_told_so_and_stops(tmp_path: Path) -> None:
    spec = tmp_path / "dup.toml"
    spec.write_text("""
[run]
name = "dup"
rounds = 200
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "10"
[selection]
min_participants = 4
min_quorum = 3
[evaluation]
every_rounds = 0
[federation]
participants = ["p0", "p1", "p2", "p3"]
heartbeat_interval_s = 0.25
lost_after_heartbeats = 40
""")
    trainer = ["--trainer", "conclave.trainers.noise:make_trainer", "--option", "dim=10",
               "--option", "delay_s=0.05"]  # each fit takes 50 ms: 200 rounds >= 10 s
    clog = tmp_path / "coordinator.log"
    coord = _spawn(["coordinator", "--spec", str(spec), "--state-dir", str(tmp_path / "s")], clog)
    procs = [coord]
    try:
        address = _wait_for(r"listening on (\S+)", clog).group(1)
        for i in range(4):
            procs.append(_spawn(["participant", "--coordinator", address, "--name", f"p{i}",
                                 *trainer], tmp_path / f"h{i}.log"))
        first = procs[2]  # p1
        _wait_for(r"round +3/200", clog)
        second_log = tmp_path / "h1-second.log"
        second = _spawn(["participant", "--coordinator", address, "--name", "p1", *trainer],
                        second_log)
        procs.append(second)
        _wait_for(r"cannot join yet \(.*another process", second_log)  # the first is alive
        first.send_signal(signal.SIGSTOP)  # the first falls silent...
        time.sleep(1.5)  # ...for longer than two heartbeats: the second gets in
        first.send_signal(signal.SIGCONT)  # ...and wakes up: it must be told, and stop
        assert first.wait(timeout=60) == 1
        assert "replaced this one" in (tmp_path / "h1.log").read_text()
        assert coord.wait(timeout=120) == 0, clog.read_text()
        assert second.wait(timeout=30) == 0, second_log.read_text()
    finally:
        kill_all(procs)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_committed"] == 200
