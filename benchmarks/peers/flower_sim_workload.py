"""Flower simulation workload for side-by-side benchmarks (run on the Flower venv's Python).

This script never imports conclave: it runs in Flower's own virtual environment
(see ``flower_env.py``), started with the variables from ``flower_env.flower_env_vars``.

Workload (as in /work/shared/PEERS.md): the model is one float32 vector of ``--dim`` elements;
a client's "training" adds N(0, 1e-3) noise to it, so framework overhead dominates; FedAvg over
every client each round, no federated evaluation (``--secagg``: the same workload aggregated
with SecAgg+, see ``flower_secagg_workload.py``). Flower's Message API (``ServerApp`` main +
``flwr.serverapp.strategy.FedAvg``) runs under ``flwr.simulation.run_simulation`` with
``num_supernodes=N`` on the Ray backend with 1 CPU per client and 2 CPUs for Ray.

Timing (wall clock, ``time.time()``, comparable between the driver and Ray's workers): every
client reports when its ``train`` began; the strategy records when each ``aggregate_train``
returns. Flower's ServerApp starts before the Ray backend is up and waits inside round 1, so
``startup_s`` runs from the call to ``run_simulation`` to the first client's ``train`` in
round 1 (Ray start-up, actor pool, app loading); round 1 lasts from then to its aggregation,
and round r > 1 from aggregation r-1 to aggregation r (so inter-round overhead counts). ``median_round_s`` is the
median over rounds 2..R (steady state) when R >= 2, else round 1. ``peak_rss_mb`` is the
largest sum of resident set sizes over this process and all its descendants (Ray's daemons
and workers), sampled every 0.1 s; shared pages are counted once per process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

_T_PROCESS = time.perf_counter()

import numpy as np
import psutil
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

NOISE_STD = 1e-3
_T_START_KEY = "t-train-start"
_POLL_INTERVAL_S = 0.1
_T_IMPORTED = time.perf_counter()


class TreeMemoryPoller:
    """Samples the summed RSS of this process and all its descendants in a daemon thread."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._root = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-poller", daemon=True)
        self.peak_bytes = 0
        self.peak_processes = 0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        procs = [self._root, *self._root.children(recursive=True)]
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_processes = max(self.peak_processes, len(procs))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's first client began and when it was aggregated."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.first_train_started: dict[int, float] = {}
        self.round_aggregated: dict[int, float] = {}
        self.replies_per_round: dict[int, int] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        starts = [
            _scalar(m.content.metric_records["metrics"][_T_START_KEY])
            for m in replies
            if not m.has_error()
        ]
        if starts:
            self.first_train_started[server_round] = min(starts)
        result = super().aggregate_train(server_round, replies)
        self.replies_per_round[server_round] = sum(1 for m in replies if not m.has_error())
        self.round_aggregated[server_round] = time.time()
        return result


def _scalar(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number in the record, got {type(value).__name__}")
    return float(value)


def build_apps(clients: int, dim: int, rounds: int) -> tuple[ServerApp, ClientApp, TimedFedAvg]:
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord([np.zeros(dim, dtype=np.float32)])
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)

    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        started = time.time()
        vector = msg.content.array_records["arrays"].to_numpy_ndarrays()[0]
        server_round = int(_scalar(msg.content.config_records["config"]["server-round"]))
        rng = np.random.default_rng([context.node_id, server_round])
        # generated as conclave.trainers.noise does (float32 draws), so both sides pay the
        # same for 'training' and the ratio measures the frameworks
        noise = rng.standard_normal(vector.shape, dtype=np.float32)
        noise *= np.float32(NOISE_STD)
        content = RecordDict(
            {
                "arrays": ArrayRecord([vector + noise]),
                "metrics": MetricRecord({"num-examples": 1, _T_START_KEY: started}),
            }
        )
        return Message(content=content, reply_to=msg)

    return server_app, client_app, strategy


def round_durations(strategy: TimedFedAvg, rounds: int) -> list[float]:
    missing = [r for r in range(1, rounds + 1) if r not in strategy.round_aggregated]
    if missing:
        raise RuntimeError(f"Flower did not aggregate rounds {missing}")
    durations = [strategy.round_aggregated[1] - strategy.first_train_started[1]]
    for r in range(2, rounds + 1):
        durations.append(strategy.round_aggregated[r] - strategy.round_aggregated[r - 1])
    return durations


def run(clients: int, dim: int, rounds: int) -> dict[str, object]:
    import flwr
    import ray

    server_app, client_app, strategy = build_apps(clients, dim, rounds)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0},
        "init_args": {"num_cpus": 2},
    }
    with TreeMemoryPoller(_POLL_INTERVAL_S) as poller:
        t_call = time.time()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_config=backend_config,  # type: ignore[arg-type]
        )
        t_done = time.time()
        poller.sample()
    durations = round_durations(strategy, rounds)
    short = {r: n for r, n in strategy.replies_per_round.items() if n != clients}
    if short:
        raise RuntimeError(f"rounds with fewer than {clients} replies: {short}")
    steady = durations[1:] if rounds >= 2 else durations
    return {
        "framework": "flower",
        "version": flwr.__version__,
        "ray_version": ray.__version__,
        "python": sys.version.split()[0],
        "clients": clients,
        "dim": dim,
        "rounds": rounds,
        "seconds_per_round": durations,
        "median_round_s": statistics.median(steady),
        "startup_s": strategy.first_train_started[1] - t_call,
        "total_s": t_done - t_call,
        "import_s": _T_IMPORTED - _T_PROCESS,
        "peak_rss_mb": poller.peak_bytes / 2**20,
        "peak_processes": poller.peak_processes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--json-out", type=Path, required=True)
    secagg = parser.add_argument_group("SecAgg+ (see flower_secagg_workload.py)")
    secagg.add_argument("--secagg", action="store_true", help="aggregate with SecAgg+")
    secagg.add_argument("--num-shares", type=int, default=5)
    secagg.add_argument("--threshold", type=int, default=3)
    secagg.add_argument("--clipping-range", type=float, default=8.0)
    secagg.add_argument("--quantization-range", type=int, default=2**22)
    secagg.add_argument("--max-weight", type=float, default=1000.0)
    secagg.add_argument("--drop-fraction", type=float, default=0.0)
    secagg.add_argument("--seed", type=int, default=0, help="picks the dropped clients")
    args = parser.parse_args(argv)
    if min(args.clients, args.dim, args.rounds) < 1:
        parser.error("--clients, --dim and --rounds must be positive")
    if not 0.0 <= args.drop_fraction < 1.0:
        parser.error("--drop-fraction must be in [0, 1)")
    if args.drop_fraction and not args.secagg:
        parser.error("--drop-fraction needs --secagg")
    if args.secagg:
        # A sibling script, importable because Python puts this script's folder on sys.path.
        from flower_secagg_workload import SecAggParams, run_secagg

        params = SecAggParams(
            num_shares=args.num_shares,
            threshold=args.threshold,
            clipping_range=args.clipping_range,
            quantization_range=args.quantization_range,
            max_weight=args.max_weight,
            drop_fraction=args.drop_fraction,
            seed=args.seed,
        )
        result = run_secagg(args.clients, args.dim, args.rounds, params)
        result["import_s"] = _T_IMPORTED - _T_PROCESS
    else:
        result = run(args.clients, args.dim, args.rounds)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
