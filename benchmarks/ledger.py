"""Ledger cost: the share of round time spent writing the SQLite ledger, and a soak run.

1. 100 simulated participants (noise trainer, 100k parameters), SQLite ledger in a temporary
   state dir: seconds per round spent in ledger calls against the round's wall time.
   Target: <= 5 %.
2. Soak: R rounds (default 1,000) of 20 participants with a small model and the SQLite
   ledger, checkpoints pruned to the last 5: the process's RSS after round 100 against after
   round R. Target: growth < 5 %.

Run: python benchmarks/ledger.py [--participants 100] [--soak-rounds 1000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from conclave.coordinator.service import RoundTiming
from conclave.core.spec import RunSpec
from conclave.core.types import TaskKind
from conclave.ledger.sqlite import SqliteLedger
from conclave.simulation.engine import Simulation
from conclave.trainers.noise import make_trainer

SPEC = """
[run]
name = "bench-ledger"
rounds = {rounds}
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "{dim}"
[selection]
min_participants = {n}
[evaluation]
every_rounds = 0
[checkpoints]
keep_last = 5
[simulation]
participants = {n}
"""


class TimedLedger:
    """Forwards to a ledger and adds up the time spent in it."""

    def __init__(self, inner: SqliteLedger) -> None:
        self._inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def commit_share(n: int, dim: int, rounds: int, power_loss_safe: bool = False
                 ) -> tuple[float, float]:
    spec = RunSpec.from_toml(SPEC.format(rounds=rounds, dim=dim, n=n))
    with tempfile.TemporaryDirectory() as state:
        ledger = TimedLedger(SqliteLedger(Path(state), power_loss_safe=power_loss_safe))
        marks: list[tuple[float, float]] = []

        def on_round(t: RoundTiming) -> None:
            if t.kind is TaskKind.FIT:
                marks.append((time.perf_counter(), ledger.seconds))

        sim = Simulation(spec=spec, ledger=ledger, factory=make_trainer,  # type: ignore[arg-type]
                         on_round=on_round)
        start = (time.perf_counter(), ledger.seconds)
        sim.run()
        ledger.close()
    spans = list(zip([start, *marks[:-1]], marks, strict=True))[1:]
    wall = statistics.median(b[0] - a[0] for a, b in spans)
    in_ledger = statistics.median(b[1] - a[1] for a, b in spans)
    return wall, in_ledger


def soak(rounds: int, n: int = 20, dim: int = 1000) -> tuple[float, float]:
    spec = RunSpec.from_toml(SPEC.format(rounds=rounds, dim=dim, n=n))
    proc = psutil.Process()
    rss: dict[int, float] = {}

    def on_round(t: RoundTiming) -> None:
        if t.kind is TaskKind.FIT and t.round in (100, rounds):
            gc.collect()
            rss[t.round] = proc.memory_info().rss / 2**20

    with tempfile.TemporaryDirectory() as state:
        ledger = SqliteLedger(Path(state))
        Simulation(spec=spec, ledger=ledger, factory=make_trainer, on_round=on_round).run()
        ledger.close()
    return rss[100], rss[rounds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--participants", type=int, default=100)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--soak-rounds", type=int, default=1000)
    args = ap.parse_args()
    wall_f, in_ledger_f = commit_share(args.participants, args.dim, args.rounds, True)
    print(f"{args.participants} participants, {args.dim} parameters, power-loss-safe ledger "
          f"(fsync every transaction): round {wall_f:.3f} s, in the ledger {in_ledger_f:.4f} s "
          f"({in_ledger_f / wall_f:.1%})")
    wall, in_ledger = commit_share(args.participants, args.dim, args.rounds)
    print(f"{args.participants} participants, {args.dim} parameters, default ledger (survives "
          f"the process dying): round {wall:.3f} s, in the ledger {in_ledger:.4f} s")
    t0 = time.perf_counter()
    first, last = soak(args.soak_rounds)
    print(f"soak: {args.soak_rounds} rounds in {time.perf_counter() - t0:.0f} s; RSS after "
          f"round 100 {first:.1f} MB, after round {args.soak_rounds} {last:.1f} MB")
    print(f"ledger share of round time: {in_ledger / wall:.1%} (target <= 5%); memory growth "
          f"after round 100: {last / first - 1:+.1%} (target < 5%)")


if __name__ == "__main__":
    main()
