"""The frame loop: source → engine → outbox, one frame at a time, on the main thread.

A frame is read, classified and its DetectionMessage committed to the outbox before the
next frame is read, so the network never sits on the frame's path and a crash loses at
most the frame in hand. A corrupt frame is counted and logged, never fatal; a detection
that cannot be committed (a locked or full outbox) ends the loop before the source is
asked for the next frame, so a watched folder never marks that frame seen.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from agent.capture import Capturer
from agent.contract.messages import DetectionMessage, Topics
from agent.engine.detector import Analysis, Detector
from agent.health import FrameStats, Heartbeat, SdNotify
from agent.outbox import Outbox
from agent.sources import Failed, Frame, Source

log = logging.getLogger(__name__)


class FrameLoop:
    """Owns nothing but the loop; the daemon owns the parts and stops them."""

    def __init__(
        self,
        *,
        source: Source,
        detector: Detector,
        outbox: Outbox,
        topics: Topics,
        device_id: str,
        stats: FrameStats,
        heartbeat: Heartbeat,
        notify: SdNotify,
        capturer: Capturer | None = None,
    ) -> None:
        self.source = source
        self.detector = detector
        self.outbox = outbox
        self.topics = topics
        self.device_id = device_id
        self.stats = stats
        self.heartbeat = heartbeat
        self.notify = notify
        self.capturer = capturer

    def run(self, stop: threading.Event) -> None:
        """Classify until the source is exhausted or `stop` is set."""
        ready = False
        for item in self.source.frames(stop):
            self.heartbeat.busy()
            if isinstance(item, Failed):
                self.stats.fail()
                log.warning("frame refused: %s", item.reason)
            else:
                try:
                    analysis, message = self._classify(item)
                except Exception:  # one frame a model chokes on must not end the agent
                    self.stats.fail()
                    log.exception("frame %s could not be classified", item.name)
                    self.heartbeat.idle()
                    continue
                message = self._commit(item, analysis, message)
                if not ready:
                    ready = True
                    self.notify.ready(f"classifying {self.source.uri}")
                    log.info("first frame classified: %s", _line(item, message))
                elif log.isEnabledFor(logging.DEBUG):  # no formatting per frame unless asked
                    log.debug("%s", _line(item, message))
            self.heartbeat.idle()  # asking for the next item lets a folder mark this one seen

    def _classify(self, frame: Frame) -> tuple[Analysis, DetectionMessage]:
        analysis = self.detector.analyse(frame.image, frame.full_size)
        latency_ms = 1000.0 * (time.monotonic() - frame.read_at)
        return analysis, analysis.message(
            device_id=self.device_id,
            source=frame.source,
            frame_index=frame.index,
            captured_at=frame.captured_at,
            latency_ms=latency_ms,
            gps=frame.gps,
        )

    def _commit(
        self, frame: Frame, analysis: Analysis, message: DetectionMessage
    ) -> DetectionMessage:
        """Capture (best effort) and commit the detection; an outbox error propagates."""
        if self.capturer is not None:
            try:
                message = self.capturer.consider(frame, analysis, message)
            except (OSError, ValueError, sqlite3.Error) as exc:  # a full disk must not stop
                # the detections: the capture is lost (and counted where the disk allows)
                log.error("capture of %s failed: %s", frame.name, exc)
        try:
            self.outbox.put(self.topics.detections, message.model_dump_json().encode())
        except BaseException:  # no detection, no capture: it would upload under an id never
            if self.capturer is not None:  # published, and the frame comes again anyway
                try:
                    self.capturer.withdraw(message)
                except (OSError, sqlite3.Error) as exc:
                    log.error("capture of %s not taken back: %s", frame.name, exc)
            raise
        if self.capturer is not None:
            try:
                self.capturer.release(message)
            except sqlite3.Error as exc:  # it goes up at the next start
                log.error("capture of %s held until the next start: %s", frame.name, exc)
        self.stats.frame(message.latency_ms, analysis.flagged)
        return message


def _line(frame: Frame, m: DetectionMessage) -> str:
    flag = "FLAGGED" if m.flagged else "ok"
    return (
        f"{frame.name}: {m.corrosion_pct:.2f}% corroded, {flag}, {len(m.regions)} regions, "
        f"{m.latency_ms:.1f} ms"
    )
