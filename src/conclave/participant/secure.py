"""The participant's side of a secure-aggregation round, driven step by step.

After training, the participant never sends its update. It sends the change to the global
model, clipped, example-weighted and fixed-point encoded, hidden under pairwise and self masks
that cancel only in the sum over survivors (SecAgg+). ``poll`` advances one step whenever the
coordinator has the input for it, so the same session runs in a blocking participant process
(long polls) and in a simulation (non-blocking polls).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conclave.core.errors import ConclaveError, RemoteProtocolError
from conclave.core.ports import CoordinatorService
from conclave.core.secagg.config import SecAggConfig
from conclave.core.secagg.messages import KeyBundle, ShareBundle, UnmaskRequest
from conclave.core.secagg.participant import SecAggParticipant
from conclave.core.secagg.setup import IDENTITY_CAPABILITY, SecAggSetup
from conclave.core.types import Declined, FitResult, SecAggStep, Task

logger = logging.getLogger(__name__)


def identity_capability(key: Ed25519PrivateKey) -> dict[str, str]:
    """The Join capability that lets a participant take part in secure aggregation."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {IDENTITY_CAPABILITY: raw.hex()}


@functools.lru_cache(maxsize=4)
def _parse_setup(payload: bytes) -> tuple[SecAggSetup, SecAggConfig,
                                          Mapping[str, Ed25519PublicKey]]:
    """Parse a round's public setup. Cached: the virtual participants of a simulation share one
    process and receive identical bytes; everything here is public and immutable."""
    setup = SecAggSetup.from_bytes(payload)
    return setup, setup.config(), MappingProxyType(setup.public_keys())


@dataclass(slots=True)
class StageMessage:
    step: SecAggStep
    payload: bytes


class SecureSession:
    """One participant in one secure round."""

    def __init__(self, *, name: str, task: Task, setup_payload: bytes,
                 identity: Ed25519PrivateKey,
                 before_send: Callable[[SecAggStep | str, int], bool | None] | None = None) -> None:
        self.name = name
        self._before_send = before_send
        self.task = task
        setup, config, public = _parse_setup(setup_payload)
        if setup.run_id != task.run_id or setup.round != task.round:
            raise RemoteProtocolError("secure-aggregation setup is for another run or round")
        own = identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if setup.identity_keys.get(name) != own:
            raise RemoteProtocolError(
                "the coordinator's setup does not carry this participant's identity key")
        if setup.vector_length != task.parameters.layout.size + 1:
            raise RemoteProtocolError("secure-aggregation setup has the wrong vector length")
        self.setup = setup
        self._codec = setup.codec()
        self._machine = SecAggParticipant(config=config, participant_id=name,
                                          identity_key=identity, identity_keys=public)
        self._encoded: np.ndarray | None = None
        self.next_step = SecAggStep.ADVERTISE
        self.done = False
        self.aborted = ""

    def _crashes_before(self, step: SecAggStep) -> bool:
        """Fault injection: the hook returns False to make this participant vanish here."""
        if self._before_send is not None and self._before_send(step, self.task.round) is False:
            self.aborted = f"vanished before sending {step.value} (fault injection)"
            return True
        return False

    def start(self, fit: FitResult) -> StageMessage | None:
        """Encode the trained model's change and produce the ADVERTISE message."""
        weight = min(max(int(fit.num_examples), 0), self.setup.max_weight)
        self._encoded = self._codec.encode_weighted(fit.parameters.flat, weight,
                                                    self.setup.max_weight,
                                                    base=self.task.parameters.flat)
        msg = StageMessage(SecAggStep.ADVERTISE, self._machine.advertise().to_bytes())
        self.next_step = SecAggStep.SHARE
        if self._crashes_before(SecAggStep.ADVERTISE):
            return None
        return msg

    def poll(self, service: CoordinatorService, wait_s: float) -> bool:
        """Fetch the input for the next step and, if it is there, answer it. True if a step
        was done (or the session ended)."""
        if self.done or self.aborted:
            return False
        answer = service.fetch_stage(self.task.run_id, self.name, self.task.round,
                                     self.next_step, wait_s)
        if answer.aborted:
            self.aborted = answer.reason or "aborted by the coordinator"
            logger.info("%s: secure round %d ended for us: %s", self.name, self.task.round,
                        self.aborted)
            return True
        if answer.payload is None:
            return False
        try:
            message = self._answer(answer.payload)
        except ConclaveError as exc:
            self.aborted = f"refused to continue: {exc}"
            logger.warning("%s: secure round %d: %s", self.name, self.task.round, self.aborted)
            self._say_why(service, str(exc))
            return True
        if self._crashes_before(message.step):
            return True
        verdict = service.submit_stage(self.task.run_id, self.name, self.task.round,
                                       message.step, message.payload)
        if not verdict.accepted:
            self.aborted = f"{message.step.value} rejected: {verdict.reason}"
            logger.warning("%s: secure round %d: %s", self.name, self.task.round, self.aborted)
        elif message.step is SecAggStep.UNMASK:
            self.done = True
        return True

    def _say_why(self, service: CoordinatorService, reason: str) -> None:
        """Tell the coordinator we stopped, and why, so the step does not wait for us until its
        deadline and the ledger records the real reason (best effort: if this fails too, the
        deadline drops us all the same)."""
        try:
            service.decline_task(Declined(run_id=self.task.run_id, round=self.task.round,
                                          participant=self.name, kind=self.task.kind,
                                          reason=reason))
        except ConclaveError as exc:
            logger.info("%s: could not tell the coordinator: %s", self.name, exc)

    def _answer(self, payload: bytes) -> StageMessage:
        step = self.next_step
        if step is SecAggStep.SHARE:
            out = self._machine.receive_keys(KeyBundle.from_bytes(payload)).to_bytes()
            self.next_step = SecAggStep.MASKED_INPUT
        elif step is SecAggStep.MASKED_INPUT:
            assert self._encoded is not None
            masked = self._machine.masked_input(self._encoded, ShareBundle.from_bytes(payload))
            out = masked.to_bytes()
            self._encoded = None
            self.next_step = SecAggStep.UNMASK
        else:
            out = self._machine.unmask(UnmaskRequest.from_bytes(payload)).to_bytes()
        return StageMessage(step, out)
