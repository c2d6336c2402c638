"""Frame sources: cameras, streams, video files, a watched folder and image lists.

Each source yields `Frame`s until it is exhausted or the caller's stop event is set; one
unusable file yields `Failed` and costs only itself. Live sources keep just the newest frame:
an analysis slower than the camera must see what is in front of it now, not a backlog, and a
lost camera is reopened with backoff for as long as the agent runs. A watched folder records
what it has processed in SQLite, so a restart neither repeats nor skips work, and takes a file
only once its size has settled, because drones and sync tools write photos in pieces.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import re
import sqlite3
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import cv2
import numpy as np
import numpy.typing as npt

from agent import imageio
from agent.config import SourceConfig
from agent.contract.messages import Gps, SourceState
from agent.exif import read_exif

log = logging.getLogger(__name__)

Image = npt.NDArray[np.uint8]

_PARTIAL: Final = (".tmp", ".part")
_MAX_FILE_BYTES: Final = 256 * 1024**2  # no photo is this big; reading it could exhaust RAM
_STREAM_SCHEMES: Final = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})
_MAGIC: Final = re.compile(r"[*?[]")
_SECRET_PARAM: Final = re.compile(
    r"(?i)((?:^|&)[^=&]*(?:pass|pwd|token|secret|key|auth)[^=&]*=)[^&]*"
)
# FFmpeg waits 30 s by default; a stalled stream should fail its read and be reopened sooner.
_OPEN_TIMEOUT_MS: Final = 10_000
_READ_TIMEOUT_MS: Final = 5_000
_JOIN_S: Final = _READ_TIMEOUT_MS / 1000 + 1  # a grabber blocked in read() is back by then
# Keyed by the path relative to the folder, so the record survives a new mount point.
_SEEN_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS seen (path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, seen_at REAL NOT NULL, PRIMARY KEY (path, size, mtime_ns))"""


class SourceError(ValueError):
    """A source configuration that cannot work; the message names the uri."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One image to analyse, with what the message about it needs."""

    image: Image  # BGR, at most decode_long_side
    full_size: tuple[int, int]  # (w, h) as captured
    index: int
    source: str
    captured_at: datetime  # aware UTC
    gps: Gps | None
    data: bytes | None  # the file as read, uploaded unchanged; None for capture devices
    read_at: float  # time.monotonic()
    name: str


@dataclass(frozen=True)
class Failed:
    """A file that could not be used: counted and reported, never fatal."""

    source: str
    reason: str


@dataclass
class SourceStats:
    """Written by the source's threads, read by metrics; single-writer fields, no lock."""

    state: SourceState = "starting"  # never "stale": the caller decides that
    delivered: int = 0
    dropped: int = 0
    failed: int = 0
    reopens: int = 0
    last_frame_at: float | None = None  # monotonic; the caller decides staleness


class Capture(Protocol):
    """The part of cv2.VideoCapture we use, so tests can stand in for a camera."""

    def isOpened(self) -> bool: ...  # noqa: N802  (OpenCV's name)
    def read(self) -> tuple[bool, Image | None]: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[int | str], Capture]


def _video_capture(target: int | str) -> Capture:
    """VideoCapture with the backend that fits the target, and network timeouts."""
    if isinstance(target, int):
        cap = cv2.VideoCapture(target)
    elif target.startswith("/dev/"):
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
    else:
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS]
        timeouts += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, _READ_TIMEOUT_MS]
        cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)
    return cast("Capture", cap)  # frames come out as BGR uint8 (CAP_PROP_CONVERT_RGB)


