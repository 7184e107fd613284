"""Simulation: N virtual participants, a D-parameter model, no-op training, R rounds.

Reports wall-clock seconds per round (steady state, rounds after the first) and peak memory
(RSS of this process) for Conclave; with --flower, runs Flower's simulation engine on the same
workload in its own virtual environment (see benchmarks/peers/) and prints the ratio last.
Workload (PEERS.md): the model is one float32 vector; "training" adds N(0, 1e-3) noise;
FedAvg over every participant each round.

Run: python benchmarks/simulation.py --clients 100 1000 [--flower]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from conclave.coordinator.service import RoundTiming
from conclave.core.spec import RunSpec
from conclave.core.types import TaskKind
from conclave.ledger.memory import MemoryLedger
from conclave.simulation.engine import Simulation
from conclave.trainers.noise import make_trainer

SPEC = """
[run]
name = "bench-sim"
rounds = {rounds}
seed = 1
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "{dim}"
[selection]
min_participants = {clients}
[evaluation]
every_rounds = 0
[simulation]
participants = {clients}
"""


def run_conclave(clients: int, dim: int, rounds: int) -> dict[str, object]:
    spec = RunSpec.from_toml(SPEC.format(rounds=rounds, dim=dim, clients=clients))
    stamps: list[float] = []

    def on_round(t: RoundTiming) -> None:
        if t.kind is TaskKind.FIT:
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    sim = Simulation(spec=spec, ledger=MemoryLedger(), factory=make_trainer, on_round=on_round)
    setup = time.perf_counter() - t0
    start = time.perf_counter()
    result = sim.run()
    total = time.perf_counter() - start
    assert result.summary["rounds_committed"] == rounds, result.summary
    per_round = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    steady = per_round[1:] or per_round
    return {
        "framework": "conclave", "clients": clients, "dim": dim, "rounds": rounds,
        "seconds_per_round": per_round, "median_round_s": statistics.median(steady),
        "startup_s": setup, "total_s": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flower", action="store_true", help="also run Flower side by side")
    ap.add_argument("--flower-rounds", type=int, default=None,
                    help="rounds for Flower (default: --rounds; fewer saves time at N=1000)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    results: list[dict[str, object]] = []
    ratios: list[str] = []
    for n in args.clients:
        ours = run_conclave(n, args.dim, args.rounds)
        results.append(ours)
        print(f"conclave N={n}: {ours['median_round_s']:.4f} s/round, startup "
              f"{ours['startup_s']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
        if args.flower:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from peers.flower_env import run_flower  # type: ignore[import-not-found]

            theirs = run_flower(n, args.dim, args.flower_rounds or args.rounds,
                                timeout_s=3600)
            results.append(theirs)
            ratio = float(theirs["median_round_s"]) / float(ours["median_round_s"])
            print(f"flower   N={n}: {theirs['median_round_s']:.4f} s/round, startup "
                  f"{theirs['startup_s']:.2f} s, peak RSS {theirs['peak_rss_mb']:.0f} MB",
                  flush=True)
            ratios.append(f"N={n}: flower/conclave seconds per round = {ratio:.1f}x "
                          f"(target >= 20x)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    if ratios:
        for line in ratios:
            print(line)
    else:
        for r in results:
            print(f"N={r['clients']}: {r['median_round_s']:.4f} s/round (vs Flower 1.42 in "
                  f"PEERS.md: 1.37 s at N=100, 35 s at N=1000; run with --flower for a "
                  f"same-run ratio)")


if __name__ == "__main__":
    main()
