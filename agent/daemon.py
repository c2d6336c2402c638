"""`corrosion-agent run`: builds the parts from the config, runs the frame loop, and shuts
everything down in order on SIGTERM, SIGINT or, with `exit_when_done`, when a file source
is done (without it the agent idles when a glob or video ends, until it is stopped).

Shutdown order follows the data: stop taking frames, finish the frame in hand, stop the
uploader (a finished run first lets S3 and the broker drain, the health ticker feeding the
watchdog meanwhile), stop the ticker, let the publisher settle acknowledgements, publish
`stopped`, disconnect, checkpoint the outbox. Every step has a time limit so the whole
takes well under 10 s; whatever the broker has not acknowledged stays in the outbox for the
next start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from agent.capture import Capturer
from agent.commands import CommandError, Commands
from agent.config import AgentConfig, ConfigError
from agent.contract import ModelManifest, iso
from agent.contract.messages import (
    AgentState,
    ModelStatus,
    OutboxStats,
    PingCommand,
    PullModelCommand,
    RollbackCommand,
    SetThresholdCommand,
    SnapshotCommand,
    SourceStatus,
    StatusCommand,
    StatusMessage,
    Topics,
    UploadStats,
)
from agent.engine.classifier import ServingModel, load_model
from agent.engine.detector import Detector
from agent.engine.model import ModelError, resolve_manifest, runtime_fault
from agent.health import FrameStats, HealthTicker, Heartbeat, SdNotify
from agent.mqtt import MqttLink, Retained
from agent.outbox import Outbox
from agent.pipeline import FrameLoop
from agent.policy import Policy
from agent.signing import trusted_keys, verify_manifest
from agent.sources import Source, SourceError, open_source
from agent.spool import Spool
from agent.updater import ModelStore, Outcome, RollbackError, Updater, version_of
from agent.uploader import Uploader

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
DRAIN_S = 5.0  # how long a finished run waits for the broker to take the outbox
UPLOAD_DRAIN_S = 60.0  # ... and for S3 to take the captures (while it is reachable)
STOP_BUDGET_S = 7.0  # SIGTERM to exit, after the source has stopped (systemd allows 15)


def _flush_within(uploader: Uploader, budget: float | None) -> None:
    """The hour's manifests go up at stop (between flushes they lag by up to
    `manifest_every_s`); on a signal only within `budget`, since a slow S3 must not break
    the stop's time limit: what is left goes up at the next start (uploaded whole, so a PUT
    cut short replaces nothing)."""
    if budget is None:
        uploader.flush()
        return
    flusher = threading.Thread(target=uploader.flush, name="manifest-flush", daemon=True)
    flusher.start()
    flusher.join(budget)
    if flusher.is_alive():
        log.warning(
            "capture manifests not uploaded within %.1f s; they go up at the next start", budget
        )


class Agent:
    """One daemon run. Construct, then `run()`; `stop()` may come from any thread."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self.stop_event = threading.Event()
        self.topics = Topics(config.topic_prefix())
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            probe = config.state_dir / ".writable"
            probe.touch()  # an un-chowned bind mount fails here, not deep in SQLite
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"state_dir ({config.state_dir}): {exc.strerror or exc}") from None
        self.keys = trusted_keys(config.model)
        self.store = ModelStore(config.state_dir / "models")
        self.detector = Detector(self._boot_model(), config.classifier)
        self.model_since = self.started_at
        self.model_refused: str | None = None
        self.outbox = Outbox(config.state_dir / OUTBOX_FILE, config.outbox)
        try:
            self.source: Source = open_source(
                config.source,
                state_dir=config.state_dir,
                decode_long_side=config.classifier.analysis_long_side,
            )
        except SourceError as exc:
            raise SourceError(f"source.uri: {exc}") from None
        self.stats = FrameStats()
        self.heartbeat = Heartbeat(config.state_dir, io_since=lambda: self.source.stats.io_since)
        self.notify = SdNotify()
        self.commands = Commands(config.device_id, config.mqtt.max_command_bytes)
        self.policy: Policy | None = None
        self.spool: Spool | None = None
        self.uploader: Uploader | None = None
        capturer = None
        if config.upload.enabled:
            self.policy = Policy(config.upload)
            self.spool = Spool(
                config.state_dir / "spool",
                config.upload.spool_max_bytes,
                config.upload.spool_keep_free_bytes,
            )
            self.uploader = Uploader(
                config.upload,
                device_id=config.device_id,
                spool=self.spool,
                outbox=self.outbox,
                topics=self.topics,
            )
            capturer = Capturer(
                config.upload,
                device_id=config.device_id,
                policy=self.policy,
                spool=self.spool,
                on_stored=self.uploader.wake,
            )
        self.updater: Updater | None = None
        if config.model.registry is not None:
            self.updater = Updater(
                config.model,
                keys=self.keys,
                store=self.store,
                detector=self.detector,
                load=self._load_from_store,
                serving=lambda: self.detector.model.ref,
                report=self._on_model_outcome,
            )
        self.loop = FrameLoop(
            source=self.source,
            detector=self.detector,
            outbox=self.outbox,
            topics=self.topics,
            device_id=config.device_id,
            stats=self.stats,
            heartbeat=self.heartbeat,
            notify=self.notify,
            capturer=capturer,
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
            upload_stats=self._upload_stats,
            publish=lambda m: self._publish(self.topics.metrics, m.model_dump_json().encode()),
        )
        self._register_commands()

    # ------------------------------------------------------------------ models

    def _load(self, manifest: Path) -> ServingModel:
        return load_model(manifest, threads=self.config.classifier.threads)

    def _load_from_store(self, manifest: Path) -> ServingModel:
        """A registry model is verified again at every load: the disk may have been altered."""
        verify_manifest(
            ModelManifest.read(manifest), self.keys, required=self.config.model.require_signature
        )
        return self._load(manifest)

    def _boot_model(self) -> ServingModel:
        """The last good registry model on disk (a device may boot offline), else the bundled.
        A version rolled back from never serves again by itself. A pending rollback (answered,
        then cut off by a stop) is met where it can be: the versions it goes back to first,
        the one it leaves only if none of them loads (the updater then says why), none newer."""
        history, skipped = self.store.history(), self.store.skipped()
        pending = self.store.asked_rollback()
        left = self.store.rel(pending) if pending else None
        if left in history:  # the versions it goes back to, then itself, none newer
            cut = history.index(left)
            order = [*reversed(history[:cut]), left]
        else:
            order = list(reversed(history))
        for rel in order:
            if version_of(rel) in skipped:
                log.info("stored model %s was rolled back from: not served", rel)
                continue
            try:
                return self._load_from_store(self.store.root / rel)
            except Exception as exc:  # never a failed start while an earlier model remains
                if isinstance(exc, (ValueError, OSError)) and not runtime_fault(exc):
                    log.error("stored model %s unusable, trying an earlier one: %s", rel, exc)
                    self.store.drop(rel)  # it failed a check (ModelError is a ValueError)
                else:  # the device (memory short at boot) or the runtime: kept for next time
                    log.error("stored model %s not loaded now, trying an earlier one: %s", rel, exc)
        try:
            return self._load(resolve_manifest(self.config.model.path))
        except ValueError as exc:  # the bundled model's checks, its manifest's: the setting
            until = ""
            if self.config.model.registry is not None:
                until = " (a registry device serves it until it has stored a version)"
            raise ModelError(f"model.path: {exc}{until}") from None

    def _on_model_outcome(self, outcome: Outcome) -> None:
        if outcome.served is not None:
            self.model_since = datetime.now(UTC)
        self.model_refused = None if outcome.settled else outcome.refused or self.model_refused
        if self.link is not None:
            self.link.publish_state()

    # ------------------------------------------------------------------ state

    def uptime(self) -> float:
        return time.monotonic() - self._t0

    def source_status(self) -> SourceStatus:
        return self.source.status(self.config.source.stale_after_s, since=self._t0)

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
                rule_threshold=self.detector.rule_threshold,
                refused=self.model_refused,
            )
            .model_dump_json()
            .encode()
        )

    def _upload_stats(self) -> UploadStats | None:
        if self.spool is None or self.policy is None or self.uploader is None:
            return None
        counters = self.spool.counters()

        def by(kind: str) -> dict[str, int]:
            head = kind + "."
            return {k[len(head) :]: v for k, v in counters.items() if k.startswith(head)}

        return UploadStats(
            spool_depth=self.spool.depth,
            spool_bytes=self.spool.used,
            uploaded=by("uploaded"),
            evicted=by("evicted"),
            refused=by("refused"),
            rate_limited=dict(self.policy.stats.limited),
            duplicates=self.policy.stats.duplicates,
            s3_reachable=self.uploader.reachable,
            failed=by("failed") or None,  # left out while empty: what pre-1.7 readers read
            lost=by("lost") or None,
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
        c.register("ping", PingCommand, lambda _: {"pong": iso(datetime.now(UTC))})
        c.register("status", StatusCommand, self._cmd_status)
        c.register("snapshot", SnapshotCommand, self._cmd_snapshot, once=True)
        c.register("set-threshold", SetThresholdCommand, self._cmd_set_threshold)
        c.register("pull-model", PullModelCommand, self._cmd_pull_model)
        c.register("rollback", RollbackCommand, self._cmd_rollback, once=True)

    def _cmd_status(self, _: StatusCommand) -> dict[str, Any]:
        return {
            "status": self._status("online").model_dump(mode="json"),
            "outbox": self._outbox_stats().model_dump(mode="json"),
            "frames_total": self.stats.total,
            "frames_failed": self.stats.failed,
            "flagged_total": self.stats.flagged,
        }

    def _cmd_snapshot(self, request: SnapshotCommand) -> dict[str, Any]:
        if self.policy is None:
            raise CommandError("uploads are not enabled (upload.enabled = false)")
        try:
            return {"pending": self.policy.request_snapshot(request.note)}
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def _updater(self, why: str) -> Updater:
        if self.updater is None:
            raise CommandError(f"{why} (model.registry is not set)")
        return self.updater

    def _cmd_pull_model(self, _: PullModelCommand) -> dict[str, Any]:
        updater = self._updater("no registry to pull from")
        if updater.rollback_pending:  # the updater does it before any check
            raise CommandError("a rollback is pending: no channel check until it is done")
        updater.pull()
        serving = self.detector.model.ref
        return {"requested": True, "serving": serving.model_dump(mode="json"), "see": "model"}

    def _cmd_rollback(self, _: RollbackCommand) -> dict[str, Any]:
        """What can be known now is this result's error; the swap (or a refusal only it
        finds) goes on the retained `model` topic, from the updater thread."""
        updater = self._updater("rollback: this device takes no model updates")
        try:
            serving = updater.rollback()
        except RollbackError as exc:
            raise CommandError(str(exc)) from None
        return {"requested": True, "serving": serving.model_dump(mode="json"), "see": "model"}

    def _cmd_set_threshold(self, request: SetThresholdCommand) -> dict[str, Any]:
        old = self.detector.threshold
        self.detector.command_threshold(request.flag_pct)
        new = self.detector.threshold
        log.info("flag threshold %.3f%% -> %.3f%% (command)", old, new)
        if self.link is not None:
            self.link.publish_state()
        return {"previous_flag_pct": old, "flag_pct": new}

    # ------------------------------------------------------------------ lifecycle

    def stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self) -> int:
        """Run until stopped (or the source is done, with exit_when_done); the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        zone = self.config.source.camera_tz.strip()
        log.info(
            "corrosion-agent %s: device %s, model %s %s, source %s %s%s",
            __version__,
            self.config.device_id,
            self.detector.model.ref.name,
            self.detector.model.ref.version,
            self.source.kind,
            self.source.uri,
            f" (camera clock {zone})" if zone else "",
        )
        for part in (self.link, self.uploader, self.updater):
            if part is not None:
                part.start()
        self.ticker.start()
        code = 0
        try:
            self.loop.run(self.stop_event)
            if not self.stop_event.is_set() and not self.config.source.exit_when_done:
                # A glob or video ends; the agent does not: it keeps answering commands,
                # publishing metrics and taking updates, and ending would replay it all.
                log.info("source %s done; idle until stopped (exit_when_done = false)",
                         self.source.uri)  # fmt: skip
                self.stop_event.wait()
        except Exception:  # an outbox that cannot commit: logged before the stop, and the
            log.exception("frame loop failed; stopping")  # stop takes the signal's budget,
            self.stop_event.set()  # not a finished run's long drain (systemd would kill it)
            code = 1
        finally:
            try:
                self.shutdown()  # our handlers stay: a signal cuts a finished run's drain short
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        self.notify.stopping()
        self.stop_event.set()

    def shutdown(self) -> None:
        """In data order. On a signal every wait is cut to fit STOP_BUDGET_S in all; a finished
        file run first gives the broker and S3 time to take what it produced. STOPPING=1
        (which starts systemd's TimeoutStopSec) comes after those drains, not before."""
        finished = not self.stop_event.is_set()
        if finished:
            self.notify.send("STATUS=source done: handing what it produced to the broker and S3")
        else:
            self.notify.stopping()
        deadline = time.monotonic() + STOP_BUDGET_S

        def draining() -> bool:
            """A finished run that no signal has cut short since."""
            return finished and not self.stop_event.is_set()

        def left(limit: float) -> float:
            return max(0.1, min(limit, deadline - time.monotonic()))

        self.source.close()
        if self.updater is not None:
            self.updater.stop(left(1.0))
        if self.uploader is not None and self.spool is not None:
            spool, uploader = self.spool, self.uploader
            if finished and spool.depth and uploader.draining:  # let S3 have the captures
                log.info(
                    "source done: up to %.0f s for S3 to take %d capture(s); SIGTERM cuts it short",
                    UPLOAD_DRAIN_S,
                    spool.depth,
                )
                self._wait(lambda: uploader.draining, UPLOAD_DRAIN_S)
                deadline = time.monotonic() + STOP_BUDGET_S
            if uploader.stop(left(2.0)):
                _flush_within(uploader, None if draining() else left(2.0))
            if self.spool.depth:
                log.warning(
                    "%d capture(s) (%s) wait in the spool %s; they go up at the next start",
                    self.spool.depth,
                    _bytes(self.spool.used),
                    self.spool.dir,
                )
        link = self.link
        if link is not None:
            patience = DRAIN_S if link.ever_connected else 1.0
            if draining():  # a finished file run: give the broker its messages
                self._wait(lambda: not link.connected, patience)
                if link.connected:
                    self._drain(link)
        self.ticker.stop(left(1.0))  # it fed the watchdog through the drains (WatchdogSec)
        self.notify.stopping()  # the rest is bounded by the signal budget
        if link is not None:
            link.stop("stopped", timeout=left(3.0))
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
        if self.spool is not None:
            self.spool.close()
        self.detector.close()
        log.info(
            "stopped: %d frames, %d flagged, %d failed, %d published",
            self.stats.total,
            self.stats.flagged,
            self.stats.failed,
            self.outbox.acked,
        )

    def _drain(self, link: MqttLink) -> None:
        self._wait(lambda: self.outbox.depth > 0 and link.connected, DRAIN_S)

    def _wait(self, busy: Callable[[], bool], limit_s: float) -> None:
        """Wait while `busy()`, at most `limit_s`; a SIGTERM (the stop event) cuts it short."""
        deadline = time.monotonic() + limit_s
        while busy() and time.monotonic() < deadline and not self.stop_event.wait(0.05):
            pass


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