def mask_uri(uri: str) -> str:
    """The uri with its password and secret-looking query values as ***, fit for logs."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    return parts._replace(query=_SECRET_PARAM.sub(r"\1***", parts.query)).geturl()


def _fit(image: Image, long_side: int | None) -> Image:
    height, width = image.shape[:2]
    if long_side is None or max(width, height) <= long_side:
        return image
    scale = long_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


class _Pacer:
    """max_fps as a minimum gap between deliveries, waited out on the stop event."""

    def __init__(self, max_fps: float | None) -> None:
        self._gap = 1.0 / max_fps if max_fps else 0.0
        self._last = -float("inf")

    def wait(self, stop: threading.Event) -> bool:
        """Wait until the next frame may go; False once stop is set."""
        delay = self._last + self._gap - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return False
        self._last = time.monotonic()
        return not stop.is_set()


class Source(ABC):
    """What every kind shares: its name, its counters and how frames are built."""

    live: bool = False

    def __init__(self, config: SourceConfig, uri: str, decode_long_side: int | None) -> None:
        if decode_long_side is not None and decode_long_side < 1:
            raise SourceError(f"{uri}: decode_long_side must be at least 1")
        self.kind: str = config.kind
        self.uri = uri
        self.stats = SourceStats()
        self._config = config
        self._long_side = decode_long_side

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        """Yield until exhausted or `stop` is set; stop is noticed within 0.2 s."""

    def close(self) -> None:
        self.stats.state = "closed"

    def _next_index(self) -> int:
        self.stats.delivered += 1
        return self.stats.delivered - 1

    def _failed(self, source: str, reason: str) -> Failed:
        self.stats.failed += 1
        return Failed(source, reason)

    def _capture_frame(self, image: Image, read_at: float, captured_at: datetime) -> Frame:
        height, width = image.shape[:2]
        index = self._next_index()
        return Frame(
            image=_fit(image, self._long_side),
            full_size=(width, height),
            index=index,
            source=self.uri,
            captured_at=captured_at,
            gps=None,
            data=None,
            read_at=read_at,
            name=f"frame-{index}",
        )

    def _file_frame(self, path: Path, name: str, data: bytes, read_at: float) -> Frame | Failed:
        """Decode and date a file; the photo's own EXIF clock wins over ours."""
        self.stats.last_frame_at = read_at
        try:
            decoded = imageio.decode(data, str(path), max_long_side=self._long_side)
        except imageio.ImageError as exc:
            return self._failed(str(path), str(exc))
        meta = read_exif(data)
        return Frame(
            image=decoded.image,
            full_size=decoded.full_size,
            index=self._next_index(),
            source=str(path),
            captured_at=meta.taken_at or datetime.now(UTC),
            gps=meta.gps,
            data=data,
            read_at=read_at,
            name=name,
        )


class VideoSource(Source):
    """A video file: every frame in order, then the end."""

    def __init__(
        self,
        config: SourceConfig,
        *,
        decode_long_side: int | None = None,
        capture: CaptureFactory = _video_capture,
    ) -> None:
        super().__init__(config, config.uri, decode_long_side)
        if not Path(config.uri).is_file():
            raise SourceError(f"{config.uri}: video file not found")
        self._cap = capture(config.uri)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"{config.uri}: not a video this OpenCV can read")

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self.stats.state = "open"
        pacer = _Pacer(self._config.max_fps)
        while pacer.wait(stop):
            ok, image = self._cap.read()
            if not ok or image is None:
                self.stats.state = "done"
                return
            self.stats.last_frame_at = read_at = time.monotonic()
            yield self._capture_frame(image, read_at, datetime.now(UTC))

    def close(self) -> None:
        self._cap.release()
        super().close()


def _live_target(config: SourceConfig) -> int | str:
    uri = config.uri.strip()
    if config.kind == "camera":
        if uri.isdigit():
            return int(uri)
        if uri.startswith("/dev/"):
            return uri
        raise SourceError(f"{uri}: a camera is an index such as 0 or a device such as /dev/video0")
    try:
        parts = urlsplit(uri)
        usable = parts.scheme.lower() in _STREAM_SCHEMES and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        usable = False
    if not usable:
        raise SourceError(f"{mask_uri(uri)}: a stream is an rtsp://, rtmp:// or http(s):// URL")
    return uri


