"""The capture spool: a byte budget with a priority policy, counted, surviving restarts."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent import spool
from agent.spool import CaptureFiles, Spool

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


def files(n: int) -> CaptureFiles:
    return CaptureFiles(image=b"i" * n, sidecar=b"{}", mask=b"m")


def fid(i: int) -> str:
    return f"{i:032x}"


def spool_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if not p.name.startswith("spool."))


def test_order_is_priority_then_age(tmp_path: Path) -> None:
    s = Spool(tmp_path, 10_000)
    s.add(fid(1), "sample", NOW, files(10))
    s.add(fid(2), "flagged", NOW, files(10))
    s.add(fid(3), "snapshot", NOW, files(10))
    s.add(fid(4), "flagged", NOW, files(10))
    order = []
    while (c := s.next()) is not None:
        order.append(c.frame_id)
        s.done(c.frame_id, c.category)
    assert order == [fid(3), fid(2), fid(4), fid(1)]
    assert s.counters() == {"uploaded.sample": 1, "uploaded.flagged": 2, "uploaded.snapshot": 1}
    assert s.used == 0 and spool_bytes(tmp_path) == 0


def test_budget_evicts_lowest_priority_oldest_first(tmp_path: Path) -> None:
    s = Spool(tmp_path, 1000)
    for i in range(3):
        assert s.add(fid(i), "flagged", NOW, files(197))  # 200 bytes each
    for i in range(3, 5):
        assert s.add(fid(i), "sample", NOW, files(197))
    assert s.used == 1000
    assert s.add(fid(5), "flagged", NOW, files(197))  # evicts the oldest sample
    assert s.add(fid(6), "flagged", NOW, files(197))  # then the other sample
    assert s.add(fid(7), "flagged", NOW, files(197))  # then the oldest flagged
    assert not s.add(fid(8), "sample", NOW, files(197))  # a sample never evicts a flagged
    assert s.counters() == {"evicted.sample": 2, "evicted.flagged": 1, "refused.sample": 1}
    assert s.used <= 1000 and spool_bytes(tmp_path) == s.used
    assert not s.add(fid(9), "snapshot", NOW, files(5000))  # larger than the whole budget
    kept = set()
    while (c := s.next()) is not None:
        kept.add(c.frame_id)
        s.done(c.frame_id, c.category)
    assert kept == {fid(1), fid(2), fid(5), fid(6), fid(7)}


def test_survives_restart_and_sweeps_orphans(tmp_path: Path) -> None:
    s = Spool(tmp_path, 10_000)
    s.add(fid(1), "flagged", NOW, files(10))
    s.retry_later(fid(1), 3600)
    s.close()
    (tmp_path / f"{fid(2)}.jpg").write_bytes(b"half-written capture from a crash")
    again = Spool(tmp_path, 10_000)
    assert not (tmp_path / f"{fid(2)}.jpg").exists()
    assert again.next() is None  # not due yet
    c = again.next(now=4_000_000_000)
    assert c is not None and c.frame_id == fid(1) and c.attempts == 1 and c.captured_at == NOW
    assert again.used == 13


def test_full_disk_makes_room_by_the_budget_rule_then_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is shared: it can fill before the budget does. A flagged capture then takes
    the room of the oldest sample, as it would under the budget; a sample takes nobody's."""
    s = Spool(tmp_path, 10_000)
    s.add(fid(1), "sample", NOW, files(97))
    s.add(fid(2), "flagged", NOW, files(97))
    real = spool.replace_files
    full = {"left": 1}

    def replace_files(items: Iterable[tuple[Path, bytes]]) -> None:
        if full["left"]:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(items)

    monkeypatch.setattr(spool, "replace_files", replace_files)
    assert s.add(fid(3), "flagged", NOW, files(97))
    assert s.counters() == {"evicted.sample": 1}
    assert s.used == 200 and spool_bytes(tmp_path) == 200
    full["left"] = 1
    with pytest.raises(OSError, match="No space"):
        s.add(fid(4), "sample", NOW, files(97))  # only flagged captures: nothing may go
    assert s.counters() == {"evicted.sample": 1, "failed.sample": 1}
    assert s.depth == 2 and spool_bytes(tmp_path) == s.used == 200


