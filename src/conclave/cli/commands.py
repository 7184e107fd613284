"""What each ``conclave`` subcommand does: wiring of spec, ledger, transport and agents."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from conclave.cli.main import read_spec, write_summary
from conclave.cli.progress import RoundProgress
from conclave.coordinator.recovery import recover, unfinished_run
from conclave.coordinator.service import Coordinator, RoundTiming
from conclave.core.errors import ConclaveError, ConfigError, TransportError
from conclave.core.ports import Ledger
from conclave.core.spec import RunSpec
from conclave.core.types import RoundStatus, RunStatus, SecAggStep, TaskKind, TrainerContext
from conclave.ledger.memory import MemoryLedger
from conclave.ledger.sqlite import SqliteLedger
from conclave.participant.agent import ParticipantAgent, build_trainer, load_trainer_factory
from conclave.simulation.engine import Simulation
from conclave.transport.grpc.client import GrpcCoordinatorClient
from conclave.transport.grpc.server import GrpcServer


_STAGE_PREFETCH_S = 5.0  # = ParticipantAgent's default long-poll wait


def _progress_hook(progress: RoundProgress) -> Any:
    def on_round(timing: RoundTiming) -> None:
        if timing.status is RoundStatus.FAILED:
            progress.round_failed(timing.round, timing.kind.value, timing.reason)
        elif timing.kind is TaskKind.FIT:
            progress.round_committed(timing.round, timing.metrics)
        else:
            progress.evaluated(timing.round, timing.metrics)

    return on_round


def _make_coordinator(spec: RunSpec, ledger: Ledger, progress: RoundProgress | None, *,
                      resume: bool = False,
                      fault: Callable[[str, int], None] | None = None) -> Coordinator:
    """A coordinator for ``spec``; with ``resume``, it continues the newest unfinished run of
    the same spec in the ledger (if there is one) from where it stopped."""
    factory = load_trainer_factory(spec.task.trainer)
    initial = build_trainer(factory, TrainerContext(
        participant=None, seed=spec.seed, options=dict(spec.task.options))).get_weights()
    hook = _progress_hook(progress) if progress else None
    run = unfinished_run(ledger, spec.source) if resume else None
    if run is None:
        return Coordinator(spec=spec, ledger=ledger, initial=initial, on_round=hook, fault=fault)
    found = recover(ledger, run)
    if found.point.completed_rounds > spec.rounds:
        raise ConfigError("--rounds", spec.rounds,
                          f"at least the {found.point.completed_rounds} rounds run {run.run_id} "
                          "already committed")
    for problem in found.problems:
        print(f"conclave: warning: {problem}; using the checkpoint before it", file=sys.stderr)
    point = dataclasses.replace(found.point, epoch=int(time.time()))
    where = (f"{point.kind.value} round {point.round} in progress" if point.round
             else "no round in progress")
    print(f"resuming run {run.run_id} after round {point.completed_rounds} ({where})",
          flush=True)
    return Coordinator(spec=spec, ledger=ledger, initial=found.parameters or initial,
                       on_round=hook, run_id=run.run_id, resume=point, fault=fault,
                       strategy_state=found.strategy_state)


# -- simulate -------------------------------------------------------------------------------
def simulate(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec).with_overrides(rounds=args.rounds,
                                                secure_aggregation=args.secure_aggregation)
    ledger: Ledger = SqliteLedger(args.state_dir) if args.state_dir else MemoryLedger()
    progress = RoundProgress(spec.rounds, evaluate_every=spec.evaluation.every_rounds)
    sim: Simulation | None = None
    try:
        sim = Simulation(spec=spec, ledger=ledger, factory=load_trainer_factory(spec.task.trainer),
                         on_round=_progress_hook(progress))
        result = sim.run()
    except (ConclaveError, KeyboardInterrupt) as exc:
        if sim is not None:  # the run exists in the ledger: record why it stopped
            what = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            sim.coordinator.interrupt(f"simulation stopped: {what}")
            if args.state_dir:
                write_summary(args.state_dir, sim.coordinator.summary())
        raise
    finally:
        progress.close()
        ledger.close()
    summary = result.summary
    _print_results(summary)
    if args.state_dir:
        print(f"ledger and checkpoints: {args.state_dir}   summary: "
              f"{write_summary(args.state_dir, summary)}")
    return 0 if summary["status"] == "finished" else 1


# -- coordinator ----------------------------------------------------------------------------
def coordinator(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec).with_overrides(rounds=args.rounds)
    if spec.faults:
        print("conclave: warning: [faults] applies to `conclave simulate` only; ignored here",
              file=sys.stderr)
    ledger = SqliteLedger(args.state_dir,
                          power_loss_safe=spec.federation.power_loss_safe_ledger)
    progress = RoundProgress(spec.rounds, stream=sys.stderr,
                             evaluate_every=spec.evaluation.every_rounds)
    coord = _make_coordinator(spec, ledger, progress, resume=not args.new_run,
                              fault=_coordinator_crash_hook(args.crash_at))
    server = GrpcServer(coord, args.address, max_model_bytes=spec.federation.max_model_bytes)
    try:
        address = server.start()
    except TransportError as exc:
        # the run exists in the ledger now: record why it did not start (the same command,
        # with an address that works, resumes it)
        coord.interrupt(f"the coordinator could not start: {exc}")
        write_summary(args.state_dir, coord.summary())
        ledger.close()
        raise
    print(f"coordinator listening on {address} (run {coord.run_id})", flush=True)
    stop = _stop_on_signals()
    try:
        coord.start()
        while not coord.wait(0.5):
            if stop.is_set():
                print("conclave: stopping on SIGTERM; restart with the same command to resume "
                      "the run (participants keep retrying)", file=sys.stderr)
                coord.interrupt("coordinator stopped by SIGTERM")
                break
        if coord.status is not RunStatus.INTERRUPTED:
            _linger(coord, spec)
    except KeyboardInterrupt:
        print("\nconclave: interrupted (Ctrl-C); restart with the same command to resume the "
              "run", file=sys.stderr)
        coord.interrupt("coordinator interrupted (SIGINT)")
    finally:
        server.stop(grace_s=2.0)
        progress.close()
        summary = coord.summary()
        write_summary(args.state_dir, summary)
        ledger.close()
    _print_results(summary)
    return _exit_status(summary)


def _exit_status(summary: Mapping[str, Any]) -> int:
    """0 finished, 130 interrupted (a signal or Ctrl-C), 1 failed."""
    return {"finished": 0, "interrupted": 130}.get(str(summary["status"]), 1)


def _linger(coord: Coordinator, spec: RunSpec) -> None:
    """Keep serving until every connected participant has heard that the run is over."""
    coord.linger(timeout_s=2 * spec.federation.heartbeat_interval_s + 10.0)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    return stop


# -- participant ----------------------------------------------------------------------------
_PARENT_ENV = "CONCLAVE_DIE_WITH_PARENT"


def _die_with_parent() -> None:
    """A participant started by ``conclave demo`` (which sets ``CONCLAVE_DIE_WITH_PARENT`` to
    its pid) asks Linux for SIGTERM when the demo dies (``prctl(PR_SET_PDEATHSIG)``), so a demo
    killed outright leaves no participant behind; if the demo is already gone, it exits now.
    Elsewhere participants exit once their reconnection attempts run out."""
    expected = os.environ.pop(_PARENT_ENV, "")
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != expected:  # the demo died before the request took effect
        raise SystemExit(1)


def participant(args: argparse.Namespace) -> int:
    from conclave.cli.main import _parse_options

    _die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    factory = load_trainer_factory(args.trainer)
    crash = _crash_hook(args.crash_at)
    # a secure step's upload waits (as long as a fetch would) for the next step's input
    client = GrpcCoordinatorClient(args.coordinator, stage_prefetch_s=_STAGE_PREFETCH_S)
    try:
        agent = ParticipantAgent.from_factory(name=args.name, service=client, factory=factory,
                                              options=_parse_options(args.option),
                                              before_send=crash)
        _join_with_retry(agent, args.connect_timeout)
        stats = agent.run()
    finally:
        client.close()
    print(f"{args.name}: the coordinator ended the run; {stats.fits} fit and "
          f"{stats.evaluations} evaluation task(s) done, {len(stats.rejected)} rejected, "
          f"{len(stats.failures)} trainer failure(s)", flush=True)
    return 0


def _kill_self() -> None:
    """Fault injection: die by a real SIGKILL, no cleanup, nothing flushed but what already was."""
    os.kill(os.getpid(), signal.SIGKILL)


def _coordinator_crash_hook(spec: str | None) -> Callable[[str, int], None] | None:
    if spec is None:
        return None
    point, _, round_text = spec.partition(":")
    points = ("selection", "upload", "aggregation", "commit", "unmask")
    if point not in points or not round_text.isdigit() or int(round_text) < 1:
        raise ConfigError("--crash-at", spec,
                          f"POINT:ROUND with POINT one of {', '.join(points)} and ROUND >= 1")
    target = (point, int(round_text))

    def hook(at: str, rnd: int) -> None:
        if (at, rnd) == target:
            print(f"crash-at {spec}: exiting now", file=sys.stderr, flush=True)
            _kill_self()

    return hook


def _crash_hook(spec: str | None) -> Callable[[SecAggStep | str, int], bool | None] | None:
    if spec is None:
        return None
    steps = ("fit", "advertise", "share", "masked_input", "unmask")
    points: set[tuple[str, int]] = set()
    for item in spec.split(","):
        step_name, _, round_text = item.strip().partition(":")
        if step_name not in steps or not round_text.isdigit() or int(round_text) < 1:
            raise ConfigError("--crash-at", spec,
                              f"STEP:ROUND[,STEP:ROUND...] with STEP one of {', '.join(steps)}")
        points.add((step_name, int(round_text)))

    def hook(at: SecAggStep | str, rnd: int) -> bool:
        if (getattr(at, "value", at), rnd) in points:
            where = f"{getattr(at, 'value', at)}:{rnd}"
            print(f"crash-at {where}: exiting now", flush=True)
            _kill_self()
        return True

    return hook


def _join_with_retry(agent: ParticipantAgent, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    backoff = 0.1
    first: TransportError | None = None
    while True:
        try:
            agent.join()
            return
        except TransportError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if first is not None and str(first) != str(exc):
                    raise TransportError(f"could not join within {timeout_s:g} s: first "
                                         f"{first}; last {exc}") from exc
                raise
            if first is None:
                print(f"{agent.name}: cannot join yet ({exc}); retrying for up to "
                      f"{remaining:.3g} s", file=sys.stderr, flush=True)
                first = exc
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 2.0)


# -- demo -----------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> int:
    from conclave.tasks.heart_disease import FLAMBY_BASELINES

    spec = read_spec("heart-disease").with_overrides(rounds=args.rounds,
                                                      secure_aggregation=args.secure_aggregation)
    trainer = args.trainer or spec.task.trainer
    load_trainer_factory(trainer)  # a bad --trainer fails here, not in four participant logs
    state_dir: Path = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    ledger = SqliteLedger(state_dir)
    progress = RoundProgress(spec.rounds, evaluate_every=spec.evaluation.every_rounds)
    coord = _make_coordinator(spec, ledger, progress)
    server = GrpcServer(coord, "127.0.0.1:0", max_model_bytes=spec.federation.max_model_bytes)
    address = server.start()
    names = spec.federation.participants
    secure = " with SecAgg+ secure aggregation" if spec.secure_aggregation else ""
    print(f"Conclave demo: Fed-Heart-Disease, {len(names)} hospitals as separate processes, "
          f"{spec.rounds} rounds of FedAvg{secure} over gRPC at {address}")
    print(f"run {coord.run_id}; participant logs in {logs}/")
    procs: list[subprocess.Popen[bytes]] = []
    interrupted = False
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        coord.start()
        # the participants ask the OS to stop them when the demo dies, even by SIGKILL
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{_PARENT_ENV: str(os.getpid())})
        for name in names:
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "conclave", "participant", "--coordinator", address,
                 "--name", name, "--trainer", trainer],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
            log.close()
        while not coord.wait(0.5):
            if all(p.poll() is not None for p in procs):
                print("conclave: every participant process exited; see the logs in "
                      f"{logs}", file=sys.stderr)
                coord.interrupt("every participant process exited")
                break
        _linger(coord, spec)
        _wait_processes(procs, timeout_s=10.0)
    except KeyboardInterrupt as exc:
        interrupted = True
        how = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
        coord.interrupt(f"demo interrupted ({how})")
        print(f"\nconclave: interrupted ({how}); shutting down", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        progress.close()
        _stop_processes(procs)
        server.stop(grace_s=1.0)
        summary = coord.summary()
        summary_path = write_summary(state_dir, summary)
        ledger.close()
    _print_results(summary, baselines=FLAMBY_BASELINES)
    print(f"ledger: {state_dir / 'ledger.sqlite'}   checkpoints: {state_dir / 'checkpoints'}/\n"
          f"summary: {summary_path}   inspect: conclave ledger show {state_dir}")
    if interrupted:
        return 130
    return 0 if summary["status"] == "finished" else 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the demo records the run as interrupted and stops its
    participant processes."""


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A participant holds nothing that must be saved (the coordinator has its record): on
    SIGTERM it says so and exits at once with 130, whatever call it is in the middle of."""
    print("conclave: interrupted (SIGTERM); this participant stops", file=sys.stderr,
          flush=True)
    os._exit(130)


def _wait_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _print_results(summary: dict[str, Any], baselines: Mapping[str, float] | None = None) -> None:
    final = summary.get("final") or {}
    per = final.get("per_participant") or {}
    reason = (f": {summary['reason']}" if summary.get("reason") and summary["status"] != "finished"
              else "")
    print(f"\nrun {summary['run_id']} {summary['status']}{reason}; "
          f"{summary['rounds_committed']} of {summary['rounds_planned']} rounds committed")
    if not per:
        return
    head = f"{'participant':<14} {'test accuracy':>13} {'test loss':>10} {'examples':>9}"
    if baselines:
        head += f" {'FLamby FedAvg':>14}"
    print(head)
    for name, metrics in sorted(per.items()):
        line = (f"{name:<14} {_num(metrics.get('accuracy'), 3):>13} "
                f"{_num(metrics.get('loss'), 4):>10} "
                f"{int(metrics.get('num_examples', 0)):>9d}")
        if baselines and f"fedavg/{name}" in baselines:
            line += f" {baselines[f'fedavg/{name}']:>14.3f}"
        print(line)
    mean = final.get("mean_accuracy")
    if mean is not None:
        line = f"{'mean':<14} {mean:>13.3f}"
        if baselines:
            line += (f"{'':>21} {baselines.get('fedavg', float('nan')):>14.3f}   "
                     f"(FLamby pooled: {baselines.get('pooled', float('nan')):.3f})")
        print(line)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ledger_show(args: argparse.Namespace) -> int:
    from conclave.cli.ledger_view import render_ledger

    ledger = SqliteLedger.open_read_only(args.state_dir)
    try:
        print(render_ledger(ledger, run_id=args.run, as_json=args.json,
                            participant=args.participant))
    finally:
        ledger.close()
    return 0
