"""Transport: real gRPC on loopback, 10 participant processes, a 1M-parameter model.

1. Round overhead: a coordinator (this process) and P `conclave participant` processes with a
   no-op trainer (sigma = 0: the update is a copy of the model), R rounds of FedAvg. Prints
   seconds per round (steady state) — all of it framework overhead: download, upload, digests,
   aggregation, ledger commit with a checkpoint.
2. Upload throughput per stream: one client uploads the model repeatedly to a server whose
   service accepts at once; MB/s, and the same with P concurrent client processes.
Target: >= 200 MB/s per stream. The ratio to that target is printed last.
Run: python benchmarks/transport.py [--participants 10] [--dim 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from conclave.coordinator.service import Coordinator, RoundTiming
from conclave.core.parameters import Layout, Parameters
from conclave.core.spec import RunSpec
from conclave.core.types import (
    Evaluation,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    SecAggStep,
    StageInput,
    TaskAssignment,
    TaskKind,
    Update,
    Verdict,
)
from conclave.ledger.sqlite import SqliteLedger
from conclave.transport.grpc.client import GrpcCoordinatorClient
from conclave.transport.grpc.server import GrpcServer

SPEC = """
[run]
name = "bench-transport"
rounds = {rounds}
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "{dim}"
sigma = "0"
[selection]
min_participants = {participants}
[evaluation]
every_rounds = 0
[deadlines]
round_timeout_s = 120
"""


def round_overhead(participants: int, dim: int, rounds: int) -> dict[str, float]:
    spec = RunSpec.from_toml(SPEC.format(rounds=rounds, dim=dim, participants=participants))
    stamps: list[float] = []

    def on_round(t: RoundTiming) -> None:
        if t.kind is TaskKind.FIT:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as state:
        ledger = SqliteLedger(Path(state))
        initial = Parameters.zeros(Layout.of({"vector": (dim,)}))
        coord = Coordinator(spec=spec, ledger=ledger, initial=initial, on_round=on_round)
        server = GrpcServer(coord)
        address = server.start()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "conclave", "participant", "--coordinator", address,
             "--name", f"p{i}", "--trainer", "conclave.trainers.noise:make_trainer",
             "--option", f"dim={dim}", "--option", "sigma=0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(participants)]
        try:
            coord.start()
            assert coord.wait(timeout_s=600), "run did not finish"
        finally:
            for p in procs:
                p.wait(timeout=30)
            server.stop()
            ledger.close()
        assert coord.summary()["rounds_committed"] == rounds
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"startup_to_round1_s": stamps[0] - t0, "median_round_s": statistics.median(per_round)}


class Sink:
    """A CoordinatorService that accepts every update at once."""

    def join(self, request: JoinRequest) -> JoinReply:
        return JoinReply(run_id="sink", heartbeat_interval_s=60, current_round=1)

    def heartbeat(self, run_id: str, participant: str,
                  telemetry: Mapping[str, float]) -> HeartbeatReply:
        return HeartbeatReply(has_task=False, run_finished=False)

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        return TaskAssignment(task=None)

    def submit_update(self, update: Update) -> Verdict:
        return Verdict(accepted=True)

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict:
        return Verdict(accepted=True)

    def fetch_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                    wait_s: float) -> StageInput:
        return StageInput(payload=None)

    def submit_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                     payload: bytes) -> Verdict:
        return Verdict(accepted=True)


def _upload(address: str, dim: int, repeats: int, queue: "mp.Queue[float]") -> None:
    params = Parameters.from_arrays({"vector": np.ones(dim, np.float32)})
    with GrpcCoordinatorClient(address) as client:
        client.submit_update(Update(run_id="sink", round=1, participant="x", num_examples=1,
                                    parameters=params))  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert client.submit_update(Update(run_id="sink", round=1, participant="x",
                                               num_examples=1, parameters=params)).accepted
        queue.put(repeats * params.layout.nbytes / (time.perf_counter() - t0) / 1e6)


def upload_rate(streams: int, dim: int, repeats: int) -> list[float]:
    server = GrpcServer(Sink())
    address = server.start()
    ctx = mp.get_context("spawn")
    queue: mp.Queue[float] = ctx.Queue()
    procs = [ctx.Process(target=_upload, args=(address, dim, repeats, queue))
             for _ in range(streams)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    server.stop()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    mb = args.dim * 4 / 1e6
    r = round_overhead(args.participants, args.dim, args.rounds)
    print(f"{args.participants} participant processes, {mb:.0f} MB model: "
          f"{r['median_round_s']:.3f} s per round (framework overhead), "
          f"{r['startup_to_round1_s']:.2f} s from start to round 1 "
          f"(Flower 1.42 in PEERS.md, 10 SuperNodes: 19.6 s per round, 37.5 s start-up)")
    single = upload_rate(1, args.dim, args.repeats)[0]
    print(f"upload, 1 stream: {single:.0f} MB/s")
    many = upload_rate(args.participants, args.dim, max(2, args.repeats // 4))
    print(f"upload, {args.participants} concurrent streams: median "
          f"{statistics.median(many):.0f} MB/s per stream, {sum(many):.0f} MB/s in all "
          f"(on {os.cpu_count()} cores)")
    print(f"ratio single-stream upload / 200 MB/s target: {single / 200:.2f} (target >= 1)")


if __name__ == "__main__":
    main()
