"""Secure aggregation inside real rounds (coordinator + agents + in-memory transport).

The committed model must equal the plain example-weighted mean of the survivors' models (up to
the fixed-point step), whatever drops out, and whatever an adversary on the wire sends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from conclave.core.ports import CoordinatorService
from conclave.core.rounds import participant_seed
from conclave.core.secagg.messages import MaskedInput
from conclave.core.spec import RunSpec
from conclave.core.types import (
    ContributionStatus,
    RoundStatus,
    SecAggStep,
    TaskKind,
    TrainerContext,
    Verdict,
)
from conclave.ledger.memory import MemoryLedger
from conclave.simulation.engine import Simulation
from conclave.trainers.noise import make_trainer

N = 6
NAMES = [f"p{i}" for i in range(N)]
EXAMPLES = {name: 10 * (i + 1) for i, name in enumerate(NAMES)}


def spec(rounds: int = 1, extra: str = "") -> RunSpec:
    return RunSpec.from_toml(f"""
[run]
name = "secure"
rounds = {rounds}
seed = 5
[task]
trainer = "conclave.trainers.noise:make_trainer"
[task.options]
dim = "64"
sigma = "0.01"
[selection]
min_participants = {N}
min_quorum = 2
max_round_attempts = 2
[evaluation]
every_rounds = 0
[simulation]
participants = {N}
name_format = "p{{i}}"
[secure_aggregation]
max_weight = 1000
{extra}
""")


def factory(ctx: TrainerContext):  # type: ignore[no-untyped-def]
    options = dict(ctx.options)
    if ctx.participant is not None:
        options["examples"] = str(EXAMPLES[ctx.participant])
    return make_trainer(TrainerContext(participant=ctx.participant, seed=ctx.seed,
                                       options=options))


def expected_round1(s: RunSpec, survivors: list[str]) -> np.ndarray:
    """Plain FedAvg of the survivors' round-1 models, computed without Conclave."""
    total = np.zeros(64)
    weight = 0
    for p in survivors:
        trainer = factory(TrainerContext(participant=p, seed=s.seed, options=s.task.options))
        fit = trainer.fit({"seed": participant_seed(s.seed, 1, p)})
        total += fit.num_examples * fit.parameters.flat.astype(np.float64)
        weight += fit.num_examples
    return total / weight


def run(s: RunSpec, **kwargs: object) -> tuple[Simulation, MemoryLedger]:
    ledger = MemoryLedger()
    kwargs.setdefault("workers", 2)
    sim = Simulation(spec=s, ledger=ledger, factory=factory, **kwargs)  # type: ignore[arg-type]
    sim.run()
    return sim, ledger


def fit_contributions(ledger: MemoryLedger, run_id: str, rnd: int = 1) -> dict[str, object]:
    return {c.participant: c for c in ledger.contributions(run_id, rnd) if c.kind is TaskKind.FIT}


def test_no_dropouts_equals_plain_fedavg() -> None:
    s = spec()
    sim, ledger = run(s)
    got = ledger.load_checkpoint(sim.coordinator.run_id, 1).flat
    np.testing.assert_allclose(got, expected_round1(s, NAMES), rtol=0, atol=1e-6)
    assert all(c.status is ContributionStatus.ACCEPTED  # type: ignore[attr-defined]
               for c in fit_contributions(ledger, sim.coordinator.run_id).values())


@pytest.mark.parametrize("step", [SecAggStep.ADVERTISE, SecAggStep.SHARE,
                                  SecAggStep.MASKED_INPUT, SecAggStep.UNMASK])
def test_a_dropout_at_any_step_leaves_the_survivors_exact_sum(step: SecAggStep) -> None:
    s = spec()
    victim = "p2"

    def vanish(who: str, at: SecAggStep, rnd: int) -> bool:
        return not (who == victim and at is step)

    sim, ledger = run(s, before_send=vanish)
    run_id = sim.coordinator.run_id
    got = ledger.load_checkpoint(run_id, 1).flat
    # Dropping before the masked input removes the victim's input; at UNMASK it is already in.
    in_sum = NAMES if step is SecAggStep.UNMASK else [n for n in NAMES if n != victim]
    np.testing.assert_allclose(got, expected_round1(s, in_sum), rtol=0, atol=1e-6)
    status = fit_contributions(ledger, run_id)[victim].status  # type: ignore[attr-defined]
    expected = (ContributionStatus.ACCEPTED if step is SecAggStep.UNMASK
                else ContributionStatus.DROPPED)
    assert status is expected
    events = [e.detail for e in ledger.participant_events(run_id, victim)]
    if step is not SecAggStep.ADVERTISE:
        assert "secure aggregation round 1: completed advertise" in events


