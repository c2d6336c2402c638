"""Frame sources: watched folder, lists, video files, live capture with reopen, EXIF."""

from __future__ import annotations

import http.server
import logging
import os
import socketserver
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest

import agent.exif
from agent.config import SourceConfig, SourceKind
from agent.exif import PhotoMeta, read_exif
from agent.sources import (
    Failed,
    FolderSource,
    Frame,
    GlobSource,
    LiveSource,
    Source,
    SourceError,
    VideoSource,
    mask_uri,
    open_source,
)
from tests.exifdata import SYDNEY, TAKEN, app1, ascii_tag, rationals, with_exif

# --- helpers --------------------------------------------------------------------------------


def jpeg(level: int = 128, w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), level, np.uint8))
    assert ok
    return bytes(buf.tobytes())


def write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, ns=(int(mtime * 1e9), int(mtime * 1e9)))
    return path


def cfg(kind: SourceKind, uri: object, **kw: Any) -> SourceConfig:
    return SourceConfig(kind=kind, uri=str(uri), poll_s=0.05, settle_s=0.0, **kw)


class Drain:
    """Runs source.frames() in a thread, as the daemon's frame loop does."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.items: list[Frame | Failed] = []
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.source.frames(self.stop):
                self.items.append(item)
        except Exception as exc:
            self.error = exc

    def wait(self, until: Callable[[list[Frame | Failed]], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until(self.items):
            assert time.monotonic() < deadline, f"timed out with {self.items}"
            time.sleep(0.01)

    def finish(self, timeout: float = 5.0) -> list[Frame | Failed]:
        """Wait for a finite source to end by itself; what it delivered."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "frames() did not end"
        assert self.error is None, self.error
        return self.items

    def stopped(self, within: float = 0.5) -> float:
        start = time.monotonic()
        self.stop.set()
        self.thread.join(within)
        assert not self.thread.is_alive(), "frames() ignored the stop event"
        assert self.error is None, self.error
        return time.monotonic() - start


def names(items: list[Frame | Failed]) -> list[str]:
    return [i.name if isinstance(i, Frame) else f"FAILED {i.source}" for i in items]


def run_folder(folder: Path, state: Path, **kw: Any) -> list[Frame | Failed]:
    source = FolderSource(cfg("folder", folder, exit_when_done=True, **kw), state_dir=state)
    try:
        return Drain(source).finish()
    finally:
        source.close()


# --- watched folder -------------------------------------------------------------------------


def test_folder_takes_new_images_once_oldest_first(tmp_path: Path) -> None:
    folder, state, now = tmp_path / "in", tmp_path / "state", time.time()
    write(folder / "c.jpg", jpeg(10), now - 30)
    write(folder / "b.JPG", jpeg(20), now - 20)
    write(folder / "a.jpg", jpeg(30, 80, 60), now - 20)  # same mtime as b: name decides
    write(folder / "d.png", cv2.imencode(".png", np.zeros((5, 7, 3), np.uint8))[1].tobytes())
    for skipped in (".hidden.jpg", "e.jpg.part", "f.jpg.tmp", "notes.txt", "sub/g.jpg"):
        write(folder / skipped, jpeg())
    os.mkfifo(folder / "pipe.jpg")  # reading it would block forever

    items = run_folder(folder, state, extensions=(".jpg", "png"))
    assert names(items) == ["c.jpg", "a.jpg", "b.JPG", "d.png"]
    first = items[1]
    assert isinstance(first, Frame)
    assert first.data == (folder / "a.jpg").read_bytes()
    assert first.source == str((folder / "a.jpg").resolve())
    assert first.full_size == (80, 60) and first.image.shape == (60, 80, 3)
    assert [i.index for i in items if isinstance(i, Frame)] == [0, 1, 2, 3]
    assert first.gps is None and first.captured_at.tzinfo is UTC

    # A restart over the same state does not repeat anything ...
    assert run_folder(folder, state) == []
    # ... but a file replaced under the same name is new, and only that one is taken.
    write(folder / "c.jpg", jpeg(200, 32, 32))
    assert names(run_folder(folder, state)) == ["c.jpg"]


