"""File sources: a watched folder (each new image once, after it settles, remembered in
SQLite across restarts) and an image list or glob."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent import imageio
from agent.config import SourceConfig
from agent.sources.base import Failed, Frame, Pacer, Source, SourceError

log = logging.getLogger(__name__)

_PARTIAL: Final = (".tmp", ".part")
_MAX_FILE_BYTES: Final = 256 * 1024**2  # no photo is this big; reading it could exhaust RAM
_MAGIC: Final = re.compile(r"[*?[]")
# Keyed by the path relative to the folder, so the record survives a new mount point.
_SEEN_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS seen (path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, seen_at REAL NOT NULL, PRIMARY KEY (path, size, mtime_ns))"""


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
        pacer = Pacer(self._config.max_fps)
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
        self._misnamed: set[str] = set()  # reported once each
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
        pacer = Pacer(self._config.max_fps)
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
                if not _utf8(name):  # the seen record and every message carry names as UTF-8
                    if name not in self._misnamed:
                        self._misnamed.add(name)
                        log.error("%s: file name %r is not UTF-8; skipped until renamed",
                                  self.uri, name)  # fmt: skip
                    continue
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


def _utf8(name: str) -> bool:
    """False for a name os.walk decoded with surrogates (bytes from a Windows zip, say)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
