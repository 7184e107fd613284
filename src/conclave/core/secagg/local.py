"""A reference driver: one whole SecAgg+ round in one process, messages passed in memory.

It shows how a transport wires the two machines together, and is what tests, benchmarks and
simulations use. Every message crosses a ``to_bytes``/``from_bytes`` round trip (unless
``serialise=False``), and ``intercept`` may replace any message in flight, so tests can drop,
replay or tamper with traffic. A participant whose machine raises is treated as dropped, as a
real driver would; a coordinator rejection is recorded and the round goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conclave.core.errors import ConclaveError, RemoteProtocolError
from conclave.core.secagg.config import SecAggConfig, Stage
from conclave.core.secagg.coordinator import AggregateResult, SecAggCoordinator
from conclave.core.secagg.participant import SecAggParticipant


class _Wire(Protocol):
    def to_bytes(self) -> bytes: ...


M = TypeVar("M", bound=_Wire)
Intercept = Callable[[Stage, str, object], object]
"""(stage, participant the message is from or to, message) -> message to deliver instead."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class LocalRoundOutcome:
    aggregate: AggregateResult
    coordinator: SecAggCoordinator
    participant_errors: Mapping[str, ConclaveError] = field(default_factory=dict)


def run_local_round(
    config: SecAggConfig,
    inputs: Mapping[str, npt.NDArray[np.unsignedinteger]],
    identities: Mapping[str, Ed25519PrivateKey],
    *,
    dropouts: Mapping[Stage, frozenset[str]] | None = None,
    intercept: Intercept | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    serialise: bool = True,
) -> LocalRoundOutcome:
    """Run a round; ``dropouts[stage]`` vanish before performing ``stage`` (and never return).

    Raises what the coordinator raises when the round cannot finish (QuorumNotReached).
    """
    drop = dropouts or {}
    public = {pid: key.public_key() for pid, key in identities.items()}
    coordinator = SecAggCoordinator(config=config, identity_keys=public)
    parts = {
        pid: SecAggParticipant(
            config=config,
            participant_id=pid,
            identity_key=identities[pid],
            identity_keys=public,
            random_bytes=random_bytes,
        )
        for pid in config.participants
    }
    errors: dict[str, ConclaveError] = {}
    order = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT, Stage.UNMASK)

    def active(pid: str, stage: Stage) -> bool:
        gone = any(pid in drop.get(s, frozenset()) for s in order[: order.index(stage) + 1])
        return not gone and pid not in errors

    def carry(stage: Stage, pid: str, msg: M) -> M:
        if serialise:
            msg = type(msg).from_bytes(msg.to_bytes())  # type: ignore[attr-defined]
        return msg if intercept is None else intercept(stage, pid, msg)  # type: ignore[return-value]

    def step(stage: Stage, pid: str, make: Callable[[], M], submit: Callable[[M], None]) -> None:
        if not active(pid, stage):
            return
        try:
            msg = make()
        except ConclaveError as exc:
            errors[pid] = exc
            return
        try:
            submit(carry(stage, pid, msg))
        except RemoteProtocolError:
            pass  # the coordinator recorded the rejection

    for pid in config.participants:
        step(Stage.ADVERTISE, pid, parts[pid].advertise, coordinator.receive_advert)
    for pid, key_bundle in coordinator.close_advertise().items():
        make_shares = partial(parts[pid].receive_keys, carry(Stage.SHARE, pid, key_bundle))
        step(Stage.SHARE, pid, make_shares, coordinator.receive_share_keys)
    for pid, share_bundle in coordinator.close_share().items():
        bundle = carry(Stage.MASKED_INPUT, pid, share_bundle)
        make_masked = partial(parts[pid].masked_input, inputs[pid], bundle)
        step(Stage.MASKED_INPUT, pid, make_masked, coordinator.receive_masked_input)
    requests = coordinator.unmask_requests(coordinator.close_masked_input())
    for pid, request in requests.items():
        make_response = partial(parts[pid].unmask, carry(Stage.UNMASK, pid, request))
        step(Stage.UNMASK, pid, make_response, coordinator.receive_unmask_response)
    return LocalRoundOutcome(
        aggregate=coordinator.finish(), coordinator=coordinator, participant_errors=errors
    )