def test_below_threshold_fails_closed_and_the_run_fails_after_retries() -> None:
    s = spec()
    # 4 of 6 vanish before the masked input: fewer survivors than the threshold (t = 3)
    doomed = {"p0", "p1", "p2", "p3"}

    def vanish(who: str, at: SecAggStep, rnd: int) -> bool:
        return not (who in doomed and at is SecAggStep.MASKED_INPUT)

    sim, ledger = run(s, before_send=vanish)
    run_id = sim.coordinator.run_id
    assert sim.coordinator.status.value == "failed"
    rounds = [r for r in ledger.rounds(run_id) if r.kind is TaskKind.FIT]
    assert [r.status for r in rounds] == [RoundStatus.FAILED]
    assert "no aggregate is released" in rounds[0].reason
    assert ledger.checkpoints(run_id) == []
    assert "round 1" in sim.coordinator.reason


class Adversary:
    """A wire that corrupts one participant's messages at one step."""

    def __init__(self, inner: CoordinatorService, who: str, step: SecAggStep,
                 corrupt: Callable[[bytes], bytes]) -> None:
        self._inner, self._who, self._step, self._corrupt = inner, who, step, corrupt
        self.verdicts: list[Verdict] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def submit_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                     payload: bytes) -> Verdict:
        if participant == self._who and step is self._step:
            verdict = self._inner.submit_stage(run_id, participant, round, step,
                                               self._corrupt(payload))
            self.verdicts.append(verdict)
            return verdict
        return self._inner.submit_stage(run_id, participant, round, step, payload)


def _truncate_masked(payload: bytes) -> bytes:
    msg = MaskedInput.from_bytes(payload)
    return dataclasses.replace(msg, data=msg.data[:-4]).to_bytes()


def _flip_last_byte(payload: bytes) -> bytes:
    return payload[:-1] + bytes([payload[-1] ^ 1])


@pytest.mark.parametrize(
    ("step", "corrupt", "fragment"),
    [
        (SecAggStep.MASKED_INPUT, _truncate_masked, "masked input must be"),
        (SecAggStep.ADVERTISE, lambda b: b"\x00garbage", "not a AdvertiseKeys message"),
        (SecAggStep.UNMASK, _flip_last_byte, ""),
    ],
)
def test_a_corrupted_message_drops_the_offender_and_the_round_stays_correct(
    step: SecAggStep, corrupt: Callable[[bytes], bytes], fragment: str
) -> None:
    s = spec()
    holder: dict[str, Adversary] = {}

    def wrap(inner: CoordinatorService) -> CoordinatorService:
        holder["a"] = Adversary(inner, "p4", step, corrupt)
        return holder["a"]  # type: ignore[return-value]

    sim, ledger = run(s, wrap_transport=wrap)
    run_id = sim.coordinator.run_id
    (verdict,) = holder["a"].verdicts
    assert not verdict.accepted and fragment in verdict.reason
    contributions = [c for c in ledger.contributions(run_id, 1)
                     if c.kind is TaskKind.FIT and c.participant == "p4"]
    assert ContributionStatus.REJECTED in [c.status for c in contributions]
    got = ledger.load_checkpoint(run_id, 1).flat
    # a bad UNMASK response comes after p4's masked input: p4's input stays in the sum and its
    # masks are removed with the other survivors' shares
    in_sum = NAMES if step is SecAggStep.UNMASK else [n for n in NAMES if n != "p4"]
    np.testing.assert_allclose(got, expected_round1(s, in_sum), rtol=0, atol=1e-6)


def test_a_tampered_share_makes_its_recipient_refuse_and_the_round_stays_correct() -> None:
    """The coordinator cannot read shares, so a tampered ciphertext is caught by its
    recipient (AES-GCM), which cannot tell whether the sender or the coordinator tampered: it
    refuses to go on (fails safe) and is treated as dropped; the round sums the others."""
    s = spec()
    sim, ledger = run(s, wrap_transport=lambda inner: Adversary(inner, "p4", SecAggStep.SHARE,
                                                                _flip_last_byte))
    run_id = sim.coordinator.run_id
    fits = fit_contributions(ledger, run_id)
    dropped = sorted(p for p, c in fits.items()
                     if c.status is ContributionStatus.DROPPED)  # type: ignore[attr-defined]
    assert len(dropped) == 1 and dropped != ["p4"]
    # the recipient told the coordinator why it stopped (not "no message before the deadline")
    reason = fits[dropped[0]].reason  # type: ignore[attr-defined]
    assert "stopped secure aggregation" in reason and "failed authentication" in reason, reason
    survivors = [p for p in NAMES if p not in dropped]
    got = ledger.load_checkpoint(run_id, 1).flat
    np.testing.assert_allclose(got, expected_round1(s, survivors), rtol=0, atol=1e-6)


