"""The update spool on disk: accepted updates of the round in progress, one file each.

A participant told "accepted" will not send its update again, so the coordinator keeps each
accepted update until the round is committed; a coordinator restarted after a crash reads
them back instead of losing them. Layout, under the state directory::

    spool/<run>/round-00007/<participant>.upd

Run ids and participant names are percent-encoded (``lifecycle``), so no name can leave its
folder. Files use the checkpoint file format and are written the same way (temporary file,
fsync, atomic rename, fsync of the folder), so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path

from conclave.core.errors import LedgerError
from conclave.core.parameters import Parameters
from conclave.ledger.checkpoint_file import fsync_dir, read_checkpoint, write_checkpoint
from conclave.ledger.lifecycle import (
    SPOOLED_UPDATE,
    spool_file_name,
    spool_round_folder,
    spool_round_of,
    spool_run_relpath,
    spooled_participant,
)


class SpoolFolder:
    """The spool of every run under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir

    def path(self, run_id: str, round: int, participant: str) -> Path:
        return self._round_dir(run_id, round) / spool_file_name(participant)

    def write(self, run_id: str, round: int, participant: str, parameters: Parameters) -> None:
        """Durably store (or replace) one update; OS errors become ``LedgerError``."""
        write_checkpoint(self.path(run_id, round, participant), parameters)

    def participants(self, run_id: str, round: int) -> list[str]:
        folder = self._round_dir(run_id, round)
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot list spooled updates in {folder}: {exc}") from exc
        found = (spooled_participant(name) for name in names)
        return sorted(p for p in found if p is not None)

    def read(self, run_id: str, round: int, participant: str) -> Parameters:
        """Read one update back, checking its digest.

        ``LedgerError`` when there is none; ``CheckpointCorrupted`` naming the file when it
        is damaged or truncated.
        """
        path = self.path(run_id, round, participant)
        if not path.is_file():
            raise LedgerError(
                f"no spooled update of {participant!r} for round {round} of run {run_id!r}"
            )
        return read_checkpoint(path, what=SPOOLED_UPDATE)

    def clear(self, run_id: str, up_to_round: int) -> None:
        """Delete the updates (and folders) of every round <= ``up_to_round``."""
        run_dir = self._state_dir / spool_run_relpath(run_id)
        try:
            folders = [entry.name for entry in os.scandir(run_dir) if entry.is_dir()]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LedgerError(f"cannot list the spool folder {run_dir}: {exc}") from exc
        removed = False
        for name in sorted(folders):
            round = spool_round_of(name)
            if round is not None and round <= up_to_round:
                _remove_round_dir(run_dir / name)
                removed = True
        if removed:
            try:
                fsync_dir(run_dir)
            except OSError as exc:
                raise LedgerError(f"cannot sync the spool folder {run_dir}: {exc}") from exc

    def _round_dir(self, run_id: str, round: int) -> Path:
        return self._state_dir / spool_run_relpath(run_id) / spool_round_folder(round)


def _remove_round_dir(folder: Path) -> None:
    """Remove a round's folder: its files (spooled and temporary) first, then the folder."""
    try:
        for entry in os.scandir(folder):
            Path(entry.path).unlink(missing_ok=True)
        folder.rmdir()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LedgerError(f"cannot clear spooled updates in {folder}: {exc}") from exc
