"""The capture spool: a byte budget with a priority policy, counted, surviving restarts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

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
