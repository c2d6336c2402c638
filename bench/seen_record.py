"""The watched folder's record of seen files on a gateway whose inbox turns over fast.

Run as `make bench-seen`. A camera writing 15 frames/s into the inbox, and a sync tool taking
them away, pass 1.3M files a day through the folder. The record (seen-files.sqlite) must
remember files after they go, so that one put back is not analysed twice, but neither
memory nor the hourly check may grow with all the files it ever saw.

The record is built as a day at `--fps` leaves it: `--present` files still in the folder,
the last hour's files analysed and gone since the last hourly check, the rest gone at
earlier checks. Timed on it, in one run: a start (FolderSource opening the record; on this
old record it also builds the gone_at index) and the first scan (the check), against the
same two steps as they were before 2026-11-22 (every record loaded into memory; an UPDATE
per file ever seen and now missing). Then the steady state: checks of 5,000 files gone each
(the check's trigger) until the record has turned over past its 250,000 gone files, and a
restart on that record. `set MB` is the memory the set of seen files holds (tracemalloc).
No real data: the files are empty.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.config import SourceConfig
from agent.sources import FolderSource
from agent.sources.files import _KEEP_GONE, _PRUNE_AFTER_SEEN, _SEEN_SCHEMA

T = TypeVar("T")
Keys = set[tuple[str, int, int]]


def timed(run: Callable[[], T]) -> tuple[T, float, float]:
    """run()'s result, wall milliseconds and the traced memory it kept, in MB."""
    tracemalloc.start()
    start = time.perf_counter()
    result = run()
    ms = 1000.0 * (time.perf_counter() - start)
    kept = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    return result, ms, kept


def build(record: Path, inbox: Path, *, files: int, fps: float, present: int) -> None:
    """A record of `files` files at `fps`: the last `present` in the inbox, the hour's before
    them gone since the last check (gone_at NULL), the rest gone at earlier checks."""
    inbox.mkdir()
    now = time.time()
    gone_before = files - int(fps * 3600) - present
    rows = []
    for i in range(files):
        name = f"cam/{i // 100_000:03d}/IMG_{i:08d}.jpg"
        gone_at = now - 3600.0 - (gone_before - i) / fps if i < gone_before else None
        rows.append((name, 0, 0, now, gone_at))
    inbox.joinpath("cam").mkdir()
    for name, *_ in rows[files - present :]:
        path = inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    mtimes = {name: (inbox / name).stat().st_mtime_ns for name, *_ in rows[files - present :]}
    rows = [(n, 0, mtimes.get(n, 0), s, g) for n, _, _, s, g in rows]
    with sqlite3.connect(record) as db:
        db.execute(_SEEN_SCHEMA)
        db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?, ?)", rows)
    db.close()


def old_start(record: Path) -> Keys:
    """The start as it was: every record into memory."""
    with sqlite3.connect(record) as db:
        seen = {(p, s, m) for p, s, m in db.execute("SELECT path, size, mtime_ns FROM seen")}
    db.close()
    return seen


def old_check(record: Path, seen: Keys, present: Keys) -> None:
    """The hourly check as it was: an UPDATE per file ever seen and missing now."""
    now, where = time.time(), "path=? AND size=? AND mtime_ns=?"
    db = sqlite3.connect(record, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    missed = db.execute("SELECT path, size, mtime_ns FROM seen WHERE gone_at NOT NULL")
    back = [key for key in map(tuple, missed) if key in present]
    db.executemany(f"UPDATE seen SET gone_at=NULL WHERE {where}", back)
    db.executemany(
        f"UPDATE seen SET gone_at=? WHERE {where} AND gone_at IS NULL",
        ((now, *key) for key in seen - present),
    )
    db.execute("DELETE FROM seen WHERE gone_at < ?", (now - 30 * 86400.0,))
    db.execute("ROLLBACK")  # leave the record as built, for the new code
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fps", type=float, default=15.0, help="frames a second into the inbox")
    ap.add_argument("--hours", type=float, default=24.0, help="hours of frames on the record")
    ap.add_argument("--present", type=int, default=1000, help="files still in the inbox")
    args = ap.parse_args()
    files = int(args.fps * 3600 * args.hours)
    with tempfile.TemporaryDirectory() as tmp:
        state, inbox = Path(tmp, "state"), Path(tmp, "inbox")
        state.mkdir()
        record = state / "seen-files.sqlite"
        build(record, inbox, files=files, fps=args.fps, present=args.present)
        print(f"record: {files:,} files ({args.hours:g} h at {args.fps:g} frames/s), "
              f"{args.present:,} in the inbox, {record.stat().st_size / 1e6:.1f} MB")  # fmt: skip
        seen, old_start_ms, old_mb = timed(lambda: old_start(record))
        present = {k for k in seen if k[2]}  # the files in the inbox carry their mtime
        _, old_check_ms, _ = timed(lambda: old_check(record, seen, present))
        seen.clear()  # before the new start is measured
        config = SourceConfig(kind="folder", uri=str(inbox), recursive=True)
        source, start_ms, set_mb = timed(lambda: FolderSource(config, state_dir=state))
        _, check_ms, _ = timed(source._scan)  # the hourly check, first after the upgrade
        kept = record.stat().st_size / 1e6
        # Steady state: files analysed (recorded as _mark does) and gone, a check each
        # _PRUNE_AFTER_SEEN of them, until the record has turned over past _KEEP_GONE.
        cycles = _KEEP_GONE // _PRUNE_AFTER_SEEN + 10
        checks = sorted(after(source, _PRUNE_AFTER_SEEN, f"t{c}") for c in range(cycles))
        source.close()
        steady = record.stat().st_size / 1e6
        again, restart_ms, restart_mb = timed(lambda: FolderSource(config, state_dir=state))
        again.close()
    print(f"{'':<24} {'before':>10} {'now':>10} {'ratio':>8}")
    for label, before, now in [
        ("start: ms", old_start_ms, start_ms),
        ("start: set MB", old_mb, set_mb),
        ("first check: ms", old_check_ms, check_ms),
    ]:
        print(f"{label:<24} {before:>10.1f} {now:>10.1f} {before / now:>7.1f}x")
    median, worst = checks[len(checks) // 2], checks[-1]
    print(f"record {kept:.1f} MB after the first check. Steady ({cycles} checks of "
          f"{_PRUNE_AFTER_SEEN:,} files gone each): a check {median:.0f} ms (median, worst "
          f"{worst:.0f}), record {steady:.1f} MB; a restart {restart_ms:.0f} ms, set "
          f"{restart_mb:.2f} MB")  # fmt: skip
    print(
        f"files={files} old_start_ms={old_start_ms:.0f} start_ms={start_ms:.0f} "
        f"old_set_mb={old_mb:.1f} set_mb={set_mb:.1f} old_check_ms={old_check_ms:.0f} "
        f"check_ms={check_ms:.0f} steady_check_ms={median:.0f} steady_record_mb={steady:.1f} "
        f"restart_ms={restart_ms:.0f}"
    )


def after(source: FolderSource, count: int, tag: str) -> float:
    """Milliseconds of the check after `count` files were analysed and went."""
    now = time.time()
    keys = [(f"cam/{tag}/IMG_{i:08d}.jpg", 0, 0) for i in range(count)]
    db = source._db
    db.execute("BEGIN")
    db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?, NULL)", ((*k, now) for k in keys))
    db.execute("COMMIT")
    source._seen.update(keys)
    source._pruned_at = -float("inf")
    return timed(source._scan)[1]


if __name__ == "__main__":
    main()
