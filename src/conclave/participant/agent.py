"""The participant agent: joins, fetches tasks, runs the user's trainer, submits results.

The agent dials out to the coordinator through any ``CoordinatorService`` (gRPC client or the
in-memory transport). ``run`` is the blocking loop of a real participant process, with a
background heartbeat; ``step`` does one unit of work without blocking, for simulation.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conclave.core.errors import (
    ConclaveError,
    ConfigError,
    RemoteProtocolError,
    TrainerError,
    TransportError,
)
from conclave.core.parameters import Parameters
from conclave.core.ports import CoordinatorService, Trainer, TrainerFactory
from conclave.core.types import (
    Declined,
    EvaluateResult,
    Evaluation,
    FitResult,
    JoinRequest,
    SecAggStep,
    Task,
    TaskKind,
    TrainerContext,
    Update,
    Verdict,
)
from conclave.participant.secure import SecureSession, StageMessage, identity_capability

logger = logging.getLogger(__name__)

Answer = Update | Evaluation | StageMessage | Declined
"""What a participant sends back for a task (or a secure-aggregation step)."""


def load_trainer_factory(ref: str) -> TrainerFactory:
    """Import ``package.module:attribute`` and return it (it must be callable)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError("task.trainer", ref, "'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("task.trainer", ref, f"an importable module ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError("task.trainer", ref, f"a callable attribute of {module_name}")
    return factory  # type: ignore[no-any-return]


def build_trainer(factory: TrainerFactory, ctx: TrainerContext) -> Trainer:
    """Call the user's factory; ``{participant}`` in an option value becomes the participant's
    name (so one spec can point each virtual participant at its own data). Failures become
    TrainerError naming the factory."""
    name = ctx.participant or "coordinator"
    options = {k: v.replace("{participant}", name) for k, v in ctx.options.items()}
    ctx = TrainerContext(participant=ctx.participant, seed=ctx.seed, options=options)
    try:
        trainer = factory(ctx)
    except ConclaveError:
        raise
    except Exception as exc:
        label = getattr(factory, "__qualname__", repr(factory))
        raise TrainerError(
            f"trainer factory {label} failed for {name}: {type(exc).__name__}: {exc}") from exc
    missing = [m for m in ("get_weights", "set_weights", "fit", "evaluate")
               if not callable(getattr(trainer, m, None))]
    if missing:
        raise TrainerError(f"the trainer built for {name} lacks {', '.join(missing)}")
    return trainer


@dataclass(slots=True)
class AgentStats:
    fits: int = 0
    evaluations: int = 0
    rejected: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _Backoff:
    """Exponential backoff with full jitter, giving up ``limit_s`` after the last success."""

    def __init__(self, limit_s: float, first_s: float = 0.2, cap_s: float = 5.0) -> None:
        self._limit_s, self._first_s, self._cap_s = limit_s, first_s, cap_s
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()
        self._next = self._first_s

    def next_pause(self, exc: Exception) -> float:
        if time.monotonic() - self._since > self._limit_s:
            raise TransportError(
                f"coordinator unreachable for more than {self._limit_s:.0f} s: {exc}") from exc
        pause = random.uniform(0, self._next)
        self._next = min(self._next * 2, self._cap_s)
        return pause


class ParticipantAgent:
    def __init__(
        self,
        *,
        name: str,
        service: CoordinatorService,
        trainer: Trainer,
        capabilities: Mapping[str, str] | None = None,
        poll_wait_s: float = 5.0,
        identity: Ed25519PrivateKey | None = None,
        before_send: Callable[[SecAggStep | str, int], bool | None] | None = None,
    ) -> None:
        self._before_send = before_send
        self.name = name
        self._service = service
        self._trainer = trainer
        self._identity = identity or Ed25519PrivateKey.generate()
        self._capabilities = {**identity_capability(self._identity), **(capabilities or {})}
        self.session: SecureSession | None = None
        self._last_task: tuple[str, int, str, object, object] | None = None
        self._pending: Answer | None = None
        self._poll_wait_s = poll_wait_s
        self.run_id = ""
        self.heartbeat_interval_s = 2.0
        self.stats = AgentStats()
        self.finished = False

    @classmethod
    def from_factory(
        cls, *, name: str, service: CoordinatorService, factory: TrainerFactory,
        options: Mapping[str, str] | None = None, seed: int = 0, poll_wait_s: float = 5.0,
        before_send: Callable[[SecAggStep | str, int], bool | None] | None = None,
    ) -> ParticipantAgent:
        trainer = build_trainer(factory, TrainerContext(participant=name, seed=seed,
                                                         options=dict(options or {})))
        return cls(name=name, service=service, trainer=trainer, poll_wait_s=poll_wait_s,
                   before_send=before_send)

    # -- protocol -----------------------------------------------------------------------
    def join(self) -> None:
        reply = self._service.join(JoinRequest(participant=self.name,
                                               capabilities=self._capabilities))
        self.run_id = reply.run_id
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        logger.info("%s joined run %s at round %d", self.name, reply.run_id, reply.current_round)

    def fetch(self, wait_s: float = 0.0) -> Task | None:
        """Ask for a task (waiting up to ``wait_s``); notes when the run is over. A task this
        agent already worked on (same run, round, kind and attempt) is not taken twice."""
        assignment = self._service.fetch_task(self.run_id, self.name, wait_s)
        if assignment.run_finished:
            self.finished = True
        task = assignment.task
        if task is None:
            return None
        key = (task.run_id, task.round, task.kind.value, task.config.get("attempt"),
               task.config.get("epoch"))
        if key == self._last_task:
            return None
        self._last_task = key
        return task

    @property
    def in_secure_round(self) -> bool:
        return self.session is not None and not (self.session.done or self.session.aborted)

    def step(self, wait_s: float = 0.0) -> bool:
        """Carry out at most one task or secure-aggregation step. True if work was done."""
        if self._pending is not None:
            # an answer whose delivery failed: send the same bytes again (idempotent)
            self.submit(self._pending)
            self._pending = None
            return True
        if self.in_secure_round:
            assert self.session is not None
            return self.session.poll(self._service, wait_s)
        task = self.fetch(wait_s)
        if task is None:
            return False
        self._perform(task)
        return True

    def run(self, stop: threading.Event | None = None,
            reconnect_timeout_s: float = 60.0) -> AgentStats:
        """Join (unless already joined), then work until the run finishes or ``stop`` is set.

        A lost connection is retried with exponential backoff and jitter for up to
        ``reconnect_timeout_s``; a trainer that fails is logged and the participant stays in
        the federation (the coordinator records it as silent for that round).
        """
        stop = stop or threading.Event()
        if not self.run_id:
            self.join()
        beat = threading.Thread(target=self._heartbeat_loop, args=(stop,), daemon=True,
                                name=f"heartbeat-{self.name}")
        beat.start()
        backoff = _Backoff(reconnect_timeout_s)
        try:
            while not stop.is_set() and not self.finished:
                try:
                    self.step(self._poll_wait_s)
                except TransportError as exc:
                    pause = backoff.next_pause(exc)
                    logger.warning("%s: coordinator unreachable (%s); retrying in %.1f s",
                                   self.name, exc, pause)
                    stop.wait(pause)
                    continue
                except TrainerError as exc:  # (prepare's are answered in _perform)
                    self.stats.failures.append(str(exc))
                    logger.error("%s; sitting this task out", exc)
                except RemoteProtocolError as exc:
                    if "has not joined" not in str(exc):
                        raise
                    # The coordinator restarted and resumed the run: join it again. A secure
                    # round's protocol state died with the old coordinator: that round starts
                    # over. A plain update not yet acknowledged is sent again (idempotent).
                    logger.warning("%s: %s; joining again", self.name, exc)
                    self.session = None
                    if isinstance(self._pending, StageMessage):
                        self._pending = None
                    self.join()
                backoff.reset()
        finally:
            stop.set()
            beat.join(timeout=5)
        return self.stats

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            try:
                reply = self._service.heartbeat(self.run_id, self.name, _telemetry())
            except ConclaveError as exc:  # unreachable, or restarted: the main loop copes
                logger.info("%s: heartbeat failed: %s", self.name, exc)
                continue
            if reply.run_finished:
                self.finished = True
                return

    # -- work ---------------------------------------------------------------------------
    def prepare(self, task: Task) -> Answer | None:
        """Run the trainer on ``task``; what to submit. (No state-changing coordinator call:
        simulations run many of these in parallel, then submit in a fixed order.)"""
        setup = None
        if task.kind is TaskKind.FIT and task.config.get("secure_aggregation"):
            answer = self._service.fetch_stage(task.run_id, self.name, task.round,
                                               SecAggStep.SETUP, self._poll_wait_s)
            if answer.payload is None:
                logger.warning("%s: no secure-aggregation setup for round %d: %s", self.name,
                               task.round, answer.reason)
                return None
            setup = answer.payload
        try:
            self._trainer.set_weights(task.parameters)
            if task.kind is TaskKind.FIT:
                started = time.perf_counter()
                fit = self._trainer.fit(task.config)
                if not isinstance(fit, FitResult) or not isinstance(fit.parameters, Parameters):
                    raise TrainerError("trainer.fit must return a FitResult with Parameters")
                n = fit.num_examples
                if isinstance(n, bool) or not isinstance(n, int) or not -2**63 <= n < 2**63:
                    raise TrainerError(f"trainer.fit returned num_examples={n!r}; "
                                       "it must be a 64-bit integer")
                metrics = _metrics(fit.metrics, "fit")
                if setup is not None:
                    return self._start_secure(task, setup, fit)
                return Update(
                    run_id=task.run_id, round=task.round, participant=self.name,
                    num_examples=fit.num_examples, parameters=fit.parameters,
                    metrics=metrics, train_seconds=time.perf_counter() - started,
                    digest=fit.parameters.digest(),
                )
            ev = self._trainer.evaluate(task.config)
            if not isinstance(ev, EvaluateResult):
                raise TrainerError("trainer.evaluate must return an EvaluateResult")
            if isinstance(ev.num_examples, bool) or not isinstance(
                    ev.num_examples, (int, np.integer)) or not _is_number(ev.loss):
                raise TrainerError(f"trainer.evaluate returned loss={ev.loss!r}, num_examples="
                                   f"{ev.num_examples!r}; they must be a number and an integer")
            return Evaluation(
                run_id=task.run_id, round=task.round, participant=self.name,
                loss=float(ev.loss), num_examples=int(ev.num_examples),
                metrics=_metrics(ev.metrics, "evaluate"),
            )
        except TrainerError as exc:
            raise TrainerError(f"{self.name}: {exc}") from exc
        except ConclaveError:
            raise
        except (Exception, SystemExit) as exc:  # a trainer calling sys.exit() failed too
            raise TrainerError(
                f"{self.name}: trainer.{task.kind.value} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _start_secure(
        self, task: Task, setup: bytes, fit: FitResult
    ) -> StageMessage | Declined | None:
        try:
            self.session = SecureSession(name=self.name, task=task, setup_payload=setup,
                                         identity=self._identity,
                                         before_send=self._before_send)
            return self.session.start(fit)
        except ConclaveError as exc:
            # e.g. a NaN update cannot be encoded: sit the round out; it goes on without us.
            logger.warning("%s: not taking part in secure round %d: %s", self.name, task.round,
                           exc)
            if self.session is not None:
                self.session.aborted = str(exc)
            return self.declined(task, exc)

    def submit(self, result: Answer | None) -> Verdict | None:
        if result is None:
            return None
        if isinstance(result, Declined):
            verdict = self._service.decline_task(result)
            if not verdict.accepted:
                logger.info("%s: declining round %d: %s", self.name, result.round, verdict.reason)
            return verdict
        if isinstance(result, StageMessage):
            assert self.session is not None
            task = self.session.task
            verdict = self._service.submit_stage(task.run_id, self.name, task.round,
                                                 result.step, result.payload)
            self.stats.fits += 1
            if not verdict.accepted:
                self.session.aborted = verdict.reason
                self.stats.rejected.append(verdict.reason)
            return verdict
        if isinstance(result, Update):
            if self._before_send is not None and self._before_send("fit", result.round) is False:
                return None  # fault injection: vanished before sending the update
            verdict = self._service.submit_update(result)
            self.stats.fits += 1
        else:
            verdict = self._service.submit_evaluation(result)
            self.stats.evaluations += 1
        if not verdict.accepted:
            self.stats.rejected.append(verdict.reason)
            logger.warning("%s: round %d submission rejected: %s", self.name, result.round,
                           verdict.reason)
        return verdict

    def _perform(self, task: Task) -> None:
        try:
            self._pending = self.prepare(task)
        except TrainerError as exc:
            self.stats.failures.append(str(exc))
            logger.error("%s; sitting this task out (the coordinator is told)", exc)
            self._pending = self.declined(task, exc)
        self.submit(self._pending)
        self._pending = None

    def declined(self, task: Task, error: ConclaveError) -> Declined:
        """The answer to a task this participant cannot do: the coordinator stops waiting."""
        return Declined(run_id=task.run_id, round=task.round, participant=self.name,
                        kind=task.kind, reason=str(error).removeprefix(f"{self.name}: "))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _metrics(metrics: object, method: str) -> dict[str, float]:
    """A trainer's metrics as ``{name: float}``; anything else is the trainer's error, named."""
    if not isinstance(metrics, Mapping):
        raise TrainerError(f"trainer.{method} returned metrics={metrics!r}; expected a mapping "
                           "of names to numbers")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _is_number(value):
            raise TrainerError(f"trainer.{method} returned metric {name!r} = {value!r}; metrics "
                               "must map names to numbers")
        out[name] = float(value)
    return out


def _telemetry() -> dict[str, float]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return {}
    mem = psutil.virtual_memory()
    return {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "cpu_count": float(psutil.cpu_count() or 0),
        "memory_available_mb": mem.available / 2**20,
    }
