"""`corrosion-agent run`: builds the parts from the config, runs the frame loop, and shuts
everything down in order on SIGTERM, SIGINT or when a file source is done.

Shutdown order follows the data: stop taking frames, finish the frame in hand, stop the
health ticker, let the publisher settle acknowledgements, publish `stopped`, disconnect,
checkpoint the outbox. Every step has a time limit so the whole takes well under 10 s;
whatever the broker has not acknowledged stays in the outbox for the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from agent import __version__
from agent.commands import Commands
from agent.config import AgentConfig
from agent.contract.messages import (
    AgentState,
    ModelStatus,
    OutboxStats,
    PingCommand,
    SetThresholdCommand,
    SnapshotCommand,
    SourceStatus,
    StatusCommand,
    StatusMessage,
    Topics,
)
from agent.engine.detector import Detector
from agent.engine.model import resolve_manifest
from agent.health import FrameStats, HealthTicker, Heartbeat, SdNotify
from agent.mqtt import MqttLink, Retained
from agent.outbox import Outbox
from agent.pipeline import FrameLoop
from agent.sources import Source, open_source

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
DRAIN_S = 5.0  # how long a finished run waits for the broker to take the outbox


class Agent:
    """One daemon run. Construct, then `run()`; `stop()` may come from any thread."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self._stale = False
        self.stop_event = threading.Event()
        self.topics = Topics(config.topic_prefix())
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.detector = Detector.load(resolve_manifest(config.model.path), config.classifier)
        self.model_since = self.started_at
        self.outbox = Outbox(config.state_dir / OUTBOX_FILE, config.outbox)
        self.source: Source = open_source(
            config.source,
            state_dir=config.state_dir,
            decode_long_side=config.classifier.analysis_long_side,
        )
        self.stats = FrameStats()
        self.heartbeat = Heartbeat(config.state_dir)
        self.notify = SdNotify()
        self.commands = Commands(config.device_id, config.mqtt.max_command_bytes)
        self.loop = FrameLoop(
            source=self.source,
            detector=self.detector,
            outbox=self.outbox,
            topics=self.topics,
            device_id=config.device_id,
            stats=self.stats,
            heartbeat=self.heartbeat,
            notify=self.notify,
        )
        self.link: MqttLink | None = None
        if config.mqtt.enabled:
            self.link = MqttLink(
                config.mqtt,
                client_id=config.device_id,
                topics=self.topics,
                outbox=self.outbox,
                retained=Retained(status=self._status_payload, model=self._model_payload),
                commands=self.commands,
            )
        self.ticker = HealthTicker(
            config.health,
            device_id=config.device_id,
            heartbeat=self.heartbeat,
            stats=self.stats,
            notify=self.notify,
            outbox_stats=self._outbox_stats,
            source_status=self.source_status,
            connected=lambda: self.link is not None and self.link.connected,
            publish=lambda m: self._publish(self.topics.metrics, m.model_dump_json().encode()),
        )
        self._register_commands()

    # ------------------------------------------------------------------ state

    def uptime(self) -> float:
        return time.monotonic() - self._t0

    def source_status(self) -> SourceStatus:
        """The source's own state, plus `stale` when a live source has gone quiet."""
        s = self.source.stats
        state = s.state
        if self.source.live and state == "open":
            last = s.last_frame_at if s.last_frame_at is not None else self._t0
            silent = time.monotonic() - last
            stale = silent > self.config.source.stale_after_s
            if stale != self._stale:
                self._stale = stale
                if stale:
                    log.warning("source %s stale: no frame for %.0f s", self.source.uri, silent)
                else:
                    log.info("source %s delivers again", self.source.uri)
            state = "stale" if stale else state
        return SourceStatus(
            kind=self.source.kind,
            uri=self.source.uri,
            state=state,
            delivered=s.delivered,
            dropped=s.dropped,
            failed=s.failed,
            reopens=s.reopens,
        )

    def _status(self, state: AgentState) -> StatusMessage:
        return StatusMessage(
            device_id=self.config.device_id,
            state=state,
            agent_version=__version__,
            started_at=self.started_at,
            uptime_s=round(self.uptime(), 3),
            model=self.detector.model.ref,
            source=self.source_status(),
        )

    def _status_payload(self, state: AgentState) -> bytes:
        return self._status(state).model_dump_json().encode()

    def _model_payload(self) -> bytes:
        return (
            ModelStatus(
                device_id=self.config.device_id,
                serving=self.detector.model.ref,
                since=self.model_since,
                flag_pct=self.detector.threshold,
            )
            .model_dump_json()
            .encode()
        )

    def _outbox_stats(self) -> OutboxStats:
        return OutboxStats(
            depth=self.outbox.depth,
            bytes=self.outbox.size,
            dropped_total=self.outbox.dropped_total,
            published=self.outbox.acked,
        )

    def _publish(self, topic: str, payload: bytes) -> None:
        self.outbox.put(topic, payload)

    # ------------------------------------------------------------------ commands

    def _register_commands(self) -> None:
        c = self.commands
        c.register("ping", PingCommand, lambda _: {"pong": datetime.now(UTC).isoformat()})
        c.register("status", StatusCommand, self._cmd_status)
        c.register("snapshot", SnapshotCommand, self._cmd_snapshot)
        c.register("set-threshold", SetThresholdCommand, self._cmd_set_threshold)

    def _cmd_status(self, _: StatusCommand) -> dict[str, Any]:
        return {
            "status": self._status("online").model_dump(mode="json"),
            "outbox": self._outbox_stats().model_dump(mode="json"),
            "frames_total": self.stats.total,
            "frames_failed": self.stats.failed,
            "flagged_total": self.stats.flagged,
        }

    def _cmd_snapshot(self, request: SnapshotCommand) -> dict[str, Any]:
        return {"pending": self.loop.request_snapshot(request.note)}

    def _cmd_set_threshold(self, request: SetThresholdCommand) -> dict[str, Any]:
        old = self.detector.threshold
        self.detector.config.flag_pct = request.flag_pct
        new = self.detector.threshold
        log.info("flag threshold %.3f%% -> %.3f%% (command)", old, new)
        if self.link is not None:
            self._publish_model()
        return {"previous_flag_pct": old, "flag_pct": new}

    def _publish_model(self) -> None:
        self.outbox.put(self.topics.model, self._model_payload(), retain=True)

    # ------------------------------------------------------------------ lifecycle

    def stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self) -> int:
        """Run until stopped or the source is done; returns the process exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        log.info(
            "corrosion-agent %s: device %s, model %s %s, source %s %s",
            __version__,
            self.config.device_id,
            self.detector.model.ref.name,
            self.detector.model.ref.version,
            self.source.kind,
            self.source.uri,
        )
        if self.link is not None:
            self.link.start()
        self.ticker.start()
        try:
            self.loop.run(self.stop_event)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        self.notify.stopping()
        self.stop_event.set()

    def shutdown(self) -> None:
        self.notify.stopping()
        self.source.close()
        self.ticker.stop()
        link = self.link
        if link is not None:
            patience = DRAIN_S if link.ever_connected else 1.0
            if not self.stop_event.is_set() and link.wait_connected(patience):
                self._drain(link)  # a finished file run: give the broker its messages
            link.stop("stopped")
        if self.outbox.depth:
            where = f"broker {link.where} unreachable" if link and not link.connected else "unsent"
            log.warning(
                "%d message(s) (%s) kept in the outbox %s (%s); they go out at the next start",
                self.outbox.depth,
                _bytes(self.outbox.size),
                self.outbox.path,
                where,
            )
        self.outbox.close()
        self.detector.close()
        log.info(
            "stopped: %d frames, %d flagged, %d failed, %d published",
            self.stats.total,
            self.stats.flagged,
            self.stats.failed,
            self.outbox.acked,
        )

    def _drain(self, link: MqttLink) -> None:
        deadline = time.monotonic() + DRAIN_S
        while self.outbox.depth and link.connected and time.monotonic() < deadline:
            time.sleep(0.05)


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
