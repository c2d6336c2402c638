"""File sources: a watched folder (each new image once, after it settles, remembered in
SQLite across restarts) and an image list or glob."""

from __future__ import annotations

import fnmatch
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
from agent.config import ConfigError, SourceConfig
from agent.sources.base import Failed, Frame, Pacer, Source, SourceError

log = logging.getLogger(__name__)

_PARTIAL: Final = (".tmp", ".part")
_MAX_FILE_BYTES: Final = 256 * 1024**2  # no photo is this big; reading it could exhaust RAM
_MAGIC: Final = re.compile(r"[*?[]")
# A read error may pass (permissions fixed, a flaky mount back): retried with this backoff.
_RETRY_MIN_S: Final = 2.0
_RETRY_MAX_S: Final = 300.0
# Memory holds the seen files the folder held at the last check (and those seen since); a
# file gone from it stays on disk only, so a sync tool that puts it back, or a card or mount
# that was out, repeats nothing, while it is among the _KEEP_GONE most recently gone (140-230
# bytes each with the index, by path length: 35-60 MB) and gone for under _FORGET_AFTER_S. A
# gateway whose inbox turns over 1.3M frames a day would otherwise hold every one for a month
# (bench/RESULTS.md, "Soak").
_FORGET_AFTER_S: Final = 30 * 86400.0
_KEEP_GONE: Final = 250_000
# The check runs hourly, and sooner once this many files were seen since the last: memory
# then holds at most this many gone files (1.5 MB), whatever the frame rate (its cost:
# make bench-seen).
_PRUNE_EVERY_S: Final = 3600.0
_PRUNE_AFTER_SEEN: Final = 5000
# A quiet folder (nothing new, nothing settling or unreadable) whose folders' mtimes have not
# changed is not walked again for up to this long: walking an inbox of 20,000 analysed
# photos costs 134 ms of CPU (make bench-folder), once every poll_s before. The full walk
# still catches what an mtime misses (a photo rewritten in place, a coarse FAT clock).
_QUIET_WALK_S: Final = 60.0
# Keyed by the path relative to the folder, so the record survives a new mount point.
# gone_at: when a check first missed the file (NULL while it is there).
_SEEN_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS seen (path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, seen_at REAL NOT NULL, gone_at REAL,
    PRIMARY KEY (path, size, mtime_ns))"""
# The bounds read and delete gone files by when they went; files there are not indexed.
_GONE_INDEX: Final = "CREATE INDEX IF NOT EXISTS seen_gone ON seen (gone_at) WHERE gone_at NOT NULL"


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


def _matches(pattern: str, wanted: frozenset[str]) -> tuple[list[Path], Path | None]:
    """The image files a glob pattern matches, sorted, and the folder before its first
    wildcard (names are given relative to it). As glob.glob: `**` as a whole part is any
    depth of folders, links to folders followed; a wildcard matches a hidden name only when
    that part of the pattern starts with a dot. Unlike it, each real folder is walked once
    per `**`: a link back up the tree (`site/up -> ..`) gave each photo dozens of times, and
    two such links kept the start from returning. A file reached twice (through a link)
    counts once; a name that is not UTF-8 is skipped: every message carries names as UTF-8."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda part: not _MAGIC.search(part), parts[:-1]))
    paths = [Path(*fixed) if fixed else Path()]
    if pattern.endswith(("/", os.sep)):  # folders only, as glob.glob: no image file
        paths = []
    for part in parts[len(fixed) :]:
        walked: set[str] = set()  # one `**` walks each real folder once, whatever its start
        paths = [found for folder in paths for found in _expand(folder, part, walked)]
    files: dict[str, Path] = {}
    for path in sorted(paths):
        try:
            if path.suffix.lower() not in wanted or not path.is_file():
                continue
        except OSError as exc:  # a folder that can be listed but not searched (r--)
            log.error("%s: %s: cannot read (%s); skipped", pattern, path, exc.strerror or exc)
            continue
        if not _utf8(str(path)):
            log.error("%s: name %r is not UTF-8; skipped (rename it)", pattern, str(path))
            continue
        files.setdefault(os.path.realpath(path), path)
    return list(files.values()), Path(*fixed) if fixed else None


def _expand(folder: Path, part: str, walked: set[str]) -> Iterator[Path]:
    """What one part of a glob pattern names in `folder`."""
    if part == "**":
        yield from _below(folder, walked)
        return
    if not _MAGIC.search(part):
        if os.path.lexists(folder / part):
            yield folder / part
        return
    try:  # sorted: the first start a `**` walks from keeps a real folder's name
        names = sorted(os.listdir(folder))
    except OSError:  # not a folder, or unreadable: nothing in it matches
        return
    hidden = part.startswith(".")
    for name in names:
        if (hidden or not name.startswith(".")) and fnmatch.fnmatchcase(name, part):
            yield folder / name


