"""The run machine's secure-aggregation steps of a FIT round.

With ``secure_aggregation`` configured, a FIT round runs the SecAgg+ steps (advertise keys,
share keys, masked input, unmask) through a ``SecureRound``: this part sets it up for the
selection, answers each participant's stage messages and its requests for step inputs, closes
each step when every expected message arrived or its deadline passed, and turns the outcome
into contributions and a commit (or a failed attempt). A part of ``RunMachine`` (see
``state``); pure, like the rest of the machine.
"""

from __future__ import annotations

from conclave.core.errors import ConclaveError
from conclave.core.rounds.events import (
    ArmTimer,
    Command,
    FailRun,
    RecordContribution,
    RecordStage,
    Reply,
    Stage,
    Timer,
)
from conclave.core.rounds.secure import SecureOutcome, SecureRound
from conclave.core.rounds.state import RunState
from conclave.core.secagg.config import Stage as SecAggStage
from conclave.core.types import ContributionStatus, SecAggStep, StageInput, TaskKind, Verdict


class SecureSteps(RunState):
    """The part of ``RunMachine`` that runs the secure-aggregation steps."""

    def stage_input(self, participant: str, round: int, step: SecAggStep) -> StageInput:
        """Secure aggregation: what ``participant`` needs for ``step`` (payload None: not yet)."""
        if self.finished:
            return StageInput(payload=None, aborted=True, reason=f"the run is {self._stage.value}")
        if self._secure is None or round != self._round or self._kind is not TaskKind.FIT:
            return StageInput(payload=None, aborted=True,
                              reason=f"no secure round {round} in progress (round is {self._round})")
        return self._secure.input_for(participant, step)

    def _start_secure(self) -> list[Command]:
        """Set up the secure round for the current selection (empty list when fine)."""
        assert self.spec.secure_aggregation is not None
        self._secure_pending = False
        try:
            self._secure = SecureRound(
                run_id=self.run_id, round=self._round, attempt=self._attempt,
                run_seed=self.spec.seed, selected=self._selected,
                identity_keys=self._identity, spec=self.spec.secure_aggregation,
                global_parameters=self._global,
            )
        except ConclaveError as exc:
            self._stage = Stage.FAILED
            return [FailRun(reason=f"round {self._round}: cannot set up secure aggregation "
                                   f"among {len(self._selected)} participant(s): {exc}")]
        return []

    # -- secure aggregation steps -------------------------------------------------------
    def _stage_message(self, participant: str, round: int, step: SecAggStep,
                       payload: bytes) -> list[Command]:
        secure = self._secure
        if secure is None or round != self._round or self._stage is not Stage.TRAINING:
            reason = (f"stale {step.value} message for round {round}: no secure round "
                      f"{round} is collecting")
            return [Reply(verdict=Verdict(accepted=False, reason=reason))]
        reason = secure.submit(participant, step, payload)
        if reason:
            cmds: list[Command] = [
                RecordContribution(round=round, kind=TaskKind.FIT, participant=participant,
                                   status=ContributionStatus.REJECTED,
                                   reason=f"secure aggregation, {step.value}: {reason}"),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ]
        else:
            cmds = [Reply(verdict=Verdict(accepted=True))]
        if not secure.pending:
            cmds += self._close_secure_step()
        return cmds

    def _close_secure_step(self) -> list[Command]:
        secure = self._secure
        assert secure is not None
        cmds: list[Command] = []
        while True:
            step = secure.step
            missing = tuple(sorted(secure.missing))
            outcome = secure.close()
            completions = secure.completions
            done = tuple(sorted(p for p in completions.get(_STAGE_OF[step], frozenset())))
            if outcome is None or outcome.mean is not None:
                cmds.append(RecordStage(round=self._round, step=step, completed=done,
                                        dropped=missing))
            if outcome is not None:
                return cmds + self._secure_outcome(outcome)
            if secure.pending:
                timeout = self.spec.secure_aggregation.stage_timeout_s  # type: ignore[union-attr]
                return cmds + [ArmTimer(timer=Timer.SECAGG, round=self._round,
                                        attempt=self._attempt, timeout_s=timeout)]

    def _secure_outcome(self, outcome: SecureOutcome) -> list[Command]:
        cmds: list[Command] = []
        for p in self._selected:
            if p in outcome.survivors:
                cmds.append(RecordContribution(round=self._round, kind=TaskKind.FIT,
                                               participant=p,
                                               status=ContributionStatus.ACCEPTED))
            elif p in outcome.dropped:
                cmds.append(RecordContribution(round=self._round, kind=TaskKind.FIT,
                                               participant=p, status=ContributionStatus.DROPPED,
                                               reason=outcome.dropped[p]))
        if outcome.mean is None:
            return cmds + self._fail_attempt(outcome.reason)
        needed = self.spec.selection.min_quorum
        if len(outcome.survivors) < needed:
            return cmds + self._fail_attempt(
                f"quorum not reached: {len(outcome.survivors)} survivor(s) of secure "
                f"aggregation, {needed} needed")
        metrics = {"contributions": float(len(outcome.survivors)),
                   "secagg_dropped": float(len(outcome.dropped))}
        return cmds + self._commit(outcome.mean, metrics)


_STAGE_OF = {
    SecAggStep.ADVERTISE: SecAggStage.ADVERTISE,
    SecAggStep.SHARE: SecAggStage.SHARE,
    SecAggStep.MASKED_INPUT: SecAggStage.MASKED_INPUT,
    SecAggStep.UNMASK: SecAggStage.UNMASK,
}