class LiveSource(Source):
    """A camera or stream. A grabber thread reads continuously into a one-frame slot, so
    the consumer always gets the newest frame; a source that fails is reopened with
    exponential backoff, and the source never ends on its own."""

    live = True

    def __init__(
        self,
        config: SourceConfig,
        *,
        decode_long_side: int | None = None,
        capture: CaptureFactory = _video_capture,
    ) -> None:
        super().__init__(config, mask_uri(config.uri), decode_long_side)
        self._target = _live_target(config)
        self._capture = capture
        self._cond = threading.Condition()
        self._slot: tuple[Image, float, datetime] | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self._start()
        pacer = _Pacer(self._config.max_fps)
        try:
            while pacer.wait(stop):
                taken = self._take(stop)
                if taken is None:
                    return
                yield self._capture_frame(*taken)
        finally:
            self._stop()

    def close(self) -> None:
        self._stop()
        super().close()

    def _take(self, stop: threading.Event) -> tuple[Image, float, datetime] | None:
        with self._cond:
            while self._slot is None:
                if stop.is_set():
                    return None
                self._cond.wait(0.2)
            taken, self._slot = self._slot, None
        return taken

    def _start(self) -> None:
        self._stop()
        self._halt = threading.Event()  # per run, so a straggling old grabber stays halted
        self._thread = threading.Thread(
            target=self._grab, args=(self._halt,), name=f"grab {self.uri}", daemon=True
        )
        self._thread.start()

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        thread.join(_JOIN_S)
        if thread.is_alive():
            log.warning("%s: grabber still blocked in a read; it ends when that returns", self.uri)
        with self._cond:
            self._slot = None

    def _grab(self, halt: threading.Event) -> None:
        cfg = self._config
        delay = cfg.reopen_min_s
        while True:
            count = self._pump(halt)
            if halt.is_set():
                return
            if count:
                delay = cfg.reopen_min_s  # it worked for a while: a fresh outage
            self.stats.state = "reopening"
            wait = min(cfg.reopen_max_s, delay * random.uniform(1.0, 1.25))
            if count or self.stats.reopens == 0:
                what = f"ended after {count} frames" if count else "cannot be opened or read"
                log.warning("%s: %s; reopening (first wait %.1f s)", self.uri, what, wait)
            if halt.wait(wait):
                return
            delay = min(cfg.reopen_max_s, delay * 2)
            self.stats.reopens += 1

    def _pump(self, halt: threading.Event) -> int:
        """Open the capture and fill the slot until a read fails; the frames read."""
        count = 0
        cap: Capture | None = None
        try:
            cap = self._capture(self._target)
            while cap.isOpened() and not halt.is_set():
                ok, image = cap.read()
                if not ok or image is None:
                    break
                read_at = time.monotonic()
                with self._cond:
                    if self._slot is not None:
                        self.stats.dropped += 1
                    self._slot = (image, read_at, datetime.now(UTC))
                    self._cond.notify()
                self.stats.last_frame_at = read_at
                if count == 0:
                    self.stats.state = "open"
                    log.info("%s: receiving frames", self.uri)
                count += 1
        # Whatever the backend throws, the grabber must live on: the source never ends.
        except Exception as exc:
            log.warning("%s: capture error: %s", self.uri, exc)
        finally:
            if cap is not None:
                cap.release()
        return count


