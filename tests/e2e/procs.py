"""Real processes for the end-to-end tests: start a ``conclave`` command with its output in a
log file, and read the address a coordinator printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m conclave ARGS`` with no standard input, stdout and stderr appended to
    ``log``, unbuffered so the test can follow it."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "conclave", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def coordinator_address(log: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> str:
    """The HOST:PORT a coordinator printed (``coordinator listening on ...``) in ``log``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for line in log.read_text().splitlines():
            if line.startswith("coordinator listening on "):
                return line.split()[3]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"the coordinator printed no address:\n{log.read_text()}")


def kill_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Kill whatever is still running (a paused process is woken first) and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
