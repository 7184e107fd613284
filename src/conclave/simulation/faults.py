"""Fault injection for simulations: the ``[faults]`` table of a run spec.

```toml
[faults]
drop_probability = 0.1          # a selected participant stays silent for one attempt of a round
slow = ["participant-3"]        # always answers after the round's deadline (recorded late)
[[faults.crash]]                # vanishes for good just before sending STEP in ROUND
participant = "participant-7"
round = 4
step = "fit"                    # fit, evaluate, or a secure-aggregation step
[[faults.partition]]            # unreachable from round A through round B
participants = ["participant-0", "participant-1"]
from_round = 3
to_round = 5
```

Decisions are a pure function of the run seed, the participant and the round, so a faulty
simulation replays exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conclave.core.errors import ConfigError

_STEPS = ("fit", "evaluate", "advertise", "share", "masked_input", "unmask")


@dataclass(frozen=True, slots=True)
class Crash:
    participant: str
    round: int
    step: str


@dataclass(frozen=True, slots=True)
class Partition:
    participants: frozenset[str]
    from_round: int
    to_round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPlan:
    seed: int = 0
    drop_probability: float = 0.0
    slow: frozenset[str] = frozenset()
    crashes: tuple[Crash, ...] = ()
    partitions: tuple[Partition, ...] = ()
    _crash_at: Mapping[str, Crash] = field(default_factory=dict, repr=False)

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, *, seed: int,
                   names: tuple[str, ...]) -> FaultPlan:
        if not table:
            return cls(seed=seed)
        known = {"drop_probability", "slow", "crash", "partition", "seed"}
        for key in table:
            if key not in known:
                raise ConfigError(f"faults.{key}", table[key],
                                  f"a known key ({', '.join(sorted(known))})")
        p = table.get("drop_probability", 0.0)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ConfigError("faults.drop_probability", p, "a number from 0 to 1")
        slow = table.get("slow", [])
        _check_names("faults.slow", slow, names)
        crashes = []
        for i, c in enumerate(table.get("crash", [])):
            where = f"faults.crash[{i}]"
            if not isinstance(c, Mapping) or set(c) - {"participant", "round", "step"}:
                raise ConfigError(where, c, "a table with participant, round and step")
            _check_names(f"{where}.participant", [c.get("participant")], names)
            rnd, step = c.get("round"), c.get("step", "fit")
            if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
                raise ConfigError(f"{where}.round", rnd, "an integer >= 1")
            if step not in _STEPS:
                raise ConfigError(f"{where}.step", step, f"one of {', '.join(_STEPS)}")
            crashes.append(Crash(participant=c["participant"], round=rnd, step=step))
        partitions = []
        for i, q in enumerate(table.get("partition", [])):
            where = f"faults.partition[{i}]"
            if not isinstance(q, Mapping):
                raise ConfigError(where, q, "a table with participants, from_round, to_round")
            _check_names(f"{where}.participants", q.get("participants"), names)
            a, b = q.get("from_round"), q.get("to_round")
            if not (isinstance(a, int) and isinstance(b, int) and 1 <= a <= b):
                raise ConfigError(f"{where}.from_round", (a, b), "1 <= from_round <= to_round")
            partitions.append(Partition(frozenset(q["participants"]), a, b))
        fault_seed = table.get("seed", seed)
        return cls(seed=int(fault_seed), drop_probability=float(p), slow=frozenset(slow),
                   crashes=tuple(crashes), partitions=tuple(partitions),
                   _crash_at={c.participant: c for c in crashes})

    @property
    def active(self) -> bool:
        return bool(self.drop_probability or self.slow or self.crashes or self.partitions)

    def silent(self, participant: str, round: int, attempt: int = 1) -> bool:
        """Whether ``participant`` does not answer at all in ``attempt`` of ``round``. Drops
        are drawn afresh for each attempt, as a retried round meets a new moment in a real
        federation; partitions hold for every attempt of their rounds."""
        if any(participant in q.participants and q.from_round <= round <= q.to_round
               for q in self.partitions):
            return True
        if self.drop_probability <= 0:
            return False
        key = f"faults/{self.seed}/{participant}/{round}"
        if attempt > 1:
            key += f"/{attempt}"
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.drop_probability

    def crashes_before(self, participant: str, step: str, round: int) -> bool:
        crash = self._crash_at.get(participant)
        return crash is not None and (round, _STEPS.index(step)) >= (
            crash.round, _STEPS.index(crash.step))


def _check_names(field_name: str, value: object, names: tuple[str, ...]) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(field_name, value, "a list of participant names")
    unknown = [v for v in value if v not in names]
    if unknown:
        raise ConfigError(field_name, unknown, f"names of simulated participants ({names[0]}...)")
