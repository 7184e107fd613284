"""The coordinator's ``CoordinatorService`` methods: what participants call, via any transport.

Each method checks that the caller joined this run, notes that it was seen, and turns the call
into an event for the run machine under the coordinator's lock; answers that must wait (a task,
a secure-aggregation step input) wait on the lock's condition, up to ``wait_s``. A part of
``Coordinator`` (``service``), which owns the state declared here and carries out the commands.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from conclave.core.errors import RemoteProtocolError, TransportError
from conclave.core.rounds.events import (
    Command,
    EvaluationReceived,
    Event,
    ParticipantJoined,
    Reply,
    StageReceived,
    TaskDeclined,
    UpdateReceived,
)
from conclave.core.rounds.machine import RunMachine
from conclave.core.secagg.setup import IDENTITY_CAPABILITY
from conclave.core.spec import NAME_RULE, RunSpec, is_valid_name
from conclave.core.types import (
    PROTOCOL_VERSION,
    Declined,
    Evaluation,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    ParticipantState,
    RunStatus,
    SecAggStep,
    StageInput,
    TaskAssignment,
    Update,
    Verdict,
)

_MAX_RECORDED_REJECTIONS = 1000
"""Refused joins of distinct unknown names recorded in the ledger; later ones are only
logged, so a flood of made-up names cannot grow the ledger without bound."""
_MAX_CAPABILITIES_CHARS = 2000

_OVER = frozenset({RunStatus.FINISHED, RunStatus.FAILED})
"""Run states that participants are told about: the run is over and they may exit."""


class ParticipantEndpoints(ABC):
    """The service methods of ``Coordinator``; its ``__init__`` sets the state below."""

    spec: RunSpec
    run_id: str
    _cond: threading.Condition
    _machine: RunMachine
    _clock: Callable[[], float]
    _status: RunStatus
    _last_seen: dict[str, float]
    _ever_joined: set[str]
    _told_finished: set[str]
    _lost: set[str]
    _rejected: set[str]
    _identities: dict[str, bytes]

    @abstractmethod
    def _apply(self, event: Event) -> list[Command]:
        """Feed ``event`` to the run machine and carry out the commands it returns."""

    @abstractmethod
    def _event(self, participant: str, state: ParticipantState, detail: str) -> None:
        """Record a participant event in the ledger."""

    @abstractmethod
    def _hit(self, point: str, round_: int) -> None:
        """Call the fault-injection hook, if any, at the named point."""

    # -- CoordinatorService -------------------------------------------------------------
    def join(self, request: JoinRequest) -> JoinReply:
        if request.protocol_version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {request.protocol_version} is not supported; "
                f"this coordinator speaks version {PROTOCOL_VERSION}"
            )
        name = request.participant
        if not is_valid_name(name):
            shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
            raise RemoteProtocolError(f"invalid participant name {shown!r}: {NAME_RULE}")
        identity = _identity_key(request)
        allowed = self.spec.federation.participants
        with self._cond:
            if allowed and name not in allowed:
                if (name not in self._rejected
                        and len(self._rejected) < _MAX_RECORDED_REJECTIONS):
                    self._rejected.add(name)
                    self._event(name, ParticipantState.REJECTED, "not enrolled in this federation")
                raise RemoteProtocolError(
                    f"unknown participant {name!r}: not enrolled in this federation"
                )
            self._check_not_impersonated(name, identity)
            state = (ParticipantState.REJOINED if name in self._ever_joined
                     else ParticipantState.JOINED)
            caps = ", ".join(f"{k}={v}" for k, v in sorted(request.capabilities.items()))
            if len(caps) > _MAX_CAPABILITIES_CHARS:
                caps = f"{caps[:_MAX_CAPABILITIES_CHARS]}... ({len(caps)} characters)"
            self._event(name, state, caps)
            self._ever_joined.add(name)
            if identity:
                self._identities[name] = identity
            self._lost.discard(name)
            self._last_seen[name] = self._clock()
            if self._status is RunStatus.RUNNING:
                self._apply(ParticipantJoined(name, identity_key=identity))
            return JoinReply(
                run_id=self.run_id,
                heartbeat_interval_s=self.spec.federation.heartbeat_interval_s,
                current_round=self._machine.round,
            )

    def heartbeat(
        self, run_id: str, participant: str, telemetry: Mapping[str, float]
    ) -> HeartbeatReply:
        with self._cond:
            self._check_member(run_id, participant)
            self._seen(participant)
            finished = self._status in _OVER
            if finished:
                self._tell_finished(participant)
            return HeartbeatReply(
                has_task=self._offers_task(participant),
                run_finished=finished,
            )

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        deadline = time.monotonic() + _wait_budget(wait_s)
        with self._cond:
            self._check_member(run_id, participant)
            while True:
                self._seen(participant)
                if self._status in _OVER:
                    self._tell_finished(participant)
                    return TaskAssignment(task=None, run_finished=True)
                # an interrupted run hands out no task (see _offers_task)
                task = (self._machine.task_for(participant)
                        if self._status is RunStatus.RUNNING else None)
                remaining = deadline - time.monotonic()
                if task is not None or remaining <= 0:
                    return TaskAssignment(task=task)
                self._cond.wait(min(remaining, 1.0))

    def submit_update(self, update: Update) -> Verdict:
        digest = update.digest or update.parameters.digest()
        self._hit("upload", update.round)
        with self._cond:
            self._check_member(update.run_id, update.participant)
            self._seen(update.participant)
            return self._verdict(self._apply(UpdateReceived(update, digest)))

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict:
        with self._cond:
            self._check_member(evaluation.run_id, evaluation.participant)
            self._seen(evaluation.participant)
            return self._verdict(self._apply(EvaluationReceived(evaluation)))

    def decline_task(self, declined: Declined) -> Verdict:
        with self._cond:
            self._check_member(declined.run_id, declined.participant)
            self._seen(declined.participant)
            return self._verdict(self._apply(TaskDeclined(declined)))

    def fetch_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                    wait_s: float) -> StageInput:
        deadline = time.monotonic() + _wait_budget(wait_s)
        with self._cond:
            self._check_member(run_id, participant)
            while True:
                self._seen(participant)
                answer = self._machine.stage_input(participant, round, step)
                remaining = deadline - time.monotonic()
                if answer.payload is not None or answer.aborted or remaining <= 0:
                    return answer
                self._cond.wait(min(remaining, 1.0))

    def submit_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                     payload: bytes) -> Verdict:
        with self._cond:
            self._check_member(run_id, participant)
            self._seen(participant)
            return self._verdict(self._apply(StageReceived(participant, round, step, payload)))

    def _offers_task(self, participant: str) -> bool:
        """Only a running run hands out tasks. An interrupted one (its coordinator is being
        stopped) hands out none and does not say the run is over either: participants keep
        retrying, and rejoin the run when the coordinator is restarted and resumes it."""
        return self._status is RunStatus.RUNNING and self._machine.task_for(participant) is not None

    def _check_member(self, run_id: str, participant: str) -> None:
        if run_id != self.run_id:
            raise RemoteProtocolError(f"unknown run id {run_id!r}; the current run is {self.run_id!r}")
        if participant not in self._ever_joined:
            raise RemoteProtocolError(f"participant {participant!r} has not joined run {run_id!r}")

    def _check_not_impersonated(self, name: str, identity: bytes) -> None:
        """One process per name: a join under a name that another process (another identity
        key) holds is refused as busy (the caller retries) while that process still sends its
        heartbeats, so a misconfigured duplicate cannot take over a live participant's tasks;
        a restarted participant gets in once its old process missed two heartbeats."""
        known = self._identities.get(name)
        if not known or not identity or known == identity or name in self._lost:
            return
        quiet_s = 2 * self.spec.federation.heartbeat_interval_s
        silent_s = self._clock() - self._last_seen.get(name, float("-inf"))
        if silent_s < quiet_s:
            raise TransportError(
                f"participant {name!r} is connected from another process (another identity "
                f"key), heard from {silent_s:.1f} s ago; a restarted participant is admitted "
                f"once the old one has been silent for {quiet_s:g} s"
            )

    def _tell_finished(self, participant: str) -> None:
        """``participant`` hears that the run is over: the last entry of its history."""
        if participant not in self._told_finished:
            self._told_finished.add(participant)
            self._event(participant, ParticipantState.LEFT, f"told the run {self._status.value}")

    def _seen(self, participant: str) -> None:
        self._last_seen[participant] = self._clock()
        if participant in self._lost:
            self._lost.discard(participant)
            self._event(participant, ParticipantState.REJOINED, "heartbeat after being lost")
            if self._status is RunStatus.RUNNING:
                self._apply(ParticipantJoined(participant))

    @staticmethod
    def _verdict(commands: list[Command]) -> Verdict:
        for cmd in commands:
            if isinstance(cmd, Reply):
                return cmd.verdict
        return Verdict(accepted=False, reason="no verdict")  # pragma: no cover


def _identity_key(request: JoinRequest) -> bytes:
    text = request.capabilities.get(IDENTITY_CAPABILITY, "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if text and len(key) != 32:
        raise RemoteProtocolError(
            f"capability {IDENTITY_CAPABILITY} must be a 32-byte Ed25519 public key in hex")
    return key


MAX_WAIT_S = 60.0
"""The longest a long poll waits in the service, whatever its caller asked."""


def _wait_budget(wait_s: float) -> float:
    """``wait_s`` made safe: NaN or negative is no wait, and no wait exceeds MAX_WAIT_S."""
    return min(wait_s, MAX_WAIT_S) if wait_s > 0 else 0.0
