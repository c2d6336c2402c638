"""OpenCV VideoCapture sources: cameras and streams (newest frame only, reopened with
backoff) and video files (every frame)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import cv2

from agent.config import SourceConfig
from agent.redact import mask_uri
from agent.sources.base import Failed, Frame, Image, Pacer, Source, SourceError

log = logging.getLogger(__name__)

_STREAM_SCHEMES: Final = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})
# FFmpeg waits 30 s by default; a stalled stream should fail its read and be reopened sooner.
_OPEN_TIMEOUT_MS: Final = 10_000
_READ_TIMEOUT_MS: Final = 5_000
# A grabber blocked in read() returns within the read timeout; shutdown does not wait that
# long (SIGTERM must exit within 10 s): the thread is a daemon and ends with its read.
_JOIN_S: Final = 2.0
# A stream that delivered for this long had recovered: its next outage starts the backoff
# afresh. One that drops sooner is flapping and keeps backing off (and logs at debug).
_STABLE_S: Final = 30.0


class Capture(Protocol):
    """The part of cv2.VideoCapture we use, so tests can stand in for a camera."""

    def isOpened(self) -> bool: ...  # noqa: N802  (OpenCV's name)
    def read(self) -> tuple[bool, Image | None]: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[int | str], Capture]


def _video_capture(target: int | str) -> Capture:
    """VideoCapture with the backend that fits the target, and network timeouts."""
    if isinstance(target, int):
        cap = cv2.VideoCapture(target)
    elif target.startswith("/dev/"):
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
    else:
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS]
        timeouts += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, _READ_TIMEOUT_MS]
        cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)
    return cast("Capture", cap)  # frames come out as BGR uint8 (CAP_PROP_CONVERT_RGB)


class VideoSource(Source):
    """A video file: every frame in order, then the end."""

    def __init__(
        self,
        config: SourceConfig,
        *,
        decode_long_side: int | None = None,
        capture: CaptureFactory = _video_capture,
    ) -> None:
        super().__init__(config, config.uri, decode_long_side)
        if not Path(config.uri).is_file():
            raise SourceError(f"{config.uri}: video file not found")
        self._cap = capture(config.uri)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"{config.uri}: not a video this OpenCV can read")

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self.stats.state = "open"
        pacer = Pacer(self._config.max_fps)
        while pacer.wait(stop):
            with self._io():  # a hung mount or a dying card: the watchdog's to see
                ok, image = self._cap.read()
            if not ok or image is None:
                self.stats.state = "done"
                return
            self.stats.last_frame_at = read_at = time.monotonic()
            yield self._capture_frame(image, read_at, datetime.now(UTC))

    def close(self) -> None:
        self._cap.release()
        super().close()


def _live_target(config: SourceConfig) -> int | str:
    uri = config.uri.strip()
    if config.kind == "camera":
        if uri.isdigit():
            return int(uri)
        if uri.startswith("/dev/"):
            return uri
        raise SourceError(f"{uri}: a camera is an index such as 0 or a device such as /dev/video0")
    try:
        parts = urlsplit(uri)
        usable = parts.scheme.lower() in _STREAM_SCHEMES and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        usable = False
    if not usable:
        raise SourceError(f"{mask_uri(uri)}: a stream is an rtsp://, rtmp:// or http(s):// URL")
    return uri


class LiveSource(Source):
    """A camera or stream. A grabber thread reads continuously into a one-frame slot, so
    the consumer always gets the newest frame; a source that fails is reopened with
    exponential backoff, and the source never ends on its own."""

    live = True

    def __init__(
        self,
        config: SourceConfig,
        *,
        decode_long_side: int | None = None,
        capture: CaptureFactory = _video_capture,
    ) -> None:
        super().__init__(config, mask_uri(config.uri), decode_long_side)
        self._target = _live_target(config)
        self._capture = capture
        self._cond = threading.Condition()
        self._slot: tuple[Image, float, datetime] | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        self._start()
        pacer = Pacer(self._config.max_fps)
        try:
            while pacer.wait(stop):
                taken = self._take(stop)
                if taken is None:
                    return
                yield self._capture_frame(*taken)
        finally:
            self._stop()

    def close(self) -> None:
        self._stop()
        super().close()

    def _take(self, stop: threading.Event) -> tuple[Image, float, datetime] | None:
        with self._cond:
            while self._slot is None:
                if stop.is_set():
                    return None
                self._cond.wait(0.2)
            taken, self._slot = self._slot, None
        return taken

    def _start(self) -> None:
        self._stop()
        self._halt = threading.Event()  # per run, so a straggling old grabber stays halted
        self._thread = threading.Thread(
            target=self._grab, args=(self._halt,), name=f"grab {self.uri}", daemon=True
        )
        self._thread.start()

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        thread.join(_JOIN_S)
        if thread.is_alive():
            log.warning("%s: grabber still blocked in a read; it ends when that returns", self.uri)
        with self._cond:
            self._slot = None

    def _grab(self, halt: threading.Event) -> None:
        cfg = self._config
        delay = cfg.reopen_min_s
        while True:
            started = time.monotonic()
            count = self._pump(halt)
            if halt.is_set():
                return
            stable = count > 0 and time.monotonic() - started >= _STABLE_S
            if stable:
                delay = cfg.reopen_min_s  # it worked for a while: a fresh outage
            self.stats.state = "reopening"
            wait = min(cfg.reopen_max_s, delay * random.uniform(1.0, 1.25))
            what = f"ended after {count} frames" if count else "cannot be opened or read"
            if stable or self.stats.reopens == 0:
                log.warning("%s: %s; reopening (first wait %.1f s)", self.uri, what, wait)
            else:
                log.debug("%s: %s; reopening in %.1f s", self.uri, what, wait)
            if halt.wait(wait):
                return
            delay = min(cfg.reopen_max_s, delay * 2)
            self.stats.reopens += 1

    def _pump(self, halt: threading.Event) -> int:
        """Open the capture and fill the slot until a read fails; the frames read."""
        count = 0
        cap: Capture | None = None
        try:
            cap = self._capture(self._target)
            while cap.isOpened() and not halt.is_set():
                ok, image = cap.read()
                if not ok or image is None:
                    break
                read_at = time.monotonic()
                with self._cond:
                    if self._slot is not None:
                        self.stats.dropped += 1
                    self._slot = (image, read_at, datetime.now(UTC))
                    self._cond.notify()
                self.stats.last_frame_at = read_at
                if count == 0:
                    self.stats.state = "open"
                    log.info("%s: receiving frames", self.uri)
                count += 1
        # Whatever the backend throws, the grabber must live on: the source never ends.
        except Exception as exc:
            log.warning("%s: capture error: %s", self.uri, exc)
        finally:
            if cap is not None:
                cap.release()
        return count
