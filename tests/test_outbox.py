"""The durable outbox: order, replay after a crash, bounds and their counted policy."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import OutboxConfig
from agent.outbox import Outbox


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.after(0, 10_000)]


def test_fifo_ack_and_counters(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(5):
        assert box.put("t", f"m{i}".encode())
    pending = box.after(0, 3)
    assert [m.payload for m in pending] == [b"m0", b"m1", b"m2"]
    assert [m.payload for m in box.after(pending[-1].id, 10)] == [b"m3", b"m4"]
    box.ack([pending[0].id, pending[2].id])
    assert payloads(box) == [b"m1", b"m3", b"m4"]
    assert (box.depth, box.size, box.acked) == (3, 9, 2)  # payload and topic bytes
    box.ack([pending[0].id])  # a second PUBACK for the same row changes nothing
    assert box.depth == 3


def test_survives_close_and_reopen_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(100):
        box.put("t", str(i).encode(), correlation=b"c" if i == 7 else None)
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    rows = again.after(0, 1000)
    assert [int(m.payload) for m in rows] == list(range(100))
    assert rows[7].correlation == b"c" and rows[8].correlation is None
    counted = sum(len(str(i)) for i in range(100)) + 100 + 1  # payloads, topics, correlation
    assert again.depth == 100 and again.size == counted


def test_sigkill_loses_nothing_committed(tmp_path: Path) -> None:
    """A writer killed with SIGKILL after it reported N commits: all N are there."""
    db = tmp_path / "o.sqlite"
    script = (
        "import sys; from pathlib import Path; from agent.outbox import Outbox\n"
        f"box = Outbox(Path({str(db)!r}))\n"
        "for i in range(100000):\n"
        "    box.put('t', str(i).encode())\n"
        "    if i % 50 == 0: print(i, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = 0
    for line in proc.stdout:
        last = int(line)
        if last >= 2000:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    box = Outbox(db)
    got = [int(p) for p in payloads(box)]
    assert got == list(range(len(got)))  # in order, no holes
    assert len(got) > last


def test_drop_oldest_is_counted_and_persists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "o.sqlite", OutboxConfig(max_messages=10))
    with caplog.at_level(logging.WARNING):
        for i in range(15):
            assert box.put("t", str(i).encode())
    assert [int(p) for p in payloads(box)] == list(range(5, 15))
    assert box.dropped_total == 5
    assert "drop_oldest" in caplog.text
    assert caplog.text.count("outbox full") == 1  # one line a minute, not one a message
    box.close()
    assert Outbox(tmp_path / "o.sqlite", OutboxConfig(max_messages=10)).dropped_total == 5


def test_drop_oldest_never_evicts_what_is_in_flight(tmp_path: Path) -> None:
    """The oldest rows of a stalled broker are the ones paho holds and will deliver: evicting
    them counted as dropped what arrived (28 delivered + dropped of 20 put)."""
    box = Outbox(tmp_path / "o.sqlite", OutboxConfig(max_messages=10))
    for i in range(10):
        box.put("t", str(i).encode())
    assert len(box.take(0, 8)) == 8  # rows 1..8 are with the broker link
    assert box.put("t", b"10") and box.put("t", b"11")  # evict rows 9 and 10, not 1..8
    assert [int(p) for p in payloads(box)] == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    box.take(8, 100)
    assert box.put("t", b"12") is None  # everything older is in flight: the new one goes
    assert box.dropped_total == 3 and box.depth == 10


def test_a_full_disk_is_named_as_such(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself on SQLITE_FULL; our ROLLBACK then raised
    'cannot rollback - no transaction is active' in place of the real error."""
    box = Outbox(tmp_path / "o.sqlite")
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for _ in range(50):
            box.put("t", b"x" * 20_000)
    assert box.depth == len(payloads(box))  # the count matches what was committed


def test_drop_newest_refuses_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", OutboxConfig(max_messages=10, when_full="drop_newest"))
    results = [box.put("t", str(i).encode()) for i in range(12)]
    assert results[:10] == list(range(1, 11)) and results[10:] == [None, None]
    assert [int(p) for p in payloads(box)] == list(range(10))
    assert box.dropped_total == 2


def test_byte_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", OutboxConfig(max_bytes=64 * 1024))
    for _ in range(10):
        box.put("t", b"x" * 10_000)
    assert box.size <= 64 * 1024 and box.depth == 6
    assert box.dropped_total == 4
    assert box.put("t", b"x" * 70_000) is None  # larger than the whole outbox: refused, counted
    assert box.dropped_total == 5


def test_refused_by_broker_counts_as_dropped(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.put("t", b"a")
    box.refuse([m.id for m in box.after(0, 1)])
    assert box.depth == 0 and box.dropped_total == 1 and box.acked == 0


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR):
        box = Outbox(path)
    assert box.put("t", b"a") and box.depth == 1
    aside = list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert len(aside) == 1 and str(path) in caplog.text


def test_listener_called_after_commit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    seen: list[int] = []
    box.on_put(lambda: seen.append(box.depth))
    box.put("t", b"a")
    assert seen == [1]
