"""Who may join: names are checked before anything is recorded, refusals do not reveal the
federation's members, and a flood of made-up names cannot grow the ledger without bound."""

from __future__ import annotations

import pytest

from conclave.coordinator import endpoints
from conclave.coordinator.service import Coordinator
from conclave.core.errors import RemoteProtocolError
from conclave.core.parameters import Parameters
from conclave.core.spec import RunSpec
from conclave.core.types import JoinRequest, ParticipantState
from conclave.ledger.memory import MemoryLedger

SPEC = """
[run]
name = "join"
rounds = 1
[task]
trainer = "conclave.trainers.noise:make_trainer"
[federation]
participants = ["alice", "bob"]
[selection]
min_participants = 2
"""


@pytest.fixture
def coordinator() -> Coordinator:
    return Coordinator(spec=RunSpec.from_toml(SPEC), ledger=MemoryLedger(),
                       initial=Parameters.from_arrays({"w": [0.0]}))


def _events(coord: Coordinator) -> list[tuple[str, ParticipantState]]:
    return [(e.participant, e.state) for e in coord._ledger.participant_events(coord.run_id)]


@pytest.mark.parametrize("name", ["", "a b", "x" * 129, "evil\n\x1b[31m", "-dash", "é"])
def test_invalid_names_are_refused_and_not_recorded(coordinator: Coordinator, name: str) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid participant name"):
        coordinator.join(JoinRequest(participant=name))
    assert _events(coordinator) == []


def test_an_unknown_name_is_refused_without_listing_the_members(coordinator: Coordinator) -> None:
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as info:
            coordinator.join(JoinRequest(participant="mallory"))
        assert "not enrolled" in str(info.value) and "alice" not in str(info.value)
    assert _events(coordinator) == [("mallory", ParticipantState.REJECTED)]  # once per name
    coordinator.join(JoinRequest(participant="alice"))
    assert _events(coordinator)[-1] == ("alice", ParticipantState.JOINED)


def test_recorded_refusals_are_bounded(coordinator: Coordinator,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "_MAX_RECORDED_REJECTIONS", 5)
    for i in range(20):
        with pytest.raises(RemoteProtocolError):
            coordinator.join(JoinRequest(participant=f"stranger-{i}"))
    assert len(_events(coordinator)) == 5


def test_a_name_held_by_a_live_process_is_not_taken_by_another() -> None:
    from conclave.core.errors import TransportError

    now = [100.0]
    coord = Coordinator(spec=RunSpec.from_toml(SPEC), ledger=MemoryLedger(),
                        initial=Parameters.from_arrays({"w": [0.0]}), clock=lambda: now[0])
    first = {"identity.ed25519": "11" * 32}
    other = {"identity.ed25519": "22" * 32}
    coord.join(JoinRequest(participant="alice", capabilities=first))
    now[0] += 1.0
    with pytest.raises(TransportError, match="connected from another process"):
        coord.join(JoinRequest(participant="alice", capabilities=other))
    coord.join(JoinRequest(participant="alice", capabilities=first))  # the same process: fine
    # the first process falls silent; once it missed two heartbeats (2 x 2 s by default)
    # the restarted one (a new key) is admitted
    now[0] += 2 * coord.spec.federation.heartbeat_interval_s - 0.5
    with pytest.raises(TransportError, match="silent for 4 s"):
        coord.join(JoinRequest(participant="alice", capabilities=other))
    now[0] += 0.5
    coord.join(JoinRequest(participant="alice", capabilities=other))
    assert _events(coord)[-1] == ("alice", ParticipantState.REJOINED)
