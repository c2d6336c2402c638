"""Soak: the real daemon on a live watched folder for --minutes; does anything keep growing?

Run as `make bench-soak` (10 minutes by default; `--minutes N`). `corrosion-agent run` runs
as a child process, so its memory, fds and threads are read from /proc/PID. A feeder thread
plays a drone camera's SD-card offload: --fps 1920x1080 JPEGs a second into the watched folder
(the CorrosionDetector rust photos resized, quality 90; synthetic scenes when DATA is absent,
said on stderr and in the output), each deleted a minute after it was written. The demo
model at a flag threshold of 20 % (about a third of the photos), QoS 1 to a Mosquitto on
loopback (bench/daemon.py's set-up), captures uploaded to moto's S3 server (bench/updates.py's)
with rate limits well above the flagged rate, so the spool, uploader, outbox and manifests
all work. Every --interval seconds: the agent's VmRSS, RssAnon, VmHWM, open fds, threads, CPU,
the state dir's SQLite files and spool, detections received by a subscriber, capture objects
in the bucket (the bench then deletes them, as a cloud-side ingest would, so moto's memory
stays bounded; the manifests stay).

"Start" is the sample at the end of the warm-up (--warmup-minutes, 2): caches, the outbox's
WAL and the spool reach their working size first. Growth per hour is the least-squares slope
of the samples from there on; the baseline is the same run's first sample (after the first
frame). --tracemalloc runs the agent under tracemalloc and diffs a snapshot taken at the
warm-up against one at the end, by source line (a diagnosis run: slower, and its RSS includes
tracemalloc's own). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
import cv2
import paho.mqtt.client as paho
from daemon import SIZE, photos
from updates import start_s3

from tests.agentproc import Subscriber, write_config
from tests.broker import Broker

DEVICE = "soak"
BUCKET = "captures"
PREFIX = "corrosion"
KEEP_S = 60.0  # the offload tool deletes a photo this long after writing it
MEMORY_MAX_MB = 512  # docs/DEPLOY.md: MemoryMax=512M on a small companion computer
FREE = {"per_minute": 6000, "per_hour": 360_000, "per_day": 8_640_000}  # 100/s: never binding

# The agent under tracemalloc: argv[1] is where snapshots go, one per SIGUSR1 (the handler
# runs on the main thread, between frames); the rest is corrosion-agent's command line.
TRACE_WRAPPER = """
import signal, sys, tracemalloc
from pathlib import Path
tracemalloc.start(10)
out, taken = Path(sys.argv[1]), [0]
def dump(*_):
    taken[0] += 1
    part = out / f"{taken[0]}.part"
    tracemalloc.take_snapshot().dump(str(part))
    part.rename(out / f"{taken[0]}.snap")
signal.signal(signal.SIGUSR1, dump)
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""


