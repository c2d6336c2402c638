"""Images from a folder or a .zip, refusing unsafe entries one by one.

`corrosion-agent batch` answers one corrosion percentage per image, so a single hostile or
broken entry must cost only its own line, never the batch. Zip members are read into memory
with bounded reads and never extracted, so traversal names and symlinks can do no harm beyond
being reported; sizes, ratios and pixel counts are checked before anything large is allocated.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from agent import imageio

__all__ = ["IMAGE_SUFFIXES", "Entry", "Limits", "Refused", "iter_inputs"]

_MIB: Final = 1024**2
_GIB: Final = 1024**3
_RATIO_FLOOR: Final = _MIB  # small members compress well for innocent reasons

IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Entry:
    """An image to analyse; `name` is its relative POSIX path inside the folder or zip."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Refused:
    """An input that was not processed; `reason` is one line that starts with the name."""

    name: str
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Limits:
    """Resource ceilings; defaults fit a gateway with a few GB of RAM and a flaky uplink."""

    max_entry_bytes: int = 256 * _MIB
    max_total_bytes: int = 4 * _GIB
    max_ratio: float = 200.0
    max_entries: int = 100_000
    max_pixels: int = imageio.MAX_PIXELS
    max_long_side: int | None = None  # what images are decoded at: a JPEG read reduced counts so


_DEFAULT_LIMITS: Final = Limits()
_DRIVE: Final = re.compile(r"^[A-Za-z]:")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _display(name: str) -> str:
    """Make a name safe for a one-line report: escape control and undecodable characters."""
    name = _CONTROL.sub(lambda m: repr(m.group())[1:-1], name)
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _size(n: int) -> str:
    for unit, factor in (("GiB", _GIB), ("MiB", _MIB), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} bytes"


def _suffix_problem(name: str) -> str | None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return None
    return f"not an image ({f'{suffix} file' if suffix else 'no file extension'})"


class _Budget:
    """Entry count and running byte total; once either is exhausted, the rest is refused."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.exhausted: str | None = None

    def admit(self, size: int) -> str | None:
        """Reserve `size` bytes for the next entry, or say why it cannot be processed."""
        if self.exhausted is None:
            self.entries += 1
            if self.entries > self.limits.max_entries:
                self.exhausted = f"more than {self.limits.max_entries:,} entries; not processed"
            elif self.total + size > self.limits.max_total_bytes:
                self.exhausted = (
                    f"total size limit of {_size(self.limits.max_total_bytes)} reached; "
                    "not processed"
                )
        if self.exhausted is not None:
            return self.exhausted
        self.total += size
        return None

    def settle(self, reserved: int, actual: int) -> None:
        self.total += actual - reserved


def _check_image(name: str, shown: str, data: bytes, limits: Limits) -> Entry | Refused:
    """Magic bytes and header size, without decoding: a bomb is refused at its header."""
    try:
        info = imageio.probe(data, shown)
        factor = imageio.counted_factor(info, data, shown, limits.max_long_side)
        imageio.check_pixels(info, shown, limits.max_pixels, factor)
    except imageio.ImageError as exc:
        return Refused(name, str(exc))
    return Entry(name, data)


# --- zip ------------------------------------------------------------------------------------


def _zip_name(raw: str) -> tuple[str | None, str | None]:
    """(normalised name, None), (None, reason) or (None, None) for entries skipped silently."""
    if _CONTROL.search(raw):
        return None, "name contains control characters"
    name = raw.replace("\\", "/")  # Windows tools write backslashes; traversal hides in them
    if name.startswith("/") or _DRIVE.match(name):
        return None, "absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "path escapes the archive"
    if not parts or raw.endswith(("/", "\\")):
        return None, None  # directory
    if "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
        return None, None
    return "/".join(parts), None


def _zip_problem(name: str, info: zipfile.ZipInfo, limits: Limits) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link (not followed)"
    if info.flag_bits & 0x1:
        return "encrypted"
    if problem := _suffix_problem(name):
        return problem
    if info.file_size > limits.max_entry_bytes:
        return (
            f"{_size(info.file_size)} exceeds the per-file limit of {_size(limits.max_entry_bytes)}"
        )
    if info.file_size > _RATIO_FLOOR and (
        info.compress_size == 0 or info.file_size / info.compress_size > limits.max_ratio
    ):
        ratio = info.file_size / max(info.compress_size, 1)
        return f"suspicious compression ratio {ratio:,.0f}:1 (possible zip bomb)"
    return None


def _iter_zip(zf: zipfile.ZipFile, limits: Limits) -> Iterator[Entry | Refused]:
    budget = _Budget(limits)
    seen: set[str] = set()
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename.replace("\\", "/")):
            if info.is_dir():
                continue
            name, reason = _zip_name(info.filename)
            if name is None:
                if reason is not None:
                    yield Refused(info.filename, f"{_display(info.filename)}: {reason}")
                continue
            shown = _display(name)
            if name in seen:
                yield Refused(name, f"{shown}: duplicate name in the archive (first one used)")
                continue
            seen.add(name)
            if (reason := _zip_problem(name, info, limits)) or (
                reason := budget.admit(info.file_size)
            ):
                yield Refused(name, f"{shown}: {reason}")
                continue
            try:
                with zf.open(info) as member:
                    data = member.read(limits.max_entry_bytes + 1)
            # zipfile reports damage as BadZipFile, zlib.error, EOFError, NotImplementedError,
            # lzma/bz2 errors and more; any of them means this member alone is unusable.
            except Exception as exc:
                budget.settle(info.file_size, 0)
                detail = _display(str(exc)) or type(exc).__name__
                yield Refused(name, f"{shown}: corrupt archive member ({detail})")
                continue
            budget.settle(info.file_size, len(data))
            if len(data) > limits.max_entry_bytes:
                yield Refused(name, f"{shown}: larger than its header says")
                continue
            yield _check_image(name, shown, data, limits)


# --- folder ---------------------------------------------------------------------------------


def _folder_files(root: Path) -> dict[str, str | None]:
    """Relative POSIX names of everything non-hidden under root, mapped to a reason when a
    folder could not be listed; symlinked folders are names too (reported, never walked)."""
    names: dict[str, str | None] = {}

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename or root)
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
        names[rel] = f"cannot list folder ({exc.strerror or exc})"

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        rel = Path(dirpath).relative_to(root)
        keep = []
        for d in dirnames:
            if d.startswith(".") or d == "__MACOSX":
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                filenames.append(d)  # os.walk does not descend; report it like a file
            else:
                keep.append(d)
        dirnames[:] = keep
        names.update(((rel / f).as_posix(), None) for f in filenames if not f.startswith("."))
    return dict(sorted(names.items()))


def _follow_link(root: Path, path: Path) -> Path | str:
    """A link's target if it stays inside root, so a folder cannot smuggle in /etc files."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "broken symbolic link"
    if not target.is_relative_to(root):
        return "symbolic link points outside the folder"
    if target.is_dir():
        return "symbolic link to a folder (not followed)"
    return target