def _up_from(here: str, there: str) -> bool:
    """Whether real folder `there` is `here` or holds it."""
    return here == there or here.startswith(there.rstrip(os.sep) + os.sep)


def _below(folder: Path, walked: set[str]) -> Iterator[Path]:
    """`folder` and everything under it but hidden names (a file is matched by `**` as the
    last part, as with glob.glob), links followed, each real folder once, and never a link
    back up to a folder the walk is in: it would walk the tree again under a detour's name
    (`cam1/up/cam2/...`), for every folder that holds one."""
    real = os.path.realpath(folder)
    if real in walked or not os.path.isdir(real):
        return
    walked.add(real)
    yield folder
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir()
        except OSError:
            continue
        if not is_folder:
            yield Path(entry.path)
        elif not (entry.is_symlink() and _up_from(real, os.path.realpath(entry.path))):
            yield from _below(Path(entry.path), walked)


class GlobSource(Source):
    """A fixed set of images, each delivered once, then the end. The uri is a glob pattern
    (sorted matches) or a .txt file listing one path per line (in its order, relative to it)."""

    def __init__(self, config: SourceConfig, *, decode_long_side: int | None = None) -> None:
        super().__init__(config, config.uri, decode_long_side)
        listing = Path(config.uri)
        if config.uri.endswith(".txt") and listing.is_file():
            try:  # -sig: a byte-order mark (Notepad, PowerShell 5) is no part of the first path
                lines = listing.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeError) as exc:
                raise SourceError(f"{config.uri}: cannot read the list ({exc})") from exc
            entries = (s for s in map(str.strip, lines) if s and not s.startswith("#"))
            self._paths = list(dict.fromkeys(listing.parent / s for s in entries))
            self._root: Path | None = listing.parent
        else:
            self._paths, self._root = _matches(config.uri, _extensions(config))
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
                with self._io():
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
    a crash mid-frame repeats that frame rather than losing it. A file that cannot be read
    is reported once and retried with backoff, never recorded: an unreadable file is not
    a bad image, and it is read once someone fixes its permissions or the mount."""

    def __init__(
        self, config: SourceConfig, *, state_dir: Path, decode_long_side: int | None = None
    ) -> None:
        super().__init__(config, config.uri, decode_long_side)
        if not Path(config.uri).exists():  # removable media, a mount not up yet: waited for
            log.warning("%s: folder not there (yet); watching for it", config.uri)
        elif not Path(config.uri).is_dir():
            raise SourceError(f"{config.uri}: not a folder")
        self._root = Path(config.uri).resolve()
        self._extensions = _extensions(config)
        self._settling: dict[str, tuple[int, int, float]] = {}
        self._misnamed: set[str] = set()  # reported once each
        self._unreadable: dict[tuple[str, int, int], tuple[float, float]] = {}  # retry at, wait
        self._record = record = state_dir / "seen-files.sqlite"
        self._unlisted: list[str] = []  # sub-folders the last walk could not list ("a/b/")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(record, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SEEN_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(seen)")}
            if "gone_at" not in columns:  # a record from before gone_at
                self._db.execute("ALTER TABLE seen ADD COLUMN gone_at REAL")
            self._db.execute(_GONE_INDEX)
            rows = self._db.execute("SELECT path, size, mtime_ns FROM seen WHERE gone_at IS NULL")
            self._seen: set[tuple[str, int, int]] = {(p, s, m) for p, s, m in rows}
            self._pruned_at = -float("inf")
            self._prune_at_seen = 0  # the check also runs once _seen is this large
            self._root_listed = Path(config.uri).is_dir()  # the last scan listed the folder
            self._walked: dict[str, int] = {}  # folder -> mtime_ns, at the last quiet walk
            self._walked_at = -float("inf")
        except (OSError, sqlite3.Error) as exc:
            # the state dir's fault, not the source's: named as a config setting
            raise ConfigError(
                f"state_dir: cannot open the seen-files record {record}: {exc}"
            ) from exc

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self.stats.state = "open"
        pacer = Pacer(self._config.max_fps)
        while not stop.is_set():
            with self._io():
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
                    if file.key not in self._unreadable:
                        self._mark(file)
            if not ready:
                stop.wait(self._config.poll_s)

    def close(self) -> None:
        self._db.close()
        super().close()

    def _scan(self) -> tuple[list[_File], bool]:
        """Unseen files that have settled, oldest first; and whether others are settling."""
        now = time.monotonic()
        prune = now - self._pruned_at >= _PRUNE_EVERY_S or len(self._seen) >= self._prune_at_seen
        if not prune and now - self._walked_at < _QUIET_WALK_S and self._unchanged():
            return [], False
        self._walked = {}
        ready: list[_File] = []
        settling: dict[str, tuple[int, int, float]] = {}
        unreadable = self._unreadable
        self._unreadable = {}  # forget files that went away
        present: set[tuple[str, int, int]] = set()
        back: list[tuple[str, int, int]] = []
        for file in self._files():
            key = file.key
            if prune:
                present.add(key)
            if key in self._seen:
                continue
            if self._on_record(key):
                back.append(key)
                continue
            if key in unreadable:
                self._unreadable[key] = unreadable[key]
                if now < unreadable[key][0]:
                    continue
            before = self._settling.get(file.rel)
            since = before[2] if before and before[:2] == (file.size, file.mtime_ns) else now
            if now - since >= self._config.settle_s:
                ready.append(file)
            else:
                settling[file.rel] = (file.size, file.mtime_ns, since)
        self._settling = settling
        if not ready and not settling and not self._unreadable and self._root_listed:
            self._walked_at = now  # a quiet walk: until its folders change, nothing will
        else:
            self._walked = {}  # walk again at the next poll
        self._record_back(back)
        if prune and self._root_listed:  # a folder that cannot be listed says nothing is gone
            self._pruned_at = now
            self._forget_gone(present)
            self._prune_at_seen = len(self._seen) + _PRUNE_AFTER_SEEN
        return sorted(ready, key=lambda f: (f.mtime_ns, f.rel)), bool(settling)

    def _unchanged(self) -> bool:
        """Every folder the last quiet walk listed still has the mtime it had then."""
        if not self._walked:
            return False
        try:
            return all(os.stat(top).st_mtime_ns == m for top, m in self._walked.items())
        except OSError:
            return False

    def _files(self) -> Iterator[_File]:
        """Every candidate image; os.scandir, one stat per plain file. Each folder's mtime,
        read before it is listed, goes into self._walked."""
        stack = [(str(self._root), "")]
        was_listed, self._root_listed = self._root_listed, False
        unlisted, self._unlisted = set(self._unlisted), []
        while stack:
            top, prefix = stack.pop()
            try:
                self._walked[top] = os.stat(top).st_mtime_ns
                entries = list(os.scandir(top))
            except OSError as exc:  # removed or unreadable since it was listed
                if prefix and isinstance(exc, FileNotFoundError):
                    continue  # a sub-folder deleted (a rotation script): its files are gone
                if not prefix and was_listed:  # once per outage, not every poll
                    log.warning("%s: cannot list the folder: %s", self.uri, exc)
                elif prefix and prefix not in unlisted:
                    log.warning("%s: cannot list %s, skipped until it can be: %s", self.uri,
                                prefix, exc)  # fmt: skip
                self._unlisted.append(prefix)  # what it holds is not gone, only unseen now
                continue
            if prefix and prefix in unlisted:
                log.info("%s: %s listed again", self.uri, prefix)
            if not prefix:
                self._root_listed = True
                if not was_listed:
                    log.info("%s: folder there; watching it", self.uri)
            for entry in entries:
                name = entry.name
                folder = entry.is_dir(follow_symlinks=False)
                if name.startswith(".") or (folder and not self._config.recursive):
                    continue
                if not _utf8(name):  # the seen record and every message carry names as UTF-8
                    if name not in self._misnamed:
                        self._misnamed.add(name)
                        log.error("%s: name %r is not UTF-8; skipped until renamed",
                                  self.uri, name)  # fmt: skip
                    continue
                if folder:
                    stack.append((entry.path, f"{prefix}{name}/"))
                elif (file := self._file(entry, prefix + name)) is not None:
                    yield file

    def _file(self, entry: os.DirEntry[str], rel: str) -> _File | None:
        """A candidate image, or None (wrong suffix, partial, gone, FIFO, broken link...)."""
        lower = entry.name.lower()
        if lower.endswith(_PARTIAL) or lower[lower.rfind(".") :] not in self._extensions:
            return None
        try:
            link = entry.is_symlink()
            escapes = link and not Path(entry.path).resolve().is_relative_to(self._root)
            st = entry.stat(follow_symlinks=not escapes)
        except (OSError, RuntimeError):  # gone, broken or looping link
            return None
        if not escapes and not stat.S_ISREG(st.st_mode):
            return None  # a FIFO or device would block the reader
        return _File(rel, st.st_size, st.st_mtime_ns, escapes)

    def _load(self, file: _File) -> Frame | Failed | None:
        """The file as a frame; None if it vanished or changed since it settled."""
        path = self._root / file.rel
        if file.escapes:
            return self._failed(str(path), f"{path}: symbolic link points outside the folder")
        if file.size > _MAX_FILE_BYTES:
            return self._failed(str(path), f"{path}: {file.size:,} bytes is too large for an image")
        try:
            with self._io():
                data = path.read_bytes()
                st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._unreadable_now(file, path, exc)
        self._unreadable.pop(file.key, None)
        if (st.st_size, st.st_mtime_ns) != (file.size, file.mtime_ns) or len(data) != file.size:
            return None  # rewritten after settling: it will settle again under its new key
        return self._file_frame(path, file.rel, data, time.monotonic())

    def _unreadable_now(self, file: _File, path: Path, exc: OSError) -> Failed | None:
        """Failed the first time (counted, logged by the loop); then only a debug line."""
        before = self._unreadable.get(file.key)
        wait = min(_RETRY_MAX_S, 2 * before[1]) if before else _RETRY_MIN_S
        self._unreadable[file.key] = (time.monotonic() + wait, wait)
        reason = f"{path}: cannot read ({exc.strerror or exc})"
        if before is None:
            return self._failed(str(path), f"{reason}; retried until it can be")
        log.debug("%s; next try in %.0f s", reason, wait)
        return None

    def _on_record(self, key: tuple[str, int, int]) -> bool:
        """Whether a file not in memory is on the record (gone at a check and back, or seen
        before this start and gone then): a point lookup, made only for files not seen."""
        try:
            where = "path=? AND size=? AND mtime_ns=?"
            found = self._db.execute(f"SELECT 1 FROM seen WHERE {where}", key).fetchone()
        except sqlite3.Error as exc:  # analysed again rather than skipped unseen
            log.error("%s: cannot look up %s in %s: %s", self.uri, key[0], self._record, exc)
            return False
        if found is not None:
            self._seen.add(key)
        return found is not None

    def _record_back(self, keys: list[tuple[str, int, int]]) -> None:
        """Files back in the folder are not gone: one transaction for a card put back."""
        if not keys:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE seen SET gone_at=NULL WHERE path=? AND size=? AND mtime_ns=?", keys
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:  # still in memory: skipped until restart all the same
            self._abort(f"cannot record {len(keys)} file(s) back in the folder", exc)

    def _abort(self, what: str, exc: sqlite3.Error) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        log.error("%s: %s in %s: %s", self.uri, what, self._record, exc)

    def _forget_gone(self, present: set[tuple[str, int, int]]) -> None:
        """Bound memory by what the folder holds and the record by _KEEP_GONE and
        _FORGET_AFTER_S: the files seen and missing now leave memory and are marked gone;
        the work follows the turnover since the last check, not the record's size. Files
        under a sub-folder that could not be listed are not missing, only out of sight."""
        now = time.time()
        gone = {
            key
            for key in self._seen - present
            if not any(key[0].startswith(prefix) for prefix in self._unlisted)
        }
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE seen SET gone_at=? WHERE path=? AND size=? AND mtime_ns=?",
                ((now, *key) for key in gone),
            )
            forgot = self._db.execute(
                "DELETE FROM seen WHERE gone_at < ?", (now - _FORGET_AFTER_S,)
            ).rowcount
            # The newest gone beyond the count kept, and all before it, go. A check marks all
            # it misses at one time: rowid orders a batch, so one across the line is cut, not
            # dropped whole (a card of more than _KEEP_GONE pulled at once keeps its newest).
            over = self._db.execute(
                "SELECT gone_at, rowid FROM seen WHERE gone_at NOT NULL"
                " ORDER BY gone_at DESC, rowid DESC LIMIT 1 OFFSET ?",
                (_KEEP_GONE,),
            ).fetchone()
            if over is not None:
                forgot += self._db.execute(
                    "DELETE FROM seen WHERE gone_at < ? OR (gone_at = ? AND rowid <= ?)",
                    (over[0], over[0], over[1]),
                ).rowcount
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abort("cannot prune the record of seen files", exc)
            return
        self._seen -= gone
        if forgot:
            log.info("%s: forgot %d file(s) gone from the folder, the oldest beyond the "
                     "record's bounds", self.uri, forgot)  # fmt: skip
            self._shrink()

    def _shrink(self) -> None:
        """Give the disk back once most of the record is free pages (SQLite keeps them): a
        record from before _KEEP_GONE, or a burst of files long gone."""
        try:
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if 2 * free > self._db.execute("PRAGMA page_count").fetchone()[0]:
                self._db.execute("VACUUM")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # the record is still right, only larger than needed
            log.warning("%s: cannot compact %s: %s", self.uri, self._record, exc)

    def _mark(self, file: _File) -> None:
        self._seen.add(file.key)
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO seen (path, size, mtime_ns, seen_at) VALUES (?, ?, ?, ?)",
                (*file.key, time.time()),
            )
        except sqlite3.Error as exc:  # e.g. disk full: still skipped until restart
            log.error("%s: cannot record %s as seen in %s: %s", self.uri, file.rel, self._record,
                      exc)  # fmt: skip


def _utf8(name: str) -> bool:
    """False for a name os.scandir decoded with surrogates (bytes from a Windows zip, say)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