def test_the_disk_reserve_is_kept_by_the_budget_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captures never take the disk's last `keep_free` bytes (a model update needs them):
    below it a flagged capture takes a sample's room; one nobody may give way to is refused,
    counted, and what was spooled stays."""
    s = Spool(tmp_path, 10_000, keep_free=1000)
    disk = {"free": 10_000}

    def disk_usage(path: Path) -> Any:
        assert path == tmp_path
        return type("Usage", (), {"free": disk["free"]})()

    monkeypatch.setattr(spool.shutil, "disk_usage", disk_usage)
    assert s.add(fid(1), "sample", NOW, files(197))
    assert s.add(fid(2), "sample", NOW, files(197))
    assert s.add(fid(3), "flagged", NOW, files(197))
    disk["free"] = 1100  # someone else filled the disk: 200 more would leave 900
    assert s.add(fid(4), "flagged", NOW, files(197))
    assert s.counters() == {"evicted.sample": 1}  # the oldest sample made the room
    assert s.add(fid(5), "sample", NOW, files(197))  # a sample takes an older sample's
    disk["free"] = 500  # 700 bytes needed, 600 spooled: refused, nothing evicted in vain
    assert not s.add(fid(6), "flagged", NOW, files(197))
    assert s.counters() == {"evicted.sample": 2, "refused.flagged": 1}
    assert s.depth == 3 and spool_bytes(tmp_path) == s.used == 600
    kept = set()
    while (c := s.next()) is not None:
        kept.add(c.frame_id)
        s.done(c.frame_id, c.category)
    assert kept == {fid(3), fid(4), fid(5)}


class _FailingCommit:
    """The spool's connection, but the next COMMIT fails as a full disk's would."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction


def test_failed_eviction_commit_keeps_rows_and_count(tmp_path: Path) -> None:
    s = Spool(tmp_path, 400)
    for i in range(2):
        assert s.add(fid(i), "sample", NOW, files(197))
    real, s._db = s._db, _FailingCommit(s._db)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        s.add(fid(9), "flagged", NOW, files(197))
    s._db = real
    assert s.used == 400 == spool_bytes(tmp_path) and s.depth == 2  # as before, both kept
    assert s.add(fid(9), "flagged", NOW, files(197))  # and it works once the disk does
    assert s.used == 400 and s.counters() == {"evicted.sample": 1}


def test_a_held_capture_waits_for_its_release(tmp_path: Path) -> None:
    """A capture goes up only once its detection is committed: one the outbox then refuses
    is withdrawn, uncounted, before the uploader could send it under an unpublished id."""
    s = Spool(tmp_path, 10_000)
    assert s.add(fid(1), "flagged", NOW, files(10), held=True)
    assert s.add(fid(2), "flagged", NOW, files(10), held=True)
    assert s.next() is None
    s.due_now()  # S3 back after an outage: put-back captures go, held ones still wait
    assert s.next() is None
    s.release(fid(1))
    taken = s.next()
    assert taken is not None and taken.frame_id == fid(1)
    s.withdraw(fid(2))
    assert s.depth == 1 and s.counters() == {} and spool_bytes(tmp_path) == s.used == 13
    assert s.add(fid(3), "flagged", NOW, files(10), held=True)  # a crash before its release
    s.done(fid(1), "flagged")
    s.due_now(held=True)  # the next start frees it
    taken = s.next()
    assert taken is not None and taken.frame_id == fid(3)


def test_a_captures_row_is_fsynced_with_its_commit(tmp_path: Path) -> None:
    """The detection naming a capture's upload key is committed (and may be published) right
    after the capture's row. Under synchronous=NORMAL a power cut could keep the detection
    and lose the row; the next start then swept the capture's fsynced files away as
    orphans, uncounted. FULL puts every commit on disk before the next step."""
    spool = Spool(tmp_path, 1 << 20)
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    spool.close()
