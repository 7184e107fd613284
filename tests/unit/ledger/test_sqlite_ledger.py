"""What only the SQLite ledger promises: WAL, durability, schema versions, checkpoint files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from conclave.core.errors import CheckpointCorrupted, LedgerError
from conclave.core.parameters import Parameters
from conclave.core.records import ContributionRecord, ParticipantEvent, RoundRecord, RunRecord
from conclave.core.types import (
    ContributionStatus,
    ParticipantState,
    RoundStatus,
    RunStatus,
    TaskKind,
)
from conclave.ledger import SqliteLedger, encode_checkpoint
from conclave.ledger.schema import SCHEMA_VERSION

RUN = "run-7"


def params(scale: float = 1.0) -> Parameters:
    return Parameters.from_arrays({"w": np.linspace(0, scale, 12).reshape(3, 4), "b": np.ones(4)})


def fill(ledger: SqliteLedger) -> Parameters:
    """A run with one committed FIT round, one event and one contribution."""
    ledger.create_run(
        RunRecord(
            run_id=RUN,
            name="n",
            spec_toml="x = 1",
            seed=3,
            status=RunStatus.RUNNING,
            created_at=1.0,
        )
    )
    ledger.record_participant_event(
        ParticipantEvent(run_id=RUN, participant="a", state=ParticipantState.JOINED, at=2.0)
    )
    ledger.start_round(
        RoundRecord(
            run_id=RUN,
            round=1,
            kind=TaskKind.FIT,
            status=RoundStatus.RUNNING,
            selected=("a",),
            started_at=3.0,
        )
    )
    ledger.record_contribution(
        ContributionRecord(
            run_id=RUN,
            round=1,
            kind=TaskKind.FIT,
            participant="a",
            status=ContributionStatus.ACCEPTED,
            weight=5,
        )
    )
    model = params(3.0)
    ledger.commit_round(RUN, 1, model, finished_at=4.0, metrics={"loss": 0.5})
    return model


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    with SqliteLedger(tmp_path / "state") as opened:
        yield opened


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


def test_creates_state_dir_in_wal_mode(ledger: SqliteLedger, tmp_path: Path) -> None:
    assert ledger.db_path == (tmp_path / "state" / "ledger.sqlite").resolve()
    assert ledger.db_path.is_file()
    with closing(raw(ledger.db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_write_is_visible_to_a_new_connection(ledger: SqliteLedger) -> None:
    fill(ledger)
    with closing(raw(ledger.db_path)) as conn:
        rows = conn.execute(
            "SELECT status, model_digest FROM rounds WHERE run_id = ? AND round = 1", (RUN,)
        ).fetchall()
        assert rows == [("committed", params(3.0).digest())]
        assert conn.execute("SELECT count(*) FROM contributions").fetchone()[0] == 1
        assert conn.execute("SELECT nbytes FROM checkpoints").fetchone()[0] > 0


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    with SqliteLedger(tmp_path) as first:
        model = fill(first)
        before = (first.get_run(RUN), first.rounds(RUN), first.contributions(RUN))
        events = first.participant_events(RUN)
    with SqliteLedger(tmp_path) as second:
        assert (second.get_run(RUN), second.rounds(RUN), second.contributions(RUN)) == before
        assert second.participant_events(RUN) == events
        assert second.load_checkpoint(RUN, 1) == model
        second.set_run_status(RUN, RunStatus.FINISHED)
    with SqliteLedger.open_read_only(tmp_path) as third:
        assert third.get_run(RUN).status is RunStatus.FINISHED
        assert third.load_checkpoint(RUN, 1) == model


def test_read_only_refuses_writes_and_missing_ledgers(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger"):
        SqliteLedger.open_read_only(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    with SqliteLedger(tmp_path) as writer:
        fill(writer)
        with SqliteLedger.open_read_only(tmp_path) as reader:
            assert [r.run_id for r in reader.runs()] == [RUN]
            with pytest.raises(LedgerError, match="read-only"):
                reader.set_run_status(RUN, RunStatus.FAILED)
            with pytest.raises(LedgerError, match="read-only"):
                reader.commit_round(RUN, 2, params(), finished_at=1.0)
        assert writer.get_run(RUN).status is RunStatus.RUNNING


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    SqliteLedger(tmp_path).close()
    with closing(raw(tmp_path / "ledger.sqlite")) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SqliteLedger(tmp_path)
    with pytest.raises(LedgerError, match="Upgrade Conclave"):
        SqliteLedger.open_read_only(tmp_path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    with closing(raw(tmp_path / "ledger.sqlite")) as conn:
        conn.execute("CREATE TABLE other (x INTEGER)")
        conn.commit()
    with pytest.raises(LedgerError, match="not a Conclave ledger"):
        SqliteLedger(tmp_path)


def test_checkpoint_file_place_and_no_leftovers(ledger: SqliteLedger) -> None:
    fill(ledger)
    (checkpoint,) = ledger.checkpoints(RUN)
    path = Path(checkpoint.path)
    assert path == ledger.state_dir / "checkpoints" / RUN / "round-00001.ckpt"
    assert path.stat().st_size == checkpoint.nbytes
    assert path.read_bytes() == encode_checkpoint(params(3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["round-00001.ckpt"]


def test_odd_run_ids_stay_inside_the_checkpoint_folder(ledger: SqliteLedger) -> None:
    run_id = "../../escape/..run"
    ledger.create_run(
        RunRecord(
            run_id=run_id, name="", spec_toml="", seed=0, status=RunStatus.RUNNING, created_at=0
        )
    )
    ledger.start_round(
        RoundRecord(
            run_id=run_id,
            round=2,
            kind=TaskKind.FIT,
            status=RoundStatus.RUNNING,
            selected=(),
            started_at=0,
        )
    )
    record = ledger.commit_round(run_id, 2, params(), finished_at=1.0)
    path = Path(record.path)
    assert path.parent.parent == ledger.state_dir / "checkpoints"
    assert ".." not in path.parts
    assert ledger.load_checkpoint(run_id, 2) == params()


@pytest.mark.parametrize("damage", ["flip-payload", "flip-header", "truncate", "append", "delete"])
def test_damaged_checkpoint_is_detected(ledger: SqliteLedger, damage: str) -> None:
    fill(ledger)
    path = Path(ledger.checkpoints(RUN)[0].path)
    data = bytearray(path.read_bytes())
    if damage == "flip-payload":
        data[-5] ^= 0x40
    elif damage == "flip-header":
        data[20] ^= 0x01
    elif damage == "truncate":
        data = data[:-3]
    elif damage == "append":
        data += b"\0\0\0\0"
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match=r"round-00001\.ckpt"):
        ledger.load_checkpoint(RUN, 1)


def test_checkpoint_swapped_for_another_valid_one_is_detected(ledger: SqliteLedger) -> None:
    fill(ledger)
    path = Path(ledger.checkpoints(RUN)[0].path)
    path.write_bytes(encode_checkpoint(params(9.0)))  # self-consistent, but not what was committed
    with pytest.raises(CheckpointCorrupted, match="ledger recorded"):
        ledger.load_checkpoint(RUN, 1)


def test_failed_commit_leaves_round_running_and_no_file(
    ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger)
    ledger.start_round(
        RoundRecord(
            run_id=RUN,
            round=2,
            kind=TaskKind.FIT,
            status=RoundStatus.RUNNING,
            selected=("a",),
            started_at=5.0,
        )
    )

    def broken_dump(metrics: object) -> str:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr("conclave.ledger.sqlite.dump_metrics", broken_dump)
    with pytest.raises(LedgerError, match="disk I/O error"):
        ledger.commit_round(RUN, 2, params(5.0), finished_at=6.0)
    monkeypatch.undo()
    assert ledger.rounds(RUN)[1].status is RoundStatus.RUNNING
    assert [c.round for c in ledger.checkpoints(RUN)] == [1]
    assert not (ledger.state_dir / "checkpoints" / RUN / "round-00002.ckpt").exists()
    ledger.commit_round(RUN, 2, params(5.0), finished_at=7.0)
    assert ledger.load_checkpoint(RUN, 2) == params(5.0)


def test_a_second_writer_is_refused_while_the_first_holds_the_state_dir(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    with SqliteLedger(tmp_path) as first:
        fill(first)
        with pytest.raises(LedgerError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            SqliteLedger(tmp_path)
        # another process is refused too, and readers are not
        probe = subprocess.run(
            [sys.executable, "-c",
             "import sys\nfrom pathlib import Path\n"
             "from conclave.ledger.sqlite import SqliteLedger\n"
             "from conclave.core.errors import LedgerError\n"
             "try:\n    SqliteLedger(Path(sys.argv[1]))\nexcept LedgerError as e:\n"
             "    print(e); sys.exit(3)\n", str(tmp_path)],
            capture_output=True, text=True, timeout=60)
        assert probe.returncode == 3 and "in use by another process" in probe.stdout
        with SqliteLedger.open_read_only(tmp_path) as reader:
            assert reader.get_run(RUN).run_id == RUN
    with SqliteLedger(tmp_path) as again:  # released on close
        assert again.get_run(RUN).run_id == RUN


def test_a_damaged_database_or_a_file_in_the_way_is_refused_clearly(tmp_path: Path) -> None:
    with SqliteLedger(tmp_path / "state") as first:
        fill(first)
        for i in range(60):  # enough rows for several pages
            first.record_participant_event(ParticipantEvent(
                run_id=RUN, participant=f"p{i}", state=ParticipantState.JOINED, at=float(i),
                detail="x" * 500))
    db = tmp_path / "state" / "ledger.sqlite"
    with closing(raw(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[4 * page: 5 * page] = b"\x55" * page
    db.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="is damaged"):
        SqliteLedger(tmp_path / "state")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(LedgerError, match="is a file, not a folder"):
        SqliteLedger(afile)
