"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020) as a pair of sans-I/O state machines.

SecAgg (Bonawitz et al., CCS 2017) is the special case of a complete neighbour graph
(``neighbours >= n - 1``). The coordinator learns only the sum mod 2^bits of the inputs of the
participants that survive to the masked-input stage, provided it cannot collect a threshold of
both share kinds for one participant (``threshold > neighbours / 2``, enforced).

Modules:

* :mod:`.config` - :class:`SecAggConfig` (public round parameters, defaults from n), :class:`Stage`
* :mod:`.graph` - the random Harary neighbour graph, default k and t
* :mod:`.shamir` - t-of-n sharing of byte strings over GF(2^31 - 1), numpy-vectorised
* :mod:`.fixedpoint` - :class:`FixedPointCodec`: floats <-> Z_(2^bits) with headroom for sums
* :mod:`.prg` - AES-256-CTR expansion of a 32-byte seed into ring elements
* :mod:`.keys` - per-round X25519 keys, Ed25519-signed adverts, HKDF, AES-GCM share sealing
* :mod:`.messages` - frozen stage messages with a length-checked binary codec
* :mod:`.participant` / :mod:`.coordinator` - the two state machines
* :mod:`.local` - a reference in-process driver (tests, benchmarks, simulation)

What is *not* here: the consistency-check round of the actively-secure variant (signatures
over the survivor set), so a malicious coordinator that lies about who dropped is only
stopped by each participant's local refusal to reveal both share kinds for one peer.
"""

from conclave.core.secagg.config import SecAggConfig, Stage
from conclave.core.secagg.coordinator import AggregateResult, SecAggCoordinator, ShareKind
from conclave.core.secagg.fixedpoint import FixedPointCodec
from conclave.core.secagg.local import LocalRoundOutcome, run_local_round
from conclave.core.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from conclave.core.secagg.participant import SecAggParticipant

__all__ = [
    "AdvertiseKeys",
    "AggregateResult",
    "EncryptedShare",
    "FixedPointCodec",
    "KeyBundle",
    "LocalRoundOutcome",
    "MaskedInput",
    "RevealedShare",
    "SecAggConfig",
    "SecAggCoordinator",
    "SecAggParticipant",
    "ShareBundle",
    "ShareKeys",
    "ShareKind",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "run_local_round",
]
