"""One secure-aggregation FIT round on the coordinator's side, as the run machine sees it.

It wraps the SecAgg+ coordinator machine: decodes wire payloads, checks that each message
comes from the participant that sent it, knows who is still expected at each step, hands out
each participant's input for the next step, and at the end turns the exact ring sum into the
example-weighted mean of the survivors' clipped model changes. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from conclave.core.errors import ConclaveError, QuorumNotReached, RemoteProtocolError
from conclave.core.parameters import DTYPE, Parameters
from conclave.core.secagg.config import Stage
from conclave.core.secagg.coordinator import SecAggCoordinator
from conclave.core.secagg.messages import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from conclave.core.secagg.setup import SecAggSetup
from conclave.core.spec import SecAggProtocol, SecureAggregationSpec
from conclave.core.types import SecAggStep, StageInput

_ORDER = (SecAggStep.ADVERTISE, SecAggStep.SHARE, SecAggStep.MASKED_INPUT, SecAggStep.UNMASK)
_INPUT_OF = {  # the input a participant fetches in order to produce each step's message
    SecAggStep.SHARE: SecAggStep.ADVERTISE,  # key bundle, produced by closing ADVERTISE
    SecAggStep.MASKED_INPUT: SecAggStep.SHARE,
    SecAggStep.UNMASK: SecAggStep.MASKED_INPUT,
}


def graph_seed(run_seed: int, run_id: str, round: int, attempt: int) -> bytes:
    return hashlib.sha256(f"conclave/secagg/{run_seed}/{run_id}/{round}/{attempt}".encode()).digest()


@dataclass(frozen=True, slots=True)
class SecureOutcome:
    mean: Parameters | None
    survivors: frozenset[str]
    dropped: Mapping[str, str]
    """participant -> why its input is not in the sum"""
    reason: str = ""


class SecureRound:
    def __init__(
        self,
        *,
        run_id: str,
        round: int,
        attempt: int,
        run_seed: int,
        selected: tuple[str, ...],
        identity_keys: Mapping[str, bytes],
        spec: SecureAggregationSpec,
        global_parameters: Parameters,
    ) -> None:
        neighbours = spec.neighbours
        if spec.protocol is SecAggProtocol.SECAGG:
            neighbours = len(selected) - 1
        self.setup = SecAggSetup(
            run_id=run_id, round=round, participants=selected,
            identity_keys={p: identity_keys[p] for p in selected},
            graph_seed=graph_seed(run_seed, run_id, round, attempt),
            vector_length=global_parameters.layout.size + 1, bits=spec.bits,
            neighbours=neighbours, threshold=spec.threshold, clip_range=spec.clip_range,
            max_weight=spec.max_weight,
        )
        self._setup_bytes = self.setup.to_bytes()
        self._global = global_parameters
        self._machine = SecAggCoordinator(config=self.setup.config(),
                                          identity_keys=self.setup.public_keys())
        self.step = SecAggStep.ADVERTISE
        self._expected: set[str] = set(selected)
        self._answered: set[str] = set()
        self._forgotten: set[str] = set()
        self._outputs: dict[SecAggStep, Mapping[str, bytes]] = {}
        self._dropped_at: dict[str, str] = {}
        # what each participant's accepted messages looked like, to tell a resend (the reply
        # was lost: acknowledge it again) from a second, different message (reject it)
        self._accepted: dict[tuple[str, SecAggStep], tuple[int, int]] = {}
        self.failed = ""

    # -- queries ------------------------------------------------------------------------
    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._expected - self._answered)

    @property
    def missing(self) -> frozenset[str]:
        """Who sent nothing at this step: still awaited, or lost while awaited."""
        return self.pending | self._forgotten

    @property
    def completions(self) -> Mapping[Stage, frozenset[str]]:
        return self._machine.stage_completions

    def input_for(self, participant: str, step: SecAggStep) -> StageInput:
        if participant not in self.setup.participants:
            return StageInput(payload=None, aborted=True,
                              reason=f"{participant} is not in this secure round")
        if self.failed:
            return StageInput(payload=None, aborted=True, reason=self.failed)
        if participant in self._dropped_at:
            return StageInput(payload=None, aborted=True,
                              reason=f"dropped from the round: {self._dropped_at[participant]}")
        if step is SecAggStep.SETUP:
            return StageInput(payload=self._setup_bytes)
        produced_by = _INPUT_OF.get(step)
        if produced_by is None:
            return StageInput(payload=None, aborted=True, reason=f"{step.value} has no input")
        outputs = self._outputs.get(produced_by)
        if outputs is None:
            return StageInput(payload=None)
        payload = outputs.get(participant)
        if payload is None:
            return StageInput(payload=None, aborted=True,
                              reason=f"no {step.value} input for {participant}")
        return StageInput(payload=payload)

    # -- submissions --------------------------------------------------------------------
    def forget(self, participant: str, reason: str) -> bool:
        """``participant`` is gone (lost): stop waiting for its message at this step; it is
        dropped from the round like one that missed the deadline. True if it was awaited."""
        if self.failed or participant not in self.pending:
            return False
        self._answered.add(participant)
        self._forgotten.add(participant)
        self._dropped_at[participant] = f"{reason} (before {self.step.value})"
        return True

    def submit(self, participant: str, step: SecAggStep, payload: bytes) -> str:
        """Take one stage message; '' if accepted, else the reason it was rejected."""
        if self.failed:
            return f"the secure round failed: {self.failed}"
        if self._accepted.get((participant, step)) == _fingerprint(payload):
            return ""  # a resend of what was accepted (its reply was lost): nothing to do
        if step is not self.step:
            return (f"stale or early {step.value} message: the round is collecting "
                    f"{self.step.value}")
        if participant not in self._expected:
            return f"{participant} is not expected at {step.value}"
        if participant in self._answered:
            return f"duplicate {step.value} message from {participant}"
        try:
            msg = _PARSE[step](payload)
            sender = getattr(msg, "participant", participant)
            if sender != participant:
                raise RemoteProtocolError(
                    f"{step.value} message names {sender!r} but was sent by {participant!r}")
            _RECEIVE[step](self._machine, msg)
        except ConclaveError as exc:
            self._answered.add(participant)
            self._dropped_at[participant] = f"rejected at {step.value}: {exc}"
            return str(exc)
        self._answered.add(participant)
        self._accepted[(participant, step)] = _fingerprint(payload)
        return ""

    # -- closing a step -----------------------------------------------------------------
    def close(self) -> SecureOutcome | None:
        """End the current step with whoever answered. Returns the outcome when the round is
        over (aggregated or failed), None when it moved on to the next step."""
        for p in self.pending:
            self._dropped_at.setdefault(p, f"no {self.step.value} message before the deadline")
        try:
            if self.step is SecAggStep.ADVERTISE:
                self._advance({p: b.to_bytes() for p, b in self._machine.close_advertise().items()})
            elif self.step is SecAggStep.SHARE:
                self._advance({p: b.to_bytes() for p, b in self._machine.close_share().items()})
            elif self.step is SecAggStep.MASKED_INPUT:
                request = self._machine.close_masked_input()
                self._advance({p: r.to_bytes()
                               for p, r in self._machine.unmask_requests(request).items()})
            else:
                return self._finish()
        except QuorumNotReached as exc:
            return self._fail(str(exc))
        except ConclaveError as exc:
            return self._fail(f"secure aggregation failed: {exc}")
        return None

    def _advance(self, outputs: Mapping[str, bytes]) -> None:
        self._outputs[self.step] = outputs
        self.step = _ORDER[_ORDER.index(self.step) + 1]
        self._expected = set(outputs)
        self._answered = set()
        self._forgotten = set()

    def _finish(self) -> SecureOutcome:
        result = self._machine.finish()
        codec = self.setup.codec()
        mean_delta = codec.decode_weighted_mean(result.vector, result.count)
        flat = (self._global.flat.astype(np.float64) + mean_delta).astype(DTYPE)
        survivors = frozenset(result.survivors)
        return SecureOutcome(
            mean=Parameters(self._global.layout, flat), survivors=survivors,
            dropped=self._dropped_outcome(survivors),
        )

    def _fail(self, reason: str) -> SecureOutcome:
        self.failed = reason
        return SecureOutcome(mean=None, survivors=frozenset(),
                             dropped=self._dropped_outcome(frozenset()), reason=reason)

    def _dropped_outcome(self, survivors: frozenset[str]) -> dict[str, str]:
        out = {p: r for p, r in self._dropped_at.items() if p not in survivors}
        for p in self._machine.dropped - survivors:
            out.setdefault(p, "dropped before the masked input; masks removed from shares")
        return out


_PARSE: dict[SecAggStep, Callable[[bytes], object]] = {
    SecAggStep.ADVERTISE: AdvertiseKeys.from_bytes,
    SecAggStep.SHARE: ShareKeys.from_bytes,
    SecAggStep.MASKED_INPUT: MaskedInput.from_bytes,
    SecAggStep.UNMASK: UnmaskResponse.from_bytes,
}
_RECEIVE: dict[SecAggStep, Callable[[SecAggCoordinator, object], None]] = {
    SecAggStep.ADVERTISE: lambda m, msg: m.receive_advert(msg),  # type: ignore[arg-type]
    SecAggStep.SHARE: lambda m, msg: m.receive_share_keys(msg),  # type: ignore[arg-type]
    SecAggStep.MASKED_INPUT: lambda m, msg: m.receive_masked_input(msg),  # type: ignore[arg-type]
    SecAggStep.UNMASK: lambda m, msg: m.receive_unmask_response(msg),  # type: ignore[arg-type]
}


def _fingerprint(payload: bytes) -> tuple[int, int]:
    """Length and CRC-32: tells a participant's resend of the same bytes from a different
    message. Not a security check: the first accepted message is what counts either way."""
    return len(payload), zlib.crc32(payload)
