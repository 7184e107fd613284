"""Rules every ledger adapter applies the same way: round transitions, checkpoint and spool
names, which checkpoints retention keeps, and how recovery finds the newest usable one."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from urllib.parse import unquote

from conclave.core.errors import CheckpointCorrupted, ConfigError, LedgerError
from conclave.core.parameters import Parameters
from conclave.core.records import RoundRecord
from conclave.core.types import RoundStatus, TaskKind

_KIND_ORDER = {TaskKind.FIT: 0, TaskKind.EVALUATE: 1}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def round_label(run_id: str, round: int, kind: TaskKind) -> str:
    return f"{kind.value} round {round} of run {run_id!r}"


def round_sort_key(record: RoundRecord) -> tuple[int, int]:
    """Rounds are listed by number, the FIT round before the EVALUATE round of one number."""
    return record.round, _KIND_ORDER[record.kind]


def check_startable(existing: RoundRecord | None, record: RoundRecord) -> None:
    """A round may be (re)started unless it was already committed.

    Restarting a RUNNING or FAILED round replaces its record: that is what a coordinator
    resuming after a crash does with the round it was in the middle of.
    """
    if record.status is not RoundStatus.RUNNING:
        raise LedgerError(
            f"cannot start {round_label(record.run_id, record.round, record.kind)} "
            f"with status {record.status.value}; a started round is running"
        )
    if existing is not None and existing.status is RoundStatus.COMMITTED:
        raise LedgerError(
            f"{round_label(record.run_id, record.round, record.kind)} is already committed"
        )


def check_finishable(
    existing: RoundRecord | None, run_id: str, round: int, kind: TaskKind, status: RoundStatus
) -> RoundRecord:
    """Return the running round that ``finish_round`` may close, or raise ``LedgerError``."""
    label = round_label(run_id, round, kind)
    if status is RoundStatus.RUNNING:
        raise LedgerError(f"cannot finish {label} with status running")
    if existing is None:
        raise LedgerError(f"{label} was never started")
    if existing.status is not RoundStatus.RUNNING:
        raise LedgerError(f"{label} is already {existing.status.value}")
    return existing


def check_committable(existing: RoundRecord | None, run_id: str, round: int) -> RoundRecord:
    """Return the running FIT round that ``commit_round`` may commit, or raise."""
    return check_finishable(existing, run_id, round, TaskKind.FIT, RoundStatus.COMMITTED)


def checkpoint_relpath(run_id: str, round: int) -> PurePosixPath:
    """Where a round's checkpoint lives, relative to the state directory.

    The run id is percent-encoded so that any id (slashes, dots, spaces) maps to one safe
    folder name inside ``checkpoints/``.
    """
    return PurePosixPath("checkpoints", _escape(run_id) or "%", f"round-{round:05d}.ckpt")


# -- the update spool --------------------------------------------------------------------------
SPOOL_SUFFIX = ".upd"
SPOOLED_UPDATE = "spooled update"  # how error messages name a spool file
_ROUND_FOLDER = re.compile(r"round-([0-9]+)")


def spool_run_relpath(run_id: str) -> PurePosixPath:
    """The folder of a run's spooled updates, relative to the state directory."""
    return PurePosixPath("spool", _escape(run_id) or "%")


def spool_round_folder(round: int) -> str:
    return f"round-{round:05d}"


def spool_round_of(folder_name: str) -> int | None:
    """The round a spool folder holds, or None for a name the ledger did not make."""
    match = _ROUND_FOLDER.fullmatch(folder_name)
    return None if match is None else int(match.group(1))


def spool_file_name(participant: str) -> str:
    """One file per participant; every character but [A-Za-z0-9_-] is percent-encoded, so
    no name (``..``, ``a/b``, ``.hidden``) can leave the round's folder or hide in it."""
    if not participant:
        raise LedgerError("cannot spool an update of a participant with an empty name")
    return _escape(participant) + SPOOL_SUFFIX


def spooled_participant(file_name: str) -> str | None:
    """The participant a spool file belongs to, or None for a file the ledger did not make
    (temporary files of an interrupted write start with a dot and are skipped too)."""
    if not file_name.endswith(SPOOL_SUFFIX):
        return None
    escaped = file_name[: -len(SPOOL_SUFFIX)]
    try:
        participant = unquote(escaped, errors="strict")
    except UnicodeDecodeError:
        return None
    return participant if participant and _escape(participant) == escaped else None


def _escape(name: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)


# -- checkpoint retention and recovery ---------------------------------------------------------
def checkpoints_to_prune(rounds: Iterable[int], *, keep_last: int, keep_every: int) -> list[int]:
    """The rounds whose checkpoints retention deletes, ascending.

    Kept: the newest ``keep_last`` rounds, every round divisible by ``keep_every`` (0: none
    extra), and always the newest round, whatever ``keep_last`` says.
    """
    if keep_last < 0:
        raise ConfigError("keep_last", keep_last, "must be 0 or more")
    if keep_every < 0:
        raise ConfigError("keep_every", keep_every, "must be 0 or more (0 keeps none extra)")
    ordered = sorted(set(rounds))
    kept = set(ordered[-max(keep_last, 1) :])
    if keep_every:
        kept.update(r for r in ordered if r % keep_every == 0)
    return [r for r in ordered if r not in kept]


def latest_usable(
    rounds: Iterable[int], load: Callable[[int], Parameters]
) -> tuple[int, Parameters, list[str]] | None:
    """Load the newest checkpoint that ``load`` reads without ``CheckpointCorrupted``.

    Returns (round, parameters, one problem line per newer checkpoint skipped), or None when
    every checkpoint is damaged or missing (or there is none).
    """
    problems: list[str] = []
    for round in sorted(set(rounds), reverse=True):
        try:
            return round, load(round), problems
        except CheckpointCorrupted as exc:
            problems.append(f"round {round}: {exc}")
    return None