def _read(path: Path) -> bytes:
    """A regular file's bytes; a FIFO or device would block or never end."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise imageio.ImageError(f"{path}: not a regular file")
        if st.st_size > _MAX_FILE_BYTES:
            raise imageio.ImageError(f"{path}: {st.st_size:,} bytes is too large for an image")
        return path.read_bytes()
    except OSError as exc:
        raise imageio.ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _extensions(config: SourceConfig) -> frozenset[str]:
    return frozenset("." + e.lower().lstrip(".") for e in config.extensions)


class GlobSource(Source):
    """A fixed set of images, each delivered once, then the end. The uri is a glob pattern
    (sorted matches) or a .txt file listing one path per line (in its order, relative to it)."""

    def __init__(self, config: SourceConfig, *, decode_long_side: int | None = None) -> None:
        super().__init__(config, config.uri, decode_long_side)
        listing = Path(config.uri)
        if config.uri.endswith(".txt") and listing.is_file():
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeError) as exc:
                raise SourceError(f"{config.uri}: cannot read the list ({exc})") from exc
            entries = (s for s in map(str.strip, lines) if s and not s.startswith("#"))
            self._paths = list(dict.fromkeys(listing.parent / s for s in entries))
            self._root: Path | None = listing.parent
        else:
            wanted = _extensions(config)
            found = (Path(p) for p in glob.glob(config.uri, recursive=True))
            self._paths = sorted(p for p in found if p.suffix.lower() in wanted and p.is_file())
            parts = Path(config.uri).parts[:-1]
            fixed = list(itertools.takewhile(lambda part: not _MAGIC.search(part), parts))
            self._root = Path(*fixed) if fixed else None
        if not self._paths:
            raise SourceError(f"{config.uri}: matches no image files")

    def _name(self, path: Path) -> str:
        if self._root is not None and path.is_relative_to(self._root):
            return path.relative_to(self._root).as_posix()
        return path.name if path.is_absolute() else path.as_posix()

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self.stats.state = "open"
        pacer = _Pacer(self._config.max_fps)
        for path in self._paths:
            if not pacer.wait(stop):
                return
            try:
                data = _read(path)
            except imageio.ImageError as exc:
                yield self._failed(str(path), str(exc))
                continue
            yield self._file_frame(path, self._name(path), data, time.monotonic())
        self.stats.state = "done"


@dataclass(frozen=True)
class _File:
    rel: str  # POSIX, relative to the folder
    size: int
    mtime_ns: int
    escapes: bool  # a symbolic link to outside the folder

    @property
    def key(self) -> tuple[str, int, int]:
        return self.rel, self.size, self.mtime_ns


class FolderSource(Source):
    """A watched folder: each new image once, oldest first, after its size and mtime held
    for settle_s. A file is recorded as seen when the consumer asks for the next frame, so
    a crash mid-frame repeats that frame rather than losing it."""

    def __init__(
        self, config: SourceConfig, *, state_dir: Path, decode_long_side: int | None = None
    ) -> None:
        super().__init__(config, config.uri, decode_long_side)
        if not Path(config.uri).is_dir():
            raise SourceError(f"{config.uri}: folder not found")
        self._root = Path(config.uri).resolve()
        self._extensions = _extensions(config)
        self._settling: dict[str, tuple[int, int, float]] = {}
        record = state_dir / "seen-files.sqlite"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(record, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SEEN_SCHEMA)
            rows = self._db.execute("SELECT path, size, mtime_ns FROM seen")
            self._seen: set[tuple[str, int, int]] = {(p, s, m) for p, s, m in rows}
        except (OSError, sqlite3.Error) as exc:
            raise SourceError(f"{config.uri}: cannot open the record {record}: {exc}") from exc

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self.stats.state = "open"
        pacer = _Pacer(self._config.max_fps)
        while not stop.is_set():
            ready, settling = self._scan()
            if not ready and not settling and self._config.exit_when_done:
                self.stats.state = "done"
                return
            for file in ready:
                if not pacer.wait(stop):
                    return
                item = self._load(file)
                if item is not None:
                    yield item
                    self._mark(file)
            if not ready:
                stop.wait(self._config.poll_s)

    def close(self) -> None:
        self._db.close()
        super().close()

    def _scan(self) -> tuple[list[_File], bool]:
        """Unseen files that have settled, oldest first; and whether others are settling."""
        now = time.monotonic()
        ready: list[_File] = []
        settling: dict[str, tuple[int, int, float]] = {}
        for file in self._unseen():
            before = self._settling.get(file.rel)
            since = before[2] if before and before[:2] == (file.size, file.mtime_ns) else now
            if now - since >= self._config.settle_s:
                ready.append(file)
            else:
                settling[file.rel] = (file.size, file.mtime_ns, since)
        self._settling = settling
        return sorted(ready, key=lambda f: (f.mtime_ns, f.rel)), bool(settling)

    def _unseen(self) -> Iterator[_File]:
        for top, dirs, names in os.walk(self._root):
            dirs[:] = [d for d in dirs if not d.startswith(".")] if self._config.recursive else []
            for name in names:
                lower = name.lower()
                if name.startswith(".") or lower.endswith(_PARTIAL):
                    continue
                if os.path.splitext(lower)[1] not in self._extensions:
                    continue
                path = Path(top, name)
                try:
                    st = path.lstat()
                    escapes = stat.S_ISLNK(st.st_mode) and not path.resolve().is_relative_to(
                        self._root
                    )
                    if not escapes:
                        st = path.stat()
                except (OSError, RuntimeError):  # gone, broken or looping link
                    continue
                if not escapes and not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO or device would block the reader
                file = _File(
                    path.relative_to(self._root).as_posix(), st.st_size, st.st_mtime_ns, escapes
                )
                if file.key not in self._seen:
                    yield file

    def _load(self, file: _File) -> Frame | Failed | None:
        """The file as a frame; None if it vanished or changed since it settled."""
        path = self._root / file.rel
        if file.escapes:
            return self._failed(str(path), f"{path}: symbolic link points outside the folder")
        if file.size > _MAX_FILE_BYTES:
            return self._failed(str(path), f"{path}: {file.size:,} bytes is too large for an image")
        try:
            data = path.read_bytes()
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._failed(str(path), f"{path}: cannot read ({exc.strerror or exc})")
        if (st.st_size, st.st_mtime_ns) != (file.size, file.mtime_ns) or len(data) != file.size:
            return None  # rewritten after settling: it will settle again under its new key
        return self._file_frame(path, file.rel, data, time.monotonic())

    def _mark(self, file: _File) -> None:
        self._seen.add(file.key)
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", (*file.key, time.time())
            )
        except sqlite3.Error as exc:  # e.g. disk full: still skipped until restart
            log.error("%s: cannot record %s as seen: %s", self.uri, file.rel, exc)


def open_source(
    config: SourceConfig, *, state_dir: Path, decode_long_side: int | None = None
) -> Source:
    """The source `config` describes; SourceError if it can never work (a camera or stream
    that is merely not up yet is no error: it is reopened with backoff)."""
    if config.kind == "folder":
        return FolderSource(config, state_dir=state_dir, decode_long_side=decode_long_side)
    if config.kind == "glob":
        return GlobSource(config, decode_long_side=decode_long_side)
    if config.kind == "video":
        return VideoSource(config, decode_long_side=decode_long_side)
    return LiveSource(config, decode_long_side=decode_long_side)
