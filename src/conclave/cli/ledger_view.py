"""``conclave ledger show``: a run's rounds, contributions and participant history as text or JSON.

The text form is plain aligned columns meant for a terminal; the JSON form carries every
recorded field (enums as their values) for scripts.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from conclave.core.errors import LedgerError
from conclave.core.ports import Ledger
from conclave.core.records import (
    ContributionRecord,
    ParticipantEvent,
    RoundRecord,
    RunRecord,
)
from conclave.core.types import ContributionStatus

_KEY_METRICS = ("loss", "accuracy")
_MAX_OTHER_RUNS = 5
_JsonValue = None | bool | int | float | str | list["_JsonValue"] | dict[str, "_JsonValue"]


def render_ledger(
    ledger: Ledger,
    *,
    run_id: str | None = None,
    as_json: bool = False,
    participant: str | None = None,
) -> str:
    """Describe one run (the most recent unless ``run_id`` is given).

    With ``participant``, contributions and events are limited to that participant and the
    text form shows its whole history in time order. Raises ``LedgerError`` when the ledger
    holds no runs, the run is unknown, or the participant has no history in the run.
    """
    run = _pick_run(ledger, run_id)
    rounds = ledger.rounds(run.run_id)
    contributions = list(ledger.contributions(run.run_id))
    events = list(ledger.participant_events(run.run_id, participant))
    if participant is not None:
        contributions = [c for c in contributions if c.participant == participant]
        if not contributions and not events:
            raise LedgerError(f"participant {participant!r} has no history in run {run.run_id!r}")
    if as_json:
        document: dict[str, _JsonValue] = {
            "run": _plain(run),
            "rounds": [_plain(r) for r in rounds],
            "contributions": [_plain(c) for c in contributions],
            "participants": [_plain(e) for e in events],
            "checkpoints": [_plain(c) for c in ledger.checkpoints(run.run_id)],
        }
        return json.dumps(document, indent=2)
    lines = _header(run, others=[r.run_id for r in ledger.runs() if r.run_id != run.run_id])
    lines += ["", f"rounds ({len(rounds)})", *_rounds_table(rounds)]
    if participant is None:
        lines += ["", f"contributions ({len(contributions)})", *_contributions_table(contributions)]
        lines += ["", "participants", *_participants_table(events, contributions)]
    else:
        lines += ["", f"history of {participant}", *_history_table(run, events, contributions)]
    return "\n".join(lines)


def _pick_run(ledger: Ledger, run_id: str | None) -> RunRecord:
    if run_id is not None:
        return ledger.get_run(run_id)
    runs = ledger.runs()
    if not runs:
        raise LedgerError("the ledger holds no runs")
    return runs[-1]


# -- text ------------------------------------------------------------------------------------
def _header(run: RunRecord, *, others: Sequence[str]) -> list[str]:
    created = datetime.fromtimestamp(run.created_at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows = [
        ("run", run.run_id),
        ("name", run.name),
        ("status", run.status.value),
        ("seed", str(run.seed)),
        ("created", created),
    ]
    if run.reason:
        rows.append(("reason", run.reason))
    if others:
        listed = ", ".join(others[-_MAX_OTHER_RUNS:])
        more = len(others) - _MAX_OTHER_RUNS
        rows.append(("other runs", listed + (f" (and {more} older)" if more > 0 else "")))
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def _rounds_table(rounds: Sequence[RoundRecord]) -> list[str]:
    rows = [
        [
            str(r.round),
            r.kind.value,
            r.status.value,
            str(len(r.selected)),
            "-" if r.finished_at is None else f"{r.finished_at - r.started_at:.2f}",
            r.model_digest[:12] or "-",
            _metrics_text(r.metrics),
            r.reason,
        ]
        for r in rounds
    ]
    headers = ["round", "kind", "status", "selected", "duration s", "model", "metrics", "reason"]
    return _table(headers, rows, right={0, 3, 4})


def _contributions_table(contributions: Sequence[ContributionRecord]) -> list[str]:
    rows = [
        [
            str(c.round),
            c.kind.value,
            c.participant,
            c.status.value,
            str(c.weight) if c.weight else "-",  # 0: unknown (secure aggregation) or none
            _metrics_text(c.metrics),
            c.reason,
        ]
        for c in contributions
    ]
    headers = ["round", "kind", "participant", "status", "weight", "metrics", "reason"]
    return _table(headers, rows, right={0, 4})


def _participants_table(
    events: Sequence[ParticipantEvent], contributions: Sequence[ContributionRecord]
) -> list[str]:
    last_state: dict[str, str] = {}
    for event in events:
        last_state[event.participant] = event.state.value
    names = list(last_state) + sorted({c.participant for c in contributions} - set(last_state))
    rows = []
    for name in names:
        mine = [c for c in contributions if c.participant == name]
        accepted = sum(1 for c in mine if c.status is ContributionStatus.ACCEPTED)
        rows.append([name, last_state.get(name, "-"), str(accepted), str(len(mine) - accepted)])
    return _table(["participant", "last state", "accepted", "not accepted"], rows, right={2, 3})


def _history_table(
    run: RunRecord, events: Sequence[ParticipantEvent], contributions: Sequence[ContributionRecord]
) -> list[str]:
    entries: list[tuple[float, list[str]]] = [
        (e.at, ["event", e.state.value, e.detail]) for e in events
    ]
    for c in contributions:
        detail = " ".join(
            part
            for part in (f"weight={c.weight}" if c.weight else "", _metrics_text(c.metrics),
                         c.reason)
            if part and part != "-"
        )
        what = f"{c.kind.value} round {c.round}"
        entries.append((c.received_at, [what, c.status.value, detail]))
    entries.sort(key=lambda entry: entry[0])  # stable: events first at equal times
    rows = [[f"+{at - run.created_at:.3f}", *cells] for at, cells in entries]
    return _table(["t s", "what", "state", "detail"], rows, right={0})


def _metrics_text(metrics: Mapping[str, float], limit: int = 3) -> str:
    keys = [k for k in _KEY_METRICS if k in metrics]
    keys += sorted(k for k in metrics if k not in _KEY_METRICS)
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys[:limit])
    if len(keys) > limit:
        shown += f" (+{len(keys) - limit} more)"
    return shown or "-"


_MAX_CELL = 200


def _cell(text: str) -> str:
    """A table cell as a terminal shows it safely: control characters escaped (a name or
    reason from a hostile peer cannot move the cursor or recolour the screen), and cut short."""
    if text.isprintable() and len(text) <= _MAX_CELL:
        return text
    safe = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return safe if len(safe) <= _MAX_CELL else f"{safe[:_MAX_CELL]}... ({len(safe)} characters)"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    if not rows:
        return ["  (none)"]
    rows = [[_cell(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return ("  " + "  ".join(parts)).rstrip()

    rule = ["-" * width for width in widths]
    return [line(headers), line(rule), *(line(row) for row in rows)]


# -- JSON ------------------------------------------------------------------------------------
def _plain(record: object) -> dict[str, _JsonValue]:
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"expected a record, got {record!r}")
    return {f.name: _value(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _value(value: object) -> _JsonValue:
    if isinstance(value, enum.Enum):
        return _value(value.value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN and infinities are not JSON
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    raise TypeError(f"cannot put {type(value).__name__} into the ledger JSON")
