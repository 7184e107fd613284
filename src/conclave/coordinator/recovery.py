"""Reading a run back from its ledger so that a restarted coordinator resumes it exactly.

The ledger holds everything needed: the spec, the last committed round's checkpoint, the
round in progress (its selection and attempt), the contributions already recorded for it and
the accepted updates themselves (spooled before they were acknowledged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conclave.core.parameters import Parameters
from conclave.core.ports import Ledger
from conclave.core.records import RoundRecord, RunRecord
from conclave.core.rounds.resume import ResumePoint
from conclave.core.types import (
    ContributionStatus,
    RoundStatus,
    RunStatus,
    TaskKind,
    Update,
)

logger = logging.getLogger(__name__)

_KIND_ORDER = {TaskKind.FIT: 0, TaskKind.EVALUATE: 1}


@dataclass(frozen=True, slots=True)
class Recovered:
    run: RunRecord
    parameters: Parameters | None
    """The last committed global model; None when no round was committed yet."""
    point: ResumePoint
    problems: tuple[str, ...]
    """Checkpoints that were skipped because they were corrupt or missing."""
    strategy_state: Parameters | None = None
    """The strategy state checkpointed with ``parameters`` (FedAvgM's velocity)."""


def unfinished_run(ledger: Ledger, spec_source: str) -> RunRecord | None:
    """The newest run with this exact spec that did not finish or fail for good."""
    for run in reversed(list(ledger.runs())):
        if run.spec_toml == spec_source and run.status in (RunStatus.RUNNING,
                                                          RunStatus.INTERRUPTED):
            return run
    return None


def recover(ledger: Ledger, run: RunRecord) -> Recovered:
    run_id = run.run_id
    latest = ledger.latest_checkpoint(run_id)
    problems: tuple[str, ...] = ()
    parameters: Parameters | None = None
    completed = 0
    strategy_state: Parameters | None = None
    if latest is not None:
        completed, parameters, skipped = latest
        problems = tuple(skipped)
        strategy_state = ledger.load_strategy_state(run_id, completed)
    rounds = sorted(ledger.rounds(run_id), key=lambda r: (r.round, _KIND_ORDER[r.kind]))
    committed_fits = [r.round for r in rounds
                      if r.kind is TaskKind.FIT and r.status is RoundStatus.COMMITTED]
    for problem in problems:
        logger.warning("run %s: %s", run_id, problem)
    if committed_fits and max(committed_fits) > completed:
        # The newest checkpoints are unusable: redo the rounds after the last good one.
        ledger.invalidate_round(run_id, completed + 1,
                                f"checkpoint unusable ({'; '.join(problems) or 'missing'}); "
                                f"redone from round {completed}")
        rounds = sorted(ledger.rounds(run_id), key=lambda r: (r.round, _KIND_ORDER[r.kind]))

    in_progress = [r for r in rounds if r.status is RoundStatus.RUNNING and (
        (r.kind is TaskKind.FIT and r.round == completed + 1)
        or (r.kind is TaskKind.EVALUATE and r.round == completed))]
    evaluations = [r for r in rounds if r.kind is TaskKind.EVALUATE
                   and r.status is RoundStatus.COMMITTED]
    last_eval = _evaluations(ledger, run_id, evaluations[-1]) if evaluations else {}
    last_eval_round = evaluations[-1].round if evaluations else 0
    evaluation_done = any(r.round == completed for r in evaluations)
    committed = {c.participant: c.digest for c in ledger.contributions(run_id, completed)
                 if c.kind is TaskKind.FIT and c.status is ContributionStatus.ACCEPTED
                 and c.digest} if completed else {}
    if not in_progress:
        return Recovered(run=run, parameters=parameters, problems=problems,
                         strategy_state=strategy_state, point=ResumePoint(
                             completed_rounds=completed, last_evaluation=last_eval,
                             last_evaluation_round=last_eval_round,
                             evaluation_done=evaluation_done, committed_digests=committed))
    current = in_progress[-1]
    answered, accepted = _answers(ledger, run_id, current)
    point = ResumePoint(
        completed_rounds=completed, round=current.round, kind=current.kind,
        attempt=current.attempt, selected=current.selected, answered=frozenset(answered),
        accepted=tuple(accepted),
        evaluations=_evaluations(ledger, run_id, current) if current.kind is TaskKind.EVALUATE
        else {},
        last_evaluation=last_eval, last_evaluation_round=last_eval_round,
        evaluation_done=evaluation_done, committed_digests=committed,
    )
    return Recovered(run=run, parameters=parameters, point=point, problems=problems,
                     strategy_state=strategy_state)


def _answers(ledger: Ledger, run_id: str, current: RoundRecord) -> tuple[set[str], list[Update]]:
    """Who already answered the round in progress, and its accepted updates (spooled)."""
    answered: set[str] = set()
    accepted: list[Update] = []
    spooled = set(ledger.spooled_participants(run_id, current.round)) \
        if current.kind is TaskKind.FIT else set()
    for c in ledger.contributions(run_id, current.round):
        if c.kind is not current.kind or c.participant not in current.selected:
            continue
        if c.status is ContributionStatus.LATE or "duplicate" in c.reason:
            continue
        if c.kind is TaskKind.FIT and c.status is ContributionStatus.ACCEPTED:
            if c.participant not in spooled:
                continue  # acknowledged only after spooling: this one was never acknowledged
            params = ledger.load_spooled(run_id, current.round, c.participant)
            accepted.append(Update(run_id=run_id, round=current.round,
                                   participant=c.participant, num_examples=c.weight,
                                   parameters=params, metrics=dict(c.metrics),
                                   digest=c.digest))
        answered.add(c.participant)
    return answered, accepted


def _evaluations(ledger: Ledger, run_id: str, record: RoundRecord) -> dict[str, dict[str, float]]:
    return {c.participant: dict(c.metrics) for c in ledger.contributions(run_id, record.round)
            if c.kind is TaskKind.EVALUATE and c.status is ContributionStatus.ACCEPTED}
