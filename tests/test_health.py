"""systemd notifications, the hung-loop watchdog, the heartbeat file, latency figures."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import HealthConfig, SourceConfig
from agent.contract.messages import MetricsMessage, OutboxStats, SourceStatus
from agent.health import FrameStats, HealthTicker, Heartbeat, SdNotify, latency_of
from agent.sources import FolderSource
from tests.agentproc import AgentProcess, agent_settings, write_config, write_frames


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def received(sock: socket.socket, seconds: float) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            out.extend(sock.recv(4096).decode().splitlines())
    return out


def test_daemon_under_systemd_notify(
    tmp_path: Path,
    logistic_model: Path,
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    settings = agent_settings(tmp_path, logistic_model, 1, frames, mqtt={"enabled": False})
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    try:
        lines = received(notify_socket, 4.0)
        # An empty watched folder is a working agent: READY comes without a frame.
        assert "READY=1" in lines, agent.text()
        assert any(line.startswith("STATUS=waiting for frames") for line in lines)
        assert lines.count("WATCHDOG=1") >= 3  # every WATCHDOG_USEC / 2
        write_frames(frames, 2)
        time.sleep(1.0)
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        after = received(notify_socket, 0.5)
        assert after.count("STOPPING=1") == 1
        assert "READY=1" not in after  # once only
    finally:
        agent.stop()
    assert (tmp_path / "state" / "heartbeat").exists()


def test_finished_run_says_stopping_only_after_its_drains(
    tmp_path: Path,
    logistic_model: Path,
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STOPPING=1 starts systemd's TimeoutStopSec (15 s); a finished run's drains may take a
    minute, so it comes after them, and a STATUS line says what the agent is doing meanwhile."""
    write_frames(tmp_path / "frames", 2)
    settings = agent_settings(tmp_path, logistic_model, 1, tmp_path / "frames")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    timed: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            exited = agent.proc.poll() is not None
            try:
                lines = notify_socket.recv(4096).decode().splitlines()
            except TimeoutError:
                if exited:  # and nothing left to read
                    break
                continue
            timed += [(time.monotonic(), line) for line in lines]
        assert agent.wait(10) == 0, agent.text()
    finally:
        agent.stop()
    said = [line for _, line in timed]
    draining = next(i for i, line in enumerate(said) if line.startswith("STATUS=source done"))
    stopping = said.index("STOPPING=1")
    assert draining < stopping, said
    # the broker (port 1) never answered: the run gave it its 1 s before STOPPING=1 ...
    assert timed[stopping][0] - timed[draining][0] >= 0.9, timed
    # ... and fed the watchdog meanwhile (WatchdogSec would kill a silent drain)
    assert "WATCHDOG=1" in said[draining:stopping], said


class _Recorder(SdNotify):
    def __init__(self) -> None:
        super().__init__(address="")
        self.watchdog_s = 0.2
        self.sent: list[str] = []

    def send(self, *lines: str) -> None:
        self.sent.extend(lines)


def _ticker(
    heartbeat: Heartbeat,
    notify: SdNotify,
    hung_after_s: float,
    *,
    metrics_interval_s: float = 3600,
    publish: Callable[[MetricsMessage], None] = lambda _m: None,
) -> HealthTicker:
    return HealthTicker(
        HealthConfig(metrics_interval_s=metrics_interval_s, hung_after_s=hung_after_s),
        device_id="d",
        heartbeat=heartbeat,
        stats=FrameStats(),
        notify=notify,
        outbox_stats=lambda: OutboxStats(depth=0, bytes=0, dropped_total=0, published=0),
        source_status=lambda: SourceStatus(
            kind="folder", uri="x", state="open", delivered=0, dropped=0, failed=0, reopens=0
        ),
        connected=lambda: False,
        upload_stats=lambda: None,
        publish=publish,
    )


def test_hung_frame_loop_stops_the_watchdog(caplog: pytest.LogCaptureFixture) -> None:
    heartbeat = Heartbeat()
    notify = _Recorder()
    ticker = _ticker(heartbeat, notify, hung_after_s=1.0)
    ticker.start()
    time.sleep(1.2)
    assert notify.sent.count("WATCHDOG=1") >= 1
    heartbeat.busy()  # a frame that never finishes
    time.sleep(1.2)
    before = notify.sent.count("WATCHDOG=1")
    time.sleep(1.5)
    ticker.stop()
    assert notify.sent.count("WATCHDOG=1") == before, "pings went on while the loop hung"
    assert "frame loop stuck on one frame or one file read" in caplog.text


def test_a_source_stuck_in_a_file_read_stops_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop waits for its source, which is idle, not hung, unless the source is inside
    one read (a hung NFS mount) for hung_after_s: then systemd should restart the agent."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    source = FolderSource(
        SourceConfig(kind="folder", uri=str(tmp_path / "in"), settle_s=0.0),
        state_dir=tmp_path / "state",
    )
    released = threading.Event()
    monkeypatch.setattr(Path, "read_bytes", lambda _: released.wait(10) and b"")
    heartbeat = Heartbeat(io_since=lambda: source.stats.io_since)
    stop = threading.Event()
    reader = threading.Thread(target=lambda: next(source.frames(stop), None), daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while source.stats.io_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heartbeat.alive(hung_after_s=5.0)
    time.sleep(0.3)
    assert not heartbeat.alive(hung_after_s=0.2)
    released.set()
    stop.set()
    reader.join(5)
    source.close()
    assert source.stats.io_since is None and heartbeat.alive(hung_after_s=0.2)


def test_a_failed_metrics_write_does_not_end_the_health_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A locked or full outbox once ended the thread: no metrics, heartbeat or watchdog
    pings after it, even once the outbox worked again."""
    published: list[MetricsMessage] = []
    failures = [sqlite3.OperationalError("database is locked")] * 2

    def publish(message: MetricsMessage) -> None:
        if failures:
            raise failures.pop()
        published.append(message)

    notify = _Recorder()
    ticker = _ticker(Heartbeat(), notify, 5.0, metrics_interval_s=1.0, publish=publish)
    ticker.start()
    deadline = time.monotonic() + 10
    while not published and time.monotonic() < deadline:
        time.sleep(0.1)
    ticker.stop()
    assert published, "metrics never resumed"
    assert caplog.text.count("metrics not published") == 2
    assert any(line.startswith("STATUS=") for line in notify.sent)


def test_health_command_reads_the_heartbeat(tmp_path: Path) -> None:
    def health(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "agent.cli", "health", "--state-dir", str(tmp_path), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    missing = health()
    assert missing.returncode == 1 and "no heartbeat" in missing.stderr
    (tmp_path / "heartbeat").touch()
    assert health().returncode == 0
    old = time.time() - 300
    os.utime(tmp_path / "heartbeat", (old, old))
    stale = health("--max-age", "60")
    # The subprocess takes its own time to start: the age is 300 s and up, not exactly 300.
    assert stale.returncode == 1 and re.search(r"silent for 30\d s", stale.stderr), stale.stderr


def test_latency_percentiles() -> None:
    assert latency_of([]) is None
    one = latency_of([5.0])
    assert one is not None and one.p95_ms == 5.0
    lat = latency_of([float(i) for i in range(1, 101)])
    assert lat is not None and lat.p50_ms == 50.5 and 94 <= lat.p95_ms <= 96 and lat.max_ms == 100
