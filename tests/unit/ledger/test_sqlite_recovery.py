"""What only the SQLite ledger promises for crash recovery: spool files on disk that survive
a restart, pruned checkpoint files really gone, and version-1 databases migrated."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from conclave.core.errors import CheckpointCorrupted, LedgerError
from conclave.core.parameters import Parameters
from conclave.core.records import RoundRecord, RunRecord
from conclave.core.types import RoundStatus, RunStatus, TaskKind
from conclave.ledger import SqliteLedger, encode_checkpoint, schema
from conclave.ledger.schema import SCHEMA_VERSION

RUN = "run/9"  # a slash, so the escaped folder name matters
RUN_DIR = "run%2F9"


def params(scale: float = 1.0) -> Parameters:
    return Parameters.from_arrays({"w": np.linspace(0, scale, 8).reshape(2, 4), "b": np.ones(2)})


def make_run(run_id: str = RUN) -> RunRecord:
    return RunRecord(
        run_id=run_id, name="n", spec_toml="", seed=1, status=RunStatus.RUNNING, created_at=1.0
    )


def make_round(number: int, attempt: int = 1) -> RoundRecord:
    return RoundRecord(
        run_id=RUN,
        round=number,
        kind=TaskKind.FIT,
        status=RoundStatus.RUNNING,
        selected=("a",),
        started_at=float(number),
        attempt=attempt,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    with SqliteLedger(tmp_path / "state") as opened:
        opened.create_run(make_run())
        yield opened


# -- spool -----------------------------------------------------------------------------------
def test_spool_file_place_format_and_no_leftovers(ledger: SqliteLedger) -> None:
    ledger.spool_update(RUN, 7, "site.a", params(2.0))
    ledger.spool_update(RUN, 7, "site.a", params(3.0))  # overwritten in place
    folder = ledger.state_dir / "spool" / RUN_DIR / "round-00007"
    assert sorted(p.name for p in folder.iterdir()) == ["site%2Ea.upd"]
    assert (folder / "site%2Ea.upd").read_bytes() == encode_checkpoint(params(3.0))


def test_spool_survives_close_and_reopen(tmp_path: Path) -> None:
    with SqliteLedger(tmp_path) as first:
        first.create_run(make_run())
        first.spool_update(RUN, 3, "b", params(1.0))
        first.spool_update(RUN, 3, "a", params(2.0))
    with SqliteLedger(tmp_path) as second:
        assert list(second.spooled_participants(RUN, 3)) == ["a", "b"]
        assert second.load_spooled(RUN, 3, "a") == params(2.0)
        second.clear_spool(RUN, 3)
    with SqliteLedger.open_read_only(tmp_path) as reader:
        assert list(reader.spooled_participants(RUN, 3)) == []
        with pytest.raises(LedgerError, match="read-only"):
            reader.spool_update(RUN, 4, "a", params())
        with pytest.raises(LedgerError, match="read-only"):
            reader.clear_spool(RUN, 4)
    assert not (tmp_path / "spool" / RUN_DIR / "round-00003").exists()


@pytest.mark.parametrize("name", ["..", ".", "../../x", "a/b", "/abs", ".hidden", "é ü"])
def test_odd_participant_names_stay_inside_the_round_folder(
    ledger: SqliteLedger, name: str
) -> None:
    ledger.spool_update(RUN, 1, name, params(5.0))
    folder = ledger.state_dir / "spool" / RUN_DIR / "round-00001"
    (only,) = folder.iterdir()
    assert only.parent == folder
    assert not only.name.startswith(".")
    assert list(ledger.spooled_participants(RUN, 1)) == [name]
    assert ledger.load_spooled(RUN, 1, name) == params(5.0)
    written = [p for p in ledger.state_dir.parent.rglob("*") if p.is_file()]
    assert [p for p in written if not p.name.startswith("ledger.")] == [only]


def test_stray_files_in_a_spool_folder_are_not_participants(ledger: SqliteLedger) -> None:
    ledger.spool_update(RUN, 2, "a", params())
    folder = ledger.state_dir / "spool" / RUN_DIR / "round-00002"
    (folder / ".a.upd.x1y2.tmp").write_bytes(b"half a write")
    (folder / "notes.txt").write_text("hello")
    (folder / "bad%zz.upd").write_bytes(b"?")
    assert list(ledger.spooled_participants(RUN, 2)) == ["a"]
    ledger.clear_spool(RUN, 2)
    assert not folder.exists()


@pytest.mark.parametrize(("damage", "word"), [("truncate", "truncated"), ("flip", "corrupted")])
def test_damaged_spool_file_names_the_file(ledger: SqliteLedger, damage: str, word: str) -> None:
    ledger.spool_update(RUN, 2, "a", params())
    path = ledger.state_dir / "spool" / RUN_DIR / "round-00002" / "a.upd"
    data = path.read_bytes()
    path.write_bytes(data[:-1] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointCorrupted, match=rf"spooled update .*a\.upd is {word}"):
        ledger.load_spooled(RUN, 2, "a")


# -- retention ---------------------------------------------------------------------------------
def test_prune_deletes_the_files(ledger: SqliteLedger) -> None:
    for number in range(1, 7):
        ledger.start_round(make_round(number))
        ledger.commit_round(RUN, number, params(float(number)), finished_at=10.0 + number)
    assert ledger.prune_checkpoints(RUN, keep_last=2, keep_every=2) == [1, 3]
    folder = ledger.state_dir / "checkpoints" / RUN_DIR
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["round-00002.ckpt", "round-00004.ckpt", "round-00005.ckpt", "round-00006.ckpt"]
    assert [Path(c.path).name for c in ledger.checkpoints(RUN)] == names
    with closing(sqlite3.connect(ledger.db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM rounds WHERE model_digest != ''").fetchone() == (
            6,
        )


def test_latest_checkpoint_survives_a_missing_file(ledger: SqliteLedger) -> None:
    for number in (1, 2):
        ledger.start_round(make_round(number))
        ledger.commit_round(RUN, number, params(float(number)), finished_at=10.0)
    path = ledger.state_dir / "checkpoints" / RUN_DIR / "round-00002.ckpt"
    path.unlink()
    found = ledger.latest_checkpoint(RUN)
    assert found is not None
    assert found[:2] == (1, params(1.0))
    assert found[2] == [f"round 2: checkpoint {path} is missing"]


# -- schema versions ---------------------------------------------------------------------------
def make_v1_database(state_dir: Path) -> None:
    """A ledger as version 1 wrote it: no ``attempt`` column in ``rounds``."""
    state_dir.mkdir()
    tables = schema._TABLES.replace("    attempt       INTEGER NOT NULL DEFAULT 1,\n", "")
    assert "attempt" not in tables
    with closing(sqlite3.connect(state_dir / "ledger.sqlite")) as conn:
        conn.executescript(tables)
        conn.execute(
            "INSERT INTO runs (run_id, name, spec_toml, seed, status, created_at) "
            "VALUES (?, 'n', '', 1, 'running', 1.0)",
            (RUN,),
        )
        conn.execute(
            "INSERT INTO rounds (run_id, round, kind, status, selected, started_at) "
            "VALUES (?, 1, 'fit', 'failed', '[\"a\"]', 5.0)",
            (RUN,),
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()


def test_version_1_database_is_read_only_as_attempt_1(tmp_path: Path) -> None:
    make_v1_database(tmp_path / "v1")
    with SqliteLedger.open_read_only(tmp_path / "v1") as reader:
        (old,) = reader.rounds(RUN)
        assert (old.round, old.status, old.attempt) == (1, RoundStatus.FAILED, 1)
    with closing(sqlite3.connect(tmp_path / "v1" / "ledger.sqlite")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)


def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 2
    make_v1_database(tmp_path / "v1")
    with SqliteLedger(tmp_path / "v1") as migrated:
        (old,) = migrated.rounds(RUN)
        assert (old.round, old.status, old.attempt, old.selected) == (
            1,
            RoundStatus.FAILED,
            1,
            ("a",),
        )
        migrated.start_round(make_round(1, attempt=2))
        migrated.commit_round(RUN, 1, params(), finished_at=9.0)
    with closing(sqlite3.connect(tmp_path / "v1" / "ledger.sqlite")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        assert conn.execute("SELECT round, attempt, status FROM rounds").fetchall() == [
            (1, 2, "committed")
        ]
    with SqliteLedger(tmp_path / "v1") as again:  # opening a current database changes nothing
        assert [r.attempt for r in again.rounds(RUN)] == [2]


def test_attempt_is_stored_in_its_column(ledger: SqliteLedger) -> None:
    ledger.start_round(make_round(4, attempt=3))
    with closing(sqlite3.connect(ledger.db_path)) as conn:
        assert conn.execute("SELECT attempt FROM rounds WHERE round = 4").fetchone() == (3,)
    assert dataclasses.replace(ledger.rounds(RUN)[0], attempt=1) == make_round(4)
