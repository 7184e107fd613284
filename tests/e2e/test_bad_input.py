"""Bad input against a real coordinator process with real participant processes.

Three honest hospitals run as `conclave participant` processes; the test itself plays the
fourth, hospital-3, and misbehaves: NaN updates, duplicates, wrong shapes, stale rounds, an
unknown run id, an upload abandoned halfway, garbage bytes and an oversized message on the
port, and an outsider that is not enrolled. The run must commit every round on quorum, the
coordinator must keep serving, and the ledger must hold every rejection with its reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from procs import coordinator_address as _address

from conclave.core.errors import RemoteProtocolError
from conclave.core.parameters import Parameters
from conclave.core.types import (
    ContributionStatus,
    Evaluation,
    JoinRequest,
    Task,
    TaskKind,
    Update,
)
from conclave.ledger.sqlite import SqliteLedger
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc.client import GrpcCoordinatorClient

pytestmark = pytest.mark.e2e

SPEC = """
[run]
name = "bad-input"
rounds = 3
seed = 3
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "1000"
delay_s = "1.5"
[selection]
min_participants = 4
min_quorum = 3
[deadlines]
round_timeout_s = 8
evaluation_timeout_s = 8
join_timeout_s = 60
[evaluation]
every_rounds = 0
[federation]
participants = ["hospital-0", "hospital-1", "hospital-2", "hospital-3"]
heartbeat_interval_s = 0.5
lost_after_heartbeats = 20
"""


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "conclave", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _task(client: GrpcCoordinatorClient, run_id: str, kind: TaskKind, round_: int) -> Task:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        task = client.fetch_task(run_id, "hospital-3", 2.0).task
        if task is not None and task.kind is kind and task.round == round_:
            return task
    raise AssertionError(f"no {kind.value} task for round {round_}")


def _update(task: Task, params: Parameters, n: int = 10) -> Update:
    return Update(run_id=task.run_id, round=task.round, participant="hospital-3",
                  num_examples=n, parameters=params)


def _garbage(address: str) -> None:
    host, port = address.rsplit(":", 1)
    rng = np.random.default_rng(0)
    for size in (1, 64, 4096, 100_000):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    # a valid HTTP/2 preface followed by junk frames
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 1000)


def _abandoned_upload(address: str, task: Task) -> None:
    """Open SubmitUpdate, send the header and one chunk of two, then hang up."""
    params = task.parameters
    header = pb.UpdateHeader(
        protocol_version=1, run_id=task.run_id, round=task.round, participant="hospital-3",
        num_examples=10, digest=params.digest(), total_bytes=params.layout.nbytes,
        layout=pb.ModelLayout(arrays=[pb.ArrayLayout(name=n, shape=list(s))
                                      for n, s in params.layout.entries]),
    )

    def messages() -> Iterator[pb.UpdateMessage]:
        yield pb.UpdateMessage(header=header)
        yield pb.UpdateMessage(chunk=bytes(params.to_bytes())[:8])
        time.sleep(0.3)
        raise ConnectionAbortedError("participant went away mid-upload")

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.SubmitUpdate(messages(), timeout=10)


def _oversized(address: str) -> None:
    """A single message far larger than the server accepts."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        big = pb.JoinRequest(protocol_version=1, participant="x" * (16 << 20))
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(big, timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_misbehaving_participant_cannot_break_the_run(tmp_path: Path) -> None:
    spec = tmp_path / "run.toml"
    spec.write_text(SPEC)
    state = tmp_path / "state"
    coord_log = tmp_path / "coordinator.log"
    coord = _start(["coordinator", "--spec", str(spec), "--state-dir", str(state)], coord_log)
    procs = [coord]
    try:
        address = _address(coord_log, coord)
        _garbage(address)
        _oversized(address)
        for i in range(3):
            procs.append(_start(["participant", "--coordinator", address, "--name",
                                 f"hospital-{i}", "--trainer",
                                 "conclave.trainers.noise:make_trainer",
                                 "--option", "dim=1000", "--option", "delay_s=1.5"],
                                tmp_path / f"hospital-{i}.log"))
        client = GrpcCoordinatorClient(address, timeout_s=20)
        with pytest.raises(RemoteProtocolError, match="unknown participant 'mallory'"):
            client.join(JoinRequest(participant="mallory"))
        run_id = client.join(JoinRequest(participant="hospital-3")).run_id

        # round 1 (the honest participants take 1.5 s to train): NaN, then a retry (duplicate)
        t1 = _task(client, run_id, TaskKind.FIT, 1)
        nan = t1.parameters.copy()
        nan.flat[0] = np.nan
        v = client.submit_update(_update(t1, nan))
        assert not v.accepted and "NaN" in v.reason
        v = client.submit_update(_update(t1, t1.parameters))
        assert not v.accepted and "duplicate" in v.reason
        with pytest.raises(RemoteProtocolError, match="unknown run id"):
            client.submit_update(_update(t1, t1.parameters).__class__(
                run_id="no-such-run", round=1, participant="hospital-3", num_examples=1,
                parameters=t1.parameters))

        # round 2: a stale round-1 update, then wrong shapes
        t2 = _task(client, run_id, TaskKind.FIT, 2)
        v = client.submit_update(_update(t1, t1.parameters))
        assert not v.accepted and "stale" in v.reason
        wrong = Parameters.from_arrays({"vector": np.zeros((1, 5), np.float32)})
        v = client.submit_update(_update(t2, wrong))
        assert not v.accepted and "wrong shapes" in v.reason

        # round 3: an upload abandoned halfway; the round must commit on quorum at the deadline
        t3 = _task(client, run_id, TaskKind.FIT, 3)
        _abandoned_upload(address, t3)
        _garbage(address)  # the coordinator still serves after all of this

        # final evaluation: answer honestly so the run ends without waiting
        t4 = _task(client, run_id, TaskKind.EVALUATE, 3)
        v = client.submit_evaluation(Evaluation(run_id=run_id, round=t4.round,
                                                participant="hospital-3", loss=0.7,
                                                num_examples=1, metrics={"accuracy": 0.5}))
        assert v.accepted
        assert coord.wait(timeout=60) == 0, coord_log.read_text()
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=10)

    with SqliteLedger.open_read_only(state) as ledger:
        (run,) = ledger.runs()
        assert run.status.value == "finished"
        fits = [r for r in ledger.rounds(run.run_id) if r.kind is TaskKind.FIT]
        assert [(r.round, r.status.value) for r in fits] == [
            (1, "committed"), (2, "committed"), (3, "committed")]
        assert all(r.metrics["contributions"] == 3.0 for r in fits)
        mine = [c for c in ledger.contributions(run.run_id) if c.participant == "hospital-3"]
        reasons = [(c.round, c.status, c.reason.split(":")[0]) for c in mine
                   if c.kind is TaskKind.FIT]
        assert (1, ContributionStatus.REJECTED, "update contains 1 NaN or Inf values") in reasons
        assert any(r[0] == 1 and "duplicate" in r[2] for r in reasons)
        assert any(r[1] is ContributionStatus.LATE and "stale" in r[2] for r in reasons)
        assert any(r[0] == 2 and r[2] == "wrong shapes" for r in reasons)
        honest = [c for c in ledger.contributions(run.run_id)
                  if c.participant != "hospital-3" and c.kind is TaskKind.FIT]
        assert (3, ContributionStatus.DROPPED, "no answer before the deadline") in reasons
        assert len(honest) == 9 and all(c.status is ContributionStatus.ACCEPTED for c in honest)
        # nothing lost: a checkpoint per committed round, readable and matching its digest
        for r in fits:
            assert ledger.load_checkpoint(run.run_id, r.round).digest() == r.model_digest