def test_folder_recursive_skips_hidden_folders(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write(folder / "top.jpg", jpeg(), time.time() - 10)
    write(folder / "sub" / "deep" / "x.jpg", jpeg())
    write(folder / ".cache" / "y.jpg", jpeg())
    items = run_folder(folder, tmp_path / "state", recursive=True)
    assert names(items) == ["top.jpg", "sub/deep/x.jpg"]


def test_folder_marks_a_file_seen_only_when_the_next_is_asked_for(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    write(folder / "a.jpg", jpeg(), time.time() - 10)
    write(folder / "b.jpg", jpeg())
    source = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    frames = cast("Generator[Frame | Failed]", source.frames(threading.Event()))
    assert names([next(frames)]) == ["a.jpg"]
    frames.close()  # a crash while a.jpg was being analysed
    source.close()
    assert names(run_folder(folder, state)) == ["a.jpg", "b.jpg"]  # at least once


def test_folder_waits_until_a_growing_file_has_settled(tmp_path: Path) -> None:
    folder, data = tmp_path / "in", jpeg(90, 640, 480)
    part = folder / "drone.jpg"
    write(part, data[:100])
    config = cfg("folder", folder).model_copy(update={"settle_s": 0.5})
    source = FolderSource(config, state_dir=tmp_path / "state")
    drain = Drain(source)
    step = len(data) // 6
    for end in range(100 + step, len(data), step):  # a slow copy: a piece every 0.1 s
        time.sleep(0.1)
        with part.open("ab") as fh:
            fh.write(data[fh.tell() : end])
    with part.open("ab") as fh:
        fh.write(data[fh.tell() :])
    done = time.monotonic()
    drain.wait(lambda items: len(items) == 1)
    waited = time.monotonic() - done
    drain.stopped()
    source.close()
    (item,) = drain.items
    assert isinstance(item, Frame), item  # never read half-written
    assert item.data == data and item.full_size == (640, 480)
    assert waited >= 0.45


def test_folder_corrupt_file_fails_alone_and_is_not_retried(tmp_path: Path) -> None:
    folder, state, now = tmp_path / "in", tmp_path / "state", time.time()
    write(folder / "broken.jpg", jpeg()[:300], now - 20)
    write(folder / "text.png", b"hello, not a picture", now - 15)
    with (folder / "huge.jpg").open("wb") as fh:
        fh.truncate(300 * 1024**2)  # sparse: costs no disk
    os.utime(folder / "huge.jpg", ns=(int((now - 12) * 1e9),) * 2)
    write(folder / "good.jpg", jpeg(), now - 10)
    source = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    items = Drain(source).finish()
    assert [type(i) for i in items] == [Failed, Failed, Failed, Frame]
    broken, text, huge = (i for i in items if isinstance(i, Failed))
    assert broken.source.endswith("broken.jpg")
    assert "broken.jpg" in broken.reason and "\n" not in broken.reason
    assert "text.png" in text.reason and "huge.jpg" in huge.reason and "too large" in huge.reason
    assert (source.stats.failed, source.stats.delivered, source.stats.state) == (3, 1, "done")
    source.close()
    assert run_folder(folder, state) == []


def test_folder_unreadable_file_is_reported_once_and_read_when_it_can_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES or EIO is not a bad image: the file is retried, never recorded as seen."""
    folder, state, now = tmp_path / "in", tmp_path / "state", time.time()
    write(folder / "a.jpg", jpeg(), now - 20)
    locked = write(folder / "b.jpg", jpeg(), now - 10)
    refusals = 3
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        nonlocal refusals
        if path.name == "b.jpg" and refusals:
            refusals -= 1
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr("agent.sources.files._RETRY_MIN_S", 0.05)
    # A run that ends while b.jpg cannot be read leaves it for the next start.
    first = run_folder(folder, state)
    assert names(first) == ["a.jpg", f"FAILED {locked}"]
    failed = first[1]
    assert isinstance(failed, Failed) and "Permission denied" in failed.reason
    # A watching source reports it once a start and takes it as soon as it reads.
    source = FolderSource(cfg("folder", folder), state_dir=state)
    drain = Drain(source)
    drain.wait(lambda items: any(isinstance(i, Frame) for i in items))
    drain.stopped()
    assert names(drain.items) == [f"FAILED {locked}", "b.jpg"] and refusals == 0
    assert (source.stats.failed, source.stats.delivered) == (1, 1)
    source.close()
    assert run_folder(folder, state) == []


def test_folder_record_forgets_files_long_gone(tmp_path: Path) -> None:
    """The record is bounded by the folder: a gateway whose inbox is emptied by a sync tool
    does not keep (and hold in memory) every file it ever saw. A file is forgotten only once
    it has been missing for 30 days, not when one scan misses it (a mount not up yet)."""
    folder, state = tmp_path / "in", tmp_path / "state"
    kept = write(folder / "kept.jpg", jpeg(), time.time() - 60)
    assert names(run_folder(folder, state)) == ["kept.jpg"]
    st = kept.stat()
    month_ago = time.time() - 31 * 86400
    with sqlite3.connect(state / "seen-files.sqlite") as db:
        db.execute("UPDATE seen SET gone_at = ?", (month_ago,))  # missed once, back now
        db.execute("INSERT INTO seen VALUES ('gone.jpg', 5, 6, ?, ?)", (month_ago, month_ago))
        db.execute("INSERT INTO seen VALUES ('recent.jpg', 5, 6, ?, NULL)", (month_ago,))
    db.close()
    assert run_folder(folder, state) == []
    with sqlite3.connect(state / "seen-files.sqlite") as db:
        rows = db.execute("SELECT path, size, mtime_ns, gone_at FROM seen ORDER BY path")
        recorded = {path: (size, mtime, gone) for path, size, mtime, gone in rows}
    db.close()
    assert set(recorded) == {"kept.jpg", "recent.jpg"}  # gone.jpg: missing for 31 days
    assert recorded["kept.jpg"] == (st.st_size, st.st_mtime_ns, None)
    assert recorded["recent.jpg"][2] > time.time() - 60  # missing from now on

    # A folder that cannot be listed (a mount point not up yet) forgets nothing.
    kept.unlink()
    folder.rmdir()
    folder.mkdir()
    folder.chmod(0)  # root reads it anyway: the listing is made to fail below
    real_scandir = os.scandir
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", lambda top: (_ for _ in ()).throw(OSError(5, "EIO")))
        source = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
        Drain(source).finish()
        source.close()
    assert os.scandir is real_scandir
    with sqlite3.connect(state / "seen-files.sqlite") as db:
        unchanged = db.execute("SELECT path, gone_at FROM seen WHERE path = 'kept.jpg'")
        assert list(unchanged) == [("kept.jpg", None)]
    db.close()


def seen_rows(state: Path) -> dict[str, float | None]:
    """The seen-files record on disk: path -> gone_at."""
    with sqlite3.connect(state / "seen-files.sqlite") as db:
        rows = dict(db.execute("SELECT path, gone_at FROM seen"))
    db.close()
    return rows


def test_folder_memory_holds_what_the_folder_holds_and_a_returning_file_is_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak's leak: a gateway whose inbox turns over 15 frames/s kept every file it ever
    saw in memory for 30 days. Files gone at a check leave memory (the disk still knows them),
    so a card pulled and put back, or a sync tool's round trip, repeats nothing."""
    monkeypatch.setattr("agent.sources.files._PRUNE_AFTER_SEEN", 0)  # a check at every poll
    folder, state, card, now = tmp_path / "in", tmp_path / "state", tmp_path / "card", time.time()
    kept = write(folder / "kept.jpg", jpeg(), now - 30)
    away = [write(folder / f"{n}.jpg", jpeg(), now - 20 + i) for i, n in enumerate("ab")]
    source = FolderSource(cfg("folder", folder), state_dir=state)
    drain = Drain(source)
    drain.wait(lambda items: len(items) == 3)
    card.mkdir()
    for path in away:
        path.rename(card / path.name)  # keeps size and mtime
    drain.wait(lambda _: len(source._seen) == 1)
    assert source._seen == {("kept.jpg", kept.stat().st_size, kept.stat().st_mtime_ns)}
    assert seen_rows(state)["kept.jpg"] is None
    assert all(seen_rows(state)[p.name] is not None for p in away)
    (card / "a.jpg").rename(folder / "a.jpg")  # back while the agent watches
    drain.wait(lambda _: len(source._seen) == 2)
    drain.stopped()
    source.close()
    assert names(drain.items) == ["kept.jpg", "a.jpg", "b.jpg"]
    assert seen_rows(state)["a.jpg"] is None
    # A restart loads only what the folder held; b.jpg back after it is not repeated either.
    (card / "b.jpg").rename(folder / "b.jpg")
    restarted = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    assert {key[0] for key in restarted._seen} == {"kept.jpg", "a.jpg"}
    assert Drain(restarted).finish() == []
    restarted.close()
    assert set(seen_rows(state).values()) == {None}


def test_more_files_gone_at_one_check_than_the_record_keeps_cost_only_the_excess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check marks all it misses at one time: the count bound cut at a time deleted the
    whole batch at its line, and a card of more than _KEEP_GONE files pulled at once was
    forgotten entirely, to be analysed again when put back (a reviewer's finding)."""
    monkeypatch.setattr("agent.sources.files._KEEP_GONE", 3)
    folder, state, card, now = tmp_path / "in", tmp_path / "state", tmp_path / "card", time.time()
    photos = [write(folder / f"{i}.jpg", jpeg(), now - 60 + i) for i in range(5)]
    assert len(run_folder(folder, state)) == 5
    card.mkdir()
    for photo in photos:
        photo.rename(card / photo.name)  # the card pulled: all gone at the next check
    assert run_folder(folder, state) == []
    assert len(seen_rows(state)) == 3
    for photo in photos:
        (card / photo.name).rename(photo)  # and put back
    assert len(run_folder(folder, state)) == 2  # the excess only


def test_a_sub_folder_that_cannot_be_listed_is_out_of_sight_not_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the folder itself was guarded: a camera's share mounted under the inbox, down at
    a check, had its files marked gone; past _KEEP_GONE newer gone files (4.6 h at 15
    frames/s) they would be analysed and published again when it came back."""
    monkeypatch.setattr("agent.sources.files._PRUNE_AFTER_SEEN", 0)  # a check at every poll
    folder, state, now = tmp_path / "in", tmp_path / "state", time.time()
    for i, name in enumerate(["cam1/a.jpg", "cam2/b.jpg", "cam2/c.jpg"]):
        write(folder / name, jpeg(), now - 30 + i)
    source = FolderSource(cfg("folder", folder, recursive=True), state_dir=state)
    drain = Drain(source)
    drain.wait(lambda items: len(items) == 3)
    real_scandir = os.scandir
    down = threading.Event()

    def scandir(top: str) -> Any:
        if top.endswith("cam2"):
            down.set()
            raise OSError(116, "Stale file handle")
        return real_scandir(top)

    with caplog.at_level(logging.INFO, logger="agent.sources.files"):
        monkeypatch.setattr(os, "scandir", scandir)
        (folder / "cam1" / "a.jpg").unlink()
        drain.wait(lambda _: down.is_set() and len(source._seen) == 2)
        time.sleep(0.2)  # polls go on while it is down: said once
        monkeypatch.setattr(os, "scandir", real_scandir)
        drain.wait(lambda _: "listed again" in caplog.text)
    drain.stopped()
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "cam2/" in m] == [
        f"{folder}: cannot list cam2/, skipped until it can be: [Errno 116] Stale file handle",
        f"{folder}: cam2/ listed again",
    ]
    source.close()
    assert {key[0] for key in source._seen} == {"cam2/b.jpg", "cam2/c.jpg"}
    rows = seen_rows(state)
    assert rows["cam2/b.jpg"] is None and rows["cam2/c.jpg"] is None
    assert rows["cam1/a.jpg"] is not None  # really gone
    assert names(drain.items) == ["cam1/a.jpg", "cam2/b.jpg", "cam2/c.jpg"]


def test_a_sub_folder_deleted_during_a_walk_is_gone_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation script deleting last hour's folder between the listing of its parent and
    its own was warned about as unlistable, and its files kept as if out of sight."""
    monkeypatch.setattr("agent.sources.files._PRUNE_AFTER_SEEN", 0)
    folder, state = tmp_path / "in", tmp_path / "state"
    write(folder / "h13" / "a.jpg", jpeg(), time.time() - 30)
    assert names(run_folder(folder, state, recursive=True)) == ["h13/a.jpg"]
    real_scandir = os.scandir

    def scandir(top: str) -> Any:
        if top.endswith("h13"):
            raise FileNotFoundError(2, "No such file or directory", top)
        return real_scandir(top)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.INFO, logger="agent.sources.files"):
        assert run_folder(folder, state, recursive=True) == []
    assert "cannot list" not in caplog.text
    assert seen_rows(state)["h13/a.jpg"] is not None  # gone


def test_folder_record_keeps_only_the_most_recently_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk is bounded too: beyond _KEEP_GONE records of gone files, the longest gone go,
    and a record left mostly free pages by that is compacted."""
    monkeypatch.setattr("agent.sources.files._KEEP_GONE", 2)
    folder, state = tmp_path / "in", tmp_path / "state"
    write(folder / "here.jpg", jpeg(), time.time() - 60)
    assert names(run_folder(folder, state)) == ["here.jpg"]
    day, record = 86400.0, state / "seen-files.sqlite"
    with sqlite3.connect(record) as db:
        for age, name in enumerate(["newest", "newer", "older", "oldest"], start=1):
            gone_at = time.time() - age * day
            db.execute("INSERT INTO seen VALUES (?, 1, 2, 0.0, ?)", (f"{name}.jpg", gone_at))
        earlier = ((f"cam/IMG_{i:06d}.jpg", time.time() - 5 * day) for i in range(5000))
        db.executemany("INSERT INTO seen VALUES (?, 1, 2, 0.0, ?)", earlier)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before = record.stat().st_size
    with caplog.at_level(logging.INFO, logger="agent.sources.files"):
        assert run_folder(folder, state) == []
    assert set(seen_rows(state)) == {"here.jpg", "newest.jpg", "newer.jpg"}
    assert "forgot 5002 file(s) gone from the folder" in caplog.text
    assert record.stat().st_size < before / 10


def test_folder_record_from_before_gone_at_is_upgraded(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    old = write(folder / "old.jpg", jpeg(), time.time() - 60).stat()
    state.mkdir()
    with sqlite3.connect(state / "seen-files.sqlite") as db:
        db.execute(
            "CREATE TABLE seen (path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER "
            "NOT NULL, seen_at REAL NOT NULL, PRIMARY KEY (path, size, mtime_ns))"
        )
        db.execute("INSERT INTO seen VALUES ('old.jpg', ?, ?, 1.0)", (old.st_size, old.st_mtime_ns))
    db.close()
    write(folder / "new.jpg", jpeg(), time.time() - 30)
    assert names(run_folder(folder, state)) == ["new.jpg"]  # old.jpg stays seen
    assert names(run_folder(folder, state)) == []  # and new.jpg was recorded


def test_a_quiet_folder_is_not_walked_at_every_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inbox of analysed photos was walked, one stat per file, at every poll. Now a folder
    whose mtime has not moved is listed only every _QUIET_WALK_S; a new photo changes the
    folder's mtime and is found at the next poll, a photo rewritten in place at the next walk."""
    folder, state = tmp_path / "in", tmp_path / "state"
    for i in range(3):
        write(folder / f"old{i}.jpg", jpeg(), time.time() - 100 + i)
    assert len(run_folder(folder, state)) == 3
    listings = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda top: listings.append(top) or real(top))
    source = FolderSource(cfg("folder", folder), state_dir=state)
    drain = Drain(source)
    time.sleep(0.5)  # about 10 polls of 0.05 s
    assert len(listings) <= 2, listings  # the first walk (and the hourly prune's)
    write(folder / "new.jpg", jpeg(), time.time() - 5)
    drain.wait(lambda items: len(items) == 1)
    assert names(drain.items) == ["new.jpg"]
    found_at = source._walked_at
    deadline = time.monotonic() + 5  # the walk after a delivery is full; then it is quiet
    while source._walked_at == found_at and time.monotonic() < deadline:
        time.sleep(0.01)
    mtime = folder.stat().st_mtime_ns
    write(folder / "old0.jpg", jpeg(level=40))  # rewritten in place: the folder's mtime stays
    assert folder.stat().st_mtime_ns == mtime
    time.sleep(0.3)
    assert len(drain.items) == 1  # not seen before the next full walk ...
    monkeypatch.setattr("agent.sources.files._QUIET_WALK_S", 0.2)
    drain.wait(lambda items: len(items) == 2)  # ... which finds it
    drain.stopped()
    source.close()
    assert names(drain.items) == ["new.jpg", "old0.jpg"]


def test_folder_refuses_symlinks_that_escape(tmp_path: Path) -> None:
    folder, now = tmp_path / "in", time.time()
    outside = write(tmp_path / "secret.jpg", jpeg())
    write(folder / "real.jpg", jpeg(), now - 20)
    (folder / "inside.jpg").symlink_to(folder / "real.jpg")
    (folder / "escape.jpg").symlink_to(outside)
    os.utime(folder / "escape.jpg", ns=(int((now - 10) * 1e9),) * 2, follow_symlinks=False)
    items = run_folder(folder, tmp_path / "state")
    failed = [i for i in items if isinstance(i, Failed)]
    assert len(failed) == 1 and "outside the folder" in failed[0].reason
    assert sorted(i.name for i in items if isinstance(i, Frame)) == ["inside.jpg", "real.jpg"]


def test_folder_watch_ends_promptly_on_stop(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    config = cfg("folder", folder).model_copy(update={"poll_s": 30.0})
    source = FolderSource(config, state_dir=tmp_path / "state")
    drain = Drain(source)
    time.sleep(0.1)
    assert drain.thread.is_alive()  # nothing there, but it keeps watching
    assert drain.stopped(within=0.5) < 0.5
    source.close()
    assert source.stats.state == "closed"


def test_max_fps_paces_file_sources(tmp_path: Path) -> None:
    for n in range(4):
        write(tmp_path / f"{n}.jpg", jpeg())
    source = GlobSource(cfg("glob", tmp_path / "*.jpg", max_fps=20.0))
    start = time.monotonic()
    assert len(Drain(source).finish()) == 4
    assert time.monotonic() - start >= 0.14  # three gaps of 50 ms


# --- image lists ----------------------------------------------------------------------------


def test_glob_delivers_sorted_matches_once_then_ends(tmp_path: Path) -> None:
    write(tmp_path / "set" / "b.jpg", jpeg())
    write(tmp_path / "set" / "a.jpg", jpeg())
    write(
        tmp_path / "set" / "deep" / "c.png",
        cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes(),
    )
    write(tmp_path / "set" / "readme.md", b"# not an image")
    source = GlobSource(cfg("glob", tmp_path / "set" / "**" / "*"))
    items = Drain(source).finish()
    assert names(items) == ["a.jpg", "b.jpg", "deep/c.png"]
    assert source.stats.state == "done" and not source.live
    assert all(isinstance(i, Frame) and i.data for i in items)


def test_list_file_keeps_its_order_and_reports_missing_entries(tmp_path: Path) -> None:
    write(tmp_path / "photos" / "z.jpg", jpeg())
    write(tmp_path / "photos" / "a.jpg", jpeg())
    absolute = write(tmp_path / "elsewhere" / "m.jpg", jpeg())
    listing = tmp_path / "photos" / "list.txt"
    listing.write_text(f"# survey 7\nz.jpg\n\n  a.jpg  \nmissing.jpg\n{absolute}\nz.jpg\n")
    items = Drain(open_source(cfg("glob", listing), state_dir=tmp_path)).finish()
    assert names(items) == ["z.jpg", "a.jpg", f"FAILED {listing.parent / 'missing.jpg'}", "m.jpg"]
    assert isinstance(items[2], Failed) and "cannot read" in items[2].reason


def test_a_glob_walks_each_real_folder_once_and_takes_each_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """glob.glob's `**` followed `site/up -> ..` (camera upload trees have such links): one
    photo came 41 times, and two such links kept the start from returning at all."""
    root = tmp_path / "set"
    write(root / "site" / "a.jpg", jpeg())
    write(tmp_path / "card" / "deep" / "c.jpg", jpeg())
    (root / "card").symlink_to(tmp_path / "card")  # a link, no loop: followed as before
    write(root / "site" / ".thumb.jpg", jpeg())  # hidden: as glob.glob, not matched by `*`
    (root / "site" / "up").symlink_to("..")
    (root / "site" / "again").symlink_to("..")
    (root / "b.jpg").symlink_to(root / "site" / "a.jpg")  # the same file twice: once
    (root / "caf\udce9.jpg").write_bytes(jpeg())  # bytes a Windows zip left: not UTF-8
    made: list[GlobSource] = []  # in a thread: a glob that never returns fails, not hangs
    with caplog.at_level(logging.ERROR, logger="agent.sources.files"):
        maker = threading.Thread(
            target=lambda: made.append(GlobSource(cfg("glob", root / "**" / "*.jpg"))), daemon=True
        )
        maker.start()
        maker.join(20)
    assert made, "the glob never returned"
    assert names(Drain(made[0]).finish()) == ["b.jpg", "card/deep/c.jpg"]  # b.jpg: first, sorted
    assert "is not UTF-8; skipped (rename it)" in caplog.text
    below = Drain(GlobSource(cfg("glob", root / "site" / "**"))).finish()
    assert names(below) == ["a.jpg"]  # up and again lead back up the tree: not walked
    with pytest.raises(SourceError, match="matches no image files"):  # folders only
        GlobSource(cfg("glob", f"{root}/site/"))
    hidden = GlobSource(cfg("glob", root / "site" / ".*.jpg"))  # named: matched
    assert names(Drain(hidden).finish()) == [".thumb.jpg"]
    inside = GlobSource(cfg("glob", root / "site" / "**.jpg"))  # `**` in a part: as `*`
    assert names(Drain(inside).finish()) == ["a.jpg"]
    for nothing in (".", "/"):
        with pytest.raises(SourceError, match="matches no image files"):
            GlobSource(cfg("glob", nothing))


def test_a_glob_file_that_cannot_be_looked_at_is_skipped_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that can be listed but not searched (r--) made is_file() raise, which ended
    the start."""
    write(tmp_path / "set" / "a.jpg", jpeg())
    write(tmp_path / "set" / "b.jpg", jpeg())
    real = Path.is_file

    def is_file(self: Path) -> bool:
        if self.name == "a.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with caplog.at_level(logging.ERROR, logger="agent.sources.files"):
        source = GlobSource(cfg("glob", tmp_path / "set" / "*.jpg"))
    assert names(Drain(source).finish()) == ["b.jpg"]
    assert f"{tmp_path / 'set' / 'a.jpg'}: cannot read (Permission denied); skipped" in caplog.text


def test_a_list_saved_with_a_byte_order_mark_keeps_its_first_photo(tmp_path: Path) -> None:
    """Notepad and PowerShell 5 write UTF-8 with a BOM: it stuck to the first path, which
    then "could not be read" although it looked right and existed."""
    write(tmp_path / "a.jpg", jpeg())
    write(tmp_path / "b.jpg", jpeg())
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nb.jpg\n", encoding="utf-8-sig")
    assert names(Drain(GlobSource(cfg("glob", listing))).finish()) == ["a.jpg", "b.jpg"]


# --- video file -----------------------------------------------------------------------------


def test_video_file_delivers_every_frame_in_order(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    levels = list(range(20, 240, 20))
    for level in levels:
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()

    source = open_source(cfg("video", path), state_dir=tmp_path, decode_long_side=32)
    assert isinstance(source, VideoSource) and not source.live
    items = Drain(source).finish()
    source.close()
    assert len(items) == len(levels) and all(isinstance(i, Frame) for i in items)
    frames = [i for i in items if isinstance(i, Frame)]
    assert [round(float(f.image.mean()) / 20) for f in frames] == [round(v / 20) for v in levels]
    assert {(f.full_size, f.image.shape, f.data) for f in frames} == {((64, 48), (24, 32, 3), None)}
    assert [f.name for f in frames[:2]] == ["frame-0", "frame-1"]
    assert source.stats.state == "closed" and source.stats.delivered == len(levels)


def test_a_video_read_that_blocks_is_seen_by_the_watchdog(tmp_path: Path) -> None:
    """A read of a video on a hung mount ran outside the source's I/O mark: the loop looked
    alive, so the watchdog never restarted the agent and SIGTERM's stop was never seen."""
    (tmp_path / "clip.avi").write_bytes(b"stands in")
    released = threading.Event()

    class Hung(FakeCamera):
        def read(self) -> tuple[bool, np.ndarray | None]:
            released.wait(10)
            return False, None

    source = VideoSource(cfg("video", tmp_path / "clip.avi"), capture=lambda _: Hung())
    drain = Drain(source)
    try:
        time.sleep(0.2)
        assert source.stats.io_since is not None  # what the heartbeat's hang check reads
    finally:
        released.set()
    drain.finish()
    assert source.stats.io_since is None


# --- live sources with a stand-in camera ----------------------------------------------------


def numbered(n: int) -> np.ndarray:
    image = np.zeros((2, 8, 3), np.uint8)
    image[0, :, 0] = np.frombuffer(struct.pack("<q", n), np.uint8)
    return image


def number(frame: Frame | Failed) -> int:
    assert isinstance(frame, Frame)
    return int(struct.unpack("<q", frame.image[0, :, 0].tobytes())[0])


class FakeCamera:
    """Frames numbered 1, 2, ... every `period` s; fails after `frames` reads if given."""

    def __init__(self, frames: int | None = None, period: float = 0.002, opens: bool = True):
        self.frames, self.period, self.opens = frames, period, opens
        self.produced = 0
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802
        return self.opens and not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(self.period)
        if self.frames is not None and self.produced >= self.frames:
            return False, None
        self.produced += 1
        return True, numbered(self.produced)

    def release(self) -> None:
        self.released = True


def grabbers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("grab ")]


def live(factory: Callable[[int | str], Any], **kw: Any) -> LiveSource:
    config = SourceConfig(kind="stream", uri="rtsp://admin:hunter2@10.0.0.9/live", **kw)
    return LiveSource(config, capture=factory)


def test_live_source_hands_over_the_newest_frame_and_counts_drops() -> None:
    camera = FakeCamera()
    source = live(lambda target: camera)
    assert source.live and source.uri == "rtsp://admin:***@10.0.0.9/live"
    stop = threading.Event()
    frames = source.frames(stop)
    first = number(next(frames))
    time.sleep(0.15)  # the analysis is slow; the camera is not
    produced = camera.produced
    second = number(next(frames))
    assert second >= produced - 1 and second - first > 10  # newest, not the next in line
    stop.set()
    assert list(frames) == []  # ends on stop, and stops its grabber thread
    assert not grabbers() and camera.released
    stats = source.stats
    assert stats.delivered == 2
    assert camera.produced - 2 - 1 <= stats.dropped <= camera.produced - 2
    assert stats.last_frame_at is not None and stats.state == "open"
    source.close()
    assert stats.state == "closed"


def test_live_source_close_stops_the_grabber_of_a_running_loop() -> None:
    source = live(lambda target: FakeCamera(period=0.1))
    drain = Drain(source)
    drain.wait(lambda items: len(items) >= 2)
    source.close()
    assert not grabbers()
    drain.stopped()


def test_live_source_reopens_with_backoff_and_never_ends_on_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agent.sources.video._STABLE_S", 0.0)  # 3 frames count as recovered
    attempts: list[float] = []
    steps: list[FakeCamera | Exception] = [RuntimeError("no such device")]
    steps += [FakeCamera(opens=False), FakeCamera(frames=3)] + [FakeCamera(opens=False)] * 5
    script = iter(steps)

    def factory(target: int | str) -> FakeCamera:
        assert target == "rtsp://admin:hunter2@10.0.0.9/live"  # the real uri, not the mask
        attempts.append(time.monotonic())
        step = next(script, None) or FakeCamera(frames=0)
        if isinstance(step, Exception):
            raise step
        return step

    source = live(factory, reopen_min_s=0.04, reopen_max_s=0.16)
    drain = Drain(source)
    drain.wait(lambda items: len(attempts) >= 9)
    assert source.stats.state == "reopening" and drain.thread.is_alive()
    drain.stopped()

    gaps = np.diff(attempts)
    assert gaps[0] >= 0.04 and gaps[1] >= 0.08  # exponential ...
    assert 0.04 <= gaps[2] < 0.12  # ... and back to the minimum after frames flowed
    assert all(gap <= 0.16 + 0.1 for gap in gaps)  # never longer than reopen_max_s
    assert source.stats.reopens == len(attempts) - 1
    got = [number(i) for i in drain.items]  # the third attempt's frames, newest first
    assert got and got == sorted(set(got)) and got[-1] == 3
    assert source.stats.delivered + source.stats.dropped == 3


def test_flapping_stream_keeps_backing_off_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that drops after a frame or two was back for no time: reopening it at the
    minimum wait each time meant two reconnects a second and a warning each."""
    attempts: list[float] = []

    def factory(target: int | str) -> FakeCamera:
        attempts.append(time.monotonic())
        return FakeCamera(frames=1)

    source = live(factory, reopen_min_s=0.02, reopen_max_s=0.16)
    with caplog.at_level(logging.INFO, logger="agent.sources.video"):
        drain = Drain(source)
        drain.wait(lambda items: len(attempts) >= 6, timeout=10)
        drain.stopped()
    gaps = np.diff(attempts)
    assert gaps[1] >= 0.04 and gaps[2] >= 0.08 and gaps[4] >= 0.16  # doubling to the cap
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_live_source_is_paced_by_max_fps() -> None:
    source = live(lambda target: FakeCamera(), max_fps=10.0)
    stop = threading.Event()
    frames = source.frames(stop)
    start = time.monotonic()
    for _ in range(4):
        next(frames)
    assert time.monotonic() - start >= 0.28
    stop.set()
    assert list(frames) == []


# --- a real MJPEG stream over HTTP that goes away and comes back ----------------------------


class MjpegServer:
    """multipart/x-mixed-replace on 127.0.0.1, one JPEG every 20 ms, restartable on its port."""

    def __init__(self) -> None:
        self.port = 0
        self.level = 0
        self.halt = threading.Event()
        self.server: socketserver.TCPServer | None = None

    def start(self, level: int) -> None:
        self.level, self.halt = level, threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                halt, frame = owner.halt, jpeg(owner.level)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                while not halt.wait(0.02):
                    try:
                        self.wfile.write(head % len(frame) + frame + b"\r\n")
                    except OSError:
                        return

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.halt.set()  # ends the open response, as a camera that reboots would
        self.server.shutdown()
        self.server.server_close()


def test_real_http_mjpeg_stream_is_reopened_after_it_disappears() -> None:
    server = MjpegServer()
    server.start(level=40)
    config = SourceConfig(
        kind="stream",
        uri=f"http://viewer:pw@127.0.0.1:{server.port}/stream.mjpg",
        reopen_min_s=0.05,
        reopen_max_s=0.2,
    )
    source = open_source(config, state_dir=Path("unused"), decode_long_side=32)
    assert isinstance(source, LiveSource)
    assert source.uri == f"http://viewer:***@127.0.0.1:{server.port}/stream.mjpg"
    drain = Drain(source)

    def levels(items: list[Frame | Failed]) -> set[int]:
        return {round(float(i.image.mean()) / 20) * 20 for i in items if isinstance(i, Frame)}

    try:
        drain.wait(lambda items: len(items) >= 3)
        assert source.stats.state == "open"
        server.stop()
        drain.wait(lambda items: source.stats.reopens >= 2)  # refused while it is down
        assert source.stats.state == "reopening"
        server.start(level=200)
        drain.wait(lambda items: 200 in levels(items))
        assert source.stats.state == "open"
    finally:
        drain.stopped(within=2.0)
        server.stop()
    frame = drain.items[-1]
    assert isinstance(frame, Frame) and frame.full_size == (64, 48) and frame.data is None
    assert frame.image.shape == (24, 32, 3) and frame.source == source.uri
    assert levels(drain.items) == {40, 200}


# --- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "uri", "message"),
    [
        ("folder", "/dev/null", "not a folder"),
        ("video", "no/such/clip.avi", "video file not found"),
        ("glob", "no/such/*.jpg", "matches no image files"),
        ("camera", "front-door", "a camera is an index"),
        ("stream", "ftp://user:secret@cam/x", "rtsp://"),
        ("stream", "http://[::1/x", "rtsp://"),
    ],
)
def test_bad_configurations_fail_at_open_naming_the_uri(
    tmp_path: Path, kind: SourceKind, uri: str, message: str
) -> None:
    with pytest.raises(SourceError, match=message) as caught:
        open_source(SourceConfig(kind=kind, uri=uri), state_dir=tmp_path)
    assert mask_uri(uri) in str(caught.value) and "secret" not in str(caught.value)


def test_a_folder_not_there_at_start_is_watched_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A card or mount not up at boot made the start fail; a supervisor gave up after a few
    restarts, though a folder that vanishes while running was always waited for. The wait is
    said once, and its end too (a user walk saw a second warning, and nothing at the end)."""
    inbox = tmp_path / "media" / "inbox"
    with caplog.at_level(logging.INFO, logger="agent.sources.files"):
        source = open_source(cfg("folder", inbox), state_dir=tmp_path / "state")
        drain = Drain(source)
        try:
            time.sleep(0.2)
            write(inbox / "a.jpg", jpeg())
            drain.wait(lambda items: len(items) == 1)
            assert names(drain.items) == ["a.jpg"]
        finally:
            drain.stopped()
            source.close()
    said = [r.getMessage().removeprefix(f"{inbox}: ") for r in caplog.records]
    assert said == ["folder not there (yet); watching for it", "folder there; watching it"]


def test_a_file_that_is_not_a_video_fails_at_open(tmp_path: Path) -> None:
    clip = write(tmp_path / "clip.avi", b"not a video at all")
    with pytest.raises(SourceError, match=r"clip\.avi: not a video"):
        open_source(cfg("video", clip), state_dir=tmp_path)


def test_a_camera_that_is_not_up_yet_is_no_error(tmp_path: Path) -> None:
    for uri in ("0", "/dev/video42"):
        source = open_source(SourceConfig(kind="camera", uri=uri), state_dir=tmp_path)
        assert source.live and source.stats.state == "starting"


def test_mask_uri_hides_passwords_and_secret_parameters() -> None:
    assert mask_uri("rtsp://u:p%40ss@cam:554/s?x=1") == "rtsp://u:***@cam:554/s?x=1"
    assert mask_uri("https://cam/s.mjpg?user=a&password=b&api_key=c") == (
        "https://cam/s.mjpg?user=a&password=***&api_key=***"
    )
    assert mask_uri("rtsp://cam/stream") == "rtsp://cam/stream"


# --- EXIF -----------------------------------------------------------------------------------


def frame_of(tmp_path: Path, data: bytes) -> Frame:
    path = write(tmp_path / f"{len(list(tmp_path.iterdir()))}.jpg", data)
    (item,) = Drain(GlobSource(cfg("glob", path))).finish()
    assert isinstance(item, Frame), item
    return item


def test_exif_time_with_offset_and_gps_reach_the_frame(tmp_path: Path) -> None:
    exif = [TAKEN, ascii_tag(0x9011, "+02:00"), ascii_tag(0x9291, "25")]
    frame = frame_of(tmp_path, with_exif(jpeg(), exif, SYDNEY))
    assert frame.captured_at == datetime(2024, 5, 6, 5, 8, 9, 250000, tzinfo=UTC)
    assert frame.gps is not None
    assert frame.gps.lat == pytest.approx(-(33 + 51 / 60 + 54.5 / 3600))
    assert frame.gps.lon == pytest.approx(151 + 12 / 60 + 36 / 3600)
    assert frame.gps.alt == pytest.approx(-58.5)


def test_exif_time_without_offset_is_local_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        frame = frame_of(tmp_path, with_exif(jpeg(), [TAKEN]))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert frame.captured_at == datetime(2024, 5, 6, 12, 8, 9, tzinfo=UTC)
    assert frame.gps is None


@pytest.mark.parametrize(
    ("zone", "utc"),
    [
        ("Australia/Sydney", datetime(2024, 5, 5, 21, 8, 9, tzinfo=UTC)),  # AEST, +10:00
        ("America/New_York", datetime(2024, 5, 6, 11, 8, 9, tzinfo=UTC)),  # EDT: DST, -04:00
        ("+05:30", datetime(2024, 5, 6, 1, 38, 9, tzinfo=UTC)),
        ("UTC", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ],
)
def test_exif_time_without_offset_is_in_the_cameras_zone_when_one_is_set(
    tmp_path: Path, zone: str, utc: datetime
) -> None:
    """A gateway running in UTC read a camera's local clock as UTC: hours off."""
    path = write(tmp_path / "a.jpg", with_exif(jpeg(), [TAKEN]))
    (item,) = Drain(GlobSource(cfg("glob", path, camera_tz=zone))).finish()
    assert isinstance(item, Frame) and item.captured_at == utc
    tagged = write(tmp_path / "b.jpg", with_exif(jpeg(), [TAKEN, ascii_tag(0x9011, "+02:00")]))
    (item,) = Drain(GlobSource(cfg("glob", tagged, camera_tz=zone))).finish()
    assert isinstance(item, Frame)  # the photo's own offset wins
    assert item.captured_at == datetime(2024, 5, 6, 5, 8, 9, tzinfo=UTC)


def test_exif_digitized_time_stands_in_for_a_missing_original(tmp_path: Path) -> None:
    """A camera that writes only DateTimeDigitized got the file's time (a user walk)."""
    digitized = [ascii_tag(0x9004, "2024:05:06 07:08:09"), ascii_tag(0x9012, "+02:00")]
    frame = frame_of(tmp_path, with_exif(jpeg(), digitized))
    assert frame.captured_at == datetime(2024, 5, 6, 5, 8, 9, tzinfo=UTC)
    both = [TAKEN, ascii_tag(0x9004, "2020:01:01 00:00:00"), ascii_tag(0x9011, "+02:00")]
    frame = frame_of(tmp_path, with_exif(jpeg(), both))  # the original wins
    assert frame.captured_at == datetime(2024, 5, 6, 5, 8, 9, tzinfo=UTC)
    edited = [ascii_tag(0x0132, "2020:01:01 00:00:00")]  # IFD0 DateTime: when edited
    assert read_exif(with_exif(jpeg(), [], ifd0=edited)).taken_at is None


def test_a_zone_name_on_a_system_without_a_tz_database_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A minimal gateway image without tzdata rejected Australia/Sydney as misspelt."""
    monkeypatch.setattr(agent.exif, "ZoneInfo", lambda key: (_ for _ in ()).throw(
        agent.exif.ZoneInfoNotFoundError(key)))  # fmt: skip
    monkeypatch.setattr(agent.exif, "available_timezones", set)
    with pytest.raises(ValueError, match="this system has no tz database: install tzdata"):
        agent.exif.camera_zone("Australia/Sydney")
    assert agent.exif.camera_zone("+10:00") is not None  # an offset needs none


@pytest.mark.parametrize(
    ("data", "local"),
    [
        pytest.param(
            app1(jpeg(), b"MM\0*\xff\xff\xff\x00" + bytes(range(256))), False, id="offset"
        ),
        pytest.param(app1(jpeg(), b"II*\0\x08\0\0\0\xff\xff" + b"\x07" * 64), False, id="count"),
        pytest.param(app1(jpeg(), b"MM"), False, id="truncated"),
        pytest.param(
            with_exif(jpeg(), [ascii_tag(0x9003, "0000:00:00 00:00:00")], SYDNEY[1:]),
            False,
            id="zero-date-no-ref",
        ),
        pytest.param(
            with_exif(jpeg(), [ascii_tag(0x9003, "garbage")], [*SYDNEY[:1], rationals(2, (1, 0))]),
            False,
            id="zero-denominator",
        ),
        pytest.param(
            with_exif(
                jpeg(),
                [TAKEN, ascii_tag(0x9011, "+99:99")],
                [*SYDNEY[:1], rationals(2, (95, 1)), *SYDNEY[2:4]],
            ),
            True,
            id="impossible-offset-and-latitude",
        ),
    ],
)
def test_garbage_exif_falls_back_to_clock_and_no_gps(
    tmp_path: Path, data: bytes, local: bool
) -> None:
    before = datetime.now(UTC)
    frame = frame_of(tmp_path, data)
    assert frame.gps is None
    if local:
        assert frame.captured_at == datetime(2024, 5, 6, 7, 8, 9).astimezone(UTC)
    else:
        assert before <= frame.captured_at <= datetime.now(UTC)


def test_exif_that_would_take_millions_of_reads_is_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """exifread reads a tag's values one at a time: 300 entries of 999 values each (a 4 KB
    IFD, pointing at itself) kept it reading for seconds per photo, a zip of them for hours."""
    entries = [(0xA000 + i, 5, 999, b"\0\0\0\x08") for i in range(300)]
    hostile = with_exif(jpeg(), [TAKEN, *entries])
    reads = 0
    real = agent.exif.exifread.process_file

    def counted(fh: Any, **kw: Any) -> Any:
        def read(*args: Any) -> bytes:
            nonlocal reads
            reads += 1
            return bytes(original(*args))

        original, fh.read = fh.read, read
        return real(fh, **kw)

    monkeypatch.setattr(agent.exif.exifread, "process_file", counted)
    assert read_exif(hostile) == PhotoMeta(None, None)
    assert reads <= agent.exif.MAX_READS + 1
    reads = 0
    assert read_exif(with_exif(jpeg(), [TAKEN], SYDNEY)).gps is not None  # a camera's: read
    assert reads < 100


def test_photos_without_exif_do_not_spam_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    for data in (jpeg(), png, b"\x00" * 10):
        assert read_exif(data).taken_at is None
    frame_of(tmp_path, jpeg())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_detection_the_outbox_refuses_leaves_its_file_unseen(
    tmp_path: Path, logistic_model: Path
) -> None:
    """An outbox error (locked past its wait, disk full) was counted as a bad frame and the
    folder then marked the file seen: its detection was lost for good."""
    from agent.capture import Capturer
    from agent.config import CategoryLimits, RateLimit, UploadConfig
    from agent.contract.messages import Topics
    from agent.engine.classifier import ColourModel
    from agent.engine.detector import Detector
    from agent.health import FrameStats, Heartbeat, SdNotify
    from agent.outbox import Outbox
    from agent.pipeline import FrameLoop
    from agent.policy import Policy
    from agent.spool import Spool

    folder, state = tmp_path / "in", tmp_path / "state"
    folder.mkdir()
    write(folder / "a.jpg", jpeg(90))
    outbox = Outbox(tmp_path / "outbox.sqlite")

    def loop(source: FolderSource) -> FrameLoop:
        return FrameLoop(
            source=source,
            detector=Detector(ColourModel.load(logistic_model)),
            outbox=outbox,
            topics=Topics("corrosion/d/"),
            device_id="d",
            stats=FrameStats(),
            heartbeat=Heartbeat(),
            notify=SdNotify(None),
        )

    def locked(*_: Any, **__: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    free = RateLimit()
    upload = UploadConfig(
        enabled=True,
        bucket="captures",
        sample_fraction=1.0,
        dedupe_diff=0.0,
        limits=CategoryLimits(snapshot=free, flagged=free, near_threshold=free, sample=free),
    )
    spool = Spool(tmp_path / "spool", 1 << 30)
    failing = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    broken = loop(failing)
    broken.capturer = Capturer(
        upload, device_id="d", policy=Policy(upload), spool=spool, on_stored=lambda: None
    )
    broken.outbox = cast(Outbox, type("Locked", (), {"put": staticmethod(locked)})())
    with pytest.raises(sqlite3.OperationalError):
        broken.run(threading.Event())
    failing.close()
    # its capture went with it: it would have uploaded under an id never published
    assert spool.depth == 0 and not list((tmp_path / "spool").glob("*.jpg"))
    again = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    loop(again).run(threading.Event())  # after a restart: the same file, committed now
    assert outbox.depth == 1


def test_a_file_name_that_is_not_utf8_is_named_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`Br\\xfccke.jpg` (unzipped from a Windows archive) made the seen record raise: the
    agent died at every start, and the files behind it were never read."""
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"Br\xfccke.jpg"), "wb") as fh:
        fh.write(jpeg(90))
    os.mkdir(os.path.join(os.fsencode(folder), b"Pr\xfcfung"))  # not watched: not reported
    write(folder / "b.jpg", jpeg(60))
    source = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=tmp_path / "s")
    names = [f.name for f in source.frames(threading.Event()) if isinstance(f, Frame)]
    assert names == ["b.jpg"]
    assert caplog.text.count("is not UTF-8; skipped until renamed") == 1
    assert "Br\\udcfccke.jpg" in caplog.text


def test_a_record_that_cannot_be_pruned_is_named_and_nothing_is_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    write(folder / "a.jpg", jpeg(), time.time() - 30)
    source = FolderSource(cfg("folder", folder, exit_when_done=True), state_dir=state)
    assert names(Drain(source).finish()) == ["a.jpg"]
    real = source._db

    class Failing:  # a disk error once the prune writes
        in_transaction = property(lambda _: real.in_transaction)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("DELETE"):
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def executemany(self, sql: str, rows: Any) -> Any:
            return real.executemany(sql, rows)

    source._db = cast(Any, Failing())
    with caplog.at_level(logging.ERROR, logger="agent.sources.files"):
        source._forget_gone(set())  # a.jpg missing at this check
    source._db = real
    assert f"cannot prune the record of seen files in {state / 'seen-files.sqlite'}" in caplog.text
    assert len(source._seen) == 1 and seen_rows(state)["a.jpg"] is None  # rolled back whole
    source.close()
