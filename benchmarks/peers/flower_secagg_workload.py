"""Flower SecAgg+ variant of the simulation workload (run on the Flower venv's Python).

Started through ``flower_sim_workload.py --secagg``; never imports conclave. The workload is
the plain one (one float32 vector of D elements, every client adds N(0, 1e-3) noise, every
client every round, FedAvg) but aggregated with Flower 1.42's SecAgg+ protocol: the server
runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext`` with the
legacy ``flwr.server.strategy.FedAvg``; clients are a legacy ``NumPyClient`` behind
``secaggplus_mod``. One round is four request/reply exchanges (setup, share keys, collect
masked vectors, unmask).

Dropouts: ``--drop-fraction f`` picks ``round(f * N)`` partitions once, from ``--seed``; in
every round those clients complete setup and key sharing, then raise in the
collect-masked-vectors stage (after their key shares went out, before their masked vector
does), which the simulation engine turns into an error reply. The server then has to rebuild
their pairwise masks from the shares held by the survivors. When SecAgg+ cannot (a client has
fewer than ``threshold`` live neighbours), the workflow logs "halted", skips the strategy's
``aggregate_fit`` and keeps the previous model: such rounds are counted in
``rounds_not_aggregated``.

Timing, as in the plain run: ``startup_s`` runs to the first client's setup stage in round 1;
round 1 lasts from then to its end, round r > 1 from the end of round r-1 to the end of round
r. A round ends when the strategy's ``aggregate_fit`` returns, or, for a round that was not
aggregated, when its last exchange returned. Every exchange is logged in ``stages``.

Correctness: after the run each aggregated model is compared with the exact mean of the
surviving clients' vectors (noise regenerated from the seeds); ``max_abs_error`` is the worst
difference over all aggregated rounds (SecAgg+'s quantisation step is 2 * clipping_range /
quantization_range), and each client's vector is first scaled by num_examples / max_weight
(here 1 / max_weight), so with Flower's default max_weight = 1000 the effective step on a
parameter is about 1000 times coarser.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt
from flwr.app import Context, Message, MetricRecord
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.client.mod import secaggplus_mod
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.simulation import run_simulation

from flower_sim_workload import _POLL_INTERVAL_S, NOISE_STD, TreeMemoryPoller

_BENCH_RECORD = "conclave-bench"
_T_SETUP_KEY = "t-setup-start"
_PARTITION_KEY = "partition-id"
_ROUND_KEY = "server-round"

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class SecAggParams:
    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    drop_fraction: float
    seed: int


@dataclass(frozen=True, slots=True)
class Exchange:
    round: int
    stage: str
    sent: int
    ok: int
    seconds: float
    returned_at: float


@dataclass
class Recorder:
    """What the server side saw, filled from the driver's thread."""

    exchanges: list[Exchange] = field(default_factory=list)
    setup_started: dict[int, float] = field(default_factory=dict)
    aggregated_at: dict[int, float] = field(default_factory=dict)
    results_per_round: dict[int, int] = field(default_factory=dict)
    aggregates: dict[int, FloatArray] = field(default_factory=dict)
    survivors: dict[int, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_noise(partition_id: int, server_round: int, dim: int) -> FloatArray:
    rng = np.random.default_rng([partition_id, server_round])
    # float32 draws, as conclave.trainers.noise makes them: both sides pay the same
    noise = rng.standard_normal(dim, dtype=np.float32)
    noise *= np.float32(NOISE_STD)
    return noise


def dropped_partitions(clients: int, fraction: float, seed: int) -> frozenset[int]:
    count = round(fraction * clients)
    chosen = np.random.default_rng(seed).choice(clients, size=count, replace=False)
    return frozenset(int(p) for p in chosen)


class RecordingGrid:
    """Delegates to Flower's Grid; logs each SecAgg+ exchange (stage, replies, duration)."""

    def __init__(self, grid: Grid, recorder: Recorder) -> None:
        self._grid = grid
        self._recorder = recorder

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        outgoing = list(messages)
        stage, server_round = "other", 0
        if outgoing:
            first = outgoing[0]
            configs = first.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.STAGE in configs:
                stage = str(configs[Key.STAGE])
            server_round = int(first.metadata.group_id or 0)
        t_sent = time.time()
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        t_back = time.time()
        ok = [m for m in replies if not m.has_error()]
        if stage == Stage.SETUP:
            starts = [
                _number(m.content.metric_records[_BENCH_RECORD][_T_SETUP_KEY])
                for m in ok
                if _BENCH_RECORD in m.content.metric_records
            ]
            if starts:
                self._recorder.setup_started[server_round] = min(starts)
        with self._recorder.lock:
            self._recorder.exchanges.append(
                Exchange(server_round, stage, len(outgoing), len(ok), t_back - t_sent, t_back)
            )
        return replies


class RecordingFedAvg(FedAvg):
    """Legacy FedAvg that records when (and whether) each round was aggregated."""

    def __init__(self, recorder: Recorder, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._recorder = recorder

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self._recorder.aggregated_at[server_round] = time.time()
        self._recorder.results_per_round[server_round] = len(results)
        self._recorder.survivors[server_round] = sorted(
            int(_number(res.metrics[_PARTITION_KEY])) for _, res in results
        )
        if parameters is not None:
            self._recorder.aggregates[server_round] = parameters_to_ndarrays(parameters)[0]
        return parameters, metrics


class NoiseClient(NumPyClient):
    def __init__(self, partition_id: int) -> None:
        self._partition_id = partition_id

    def fit(
        self, parameters: list[FloatArray], config: dict[str, Scalar]
    ) -> tuple[list[FloatArray], int, dict[str, Scalar]]:
        vector = parameters[0]
        noise = client_noise(self._partition_id, int(config[_ROUND_KEY]), vector.size)
        return [vector + noise], 1, {_PARTITION_KEY: self._partition_id}


def _number(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number in the record, got {type(value).__name__}")
    return float(value)


def build_apps(
    clients: int, dim: int, rounds: int, params: SecAggParams, recorder: Recorder
) -> tuple[ServerApp, ClientApp]:
    dropped = dropped_partitions(clients, params.drop_fraction, params.seed)

    def bench_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        started = time.time()
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        partition = int(_number(ctxt.node_config[_PARTITION_KEY]))
        if stage == Stage.COLLECT_MASKED_VECTORS and partition in dropped:
            raise RuntimeError(f"simulated dropout of partition {partition}")
        reply = call_next(msg, ctxt)
        if stage == Stage.SETUP and not reply.has_error():
            reply.content.metric_records[_BENCH_RECORD] = MetricRecord({_T_SETUP_KEY: started})
        return reply

    def client_fn(context: Context) -> object:
        partition = int(_number(context.node_config[_PARTITION_KEY]))
        return NoiseClient(partition).to_client()

    mods = [bench_mod, secaggplus_mod]
    client_app = ClientApp(client_fn=client_fn, mods=mods)  # type: ignore[arg-type]

    strategy = RecordingFedAvg(
        recorder,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]),
        on_fit_config_fn=lambda server_round: {_ROUND_KEY: server_round},
    )
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        random.seed(params.seed)  # SecAgg+ shuffles its neighbour ring with `random`
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        fit_workflow = SecAggPlusWorkflow(
            num_shares=params.num_shares,
            reconstruction_threshold=params.threshold,
            clipping_range=params.clipping_range,
            quantization_range=params.quantization_range,
            max_weight=params.max_weight,
        )
        workflow = DefaultWorkflow(fit_workflow=fit_workflow)
        workflow(cast(Grid, RecordingGrid(grid, recorder)), legacy)

    return server_app, client_app


def round_ends(recorder: Recorder, rounds: int) -> list[float]:
    ends = []
    for r in range(1, rounds + 1):
        if r in recorder.aggregated_at:
            ends.append(recorder.aggregated_at[r])
            continue
        returned = [e.returned_at for e in recorder.exchanges if e.round == r]
        if not returned:
            raise RuntimeError(f"Flower ran no SecAgg+ exchange in round {r}")
        ends.append(max(returned))
    return ends


def max_abs_error(recorder: Recorder, dim: int, rounds: int) -> float | None:
    """Worst |aggregate - exact mean of survivors| over the aggregated rounds."""
    model = np.zeros(dim, dtype=np.float64)
    worst: float | None = None
    for r in range(1, rounds + 1):
        if r not in recorder.aggregates:
            continue  # Flower keeps the previous model
        survivors = recorder.survivors[r]
        noise = sum(client_noise(p, r, dim).astype(np.float64) for p in survivors)
        expected = model + noise / len(survivors)
        got = recorder.aggregates[r].astype(np.float64)
        error = float(np.max(np.abs(got - expected)))
        worst = error if worst is None else max(worst, error)
        model = got
    return worst


def run_secagg(clients: int, dim: int, rounds: int, params: SecAggParams) -> dict[str, object]:
    import flwr
    import ray

    if clients < 3:
        raise ValueError("SecAgg+ needs at least 3 clients")
    recorder = Recorder()
    server_app, client_app = build_apps(clients, dim, rounds, params, recorder)
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
    if 1 not in recorder.setup_started:
        raise RuntimeError("no client answered the SecAgg+ setup stage of round 1")
    ends = round_ends(recorder, rounds)
    t_first = recorder.setup_started[1]
    durations = [ends[0] - t_first] + [ends[i] - ends[i - 1] for i in range(1, rounds)]
    steady = list(range(2, rounds + 1)) if rounds >= 2 else [1]
    aggregated_steady = [durations[r - 1] for r in steady if r in recorder.aggregated_at]
    not_aggregated = [r for r in range(1, rounds + 1) if r not in recorder.aggregated_at]
    dropped = dropped_partitions(clients, params.drop_fraction, params.seed)
    return {
        "framework": "flower",
        "version": flwr.__version__,
        "ray_version": ray.__version__,
        "python": sys.version.split()[0],
        "clients": clients,
        "dim": dim,
        "rounds": rounds,
        "seconds_per_round": durations,
        "median_round_s": statistics.median(durations[r - 1] for r in steady),
        "startup_s": t_first - t_call,
        "total_s": t_done - t_call,
        "peak_rss_mb": poller.peak_bytes / 2**20,
        "peak_processes": poller.peak_processes,
        "secagg": True,
        "num_shares": params.num_shares,
        "threshold": params.threshold,
        "clipping_range": params.clipping_range,
        "quantization_range": params.quantization_range,
        "max_weight": params.max_weight,
        "modulus_range": 2**32,
        "drop_fraction": params.drop_fraction,
        "dropped_clients": len(dropped),
        "seed": params.seed,
        "rounds_not_aggregated": len(not_aggregated),
        "not_aggregated_rounds": not_aggregated,
        "median_aggregated_round_s": (
            statistics.median(aggregated_steady) if aggregated_steady else None
        ),
        "results_per_round": {str(r): n for r, n in sorted(recorder.results_per_round.items())},
        "max_abs_error": max_abs_error(recorder, dim, rounds),
        "stages": [
            [e.round, e.stage, e.sent, e.ok, round(e.seconds, 4)] for e in recorder.exchanges
        ],
    }
