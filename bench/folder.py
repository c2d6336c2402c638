"""The idle cost of a watched folder: CPU per rescan of an inbox full of analysed photos.

Run as `make bench-folder`. A gateway keeps what it analysed in its inbox until a sync tool
takes it away, and the folder source rescans the inbox every `poll_s` (0.5 s by default)
to find new photos, so a full inbox costs CPU even when nothing arrives. `scan_ms` is the
CPU time of one FolderSource scan with every file already seen; the baseline is the scan
before os.scandir (os.walk, then pathlib lstat and stat per file), timed in the same run
on the same files. No real data: the files are empty placeholders with image names.
"""

from __future__ import annotations

import argparse
import os
import stat
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from agent.config import SourceConfig
from agent.sources import FolderSource


def walk_scan(root: Path, extensions: frozenset[str]) -> list[tuple[str, int, int]]:
    """The scan as it was: os.walk, pathlib, an lstat and a stat per candidate."""
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = []
        for name in names:
            lower = name.lower()
            if name.startswith(".") or os.path.splitext(lower)[1] not in extensions:
                continue
            path = Path(top, name)
            st = path.lstat()
            escapes = stat.S_ISLNK(st.st_mode) and not path.resolve().is_relative_to(root)
            if not escapes:
                st = path.stat()
            found.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return found


def cpu_ms(run: Callable[[], object], repeats: int) -> float:
    """Median CPU milliseconds of `run()` (process time: what the device pays)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(1000.0 * (time.process_time() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print("CPU ms per rescan, every file already seen (median)")
    print(f"{'files':>8} {'scandir (ours)':>15} {'os.walk (before)':>17} {'ratio':>7}")
    last = ""
    for count in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            inbox = Path(tmp, "inbox")
            inbox.mkdir()
            for i in range(count):
                (inbox / f"IMG_{i:06d}.jpg").touch()
            source = FolderSource(
                SourceConfig(kind="folder", uri=str(inbox)), state_dir=Path(tmp, "state")
            )
            source._seen.update(f.key for f in source._files())  # all analysed already
            source._scan()  # the hourly prune runs at the first scan: not the idle cost
            ours = cpu_ms(source._scan, args.repeats)
            extensions = frozenset(SourceConfig().extensions)
            before = cpu_ms(partial(walk_scan, inbox.resolve(), extensions), args.repeats)
            source.close()
        print(f"{count:>8} {ours:>15.1f} {before:>17.1f} {before / ours:>6.1f}x")
        last = f"files={count} scan_ms={ours:.1f} walk_ms={before:.1f} speedup={before / ours:.1f}"
    print(last)


if __name__ == "__main__":
    main()
