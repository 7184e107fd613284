"""Participant-side refusals: each raises, puts the machine in ERROR, and the round survives it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_helpers import DeterministicRandom, config, identities, plain_sum, random_inputs

from conclave.core.errors import LocalProtocolError, RemoteProtocolError
from conclave.core.secagg import (
    KeyBundle,
    SecAggConfig,
    SecAggCoordinator,
    SecAggParticipant,
    ShareBundle,
    Stage,
    UnmaskRequest,
    run_local_round,
)


def _round(cfg: SecAggConfig) -> tuple[dict[str, SecAggParticipant], SecAggCoordinator]:
    ident = identities(cfg.participants)
    public = {pid: key.public_key() for pid, key in ident.items()}
    parts = {
        pid: SecAggParticipant(
            config=cfg,
            participant_id=pid,
            identity_key=ident[pid],
            identity_keys=public,
            random_bytes=DeterministicRandom(pid.encode()),
        )
        for pid in cfg.participants
    }
    return parts, SecAggCoordinator(config=cfg, identity_keys=public)


def _to_masked_stage(
    cfg: SecAggConfig,
) -> tuple[dict[str, SecAggParticipant], SecAggCoordinator, dict[str, ShareBundle]]:
    parts, coord = _round(cfg)
    for p in parts.values():
        coord.receive_advert(p.advertise())
    for pid, bundle in coord.close_advertise().items():
        coord.receive_share_keys(parts[pid].receive_keys(bundle))
    return parts, coord, coord.close_share()


def test_stages_advance_and_replays_are_refused() -> None:
    cfg = config(5)
    parts, coord = _round(cfg)
    p = parts["p000"]
    assert p.stage is Stage.ADVERTISE
    for q in parts.values():
        coord.receive_advert(q.advertise())
    assert p.stage is Stage.SHARE
    bundles = coord.close_advertise()
    p.receive_keys(bundles["p000"])
    assert p.stage is Stage.MASKED_INPUT
    with pytest.raises(RemoteProtocolError, match="replayed or out of order"):
        p.receive_keys(bundles["p000"])
    assert p.stage is Stage.ERROR
    with pytest.raises(LocalProtocolError, match="ERROR"):
        p.masked_input(
            np.zeros(cfg.vector_length, dtype=np.uint32),
            ShareBundle(run_id="run-1", round=3, recipient="p000", shares=()),
        )
    with pytest.raises(LocalProtocolError):
        parts["p001"].advertise()


def test_bad_neighbour_signature_is_refused() -> None:
    cfg = config(5)
    parts, coord = _round(cfg)
    for q in parts.values():
        coord.receive_advert(q.advertise())
    bundle = coord.close_advertise()["p000"]
    forged = dataclasses.replace(
        bundle.adverts[0], s_public=b"\x09" * 32
    )  # keys swapped in transit
    with pytest.raises(RemoteProtocolError, match="signature"):
        parts["p000"].receive_keys(
            dataclasses.replace(bundle, adverts=(forged, *bundle.adverts[1:]))
        )
    assert parts["p000"].stage is Stage.ERROR


def test_wrong_recipient_tampering_and_wrong_round_are_refused() -> None:
    cfg = config(5)
    parts, _, bundles = _to_masked_stage(cfg)
    x = np.zeros(cfg.vector_length, dtype=np.uint32)
    other = bundles["p001"]
    with pytest.raises(RemoteProtocolError, match="addressed to"):
        parts["p000"].masked_input(x, dataclasses.replace(bundles["p000"], shares=other.shares))
    share = bundles["p002"].shares[0]
    flipped = bytes([share.ciphertext[0]]) + bytes([share.ciphertext[20] ^ 1]).join(
        [share.ciphertext[1:20], share.ciphertext[21:]]
    )
    bad = dataclasses.replace(share, ciphertext=flipped)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        parts["p002"].masked_input(
            x, dataclasses.replace(bundles["p002"], shares=(bad, *bundles["p002"].shares[1:]))
        )
    with pytest.raises(RemoteProtocolError, match="round 4"):
        parts["p003"].masked_input(x, dataclasses.replace(bundles["p003"], round=4))
    with pytest.raises(LocalProtocolError, match="encoded input"):
        parts["p004"].masked_input(x.astype(np.uint64), bundles["p004"])
    assert all(parts[p].stage is Stage.ERROR for p in ("p000", "p002", "p003", "p004"))


def test_refuses_to_reveal_both_shares_of_one_participant() -> None:
    cfg = config(5)
    parts, coord, bundles = _to_masked_stage(cfg)
    for pid, bundle in bundles.items():
        coord.receive_masked_input(
            parts[pid].masked_input(np.zeros(cfg.vector_length, dtype=np.uint32), bundle)
        )
    request = coord.close_masked_input()
    greedy = UnmaskRequest(run_id="run-1", round=3, survivors=request.survivors, dropped=("p001",))
    with pytest.raises(RemoteProtocolError, match="both shares"):
        parts["p000"].unmask(greedy)
    assert parts["p000"].stage is Stage.ERROR
    not_me = dataclasses.replace(
        request, survivors=tuple(s for s in request.survivors if s != "p001")
    )
    with pytest.raises(RemoteProtocolError, match="survivor"):
        parts["p001"].unmask(not_me)
    response = parts["p002"].unmask(request)
    assert {s.owner for s in response.self_mask_shares} == {"p000", "p001", "p003", "p004"}
    assert response.mask_key_shares == ()
    with pytest.raises(RemoteProtocolError, match="replayed"):
        parts["p002"].unmask(request)


def _tamper_round(n: int, intercept_target: str, tamper: object) -> None:
    cfg = config(n, vector_length=32)
    inputs = random_inputs(cfg, seed=n)
    out = run_local_round(
        cfg,
        inputs,
        identities(cfg.participants),
        intercept=tamper,
        random_bytes=DeterministicRandom(n),
    )
    assert intercept_target in out.participant_errors
    assert (
        intercept_target in out.coordinator.dropped or intercept_target in out.aggregate.survivors
    )
    assert np.array_equal(out.aggregate.vector, plain_sum(cfg, inputs, out.aggregate.survivors))


@pytest.mark.parametrize("attack", ["signature", "misaddressed", "ciphertext", "both_kinds"])
def test_offending_message_drops_only_its_recipient_and_the_round_is_exact(attack: str) -> None:
    victim = "p003"

    def tamper(stage: Stage, pid: str, msg: object) -> object:
        if pid != victim:
            return msg
        if attack == "signature" and isinstance(msg, KeyBundle):
            bad = dataclasses.replace(msg.adverts[0], signature=bytes(64))
            return dataclasses.replace(msg, adverts=(bad, *msg.adverts[1:]))
        if attack in ("misaddressed", "ciphertext") and isinstance(msg, ShareBundle):
            first = msg.shares[0]
            if attack == "misaddressed":
                first = dataclasses.replace(first, recipient="p004")
            else:
                first = dataclasses.replace(
                    first, ciphertext=first.ciphertext[:-1] + bytes([first.ciphertext[-1] ^ 0x80])
                )
            return dataclasses.replace(msg, shares=(first, *msg.shares[1:]))
        if attack == "both_kinds" and isinstance(msg, UnmaskRequest):
            return dataclasses.replace(msg, dropped=(msg.survivors[0],))
        return msg

    _tamper_round(9, victim, tamper)
