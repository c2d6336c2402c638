"""Writes that survive a power cut: a drone's battery is pulled mid-write, a gateway loses
mains. A file is either the old one or the new one, and a rename is on disk before
anything that relies on it is recorded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write `path` and flush it to the device (for files a later rename publishes)."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def sync_dir(path: Path) -> None:
    """Make the entries of folder `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_files(files: Iterable[tuple[Path, bytes]]) -> None:
    """Replace each path with its data atomically and durably (write, fsync, rename), then
    fsync each folder once."""
    folders: dict[Path, None] = {}
    for path, data in files:
        tmp = path.with_name(path.name + ".tmp")
        write_synced(tmp, data)
        os.replace(tmp, path)
        folders[path.parent] = None
    for folder in folders:
        sync_dir(folder)


def replace_file(path: Path, data: bytes) -> None:
    replace_files([(path, data)])
