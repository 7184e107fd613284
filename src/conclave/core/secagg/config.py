"""The public parameters of one secure-aggregation round, shared by coordinator and participants.

Build it with :meth:`SecAggConfig.create`, which fills in the neighbour degree and threshold
from n (see :mod:`conclave.core.secagg.graph`) and validates everything, raising
:class:`~conclave.core.errors.ConfigError` that names the offending field.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from conclave.core.errors import ConfigError
from conclave.core.secagg.fixedpoint import ring_dtype
from conclave.core.secagg.graph import (
    SEED_BYTES,
    default_neighbours,
    default_threshold,
    neighbour_graph,
    validate_degree,
    validate_threshold,
)
from conclave.core.secagg.keys import round_context
from conclave.core.secagg.shamir import MAX_X


class Stage(enum.Enum):
    """Stages of both machines. A participant is *in* a stage when it waits to perform it;
    the coordinator is in a stage while it collects that stage's messages."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ERROR = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """Everything public about one round; every party must hold an identical copy.

    ``participants`` is the sorted tuple of ids selected for the round (the graph is built
    over all of them, whoever later drops). Share x-coordinates are 1-based positions in it.
    """

    run_id: str
    round: int
    participants: tuple[str, ...]
    graph_seed: bytes
    vector_length: int
    bits: int
    neighbours: int
    threshold: int
    graph: Mapping[str, frozenset[str]] = field(repr=False, compare=False)

    @classmethod
    def create(
        cls,
        *,
        run_id: str,
        round: int,
        participants: Sequence[str],
        graph_seed: bytes,
        vector_length: int,
        bits: int = 32,
        neighbours: int | None = None,
        threshold: int | None = None,
    ) -> SecAggConfig:
        ids = tuple(sorted(participants))
        n = len(ids)
        if n < 2:
            raise ConfigError("participants", n, "at least 2 participants")
        if len(set(ids)) != n or any(not pid for pid in ids):
            raise ConfigError("participants", ids, "distinct non-empty ids")
        if n >= MAX_X:
            raise ConfigError("participants", n, f"fewer than {MAX_X}")
        if round < 0:
            raise ConfigError("round", round, "an integer >= 0")
        if vector_length < 1:
            raise ConfigError("vector_length", vector_length, "an integer >= 1")
        if len(graph_seed) != SEED_BYTES:
            raise ConfigError("graph_seed", len(graph_seed), f"exactly {SEED_BYTES} bytes")
        ring_dtype(bits)
        k = validate_degree(n, default_neighbours(n) if neighbours is None else neighbours)
        t = default_threshold(k) if threshold is None else threshold
        validate_threshold(k, t)
        return cls(
            run_id=run_id,
            round=round,
            participants=ids,
            graph_seed=bytes(graph_seed),
            vector_length=vector_length,
            bits=bits,
            neighbours=k,
            threshold=t,
            graph=neighbour_graph(graph_seed, ids, k),
        )

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        return ring_dtype(self.bits)

    @property
    def is_complete(self) -> bool:
        return self.neighbours == len(self.participants) - 1

    @property
    def context(self) -> bytes:
        """Bytes binding signatures and derivations to this run and round."""
        return round_context(self.run_id, self.round)

    def x_of(self, participant: str) -> int:
        """The Shamir x-coordinate of a participant (1-based position in ``participants``)."""
        pos = bisect.bisect_left(self.participants, participant)
        if pos == len(self.participants) or self.participants[pos] != participant:
            raise KeyError(participant)
        return pos + 1

    def neighbours_of(self, participant: str) -> frozenset[str]:
        return self.graph[participant]
