"""The capture spool: files on disk plus a SQLite queue, within a disk budget.

A capture (image, sidecar, optional mask) is written and committed before anything is
sent, so an S3 outage, a SIGKILL or a reboot only delays it. The spool never grows past
its byte budget: when a new capture does not fit, the oldest capture of the lowest
priority goes first (flagged frames last), but never one more important than the
newcomer; if nothing may go, the newcomer is refused. A disk that fills up before the
budget does (it is shared) is met the same way: room is made by the same rule and the
write tried once more. Nor does the spool take the disk's last `keep_free` bytes: a model
update, the outbox and the system need them, and a gateway whose captures filled its disk
could no longer take the model that fixes it; below that, captures give way by the same
rule. All of it is counted, per category, in counters that survive
restarts and are published in metrics: nothing is lost silently.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.contract.captures import CATEGORY_PRIORITY, IMAGE_SUFFIX, MASK_SUFFIX, Category
from agent.durable import replace_files

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    frame_id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    priority INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    created REAL NOT NULL,
    bytes INTEGER NOT NULL,
    has_mask INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS captures_order ON captures (priority DESC, created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
SIDECAR = ".json"
HELD = 1e18  # next_try of a held capture: due only on release (or at the next start)


@dataclass(frozen=True)
class Spooled:
    """One capture waiting for upload."""

    frame_id: str
    category: Category
    captured_at: datetime
    has_mask: bool
    attempts: int


@dataclass(frozen=True)
class CaptureFiles:
    image: bytes
    sidecar: bytes
    mask: bytes | None

    @property
    def size(self) -> int:
        return len(self.image) + len(self.sidecar) + len(self.mask or b"")


class Spool:
    """Owned by the daemon; the frame loop adds, the uploader takes. Thread-safe."""

    def __init__(self, directory: Path, max_bytes: int, keep_free: int = 0) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.keep_free = keep_free
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._in_flight: str | None = None  # being uploaded: never evicted under the uploader
        self._db = sqlite3.connect(
            directory / "spool.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit is on disk before the next step. The detection naming a capture's
        # upload key is committed (and may be published) right after the capture's row; under
        # NORMAL a power cut could keep the detection and lose the row, whose fsynced files
        # the next start then swept away as orphans, uncounted. One small fsync a capture.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._sweep_orphans()
        self.used = int(
            self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM captures").fetchone()[0]
        )

    def _sweep_orphans(self) -> None:
        """Files without a row are from a crash between write and commit: not captures."""
        known = {row[0] for row in self._db.execute("SELECT frame_id FROM captures")}
        for path in self.dir.iterdir():
            if path.name.startswith("spool.sqlite") or not path.is_file():
                continue
            if path.name.split(".", 1)[0] not in known:
                path.unlink(missing_ok=True)

    def paths(self, frame_id: str) -> tuple[Path, Path, Path]:
        """(image, sidecar, mask) files of a capture."""
        base = self.dir / frame_id
        return (
            base.with_suffix(IMAGE_SUFFIX),
            base.with_suffix(SIDECAR),
            self.dir / f"{frame_id}{MASK_SUFFIX}",
        )

    @property
    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM captures").fetchone()[0])

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def _bump(self, name: str, n: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def add(
        self,
        frame_id: str,
        category: Category,
        captured_at: datetime,
        files: CaptureFiles,
        *,
        held: bool = False,
    ) -> bool:
        """Store a capture within the budget; False if it had to be refused (counted). A held
        capture is not uploaded until `release` (its detection is not committed yet)."""
        size = files.size
        priority = CATEGORY_PRIORITY[category]
        with self._lock:
            over = self.used + size - self.max_bytes
            short = self._short_of_disk(size)
            why = "disk low" if short > over else "spool full"
            victims = self._victims(size, priority, need=max(over, short))
            if victims is None:
                self._db.execute("BEGIN IMMEDIATE")
                self._bump(f"refused.{category}")
                self._db.execute("COMMIT")
                log.warning(
                    "%s (%d of %d bytes spooled, %d kept free): %s capture %s refused",
                    why,
                    self.used,
                    self.max_bytes,
                    self.keep_free,
                    category,
                    frame_id,
                )
                return False
            self._evict(victims, why)  # first: the budget holds at every instant
            for retry in (False, True):
                try:
                    self._write(frame_id, files)
                    break
                except OSError as exc:
                    full = exc.errno == errno.ENOSPC and not retry
                    room = self._victims(size, priority, need=size) if full else None
                    if not room:  # counted, and the caller logs the lost capture
                        self._failed(category)
                        raise
                    self._evict(room, "disk full")
            with self._db:
                self._db.execute(
                    "INSERT INTO captures (frame_id, category, priority, captured_at, created, "
                    "bytes, has_mask, next_try) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        frame_id,
                        category,
                        priority,
                        captured_at.isoformat(),
                        time.time(),
                        size,
                        files.mask is not None,
                        HELD if held else 0.0,
                    ),
                )
            self.used += size
        return True

    def _write(self, frame_id: str, files: CaptureFiles) -> None:
        image, sidecar, mask = self.paths(frame_id)
        written = ((image, files.image), (sidecar, files.sidecar), (mask, files.mask))
        try:
            replace_files((path, data) for path, data in written if data is not None)
        except OSError:
            self._unlink(frame_id)  # a half-written capture is no capture
            raise

    def _failed(self, category: str) -> None:
        with self._db:
            self._bump(f"failed.{category}")

    def _evict(self, victims: list[tuple[str, str, int]], why: str) -> None:
        """Rows go in one transaction, then `used`, then the files: a failed COMMIT leaves
        both the rows and the count as they were."""
        if not victims:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for victim, victim_category, _ in victims:
                self._db.execute("DELETE FROM captures WHERE frame_id=?", (victim,))
                self._bump(f"evicted.{victim_category}")
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:  # SQLite may have rolled back already
                self._db.execute("ROLLBACK")
            raise
        self.used -= sum(freed for _, _, freed in victims)
        for victim, victim_category, _ in victims:
            self._unlink(victim)
            log.warning("%s: evicted %s capture %s", why, victim_category, victim)

    def _short_of_disk(self, size: int) -> int:
        """Bytes the disk would be short of `keep_free` after writing `size` more."""
        if not self.keep_free:
            return 0
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:  # not knowable now: the write itself will tell
            return 0
        return self.keep_free + size - free

    def _victims(self, size: int, priority: int, need: int) -> list[tuple[str, str, int]] | None:
        """Captures to evict to free `need` bytes (of the budget or of the disk) for `size`
        more, lowest priority and oldest first; None if they cannot be found among
        captures no more important than the newcomer."""
        if size > self.max_bytes:
            return None
        victims: list[tuple[str, str, int]] = []
        if need <= 0:
            return victims
        rows = self._db.execute(
            "SELECT frame_id, category, bytes FROM captures WHERE priority <= ? "
            "AND frame_id IS NOT ? ORDER BY priority, created",
            (priority, self._in_flight),
        )
        for frame_id, category, freed in rows:
            victims.append((frame_id, category, int(freed)))
            need -= int(freed)
            if need <= 0:
                return victims
        return None

    def next(self, now: float | None = None) -> Spooled | None:
        """The most important, oldest capture that is due for an attempt."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT frame_id, category, captured_at, has_mask, attempts FROM captures "
                "WHERE next_try <= ? ORDER BY priority DESC, created LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            self._in_flight = row[0]
        return Spooled(row[0], row[1], datetime.fromisoformat(row[2]), bool(row[3]), row[4])

    def retry_later(self, frame_id: str, delay_s: float) -> None:
        with self._lock, self._db:
            self._in_flight = None
            self._db.execute(
                "UPDATE captures SET attempts = attempts + 1, next_try = ? WHERE frame_id=?",
                (time.time() + delay_s, frame_id),
            )

    def due(self) -> int:
        """Captures due for an attempt now."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM captures WHERE next_try <= ?", (time.time(),)
            ).fetchone()
        return int(row[0])

    def release(self, frame_id: str) -> None:
        """A held capture's detection is committed: it may go up now."""
        with self._lock, self._db:
            self._db.execute("UPDATE captures SET next_try = 0 WHERE frame_id=?", (frame_id,))

    def due_now(self, *, held: bool = False) -> None:
        """Every capture put back is due again (S3 is back: what waited out the outage goes
        now); with `held`, those held too (a new start: a crash left them unreleased, and
        their frames' detections may or may not have gone out)."""
        limit = float("inf") if held else HELD
        with self._lock, self._db:
            self._db.execute(
                "UPDATE captures SET next_try = 0 WHERE next_try > 0 AND next_try < ?", (limit,)
            )

    def done(self, frame_id: str, category: str) -> None:
        """Uploaded: forget it (row first, so a crash leaves orphans, never a lost capture)."""
        self._remove(frame_id, f"uploaded.{category}")

    def lost(self, frame_id: str, category: str) -> None:
        """Its files vanished (someone cleaned the disk): counted, not retried forever."""
        log.error("capture %s: files missing from %s; dropped (counted)", frame_id, self.dir)
        self._remove(frame_id, f"lost.{category}")

    def withdraw(self, frame_id: str) -> None:
        """Its detection was never committed: the capture goes too, uncounted (the frame
        comes again, and with it a capture under a new id)."""
        self._remove(frame_id, None)

    def _remove(self, frame_id: str, counter: str | None) -> None:
        with self._lock:
            row = self._db.execute(
                "SELECT bytes FROM captures WHERE frame_id=?", (frame_id,)
            ).fetchone()
            if self._in_flight == frame_id:
                self._in_flight = None
            if row is None:  # evicted meanwhile: it is already counted
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM captures WHERE frame_id=?", (frame_id,))
            if counter is not None:
                self._bump(counter)
            self._db.execute("COMMIT")
            self.used -= int(row[0])
        self._unlink(frame_id)

    def _unlink(self, frame_id: str) -> None:
        for path in self.paths(frame_id):
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
