"""The run machine's submissions: FIT updates and evaluation results from participants.

Each submission is checked against the open task (stale, unselected, duplicate, invalid), then
recorded and answered; an accepted update joins the round's streaming aggregate. A part of
``RunMachine`` (see ``state``); pure, like the rest of the machine.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from conclave.core.aggregation.fedavg import MAX_EXAMPLES, validate_update
from conclave.core.errors import InvalidUpdate
from conclave.core.rounds.events import Command, RecordContribution, Reply, SpoolUpdate, Stage
from conclave.core.rounds.state import RunState
from conclave.core.types import ContributionStatus, Evaluation, TaskKind, Update, Verdict


class Submissions(RunState):
    """The part of ``RunMachine`` that takes updates and evaluations."""

    def _check_submission(self, kind: TaskKind, participant: str, round: int) -> str:
        """The reason to reject a submission, or '' if it is for the open task."""
        if self.finished:
            return f"the run is {self._stage.value}"
        if round != self._round or kind is not self._kind or self._stage not in (
            Stage.TRAINING, Stage.EVALUATING
        ):
            return (
                f"stale submission: {kind.value} for round {round}, but the open task is "
                f"{self._kind.value} for round {self._round}"
            )
        if participant not in self._selected:
            return f"{participant} was not selected for {kind.value} round {round}"
        if participant in self._answered:
            return f"duplicate submission: {participant} already answered {kind.value} round {round}"
        return ""

    def _already_evaluated(self, evaluation: Evaluation) -> bool:
        """``evaluation`` repeats an answer accepted in the last closed evaluation round."""
        if evaluation.round != self._last_evaluation_round:
            return False
        known = self._last_evaluation.get(evaluation.participant)
        return known is not None and known.get("loss") == float(evaluation.loss) and (
            known.get("num_examples") == float(evaluation.num_examples))

    def _update(self, update: Update, digest: str) -> list[Command]:
        if digest and self._accepted_digests.get((update.round, update.participant)) == digest:
            # The same update again (the participant lost our answer): accepted, once.
            return [Reply(verdict=Verdict(accepted=True, reason="already accepted"))]
        reason = self._check_submission(TaskKind.FIT, update.participant, update.round)
        if not reason and self.spec.secure_aggregation is not None:
            reason = "this run uses secure aggregation: submit stage messages, not an update"
        invalid = False
        if not reason:
            try:
                validate_update(self._global.layout, update.parameters, update.num_examples)
            except InvalidUpdate as exc:
                # The participant answered its task, badly: it counts as answered.
                reason, invalid = str(exc), True
                self._answered.add(update.participant)
        if reason:
            status = (
                ContributionStatus.LATE if reason.startswith("stale") else ContributionStatus.REJECTED
            )
            cmds: list[Command] = [
                RecordContribution(round=update.round, kind=TaskKind.FIT,
                                   participant=update.participant, status=status,
                                   weight=_safe_weight(update.num_examples), digest=digest,
                                   reason=reason, metrics=_finite(update.metrics),
                                   train_seconds=update.train_seconds),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ]
            return cmds + (self._maybe_close() if invalid else [])
        metrics = self._accept(update)
        self._accepted_digests[(update.round, update.participant)] = digest
        cmds = [
            SpoolUpdate(round=update.round, participant=update.participant,
                        parameters=update.parameters),
            RecordContribution(round=update.round, kind=TaskKind.FIT,
                               participant=update.participant,
                               status=ContributionStatus.ACCEPTED, weight=update.num_examples,
                               metrics=metrics, digest=digest,
                               train_seconds=update.train_seconds),
            Reply(verdict=Verdict(accepted=True)),
        ]
        return cmds + self._maybe_close()

    def _accept(self, update: Update) -> dict[str, float]:
        if update.digest:
            self._accepted_digests[(update.round, update.participant)] = update.digest
        self._agg.add(update.parameters, update.num_examples)
        self._answered.add(update.participant)
        self._arrivals.append((update.participant, update.num_examples))
        metrics = _finite(update.metrics)
        n = update.num_examples
        for name, value in metrics.items():  # each metric averaged over those who reported it
            total, weight = self._metric_sums.get(name, (0.0, 0))
            self._metric_sums[name] = (total + value * n, weight + n)
        return metrics

    def _evaluation(self, evaluation: Evaluation) -> list[Command]:
        if self._already_evaluated(evaluation):
            # the same answer again (the participant lost our reply, or we restarted)
            return [Reply(verdict=Verdict(accepted=True, reason="already accepted"))]
        reason = self._check_submission(TaskKind.EVALUATE, evaluation.participant, evaluation.round)
        metrics = _finite(evaluation.metrics)
        invalid = False
        if not reason and (evaluation.num_examples < 0 or not np.isfinite(evaluation.loss)):
            reason = (f"invalid evaluation: loss {evaluation.loss}, "
                      f"num_examples {evaluation.num_examples}")
            invalid = True
            self._answered.add(evaluation.participant)
        if reason:
            rejected: list[Command] = [
                RecordContribution(round=evaluation.round, kind=TaskKind.EVALUATE,
                                   participant=evaluation.participant,
                                   status=ContributionStatus.REJECTED, reason=reason,
                                   metrics=metrics),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ]
            return rejected + (self._maybe_close() if invalid else [])
        self._answered.add(evaluation.participant)
        result = dict(metrics)
        result["loss"] = float(evaluation.loss)
        result["num_examples"] = float(evaluation.num_examples)
        self._evaluations[evaluation.participant] = result
        accepted: list[Command] = [
            RecordContribution(round=evaluation.round, kind=TaskKind.EVALUATE,
                               participant=evaluation.participant,
                               status=ContributionStatus.ACCEPTED,
                               weight=evaluation.num_examples, metrics=result),
            Reply(verdict=Verdict(accepted=True)),
        ]
        return accepted + self._maybe_close()


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite numeric metrics (anything else a peer sent is left out, not trusted)."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            and np.isfinite(v)}


def _safe_weight(num_examples: int) -> int:
    """The weight to record for a rejected update: its claim, if it is a sane integer."""
    ok = isinstance(num_examples, int) and 0 < num_examples <= MAX_EXAMPLES
    return num_examples if ok else 0
