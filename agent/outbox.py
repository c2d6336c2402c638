"""The durable outbox: every outgoing event message is on disk before it is published.

paho keeps unacknowledged QoS 1 messages in memory only, so a crash, a SIGKILL or a
reboot during a broker outage loses them. Here a message is committed to SQLite (WAL) by
the frame loop, handed to paho by the publisher, and deleted only when its PUBACK arrives;
whatever is still in the table at start is replayed, in order. The table is bounded in
messages and bytes; when a bound is hit the configured policy discards one end of the
queue and counts it in a persistent counter that metrics publish, so nothing is lost
silently.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.config import OutboxConfig

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: replay order survives deletes
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    correlation BLOB,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
BUMP_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)


@dataclass(frozen=True)
class Pending:
    """One stored message, as the publisher hands it to paho."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None


ROW_BYTES = "(LENGTH(payload) + LENGTH(CAST(topic AS BLOB)) + COALESCE(LENGTH(correlation), 0))"
"""What a row costs against `max_bytes`: the caller of a command sets its topic and data."""


FULL_WARNING_EVERY_S = 60.0


class _AllInFlightError(Exception):
    """drop_oldest found only messages in flight to evict."""


class Outbox:
    """SQLite-backed FIFO of outgoing messages; safe to use from several threads."""

    def __init__(self, path: Path, config: OutboxConfig | None = None) -> None:
        self.path = path
        self.config = config or OutboxConfig()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._handed_through = 0  # rows up to this id were taken by the broker link
        self._warned_at = -float("inf")
        self._unlogged = 0  # dropped since the last "outbox full" line
        self._db = self._open()
        depth, size = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM({ROW_BYTES}), 0) FROM messages"
        ).fetchone()
        self._depth, self._bytes = int(depth), int(size)
        self.dropped_total = self._counter("dropped")
        self.acked = 0
        if self._depth:
            log.info("outbox %s: %d messages from before the restart to replay", path, depth)

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") not in CORRUPT:
                raise  # locked, disk full, I/O: the file is fine, the agent must not start
            # A corrupt file must not keep the device from working: keep it for forensics.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved to %s", self.path, exc, aside)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        db.execute("SELECT COUNT(*) FROM messages").fetchone()  # fails now if the file is bad
        return db

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size(self) -> int:
        """Bytes waiting: payloads, topics and correlation data, as `max_bytes` counts them."""
        return self._bytes

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int | None:
        """Commit one message; its row id, or None if the drop_newest policy refused it."""
        size = len(payload) + len(topic.encode()) + len(correlation or b"")  # as SQL counts
        cfg = self.config
        with self._lock:
            over = self._depth + 1 > cfg.max_messages or self._bytes + size > cfg.max_bytes
            if over and (cfg.when_full == "drop_newest" or size > cfg.max_bytes):
                why = "policy drop_newest" if size <= cfg.max_bytes else "larger than max_bytes"
                self._count_dropped(1, why)
                return None
            evicted, freed = 0, 0
            try:
                with self._transaction():
                    if over:
                        evicted, freed = self._evict_oldest(size)
                    row = self._db.execute(
                        "INSERT INTO messages (topic, payload, qos, retain, correlation, "
                        "created) VALUES (?, ?, ?, ?, ?, ?)",
                        (topic, payload, qos, int(retain), correlation, time.time()),
                    ).lastrowid
            except _AllInFlightError:  # evicting them would count as dropped what gets delivered
                self._count_dropped(1, "drop_oldest, all older messages in flight")
                return None
            # Counters move only once the transaction is in: a failed commit changes nothing.
            self._depth += 1 - evicted
            self._bytes += size - freed
            if evicted:
                self.dropped_total += evicted
                self._warn_full(evicted, "dropped the oldest (policy drop_oldest)")
        for listener in self._listeners:
            listener()
        return row

    def on_put(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every committed put (the publisher wakes on it)."""
        self._listeners.append(listener)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit (one fsync under synchronous=full) per call; the caller holds the lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on a full disk
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _evict_oldest(self, incoming: int) -> tuple[int, int]:
        """Inside the put's transaction: delete from the head (past what is in flight) until
        the new message fits; returns (messages, bytes) deleted. _AllInFlightError if it cannot."""
        cfg = self.config
        evicted = freed = 0
        while (
            self._depth - evicted >= cfg.max_messages
            or self._bytes - freed + incoming > cfg.max_bytes
        ):
            row = self._db.execute(
                f"SELECT id, {ROW_BYTES} FROM messages WHERE id > ? ORDER BY id LIMIT 1",
                (self._handed_through,),
            ).fetchone()
            if row is None:
                raise _AllInFlightError
            self._db.execute("DELETE FROM messages WHERE id=?", (row[0],))
            evicted += 1
            freed += int(row[1])
        if evicted:
            self._db.execute(BUMP_COUNTER, ("dropped", evicted))
        return evicted, freed

    def _count_dropped(self, n: int, why: str) -> None:
        with self._transaction():
            self._bump("dropped", n)
        self._warn_full(n, f"refused the new one ({why})")

    def _warn_full(self, n: int, what: str) -> None:
        """A warning at the first drop, then one a minute with the count: a full outbox
        during an outage drops a message per frame, and a line each would flood the log."""
        self._unlogged += n
        now = time.monotonic()
        if now - self._warned_at >= FULL_WARNING_EVERY_S:
            log.warning("outbox full: %s; %d message(s) dropped since the last such line",
                        what, self._unlogged)  # fmt: skip
            self._warned_at, self._unlogged = now, 0

    def _bump(self, name: str, n: int) -> None:
        self._db.execute(BUMP_COUNTER, (name, n))
        if name == "dropped":
            self.dropped_total += n

    def after(self, last_id: int, limit: int) -> list[Pending]:
        """The next `limit` messages with id > last_id, oldest first."""
        return self._after(last_id, limit, take=False)

    def rows(self, ids: list[int]) -> list[Pending]:
        """These messages, those still here, oldest first (the broker link sends them again)."""
        if not ids:
            return []
        with self._lock:
            return self._select(f"id IN ({','.join('?' * len(ids))}) ORDER BY id", ids)

    def take(self, last_id: int, limit: int) -> list[Pending]:
        """`after`, for the broker link: the rows go in flight in the same step (paho delivers
        them even if their rows go), so drop_oldest never evicts them, not even a put that
        lands while the link is still handing them over."""
        return self._after(last_id, limit, take=True)

    def _after(self, last_id: int, limit: int, *, take: bool) -> list[Pending]:
        with self._lock:
            rows = self._select("id > ? ORDER BY id LIMIT ?", [last_id, limit])
            if take and rows:
                self._handed_through = max(self._handed_through, rows[-1].id)
        return rows

    def _select(self, where: str, params: list[int]) -> list[Pending]:
        rows = self._db.execute(
            f"SELECT id, topic, payload, qos, retain, correlation FROM messages WHERE {where}",
            params,
        ).fetchall()
        return [Pending(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete acknowledged messages (a message evicted meanwhile is simply gone)."""
        self._delete(ids, refused=False)

    def refuse(self, ids: Iterable[int]) -> None:
        """Delete messages the broker refused for good (PUBACK >= 0x80), counted as dropped."""
        self._delete(ids, refused=True)

    def _delete(self, ids: Iterable[int], *, refused: bool) -> None:
        keys = [(i,) for i in ids]
        if not keys:
            return
        with self._lock:
            freed = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM({ROW_BYTES}), 0) FROM messages "
                f"WHERE id IN ({','.join('?' * len(keys))})",
                [k[0] for k in keys],
            ).fetchone()
            with self._transaction():
                self._db.executemany("DELETE FROM messages WHERE id=?", keys)
                if refused:
                    self._bump("dropped", int(freed[0]))
            self._depth -= int(freed[0])
            self._bytes -= int(freed[1])
            if not refused:
                self.acked += int(freed[0])

    def close(self) -> None:
        """Checkpoint the WAL into the main file so the state directory is self-contained."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
