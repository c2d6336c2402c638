"""Liveness and metrics: systemd notifications, the frame-loop heartbeat, metrics messages.

The watchdog is fed only while the frame loop is alive: a loop stuck on one frame for
`hung_after_s` stops the pings and systemd restarts the agent. Waiting for a frame (an
empty watched folder) is not a hang. Docker has no watchdog, so the heartbeat is also a
file whose age `corrosion-agent health` checks.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import HealthConfig
from agent.contract.messages import (
    Latency,
    MetricsMessage,
    OutboxStats,
    SourceStatus,
    UploadStats,
)

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat"
IDLE_READY_S = 2.0


class SdNotify:
    """sd_notify(3) without libsystemd: one datagram per state to $NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = None
        if address:
            # A leading @ is Linux's abstract namespace, spelt with a NUL byte on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None
        self.is_ready = False
        self._stopping = False

    def ready(self, status: str) -> None:
        """READY=1, once: after the first frame, or when the source is open with none yet."""
        if not self.is_ready:
            self.is_ready = True
            self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.send("STOPPING=1")

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:  # systemd gone (shutdown): nothing to tell
            log.debug("sd_notify %s failed: %s", lines, exc)


class Heartbeat:
    """Busy/idle marks from the frame loop; alive unless one frame has been busy too long,
    or the source has been stuck in one file-system call (`io_since`) that long."""

    def __init__(
        self, state_dir: Path | None = None, io_since: Callable[[], float | None] | None = None
    ) -> None:
        self._io_since = io_since
        self._busy_since: float | None = None
        self._last = time.monotonic()
        self._file = state_dir / HEARTBEAT_FILE if state_dir else None
        self._touched = 0.0

    def busy(self) -> None:
        self._busy_since = time.monotonic()

    def idle(self) -> None:
        self._busy_since = None
        self._last = time.monotonic()

    def idle_for(self) -> float:
        """Seconds the loop has been waiting for its source (0 while a frame is in hand)."""
        return 0.0 if self._busy_since is not None else time.monotonic() - self._last

    def alive(self, hung_after_s: float) -> bool:
        now = time.monotonic()
        busy = self._busy_since
        io = self._io_since() if self._io_since else None
        return all(since is None or now - since < hung_after_s for since in (busy, io))

    def touch(self) -> None:
        """Refresh the heartbeat file (at most every 5 s: a flash card has finite writes)."""
        now = time.monotonic()
        if self._file is None or now - self._touched < 5.0:
            return
        self._touched = now
        try:
            self._file.touch()
        except OSError as exc:
            log.warning("cannot touch %s: %s", self._file, exc)


def heartbeat_age(state_dir: Path) -> float | None:
    """Seconds since the daemon last touched its heartbeat file; None if there is none."""
    try:
        return max(0.0, time.time() - (state_dir / HEARTBEAT_FILE).stat().st_mtime)
    except OSError:
        return None


class FrameStats:
    """Counters the frame loop bumps and the metrics ticker reads and resets per interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self.total = 0
        self.failed = 0
        self.flagged = 0

    def frame(self, latency_ms: float, flagged: bool) -> None:
        with self._lock:
            self._latencies.append(latency_ms)
            self.total += 1
            self.flagged += flagged

    def fail(self) -> None:
        with self._lock:
            self.failed += 1

    def take_latencies(self) -> list[float]:
        with self._lock:
            out, self._latencies = self._latencies, []
        return out


def latency_of(samples: list[float]) -> Latency | None:
    if not samples:
        return None
    if len(samples) == 1:
        return Latency(p50_ms=samples[0], p95_ms=samples[0], max_ms=samples[0])
    cuts = statistics.quantiles(samples, n=20, method="inclusive")
    return Latency(
        p50_ms=round(statistics.median(samples), 3),
        p95_ms=round(cuts[18], 3),
        max_ms=round(max(samples), 3),
    )


class HealthTicker:
    """Owns the health thread: watchdog pings, STATUS lines and periodic metrics."""

    def __init__(
        self,
        config: HealthConfig,
        *,
        device_id: str,
        heartbeat: Heartbeat,
        stats: FrameStats,
        notify: SdNotify,
        outbox_stats: Callable[[], OutboxStats],
        source_status: Callable[[], SourceStatus | None],
        connected: Callable[[], bool],
        upload_stats: Callable[[], UploadStats | None],
        publish: Callable[[MetricsMessage], None],
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.heartbeat = heartbeat
        self.stats = stats
        self.notify = notify
        self._outbox_stats = outbox_stats
        self._source_status = source_status
        self._connected = connected
        self._upload_stats = upload_stats
        self._publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._last_total = 0
        self._hung_reported = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def metrics(self, interval_s: float, dropped: int) -> MetricsMessage:
        total = self.stats.total
        frames = total - self._last_total
        self._last_total = total
        return MetricsMessage(
            device_id=self.device_id,
            interval_s=round(interval_s, 3),
            fps=round(frames / interval_s, 3) if interval_s > 0 else 0.0,
            frames=frames,
            frames_total=total,
            frames_dropped=dropped,
            frames_failed=self.stats.failed,
            flagged_total=self.stats.flagged,
            latency=latency_of(self.stats.take_latencies()),
            outbox=self._outbox_stats(),
            source=self._source_status(),
            connected=self._connected(),
            uploads=self._upload_stats(),
        )

    def _run(self) -> None:
        watchdog_every = self.notify.watchdog_s / 2 if self.notify.watchdog_s else None
        last_ping = last_metrics = time.monotonic()
        while not self._stop.wait(0.5):
            now = time.monotonic()
            alive = self.heartbeat.alive(self.config.hung_after_s)
            if alive:
                self.heartbeat.touch()
                self._hung_reported = False
            elif not self._hung_reported:
                self._hung_reported = True
                log.error(
                    "frame loop stuck on one frame or one file read for over %.0f s: "
                    "watchdog pings stopped",
                    self.config.hung_after_s,
                )
            self._ready_when_idle()
            if watchdog_every and alive and now - last_ping >= watchdog_every:
                self.notify.send("WATCHDOG=1")
                last_ping = now
            if now - last_metrics >= self.config.metrics_interval_s:
                interval, last_metrics = now - last_metrics, now
                try:
                    source = self._source_status()
                    message = self.metrics(interval, source.dropped if source else 0)
                    self._publish(message)
                    self.notify.send(self._status_line(message))
                except Exception:  # a full disk or a locked outbox: pings and heartbeat go on
                    log.exception("metrics not published; next try in %.0f s", interval)

    def _ready_when_idle(self) -> None:
        """An empty watched folder is a working agent: tell systemd, or it kills us at start."""
        if self.notify.is_ready or self.heartbeat.idle_for() < IDLE_READY_S:
            return
        source = self._source_status()
        if source is not None and source.state in ("open", "done"):
            self.notify.ready(f"waiting for frames from {source.uri}")

    @staticmethod
    def _status_line(m: MetricsMessage) -> str:
        link = "connected" if m.connected else "broker unreachable"
        return (
            f"STATUS={m.fps:.1f} fps, {m.frames_total} frames, {m.flagged_total} flagged, "
            f"outbox {m.outbox.depth} waiting, {link}"
        )
