"""The idle cost of a watched folder: CPU per rescan of an inbox full of analysed photos.

Run as `make bench-folder`. A gateway keeps what it analysed in its inbox until a sync tool
takes it away, and the folder source rescans the inbox every `poll_s` (0.5 s by default)
to find new photos, so a full inbox costs CPU even when nothing arrives. With every file
already seen: `walk_ms` is the CPU time of one full FolderSource walk (os.scandir, a stat per
file; done at least every minute), `poll_ms` that of an idle poll (the folders' mtimes
unchanged since the last quiet walk: one stat per folder). The baseline is the walk the
source did at every poll before (os.walk, then pathlib lstat and stat per file), timed in
the same run on the same files. No real data: the files are empty placeholders.
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


def full_walk(source: FolderSource) -> None:
    source._walked_at = -float("inf")  # as at the minute's walk
    source._scan()


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
    print("CPU ms per poll, every file already seen (median)")
    header = f"{'files':>8} {'idle poll':>10} {'walk (1/min)':>13} {'before (every poll)':>20}"
    print(header + f" {'before/walk':>12} {'before/poll':>12}")
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
            walk = cpu_ms(partial(full_walk, source), args.repeats)
            poll = cpu_ms(source._scan, args.repeats)
            extensions = frozenset(SourceConfig().extensions)
            before = cpu_ms(partial(walk_scan, inbox.resolve(), extensions), args.repeats)
            source.close()
        poll = max(poll, 0.001)  # below process_time's resolution
        print(
            f"{count:>8} {poll:>10.3f} {walk:>13.1f} {before:>20.1f} {before / walk:>11.1f}x"
            f" {before / poll:>11.0f}x"
        )
        last = (
            f"files={count} poll_ms={poll:.3f} walk_ms={walk:.1f} before_ms={before:.1f} "
            f"speedup_walk={before / walk:.1f} speedup_poll={before / poll:.0f}"
        )
    print(last)


if __name__ == "__main__":
    main()