def test_replayed_and_impersonated_stage_messages_are_rejected() -> None:
    s = spec()
    seen: dict[tuple[str, SecAggStep], bytes] = {}
    replies: list[Verdict] = []

    class Replayer(Adversary):
        def submit_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                         payload: bytes) -> Verdict:
            verdict = self._inner.submit_stage(run_id, participant, round, step, payload)
            seen[(participant, step)] = payload
            if participant == "p1" and step is SecAggStep.ADVERTISE:
                # replay p1's advert, and send p0's advert as if it were p1's
                replies.append(self._inner.submit_stage(run_id, "p1", round, step, payload))
                if ("p0", step) in seen:
                    replies.append(self._inner.submit_stage(run_id, "p1", round, step,
                                                            seen[("p0", step)]))
            return verdict

    sim, ledger = run(s, wrap_transport=lambda inner: Replayer(inner, "", SecAggStep.SETUP,
                                                               lambda b: b),
                      workers=1)
    # p1's own bytes again are a resend (a lost reply): acknowledged, counted once; another
    # participant's advert under p1's name is refused
    assert len(replies) == 2 and replies[0].accepted
    assert not replies[1].accepted and "duplicate" in replies[1].reason
    assert sim.coordinator.summary()["rounds_committed"] == 1
    got = ledger.load_checkpoint(sim.coordinator.run_id, 1).flat
    np.testing.assert_allclose(got, expected_round1(s, NAMES), rtol=0, atol=1e-6)


def test_a_participant_lost_mid_protocol_does_not_hold_the_step_until_its_deadline() -> None:
    """p2 crashes (the coordinator marks it lost) just before its masked input: the step
    closes as soon as the others answered, long before stage_timeout_s on the simulated
    clock, and the sum is still the survivors' exact sum."""
    s = spec(extra="stage_timeout_s = 500\n[[faults.crash]]\nparticipant = \"p2\"\nround = 1\n"
                   "step = \"masked_input\"\n")
    sim, ledger = run(s)
    run_id = sim.coordinator.run_id
    np.testing.assert_allclose(ledger.load_checkpoint(run_id, 1).flat,
                               expected_round1(s, [n for n in NAMES if n != "p2"]),
                               rtol=0, atol=1e-6)
    fit1 = next(r for r in ledger.rounds(run_id) if r.round == 1 and r.kind is TaskKind.FIT)
    assert fit1.finished_at is not None and fit1.finished_at - fit1.started_at < 500
    victim = fit_contributions(ledger, run_id)["p2"]
    assert victim.status is ContributionStatus.DROPPED  # type: ignore[attr-defined]
    assert "participant lost" in victim.reason  # type: ignore[attr-defined]
    assert "masked_input" in victim.reason  # type: ignore[attr-defined]
    events = [e.detail for e in ledger.participant_events(run_id, "p2")]
    assert "secure aggregation round 1: nothing at masked_input" in events


class Resender:
    """A wire that loses p4's replies: p4 sends every stage message again, and once also a
    different one."""

    def __init__(self, inner: CoordinatorService) -> None:
        self._inner = inner
        self.replies: list[tuple[SecAggStep, str, Verdict]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def submit_stage(self, run_id: str, participant: str, round: int, step: SecAggStep,
                     payload: bytes) -> Verdict:
        first = self._inner.submit_stage(run_id, participant, round, step, payload)
        if participant == "p4":
            again = self._inner.submit_stage(run_id, participant, round, step, payload)
            other = self._inner.submit_stage(run_id, participant, round, step, payload + b"!")
            self.replies += [(step, "first", first), (step, "again", again),
                             (step, "other", other)]
        return first


def test_a_resent_stage_message_is_acknowledged_and_a_different_one_refused() -> None:
    """A lost reply makes a participant send the same bytes again: acknowledged, not counted
    twice, and it stays in the round; different bytes at a step it answered are refused."""
    s = spec()
    holder: dict[str, Resender] = {}

    def wrap(inner: CoordinatorService) -> CoordinatorService:
        holder["w"] = Resender(inner)
        return holder["w"]  # type: ignore[return-value]

    sim, ledger = run(s, wrap_transport=wrap)
    replies = holder["w"].replies
    assert {step for step, _, _ in replies} == {SecAggStep.ADVERTISE, SecAggStep.SHARE,
                                                SecAggStep.MASKED_INPUT, SecAggStep.UNMASK}
    for step, kind, verdict in replies:
        if kind == "other":
            assert not verdict.accepted, step
        else:
            assert verdict.accepted, (step, kind, verdict.reason)
    run_id = sim.coordinator.run_id
    assert fit_contributions(ledger, run_id)["p4"].status is ContributionStatus.ACCEPTED  # type: ignore[attr-defined]
    got = ledger.load_checkpoint(run_id, 1).flat
    np.testing.assert_allclose(got, expected_round1(s, NAMES), rtol=0, atol=1e-6)
