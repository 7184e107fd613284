"""Run spec validation: every bad field names the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from conclave.core.errors import ConfigError
from conclave.core.spec import RunSpec, StrategyName

GOOD = """
[run]
name = "ok"
rounds = 3
[task]
trainer = "conclave.tasks.heart_disease:make_trainer"
"""


def test_minimal_spec_has_sensible_defaults() -> None:
    spec = RunSpec.from_toml(GOOD)
    assert spec.rounds == 3 and spec.seed == 0 and spec.strategy.name is StrategyName.FEDAVG
    assert spec.selection.min_quorum == 1 and spec.selection.participants_per_round == 0
    assert spec.source == GOOD


def test_bundled_spec_and_example_are_identical_and_valid() -> None:
    from importlib import resources
    from pathlib import Path

    bundled = resources.files("conclave.tasks.heart_disease").joinpath("run.toml").read_text()
    example = (Path(__file__).resolve().parents[3] / "examples/fed-heart-disease.toml").read_text()
    assert bundled == example
    spec = RunSpec.from_toml(bundled)
    assert spec.rounds == 15 and spec.task.config["local_steps"] == 100
    assert spec.simulation.names() == spec.federation.participants


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [
        ('rounds = 0', "run.rounds", "integer >= 1"),
        ('rounds = "ten"', "run.rounds", "integer >= 1"),
        ('rounds = 3\nseed = -1', "run.seed", "integer >= 0"),
        ('rounds = 3\ncolour = "red"', "run.colour", "known key"),
        ('rounds = 3.5', "run.rounds", "integer"),
    ],
)
def test_bad_run_fields(patch: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunSpec.from_toml(GOOD.replace("rounds = 3", patch))
    assert info.value.field == field and fragment in str(info.value)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('[strategy]\nname = "fedsgd"', "strategy.name"),
        ("[strategy]\nserver_momentum = 0.9", "strategy.server_momentum"),
        ('[strategy]\nname = "fedavgm"\nserver_momentum = 1.0', "strategy.server_momentum"),
        ('[strategy]\nname = "fedavgm"\nserver_momentum = -0.1', "strategy.server_momentum"),
        ('[strategy]\nname = "fedavgm"\nserver_lr = 0', "strategy.server_lr"),
        ('[strategy]\nname = "fedavgm"\nserver_lr = "fast"', "strategy.server_lr"),
        ('[strategy]\nname = "fedavgm"\nnesterov = true', "strategy.nesterov"),
        ("[selection]\nmin_quorum = 5\nparticipants_per_round = 2", "selection.min_quorum"),
        ("[deadlines]\nround_timeout_s = -1", "deadlines.round_timeout_s"),
        ("[deadlines]\nround_timeout_s = nan", "deadlines.round_timeout_s"),
        ('[federation]\nparticipants = ["a", "a"]', "federation.participants"),
        ('[federation]\nparticipants = ["a"]\n[selection]\nmin_participants = 2',
         "selection.min_participants"),
        ("[task.config]\nlr = [1, 2]", "task.config.lr"),
        ('[simulation]\nname_format = "p"', "simulation.name_format"),
        ("[evaluation]\nevery_rounds = -2", "evaluation.every_rounds"),
        ("[selection]\nmin_participants = 2\nmin_quorum = 3", "selection.min_quorum"),
        ('[federation]\nparticipants = ["a", "b"]\n[simulation]\nparticipants = 3',
         "simulation.participants"),
        ('[federation]\nparticipants = ["a", "b"]\n[simulation]\nname_format = "p{i}"',
         "simulation.name_format"),
        ("[bogus]\nx = 1", "bogus"),
    ],
)
def test_bad_sections(extra: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunSpec.from_toml(GOOD + extra)
    assert info.value.field == field
    assert repr(info.value.value)[:20] in str(info.value)


def test_simulation_names_default_to_the_listed_participants() -> None:
    spec = RunSpec.from_toml(GOOD + '[federation]\nparticipants = ["x", "y", "z"]\n')
    assert spec.simulation.names() == ("x", "y", "z")
    spec = RunSpec.from_toml(GOOD + '[federation]\nparticipants = ["x", "y", "z"]\n'
                             "[simulation]\nparticipants = 2\n")
    assert spec.simulation.names() == ("x", "y")


def test_fedavgm_strategy() -> None:
    spec = RunSpec.from_toml(GOOD + '[strategy]\nname = "fedavgm"\nserver_lr = 0.5\n')
    assert spec.strategy.name is StrategyName.FEDAVGM
    assert (spec.strategy.server_lr, spec.strategy.server_momentum) == (0.5, 0.9)


def test_missing_tables_and_bad_toml() -> None:
    with pytest.raises(ConfigError, match="task"):
        RunSpec.from_toml('[run]\nname = "x"\nrounds = 1\n')
    with pytest.raises(ConfigError, match="valid TOML"):
        RunSpec.from_toml("[run\nname=")
    with pytest.raises(ConfigError, match="task.trainer"):
        RunSpec.from_toml(GOOD.replace("conclave.tasks.heart_disease:make_trainer", "no colon"))


def test_rounds_override() -> None:
    spec = RunSpec.from_toml(GOOD).with_overrides(rounds=7)
    assert spec.rounds == 7
    with pytest.raises(ConfigError):
        RunSpec.from_toml(GOOD).with_overrides(rounds=0)


FED5 = ('[federation]\nparticipants = ["a", "b", "c", "d", "e"]\n'
        "[selection]\nmin_participants = 5\nmin_quorum = 2\n")


@pytest.mark.parametrize(
    ("extra", "field", "fragment"),
    [
        ("[secure_aggregation]\nthreshold = 2\nneighbours = 4", "secure_aggregation.threshold",
         "more than neighbours/2"),
        ("[secure_aggregation]\nneighbours = 3\n", "secure_aggregation.neighbours", "even"),
        ("[secure_aggregation]\nneighbours = 5\n", "secure_aggregation.neighbours", "at most"),
        ("[secure_aggregation]\nbits = 16\n", "secure_aggregation.bits", "32 or 64"),
        ("[secure_aggregation]\nclip_range = 0\n", "secure_aggregation.clip_range", "> 0"),
        ("[secure_aggregation]\nclip_range = nan\n", "secure_aggregation.clip_range", "finite"),
        ("[secure_aggregation]\nclip_range = 1e308\n", "secure_aggregation.clip_range",
         "between"),
        ("[secure_aggregation]\nclip_range = 1e-320\n", "secure_aggregation.clip_range",
         "between"),
        ('[secure_aggregation]\nenabled = "no"\n', "secure_aggregation.enabled", "true or false"),
        ("[secure_aggregation]\nenabled = 0\n", "secure_aggregation.enabled", "true or false"),
        # switched off, it is still checked
        ("[secure_aggregation]\nenabled = false\nbits = 16\n", "secure_aggregation.bits", "32"),
        ("[secure_aggregation]\nmax_weight = 9223372036854775807\n",
         "secure_aggregation.max_weight", "at most"),
        ("[secure_aggregation]\nthreshold = 1\n", "secure_aggregation.threshold",
         "more than neighbours/2"),
        # a round may run with min_participants = 4: k = 3 there, so t = 4 cannot hold
        ("[secure_aggregation]\nneighbours = 4\nthreshold = 4\n",
         "secure_aggregation.threshold", "a round of 4 participants"),
    ],
)
def test_bad_secure_aggregation(extra: str, field: str, fragment: str) -> None:
    fed = FED5.replace("min_participants = 5", "min_participants = 4") if "= 4\n" in extra \
        else FED5
    with pytest.raises(ConfigError) as info:
        RunSpec.from_toml(GOOD + fed + extra)
    assert info.value.field == field and fragment in str(info.value)


def test_secure_aggregation_edge_cases_that_are_valid() -> None:
    on = RunSpec.from_toml(GOOD + FED5 + "[secure_aggregation]\nthreshold = 3\n")
    assert on.secure_aggregation is not None and on.secure_aggregation.threshold == 3
    off = RunSpec.from_toml(GOOD + FED5 + "[secure_aggregation]\nenabled = false\n")
    assert off.secure_aggregation is None
    # two participants: k = 1, so t = 1 is the only threshold, set or defaulted
    two = (GOOD + '[federation]\nparticipants = ["a", "b"]\n'
           "[selection]\nmin_participants = 2\nmin_quorum = 2\n")
    spec = RunSpec.from_toml(two + "[secure_aggregation]\nthreshold = 1\n")
    assert spec.secure_aggregation is not None and spec.secure_aggregation.threshold == 1
    with pytest.raises(ConfigError, match="threshold"):
        RunSpec.from_toml(two + "[secure_aggregation]\nthreshold = 2\n")
    # every round has participants_per_round members, whatever min_participants says
    ten = ('[federation]\nparticipants = [' + ", ".join(f'"p{i}"' for i in range(10)) + "]\n"
           "[selection]\nparticipants_per_round = 5\nmin_participants = 10\nmin_quorum = 2\n")
    RunSpec.from_toml(GOOD + ten + "[secure_aggregation]\nthreshold = 3\n")
    # an open federation: k itself must hold (rounds may be larger than k + 1)
    open_fed = "[selection]\nmin_participants = 4\nmin_quorum = 2\n"
    with pytest.raises(ConfigError, match="threshold"):
        RunSpec.from_toml(GOOD + open_fed + "[secure_aggregation]\nneighbours = 10\n"
                          "threshold = 3\n")
    with pytest.raises(ConfigError, match="even"):
        RunSpec.from_toml(GOOD + open_fed + "[secure_aggregation]\nneighbours = 5\n")
    RunSpec.from_toml(GOOD + open_fed.replace("= 4", "= 8")
                      + "[secure_aggregation]\nneighbours = 6\nthreshold = 4\n")
    # a smaller max_weight than the limit, a wide clip and a 64-bit ring
    RunSpec.from_toml(GOOD + FED5 + "[secure_aggregation]\nbits = 64\nclip_range = 1e6\n"
                      "max_weight = 1000000\n")
    with pytest.raises(ConfigError, match="min_quorum"):
        RunSpec.from_toml(GOOD + FED5.replace("min_quorum = 2", "min_quorum = 1")
                          + "[secure_aggregation]\n")
