"""The public setup of one secure round, as the coordinator hands it to each participant.

Everything here is public: who takes part, their identity keys (so adverts can be verified),
the neighbour-graph seed, k, t, the ring and the fixed-point encoding. Both sides build the
same ``SecAggConfig`` and ``FixedPointCodec`` from it. Serialised as JSON (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conclave.core.errors import RemoteProtocolError
from conclave.core.secagg.config import SecAggConfig
from conclave.core.secagg.fixedpoint import FixedPointCodec

IDENTITY_CAPABILITY = "identity.ed25519"
"""The Join capability that carries a participant's Ed25519 identity public key (hex)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggSetup:
    run_id: str
    round: int
    participants: tuple[str, ...]
    identity_keys: Mapping[str, bytes]
    graph_seed: bytes
    vector_length: int
    bits: int
    neighbours: int | None
    threshold: int | None
    clip_range: float
    max_weight: int

    def config(self) -> SecAggConfig:
        return SecAggConfig.create(
            run_id=self.run_id, round=self.round, participants=self.participants,
            graph_seed=self.graph_seed, vector_length=self.vector_length, bits=self.bits,
            neighbours=self.neighbours, threshold=self.threshold,
        )

    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(clip=self.clip_range, bits=self.bits,
                               max_summands=len(self.participants))

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        try:
            return {p: Ed25519PublicKey.from_public_bytes(k)
                    for p, k in self.identity_keys.items()}
        except ValueError as exc:
            raise RemoteProtocolError(f"malformed identity key in setup: {exc}") from exc

    def to_bytes(self) -> bytes:
        return json.dumps({
            "run_id": self.run_id, "round": self.round, "participants": list(self.participants),
            "identity_keys": {p: k.hex() for p, k in sorted(self.identity_keys.items())},
            "graph_seed": self.graph_seed.hex(), "vector_length": self.vector_length,
            "bits": self.bits, "neighbours": self.neighbours, "threshold": self.threshold,
            "clip_range": self.clip_range, "max_weight": self.max_weight,
        }, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggSetup:
        try:
            d = json.loads(data)
            return cls(
                run_id=str(d["run_id"]), round=int(d["round"]),
                participants=tuple(str(p) for p in d["participants"]),
                identity_keys={str(p): bytes.fromhex(k) for p, k in d["identity_keys"].items()},
                graph_seed=bytes.fromhex(d["graph_seed"]), vector_length=int(d["vector_length"]),
                bits=int(d["bits"]),
                neighbours=None if d["neighbours"] is None else int(d["neighbours"]),
                threshold=None if d["threshold"] is None else int(d["threshold"]),
                clip_range=float(d["clip_range"]), max_weight=int(d["max_weight"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RemoteProtocolError(f"malformed secure-aggregation setup: {exc}") from exc
