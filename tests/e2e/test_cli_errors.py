"""User errors on the command line: one clear line, a meaningful exit code, no traceback;
and a coordinator stopped by a signal records the run as interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def conclave(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conclave", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=cwd)


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def test_bad_spec_is_exit_2_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[run]\nname = "x"\nrounds = -3\n[task]\ntrainer = "a:b"\n')
    done = conclave("simulate", str(spec))
    assert done.returncode == 2
    assert "invalid run.rounds = -3: an integer >= 1" in done.stderr
    no_traceback(done)


def test_missing_spec_file_and_unknown_trainer(tmp_path: Path) -> None:
    done = conclave("simulate", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "readable TOML file" in done.stderr
    spec = tmp_path / "t.toml"
    spec.write_text('[run]\nname = "x"\nrounds = 1\n[task]\ntrainer = "no_such_mod:f"\n')
    done = conclave("simulate", str(spec))
    assert done.returncode == 2 and "an importable module" in done.stderr
    no_traceback(done)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    done = conclave("coordinator", "--spec", "heart-disease", "--state-dir", str(afile))
    assert done.returncode == 1 and "conclave: error:" in done.stderr
    no_traceback(done)


def test_ledger_show_on_an_empty_dir(tmp_path: Path) -> None:
    done = conclave("ledger", "show", str(tmp_path))
    assert done.returncode == 1 and "no ledger" in done.stderr
    no_traceback(done)


def test_failing_trainer_factory_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken_task.py").write_text(
        "def make_trainer(ctx):\n    raise FileNotFoundError('/data/missing.csv')\n")
    spec = tmp_path / "t.toml"
    spec.write_text('[run]\nname = "x"\nrounds = 1\n[task]\ntrainer = "broken_task:make_trainer"\n')
    done = subprocess.run([sys.executable, "-m", "conclave", "simulate", str(spec)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 1
    assert "trainer factory make_trainer failed for coordinator" in done.stderr
    assert "/data/missing.csv" in done.stderr
    no_traceback(done)


def test_sigterm_marks_the_run_interrupted_and_keeps_committed_rounds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "coordinator.log"
    with log.open("wb") as out:
        coord = subprocess.Popen([sys.executable, "-m", "conclave", "coordinator", "--spec",
                                  "heart-disease", "--state-dir", str(state)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while "listening on" not in log.read_text() and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.5)  # no participant ever joins: the run is waiting for them
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(timeout=30) == 130
    finally:
        if coord.poll() is None:
            coord.kill()
    summary = json.loads((state / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    shown = conclave("ledger", "show", str(state), "--json")
    assert json.loads(shown.stdout)["run"]["status"] == "interrupted"


def _demo_running(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int], Path]:
    """A long demo, started and past its third round; its participant processes' ids."""
    import psutil

    state = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "conclave", "demo", "--state-dir",
                                 str(state), "--rounds", "2000"], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        end = time.monotonic() + 60
        while not re.search(r"round +[3-9]\d*/2000", out.read_text()):
            assert demo.poll() is None and time.monotonic() < end, out.read_text()
            time.sleep(0.05)
        children = [c.pid for c in psutil.Process(demo.pid).children()]
        assert len(children) == 4
    except BaseException:
        demo.kill()
        demo.wait()
        raise
    return demo, children, state


def _gone_within(pids: list[int], timeout_s: float) -> list[int]:
    import psutil

    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=timeout_s)
    return [p.pid for p in alive]


def test_sigterm_stops_the_demo_and_its_participants(tmp_path: Path) -> None:
    demo, children, state = _demo_running(tmp_path)
    try:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=30) == 130
        assert _gone_within(children, 10) == []
    finally:
        if demo.poll() is None:
            demo.kill()
    summary = json.loads((state / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert summary["rounds_committed"] >= 3


def test_a_demo_killed_outright_leaves_no_participant_behind(tmp_path: Path) -> None:
    demo, children, _ = _demo_running(tmp_path)
    demo.kill()
    demo.wait(timeout=30)
    leftover = _gone_within(children, 10)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert leftover == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["coordinator", "--spec", "heart-disease", "--state-dir", ""], "must name a folder"),
        (["simulate", "heart-disease", "--state-dir", " "], "must name a folder"),
        (["coordinator", "--spec", "heart-disease", "--state-dir", "s",
          "--address", "127.0.0.1:99999"], "port from 0 to 65535"),
        (["coordinator", "--spec", "heart-disease", "--state-dir", "s",
          "--address", "127.0.0.1"], "HOST:PORT"),
        (["participant", "--coordinator", "127.0.0.1:0", "--name", "p"], "port from 1 to 65535"),
        (["participant", "--coordinator", "127.0.0.1:7", "--name", "p",
          "--connect-timeout", "nan"], "finite number of seconds"),
        (["participant", "--coordinator", "127.0.0.1:7", "--name", "p",
          "--connect-timeout", "-1"], "finite number of seconds"),
        (["demo", "--trainer", "garbage", "--state-dir", "d"], "invalid task.trainer"),
    ],
)
def test_bad_arguments_are_exit_2_before_anything_starts(tmp_path: Path, args: list[str],
                                                         fragment: str) -> None:
    done = conclave(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr
    no_traceback(done)
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_a_spec_that_is_not_utf8_is_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "binary.toml"
    spec.write_bytes(b"\xff\xfe\x00bin")
    done = conclave("simulate", str(spec))
    assert done.returncode == 2 and "a UTF-8 TOML file" in done.stderr
    no_traceback(done)


def test_a_coordinator_that_cannot_listen_leaves_no_running_run(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = conclave("coordinator", "--spec", "heart-disease", "--state-dir",
                        str(tmp_path / "s"), "--address", f"127.0.0.1:{port}")
    assert done.returncode == 1 and "cannot listen" in done.stderr
    no_traceback(done)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "could not start" in summary["reason"]


def test_a_participant_stopped_by_sigterm_exits_130_with_a_message(tmp_path: Path) -> None:
    with socket_closed_port() as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conclave", "participant", "--coordinator",
             f"127.0.0.1:{port}", "--name", "hospital-0", "--connect-timeout", "60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)  # importing, then retrying its first connection
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


class socket_closed_port:
    """A port that was free a moment ago (nothing listens there)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
