"""The run spec: a TOML document describing one training run, validated before anything starts.

Parsing takes text (``RunSpec.from_toml``), never a path, so this module stays free of I/O.
Every invalid field raises ``ConfigError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from conclave.core.errors import ConfigError
from conclave.core.secagg.fixedpoint import FixedPointCodec
from conclave.core.secagg.graph import default_neighbours
from conclave.core.types import Scalar

_TRAINER_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
NAME_RULE = "letters, digits, '-', '_', '.' (1-128, starting with a letter or digit)"


def is_valid_name(name: str) -> bool:
    """A run or participant name: what the ledger, logs and tables can show as it is."""
    return bool(_NAME.match(name))

E = TypeVar("E", bound=enum.Enum)
MAX_ROUNDS = 1_000_000
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class StrategyName(enum.Enum):
    FEDAVG = "fedavg"
    """The example-weighted mean of the updates becomes the new global model."""
    FEDAVGM = "fedavgm"
    """FedAvg with server momentum (Hsu et al. 2019); its velocity is checkpointed state."""


class SecAggProtocol(enum.Enum):
    SECAGG_PLUS = "secagg+"
    """SecAgg+ (Bell et al. 2020): a random k-regular neighbour graph, k = O(log n)."""
    SECAGG = "secagg"
    """SecAgg (Bonawitz et al. 2017): the complete graph."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySpec:
    """``[strategy]``: how the round's aggregate becomes the next global model."""

    name: StrategyName = StrategyName.FEDAVG
    server_lr: float = 1.0
    """FedAvgM: the coordinator's step size along its velocity."""
    server_momentum: float = 0.9
    """FedAvgM: how much of the previous rounds' velocity is kept, in [0, 1)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureAggregationSpec:
    """``[secure_aggregation]``: the coordinator learns only the sum of the updates."""

    protocol: SecAggProtocol = SecAggProtocol.SECAGG_PLUS
    neighbours: int | None = None
    """Neighbour degree k (None: derived from the number of participants each round)."""
    threshold: int | None = None
    """Shamir threshold t, k/2 < t <= k (None: k // 2 + 1)."""
    clip_range: float = 4.0
    """Each coordinate of an update (the change to the global model) is clipped to
    [-clip_range, clip_range] before fixed-point encoding."""
    bits: int = 32
    """The ring Z_(2^bits) the masked sums live in: 32 or 64."""
    max_weight: int = 100_000
    """Example counts above this are capped when encoding the FedAvg weight."""
    stage_timeout_s: float = 60.0
    """Deadline of each secure-aggregation stage after the training deadline."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    trainer: str
    """The trainer factory as ``module:attribute``."""
    config: Mapping[str, Scalar] = field(default_factory=dict)
    """Passed to every ``Trainer.fit`` / ``evaluate`` call (local_steps, batch_size, lr...)."""
    options: Mapping[str, str] = field(default_factory=dict)
    """Passed to the trainer factory (data paths and the like)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionSpec:
    participants_per_round: int = 0
    """How many participants train each round; 0 means every available participant."""
    min_participants: int = 1
    """How many must have joined before a round starts."""
    min_quorum: int = 1
    """How many accepted contributions a round needs to commit."""
    max_round_attempts: int = 3
    """A round that misses quorum is retried with a fresh selection this many times in all."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlineSpec:
    round_timeout_s: float = 300.0
    evaluation_timeout_s: float = 300.0
    join_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationSpec:
    every_rounds: int = 5
    """Federated evaluation every K rounds (0: only after the last round)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSpec:
    participants: tuple[str, ...] = ()
    """Participants allowed to join; empty means any name."""
    heartbeat_interval_s: float = 2.0
    lost_after_heartbeats: int = 5
    max_model_bytes: int = 2**31
    power_loss_safe_ledger: bool = False
    """fsync every ledger transaction (survives power loss; slower). Off: every write still
    survives the coordinator process being killed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSpec:
    keep_last: int = 0
    """Keep the newest N checkpoints (0: keep every one)."""
    keep_every: int = 0
    """Also keep every M-th round's checkpoint (0: none beyond keep_last)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationSpec:
    participants: int = 4
    name_format: str = "participant-{i}"
    listed: tuple[str, ...] = ()
    """Without a ``name_format``, the names in ``federation.participants`` (when it has any)."""

    def names(self) -> tuple[str, ...]:
        if self.listed:
            return self.listed[: self.participants]
        return tuple(self.name_format.format(i=i) for i in range(self.participants))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    name: str
    rounds: int
    seed: int = 0
    task: TaskSpec
    strategy: StrategySpec = field(default_factory=StrategySpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    deadlines: DeadlineSpec = field(default_factory=DeadlineSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    checkpoints: CheckpointSpec = field(default_factory=CheckpointSpec)
    faults: Mapping[str, object] = field(default_factory=dict)
    """The ``[faults]`` table, read by the simulation (``conclave.simulation.faults``)."""
    secure_aggregation: SecureAggregationSpec | None = None
    """None: plain aggregation (the coordinator sees each update)."""
    source: str = ""
    """The TOML text the spec was read from (kept in the ledger for lineage)."""

    @classmethod
    def from_toml(cls, text: str) -> RunSpec:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("run spec", "<toml>", f"valid TOML ({exc})") from exc
        return cls.from_dict(data, source=text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "") -> RunSpec:
        return _build(_Table(data, ""), source)

    def with_overrides(
        self, *, rounds: int | None = None, secure_aggregation: bool = False
    ) -> RunSpec:
        spec = self
        if rounds is not None:
            if rounds < 1:
                raise ConfigError("run.rounds", rounds, "an integer >= 1")
            spec = dataclasses.replace(spec, rounds=rounds)
        if secure_aggregation and spec.secure_aggregation is None:
            secure = SecureAggregationSpec()
            _check_secure(secure, spec.selection, spec.federation)
            spec = dataclasses.replace(spec, secure_aggregation=secure)
        return spec


class _Table:
    """A TOML table that remembers its dotted path and which keys were read."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "run spec", data, "a table")
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def table(self, key: str, *, required: bool = False) -> _Table:
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(self._name(key), None, "a required table")
            return _Table({}, self._name(key))
        return _Table(self.data[key], self._name(key))

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def int(self, key: str, default: int | None, *, minimum: int = 0) -> int:
        value = self.raw(key, default)
        if value is None:
            raise ConfigError(self._name(key), None, "a required integer")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(self._name(key), value, f"an integer >= {minimum}")
        return value

    def float(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self._name(key), value, "a number")
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(self._name(key), value,
                              "a finite number > 0" if positive else "a finite number")
        return value

    def text(self, key: str, default: str | None, *, pattern: re.Pattern[str] | None = None,
            allowed: str = "a string") -> str:
        value = self.raw(key, default)
        if value is None:
            raise ConfigError(self._name(key), None, f"required: {allowed}")
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise ConfigError(self._name(key), value, allowed)
        return value

    def enum(self, key: str, kind: type[E], default: E) -> E:
        value = self.raw(key, default.value)
        try:
            return kind(value)
        except ValueError:
            options = ", ".join(repr(m.value) for m in kind)
            raise ConfigError(self._name(key), value, f"one of {options}") from None

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(
                self._name(unknown[0]), self.data[unknown[0]],
                f"a known key (this table takes: {', '.join(sorted(self.seen))})",
            )


def _bool(table: _Table, key: str, default: bool) -> bool:
    value = table.raw(key, default)
    if not isinstance(value, bool):
        raise ConfigError(table._name(key), value, "true or false")
    return value


def _scalars(table: _Table) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, value in table.data.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(table._name(key), value, "a finite number")
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(table._name(key), value, "a bool, integer, float or string")
        out[str(key)] = value
    table.seen.update(table.data)
    return out


def _build(root: _Table, source: str) -> RunSpec:
    run = root.table("run", required=True)
    name = run.text("name", None, pattern=_NAME, allowed="letters, digits, '-', '_', '.' (1-128)")
    rounds = run.int("rounds", None, minimum=1)
    if rounds > MAX_ROUNDS:
        raise ConfigError("run.rounds", rounds, f"an integer from 1 to {MAX_ROUNDS}")
    seed = run.int("seed", 0, minimum=0)
    run.check_unknown()

    task_t = root.table("task", required=True)
    trainer = task_t.text("trainer", None, pattern=_TRAINER_REF, allowed="'package.module:attribute'")
    config = _scalars(task_t.table("config"))
    options = {k: str(v) for k, v in _scalars(task_t.table("options")).items()}
    task_t.check_unknown()

    strategy = _strategy(root.table("strategy"))

    sel = root.table("selection")
    per_round = sel.int("participants_per_round", 0)
    min_participants = sel.int("min_participants", max(per_round, 1), minimum=1)
    min_quorum = sel.int("min_quorum", 1, minimum=1)
    attempts = sel.int("max_round_attempts", 3, minimum=1)
    sel.check_unknown()
    if per_round and min_quorum > per_round:
        raise ConfigError("selection.min_quorum", min_quorum,
                          f"at most selection.participants_per_round ({per_round})")
    if per_round and min_participants < per_round:
        raise ConfigError("selection.min_participants", min_participants,
                          f"at least selection.participants_per_round ({per_round})")

    dl = root.table("deadlines")
    deadlines = DeadlineSpec(
        round_timeout_s=dl.float("round_timeout_s", 300.0),
        evaluation_timeout_s=dl.float("evaluation_timeout_s", 300.0),
        join_timeout_s=dl.float("join_timeout_s", 600.0),
    )
    dl.check_unknown()

    ev = root.table("evaluation")
    evaluation = EvaluationSpec(every_rounds=ev.int("every_rounds", 5))
    ev.check_unknown()

    fed = root.table("federation")
    names = fed.raw("participants", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and _NAME.match(n) for n in names):
        raise ConfigError("federation.participants", names, "a list of participant names")
    if len(set(names)) != len(names):
        raise ConfigError("federation.participants", names, "names without duplicates")
    federation = FederationSpec(
        participants=tuple(names),
        heartbeat_interval_s=fed.float("heartbeat_interval_s", 2.0),
        lost_after_heartbeats=fed.int("lost_after_heartbeats", 5, minimum=1),
        max_model_bytes=fed.int("max_model_bytes", 2**31, minimum=1),
        power_loss_safe_ledger=_bool(fed, "power_loss_safe_ledger", False),
    )
    fed.check_unknown()
    if names and min_quorum > len(names):
        raise ConfigError("selection.min_quorum", min_quorum,
                          f"at most the {len(names)} names in federation.participants")
    if names and min_participants > len(names):
        raise ConfigError("selection.min_participants", min_participants,
                          f"at most the {len(names)} names in federation.participants")

    if min_quorum > min_participants:
        raise ConfigError("selection.min_quorum", min_quorum,
                          f"at most selection.min_participants ({min_participants}): a round "
                          "may start with only that many participants")
    simulation = _simulation(root.table("simulation"), tuple(names), min_participants)
    faults = root.raw("faults", {})
    if not isinstance(faults, Mapping):
        raise ConfigError("faults", faults, "a table")
    ck = root.table("checkpoints")
    checkpoints = CheckpointSpec(keep_last=ck.int("keep_last", 0), keep_every=ck.int("keep_every", 0))
    ck.check_unknown()
    secure = _secure(root, selection_spec := SelectionSpec(
        participants_per_round=per_round, min_participants=min_participants,
        min_quorum=min_quorum, max_round_attempts=attempts), federation)
    root.check_unknown()

    return RunSpec(
        name=name, rounds=rounds, seed=seed,
        task=TaskSpec(trainer=trainer, config=config, options=options),
        strategy=strategy,
        selection=selection_spec,
        deadlines=deadlines, evaluation=evaluation, federation=federation,
        simulation=simulation, checkpoints=checkpoints, faults=dict(faults),
        secure_aggregation=secure,
        source=source,
    )


def _simulation(sim: _Table, names: tuple[str, ...], min_participants: int) -> SimulationSpec:
    listed = names if names and "name_format" not in sim.data else ()
    simulation = SimulationSpec(
        participants=sim.int("participants", max(len(names), min_participants, 1), minimum=1),
        name_format=sim.text("name_format", "participant-{i}", allowed="a format string with {i}"),
        listed=listed,
    )
    sim.check_unknown()
    if "{i}" not in simulation.name_format:
        raise ConfigError("simulation.name_format", simulation.name_format,
                          "a string containing {i}")
    if simulation.participants < min_participants:
        raise ConfigError("simulation.participants", simulation.participants,
                          f"at least selection.min_participants ({min_participants})")
    if listed and simulation.participants > len(listed):
        raise ConfigError("simulation.participants", simulation.participants,
                          f"at most the {len(listed)} names in federation.participants "
                          "(or set simulation.name_format)")
    unknown = sorted(set(simulation.names()) - set(names)) if names else []
    if unknown:
        raise ConfigError("simulation.name_format", simulation.name_format,
                          f"names listed in federation.participants (it makes {unknown[0]!r})")
    return simulation


def _strategy(strat: _Table) -> StrategySpec:
    name = strat.enum("name", StrategyName, StrategyName.FEDAVG)
    if name is StrategyName.FEDAVG:
        for key in ("server_lr", "server_momentum"):
            if key in strat.data:
                raise ConfigError(f"strategy.{key}", strat.data[key],
                                  "only with strategy.name = 'fedavgm'")
        strat.check_unknown()
        return StrategySpec(name=name)
    server_lr = strat.float("server_lr", 1.0)
    if server_lr > _FLOAT32_MAX:
        raise ConfigError("strategy.server_lr", server_lr, f"at most {_FLOAT32_MAX:.3g} "
                          "(the step is computed in float32)")
    momentum = strat.float("server_momentum", 0.9, positive=False)
    # in float32, as the step computes it (0.99999999 would round to exactly 1)
    if not 0.0 <= momentum < 1.0 or float(np.float32(momentum)) >= 1.0:
        raise ConfigError("strategy.server_momentum", momentum,
                          "a number in [0, 1) (below 1 in float32)")
    strat.check_unknown()
    return StrategySpec(name=name, server_lr=server_lr, server_momentum=momentum)


def _secure(root: _Table, selection: SelectionSpec,
            federation: FederationSpec) -> SecureAggregationSpec | None:
    if "secure_aggregation" not in root.data:
        root.seen.add("secure_aggregation")
        return None
    t = root.table("secure_aggregation")
    enabled = t.raw("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("secure_aggregation.enabled", enabled, "true or false")
    bits = t.int("bits", 32, minimum=1)
    if bits not in (32, 64):
        raise ConfigError("secure_aggregation.bits", bits, "32 or 64")
    neighbours = t.raw("neighbours")
    threshold = t.raw("threshold")
    for key, value in (("neighbours", neighbours), ("threshold", threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"secure_aggregation.{key}", value, "an integer >= 1")
    clip = t.float("clip_range", 4.0)
    if not _CLIP_MIN <= clip <= _CLIP_MAX:
        raise ConfigError("secure_aggregation.clip_range", clip,
                          f"between {_CLIP_MIN:g} and {_CLIP_MAX:g} (beyond, the fixed-point "
                          "step under- or overflows float64)")
    spec = SecureAggregationSpec(
        protocol=t.enum("protocol", SecAggProtocol, SecAggProtocol.SECAGG_PLUS),
        neighbours=neighbours, threshold=threshold, clip_range=clip, bits=bits,
        max_weight=t.int("max_weight", 100_000, minimum=1),
        stage_timeout_s=t.float("stage_timeout_s", 60.0),
    )
    t.check_unknown()
    if not enabled:  # checked all the same, so switching it back on holds no surprise
        return None
    _check_secure(spec, selection, federation)
    return spec


_CLIP_MIN, _CLIP_MAX = 1e-20, 1e20


def _check_secure(spec: SecureAggregationSpec, selection: SelectionSpec,
                  federation: FederationSpec) -> None:
    """Check k, t and max_weight against every round size this spec allows: exactly
    ``participants_per_round``, or else between ``min_participants`` and every listed
    participant (an open federation bounds no round from above)."""
    if selection.min_quorum < 2:
        raise ConfigError("selection.min_quorum", selection.min_quorum,
                          "at least 2 with secure aggregation (a sum of one is no secret)")
    per_round = selection.participants_per_round
    largest = per_round or len(federation.participants) or 0  # 0: not bounded by the spec
    # with participants_per_round every round has exactly that many; else at least
    # min_participants (only participants with an identity key count)
    smallest = per_round or max(selection.min_participants, 2)
    if spec.protocol is SecAggProtocol.SECAGG and spec.neighbours is not None:
        raise ConfigError("secure_aggregation.neighbours", spec.neighbours,
                          "unset for protocol 'secagg' (the complete graph)")
    k = spec.neighbours
    if largest == 0 and k is not None and k % 2:
        raise ConfigError("secure_aggregation.neighbours", k,
                          "an even number (the federation is open: rounds may be larger "
                          "than neighbours + 1)")
    if largest >= 2 and k is not None:
        full = largest - 1
        if k > full:
            raise ConfigError("secure_aggregation.neighbours", k,
                              f"at most participants - 1 = {full}")
        if k < full and k % 2:
            raise ConfigError("secure_aggregation.neighbours", k,
                              "an even number (or participants - 1 for the complete graph)")

    def degree(n: int) -> int:  # the k a round of n participants uses
        if k is not None:
            return min(k, n - 1)
        return n - 1 if spec.protocol is SecAggProtocol.SECAGG else default_neighbours(n)

    t = spec.threshold
    if t is not None:
        # an unbounded federation may run rounds larger than k + 1, where k itself applies
        sizes = {smallest, largest} if largest else {smallest, (k or 0) + 1}
        for n in sorted(sizes - {0, 1}):
            kn = degree(n)
            if not kn / 2 < t <= kn:
                raise ConfigError(
                    "secure_aggregation.threshold", t,
                    f"more than neighbours/2 and at most neighbours in every round; a round of "
                    f"{n} participants has k = {kn}")
        if t < 2 and largest != 2:
            raise ConfigError("secure_aggregation.threshold", t,
                              "at least 2 (1 only with exactly two participants)")
    if largest >= 2:
        heaviest = FixedPointCodec(clip=spec.clip_range, bits=spec.bits,
                                   max_summands=largest).levels // 2
        if spec.max_weight > heaviest:
            raise ConfigError(
                "secure_aggregation.max_weight", spec.max_weight,
                f"at most {heaviest} with bits = {spec.bits} and up to {largest} "
                "participants (one example must weigh at least one fixed-point level)")