def _folder_problem(root: Path, name: str, limits: Limits) -> tuple[Path, int] | str:
    """(path to read, its size) or the reason it is refused."""
    path = root / name
    if path.is_symlink():
        followed = _follow_link(root, path)
        if isinstance(followed, str):
            return followed
        path = followed
    if problem := _suffix_problem(name):
        return problem
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # a FIFO or device would block or never end
    if st.st_size > limits.max_entry_bytes:
        return f"{_size(st.st_size)} exceeds the per-file limit of {_size(limits.max_entry_bytes)}"
    return path, st.st_size


def _read_regular(path: Path, limit: int) -> bytes:
    """Bounded read that neither follows a symlink nor blocks on a FIFO swapped in after the
    checks above."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return fh.read(limit)


def _iter_folder(root: Path, limits: Limits) -> Iterator[Entry | Refused]:
    budget = _Budget(limits)
    for name, unlisted in _folder_files(root).items():
        shown = _display(name)
        found = unlisted or _folder_problem(root, name, limits)
        if isinstance(found, str):
            yield Refused(name, f"{shown}: {found}")
            continue
        path, reserved = found
        if reason := budget.admit(reserved):
            yield Refused(name, f"{shown}: {reason}")
            continue
        try:
            data = _read_regular(path, limits.max_entry_bytes + 1)
        except OSError as exc:
            budget.settle(reserved, 0)
            yield Refused(name, f"{shown}: cannot read ({exc.strerror or exc})")
            continue
        budget.settle(reserved, len(data))
        if len(data) > limits.max_entry_bytes:
            yield Refused(name, f"{shown}: grew past the per-file limit while being read")
            continue
        yield _check_image(name, shown, data, limits)


def iter_inputs(path: Path, limits: Limits = _DEFAULT_LIMITS) -> Iterator[Entry | Refused]:
    """Every image under a folder or in a zip, sorted by name, each checked but not decoded.

    Opens the zip eagerly so that a path that is not a zip fails at the call, not mid-batch.
    """
    if path.is_dir():
        return _iter_folder(path.resolve(), limits)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a zip file or folder ({exc})") from exc
    except OSError as exc:  # absent, unreadable
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return _iter_zip(zf, limits)