def warn(msg: str) -> None:
    print(f"bench/soak: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sample:
    t_s: float
    frames: int  # detections the subscriber received
    rss_kb: int
    anon_kb: int
    hwm_kb: int
    fds: int
    threads: int
    cpu_s: float
    outbox_b: int  # outbox.sqlite + -wal
    seen_b: int  # seen-files.sqlite + -wal
    spool_b: int  # everything under spool/ (captures, spool.sqlite, manifests)
    manifests_b: int
    objects: int  # capture objects the bucket has received so far


@dataclass(frozen=True)
class Totals:
    written: int  # JPEGs the feeder wrote
    behind_s: float  # the feeder's worst lag behind its schedule
    published: int  # detections received, after the agent stopped
    uploads: int  # upload notices received
    objects: int  # capture objects the bucket received
    manifests: int  # manifest objects in the bucket


class Feeder(threading.Thread):
    """Writes `fps` JPEGs a second (atomically: .part, then renamed) and deletes each file
    KEEP_S after it was written, as an SD-card offload tool would."""

    def __init__(self, folder: Path, jpegs: list[bytes], fps: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.folder, self.jpegs, self.fps = folder, jpegs, fps
        self.stop_event = threading.Event()
        self.written = 0
        self.deleted = 0
        self.behind_s = 0.0  # worst lag behind the schedule

    def run(self) -> None:
        live: deque[tuple[float, Path]] = deque()
        start = time.monotonic()
        while True:
            due = start + self.written / self.fps
            if self.stop_event.wait(max(0.0, due - time.monotonic())):
                return
            self.behind_s = max(self.behind_s, time.monotonic() - due)
            path = self.folder / f"DJI_{self.written:07d}.JPG"
            part = path.with_name(path.name + ".part")
            part.write_bytes(self.jpegs[self.written % len(self.jpegs)])
            part.rename(path)
            now = time.monotonic()
            live.append((now, path))
            self.written += 1
            while live and now - live[0][0] > KEEP_S:
                live.popleft()[1].unlink(missing_ok=True)
                self.deleted += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


class Counter(Subscriber):
    """Counts the agent's messages by kind (detections, uploads, ...) instead of keeping them."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.counts: dict[str, int] = {}
        super().__init__(port, topics, client_id="soak-counter")

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def count(self, kind: str) -> int:
        with self._lock:
            return self.counts.get(kind, 0)


class Bucket:
    """Counts capture objects as they arrive and deletes them (manifests are kept)."""

    def __init__(self, endpoint: str) -> None:
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        self.objects = 0

    def collect(self) -> int:
        paginator = self.s3.get_paginator("list_objects_v2")
        keys = [
            {"Key": o["Key"]}
            for page in paginator.paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/captures/")
            for o in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000]})
        self.objects += len(keys)
        return self.objects

    def manifests(self) -> int:
        page = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/manifests/")
        return int(page.get("KeyCount", 0))


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def size(*paths: Path) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def tree_size(folder: Path) -> int:
    return sum(size(p) for p in folder.rglob("*") if p.is_file())


def start_agent(config: Path, log: Path, trace_dir: Path | None) -> subprocess.Popen[bytes]:
    command = Path(sys.executable).with_name("corrosion-agent")
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "agent.cli"]
    if trace_dir is not None:
        argv = [sys.executable, "-c", TRACE_WRAPPER, str(trace_dir)]
    with log.open("wb") as fh:
        return subprocess.Popen([*argv, "run", "--config", str(config)], stdout=fh, stderr=fh)


def snapshot(agent: subprocess.Popen[bytes], trace_dir: Path, n: int) -> Path:
    """Ask the traced agent for its n-th snapshot and wait for it."""
    agent.send_signal(signal.SIGUSR1)
    path = trace_dir / f"{n}.snap"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline or agent.poll() is not None:
            sys.exit("bench/soak: the agent wrote no tracemalloc snapshot")
        time.sleep(0.2)
    return path


def trace_diff(first: Path, last: Path, frames: int) -> None:
    """Where Python-level memory grew between the two snapshots, by line and by traceback."""
    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a = tracemalloc.Snapshot.load(str(first)).filter_traces(keep)
    b = tracemalloc.Snapshot.load(str(last)).filter_traces(keep)
    total = sum(s.size_diff for s in b.compare_to(a, "filename"))
    print(f"\ntracemalloc, warm-up -> end ({frames} frames between): {total / 1e6:+.2f} MB traced")
    for stat in b.compare_to(a, "lineno")[:12]:
        where = stat.traceback[0]
        print(
            f"  {stat.size_diff / 1e6:+8.3f} MB {stat.count_diff:+8d} blocks  "
            f"{where.filename.removeprefix(str(Path.cwd()) + '/')}:{where.lineno}"
        )
    # A leak adds blocks frame after frame; the frame in hand is a few big ones.
    grown = sorted(b.compare_to(a, "traceback"), key=lambda s: -s.count_diff)[:6]
    print("  most new blocks, by allocating traceback (innermost first):")
    for stat in grown:
        print(f"  {stat.size_diff / 1e6:+.3f} MB, {stat.count_diff:+d} blocks, allocated at:")
        for line in stat.traceback.format(most_recent_first=True)[:10]:
            print(f"    {line}")


def take(pid: int, t0: float, state: Path, counter: Counter, bucket: Bucket) -> Sample:
    status = proc_status(pid)
    spool = state / "spool"
    return Sample(
        t_s=time.monotonic() - t0,
        frames=counter.count("detections"),
        rss_kb=status["VmRSS"],
        anon_kb=status["RssAnon"],
        hwm_kb=status["VmHWM"],
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=status["Threads"],
        cpu_s=cpu_seconds(pid),
        outbox_b=size(state / "outbox.sqlite", state / "outbox.sqlite-wal"),
        seen_b=size(state / "seen-files.sqlite", state / "seen-files.sqlite-wal"),
        spool_b=tree_size(spool),
        manifests_b=tree_size(spool / "manifests"),
        objects=bucket.collect(),
    )


def slope_per_hour(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    """Least-squares slope of value(sample) against time, per hour."""
    if len(samples) < 2:
        return 0.0
    xs = [s.t_s / 3600 for s in samples]
    return statistics.linear_regression(xs, [value(s) for s in samples]).slope


def print_table(samples: list[Sample]) -> None:
    print(
        " t_min  frames   fps  cpu%  rss_mb anon_mb  hwm_mb  fds thr  outbox_kb  seen_kb"
        "  spool_mb manif_kb  s3_objs"
    )
    previous: Sample | None = None
    for s in samples:
        dt = s.t_s - previous.t_s if previous else s.t_s
        fps = (s.frames - (previous.frames if previous else 0)) / dt if dt > 0 else 0.0
        cpu = 100 * (s.cpu_s - (previous.cpu_s if previous else 0.0)) / dt if dt > 0 else 0.0
        print(
            f"{s.t_s / 60:6.2f} {s.frames:7d} {fps:5.1f} {cpu:5.1f} {s.rss_kb / 1024:7.1f} "
            f"{s.anon_kb / 1024:7.1f} {s.hwm_kb / 1024:7.1f} {s.fds:4d} {s.threads:3d} "
            f"{s.outbox_b / 1024:10.1f} {s.seen_b / 1024:8.1f} {s.spool_b / 1e6:9.2f} "
            f"{s.manifests_b / 1024:8.1f} {s.objects:8d}"
        )
        previous = s


def log_counts(log: Path) -> tuple[int, int, list[str]]:
    lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if " WARNING " in line]
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
    return len(warnings), len(errors), (errors + warnings)[:5]


def interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", type=Path, default=Path("demo/model"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=2.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--fps", type=float, default=15.0, help="JPEGs written per second")
    ap.add_argument("--flag-pct", type=float, default=20.0)
    ap.add_argument("--tracemalloc", action="store_true", help="diff Python allocations")
    ap.add_argument("--no-upload", action="store_true", help="captures off (to attribute growth)")
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        sys.exit(f"bench/soak: no model at {args.model}: run `make demo` first")
    if args.warmup_minutes >= args.minutes:
        sys.exit("bench/soak: --warmup-minutes must be shorter than --minutes")
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(sig, interrupted)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

    real = any((args.data / "corrosion-detector/rustnorust/train/rust").glob("*.jpg"))
    images = photos(args.data)
    jpegs = [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in images]
    what = "real rust photos" if real else "SYNTHETIC scenes (no photos under --data)"

    agent: subprocess.Popen[bytes] | None = None
    feeder: Feeder | None = None
    counter: Counter | None = None
    s3_proc: subprocess.Popen[bytes] | None = None
    broker: Broker | None = None
    samples: list[Sample] = []
    snaps: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # the broker runs as the mosquitto user
        state, frames, traces = tmp / "state", tmp / "frames", tmp / "traces"
        frames.mkdir()
        traces.mkdir()
        try:
            s3_proc, endpoint = start_s3(tmp)
            bucket = Bucket(endpoint)
            broker = Broker(tmp / "mosquitto", persistence=False).start()
            config = write_config(
                tmp / "agent.toml",
                {
                    "device_id": DEVICE,
                    "state_dir": str(state),
                    "log_level": "INFO",
                    "model": {"path": str(args.model.resolve())},
                    "classifier": {"flag_pct": args.flag_pct},
                    "source": {"kind": "folder", "uri": str(frames), "settle_s": 0.0},
                    "mqtt": {"port": broker.port},
                    "health": {"metrics_interval_s": 10.0},
                    "upload": {
                        "enabled": not args.no_upload,
                        "bucket": BUCKET,
                        "prefix": PREFIX,
                        "endpoint_url": endpoint,
                        "region": "us-east-1",
                        "limits": {k: FREE for k in ("flagged", "near_threshold", "sample")},
                    },
                },
            )
            topics = [f"{PREFIX}/{DEVICE}/{k}" for k in ("detections", "uploads")]
            counter = Counter(broker.port, topics)
            log = tmp / "agent.log"
            agent = start_agent(config, log, traces if args.tracemalloc else None)
            t0 = time.monotonic()
            feeder = Feeder(frames, jpegs, args.fps)
            feeder.start()
            warn(
                f"{args.minutes:g} min: {args.fps:g} x 1920x1080 JPEG/s ({what}), "
                f"agent pid {agent.pid}, a sample every {args.interval:g} s"
            )
            while counter.count("detections") == 0:
                if agent.poll() is not None or time.monotonic() - t0 > 120:
                    sys.exit(f"bench/soak: no detection from the agent:\n{log.read_text()}")
                time.sleep(0.05)
            samples.append(take(agent.pid, t0, state, counter, bucket))
            warmed = False
            tick = 1
            while True:
                due = t0 + tick * args.interval
                if due > t0 + args.minutes * 60 + 1e-6:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                tick += 1
                if agent.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                    sys.exit(f"bench/soak: the agent exited ({agent.returncode}):\n{tail}")
                if args.tracemalloc and not warmed and due - t0 >= args.warmup_minutes * 60:
                    snaps.append(snapshot(agent, traces, 1))
                    traced_from = counter.count("detections")
                s = take(agent.pid, t0, state, counter, bucket)
                warmed = warmed or s.t_s >= args.warmup_minutes * 60 - 1
                samples.append(s)
                warn(
                    f"{s.t_s / 60:5.1f} min  frames {s.frames}  rss {s.rss_kb / 1024:.1f} MB  "
                    f"fds {s.fds}  threads {s.threads}  seen {s.seen_b / 1024:.0f} kB  "
                    f"objects {s.objects}"
                )
            if args.tracemalloc:
                snaps.append(snapshot(agent, traces, 2))
                traced = counter.count("detections") - traced_from
            feeder.stop()
            written, behind = feeder.written, feeder.behind_s
            stop_at = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            rc = agent.wait(30)
            stop_s = time.monotonic() - stop_at
            time.sleep(1.0)  # the last PUBACKed detections reach the subscriber
            published = counter.count("detections")
            uploads = counter.count("uploads")
            objects = bucket.collect()
            manifests = bucket.manifests()
            warnings, errors, examples = log_counts(log)
            if args.tracemalloc:
                trace_diff(snaps[0], snaps[1], traced)
        finally:
            if feeder is not None:
                feeder.stop()
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait(10)
            if counter is not None:
                counter.close()
            if broker is not None:
                broker.kill()
            if s3_proc is not None:  # after hours moto holds 100k+ objects: slow to go
                s3_proc.terminate()
                try:
                    s3_proc.wait(10)
                except subprocess.TimeoutExpired:
                    s3_proc.kill()
                    s3_proc.wait(10)

    report(args, what, samples, Totals(written, behind, published, uploads, objects, manifests))
    print(f"stop                    SIGTERM -> exit {rc} in {stop_s:.2f} s")
    print(f"agent log               {warnings} warning(s), {errors} error(s)")
    for line in examples:
        print(f"  {line[:160]}")
    last = samples[-1]
    start = next(s for s in samples if s.t_s >= args.warmup_minutes * 60 - 1)
    growth = slope_per_hour([s for s in samples if s.t_s >= start.t_s], lambda s: s.rss_kb / 1024)
    print(
        f"soak_minutes={args.minutes:g} frames={published} rss_start_mb={start.rss_kb / 1024:.1f} "
        f"rss_end_mb={last.rss_kb / 1024:.1f} rss_growth_mb_per_hour={growth:.1f} "
        f"fd_start={start.fds} fd_end={last.fds} threads_start={start.threads} "
        f"threads_end={last.threads} outbox_mb_end={last.outbox_b / 1e6:.2f} "
        f"seen_mb_end={last.seen_b / 1e6:.2f} hwm_mb_end={last.hwm_kb / 1024:.1f} "
        f"objects={objects}"
    )


def report(args: argparse.Namespace, what: str, samples: list[Sample], end: Totals) -> None:
    first, last = samples[0], samples[-1]
    start = next(s for s in samples if s.t_s >= args.warmup_minutes * 60 - 1)
    after = [s for s in samples if s.t_s >= start.t_s]
    hours = (last.t_s - start.t_s) / 3600

    def per_hour(value: Callable[[Sample], float]) -> float:
        return slope_per_hour(after, value)

    rss_g = per_hour(lambda s: s.rss_kb / 1024)
    anon_g = per_hour(lambda s: s.anon_kb / 1024)
    print_table(samples)
    print()
    print(
        f"soak                    {args.minutes:g} min, {args.fps:g} x {SIZE[0]}x{SIZE[1]} JPEG/s "
        f"offered ({what}), deleted after {KEEP_S:.0f} s; demo model, flag >= {args.flag_pct:g} %"
        + ("; UPLOADS OFF" if args.no_upload else "")
    )
    print(
        f"frames                  written {end.written} (feeder at most {end.behind_s:.2f} s "
        f"behind), detections received {end.published} "
        f"({100 * end.published / max(1, end.written):.1f} %)"
    )
    print(
        f"captures                {end.uploads} upload notices, {end.objects} capture objects in "
        f"the bucket, {end.manifests} manifest objects"
    )
    print(
        f"RSS MB                  first frame {first.rss_kb / 1024:.1f}, warm-up "
        f"({start.t_s / 60:.1f} min) {start.rss_kb / 1024:.1f}, end {last.rss_kb / 1024:.1f}; "
        f"end/warm-up {last.rss_kb / start.rss_kb:.3f}, warm-up/first frame "
        f"{start.rss_kb / first.rss_kb:.3f}"
    )
    print(
        f"growth after warm-up    RSS {rss_g:+.1f} MB/h, RssAnon {anon_g:+.1f} MB/h "
        f"(least squares over {len(after)} samples, {hours * 60:.1f} min)"
    )
    room = MEMORY_MAX_MB - last.hwm_kb / 1024
    eta = f"{room / rss_g:.0f} h at this rate" if rss_g > 0.5 else "not at this rate"
    print(
        f"VmHWM                   {last.hwm_kb / 1024:.1f} MB = "
        f"{100 * last.hwm_kb / 1024 / MEMORY_MAX_MB:.0f} % of MemoryMax={MEMORY_MAX_MB}M "
        f"(docs/DEPLOY.md); reached: {eta}"
    )
    print(
        f"fds / threads           first frame {first.fds} / {first.threads}, warm-up "
        f"{start.fds} / {start.threads}, end {last.fds} / {last.threads}; "
        f"{per_hour(lambda s: s.fds):+.1f} fds/h"
    )
    frames = max(1, last.frames - start.frames)
    for name, field in (
        ("seen-files.sqlite(-wal)", "seen_b"),
        ("outbox.sqlite(-wal)", "outbox_b"),
        ("spool (all)", "spool_b"),
        ("spool manifests", "manifests_b"),
    ):
        get = attrgetter(field)
        delta = get(last) - get(start)
        print(
            f"{name:24s}warm-up {get(start) / 1e6:.2f} MB, end {get(last) / 1e6:.2f} MB: "
            f"{per_hour(get) / 1e6:+.2f} MB/h, {delta / frames:+.1f} bytes/frame"
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as exc:  # everything is stopped and removed by now
        warn(f"interrupted ({exc or 'SIGINT'}); processes stopped, temp dir removed")
        sys.exit(130)
