"""The Frame record and what every source shares: pacing, decoding, counters."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from agent import imageio
from agent.config import SourceConfig
from agent.contract.messages import Gps, SourceState, SourceStatus
from agent.exif import camera_zone, read_exif

log = logging.getLogger(__name__)

Image = npt.NDArray[np.uint8]


class SourceError(ValueError):
    """A source configuration that cannot work; the message names the uri."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One image to analyse, with what the message about it needs."""

    image: Image  # BGR, at most decode_long_side
    full_size: tuple[int, int]  # (w, h) as captured
    index: int
    source: str
    captured_at: datetime  # aware UTC
    gps: Gps | None
    data: bytes | None  # the file as read, uploaded unchanged; None for capture devices
    read_at: float  # time.monotonic()
    name: str


@dataclass(frozen=True)
class Failed:
    """A file that could not be used: counted and reported, never fatal."""

    source: str
    reason: str


@dataclass
class SourceStats:
    """Written by the source's threads, read by metrics; single-writer fields, no lock."""

    state: SourceState = "starting"  # never "stale": the caller decides that
    delivered: int = 0
    dropped: int = 0
    failed: int = 0
    reopens: int = 0
    last_frame_at: float | None = None  # monotonic; the caller decides staleness
    # Monotonic start of a file-system call on the frame loop's thread (a scan, a read),
    # None between them: a hung NFS mount stops the watchdog instead of idling forever.
    io_since: float | None = None


def _fit(image: Image, long_side: int | None) -> Image:
    height, width = image.shape[:2]
    if long_side is None or max(width, height) <= long_side:
        return image
    scale = long_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


class Pacer:
    """max_fps as a minimum gap between deliveries, waited out on the stop event."""

    def __init__(self, max_fps: float | None) -> None:
        self._gap = 1.0 / max_fps if max_fps else 0.0
        self._last = -float("inf")

    def wait(self, stop: threading.Event) -> bool:
        """Wait until the next frame may go; False once stop is set."""
        delay = self._last + self._gap - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return False
        self._last = time.monotonic()
        return not stop.is_set()


class Source(ABC):
    """What every kind shares: its name, its counters and how frames are built."""

    live: bool = False

    def __init__(self, config: SourceConfig, uri: str, decode_long_side: int | None) -> None:
        if decode_long_side is not None and decode_long_side < 1:
            raise SourceError(f"{uri}: decode_long_side must be at least 1")
        self.kind: str = config.kind
        self.uri = uri
        self.stats = SourceStats()
        self._stale = False
        self._config = config
        self._long_side = decode_long_side
        self._zone = camera_zone(config.camera_tz)

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Frame | Failed]:
        """Yield until exhausted or `stop` is set; stop is noticed within 0.2 s."""

    def close(self) -> None:
        self.stats.state = "closed"

    def status(self, stale_after_s: float, since: float) -> SourceStatus:
        """The contract's view; a live source silent for `stale_after_s` reads `stale`.

        `since` (monotonic) stands for the last frame before the first one arrives.
        """
        s = self.stats
        state = s.state
        if self.live and state == "open":
            silent = time.monotonic() - (s.last_frame_at or since)
            stale = silent > stale_after_s
            if stale != self._stale:
                self._stale = stale
                if stale:
                    log.warning("source %s stale: no frame for %.0f s", self.uri, silent)
                else:
                    log.info("source %s delivers again", self.uri)
            state = "stale" if stale else state
        return SourceStatus(
            kind=self.kind,
            uri=self.uri,
            state=state,
            delivered=s.delivered,
            dropped=s.dropped,
            failed=s.failed,
            reopens=s.reopens,
        )

    @contextmanager
    def _io(self) -> Iterator[None]:
        self.stats.io_since = time.monotonic()
        try:
            yield
        finally:
            self.stats.io_since = None

    def _next_index(self) -> int:
        self.stats.delivered += 1
        return self.stats.delivered - 1

    def _failed(self, source: str, reason: str) -> Failed:
        self.stats.failed += 1
        return Failed(source, reason)

    def _capture_frame(self, image: Image, read_at: float, captured_at: datetime) -> Frame:
        height, width = image.shape[:2]
        index = self._next_index()
        return Frame(
            image=_fit(image, self._long_side),
            full_size=(width, height),
            index=index,
            source=self.uri,
            captured_at=captured_at,
            gps=None,
            data=None,
            read_at=read_at,
            name=f"frame-{index}",
        )

    def _file_frame(self, path: Path, name: str, data: bytes, read_at: float) -> Frame | Failed:
        """Decode and date a file; the photo's own EXIF clock wins over ours."""
        self.stats.last_frame_at = read_at
        try:
            decoded = imageio.decode(data, str(path), max_long_side=self._long_side)
        except imageio.ImageError as exc:
            return self._failed(str(path), str(exc))
        meta = read_exif(data, self._zone)
        return Frame(
            image=decoded.image,
            full_size=decoded.full_size,
            index=self._next_index(),
            source=str(path),
            captured_at=meta.taken_at or datetime.now(UTC),
            gps=meta.gps,
            data=data,
            read_at=read_at,
            name=name,
        )
