"""Which frames to capture for the cloud, as active-learning systems choose them.

Flagged frames always qualify; so do frames marked by the `snapshot` command, frames near
the decision boundary (the image % close to the threshold, or many borderline pixels)
and a random share of the rest (the negatives a retrain needs). Each category has its own
rolling rate limits; a frame that qualifies for several takes the most important category
whose limits allow it. A hovering drone sends near-identical frames: one whose small grey
thumbnail barely differs from the last capture is skipped (snapshots excepted).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np

from agent.config import RateLimit, UploadConfig
from agent.contract.captures import CATEGORY_PRIORITY, Category
from agent.engine.detector import Analysis

THUMB = (32, 18)
WINDOWS = (("per_minute", 60.0), ("per_hour", 3600.0), ("per_day", 86400.0))
MAX_SNAPSHOTS = 100  # marks pending at once: a flood of commands must not grow memory


class RollingLimit:
    """Counts events in rolling windows; `allow` says whether one more fits every window."""

    def __init__(self, limit: RateLimit) -> None:
        self.caps = [
            (cap, span) for name, span in WINDOWS if (cap := getattr(limit, name)) is not None
        ]
        longest = max((span for _, span in self.caps), default=0.0)
        self._longest = longest
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self._longest:
            self._times.popleft()
        for cap, span in self.caps:
            # Times are sorted: count the tail inside the window without scanning it all.
            inside = len(self._times) - _first_within(self._times, now - span)
            if inside >= cap:
                return False
        return True

    def room(self, now: float) -> int | None:
        """How many more fit every window now (None: no cap); does not forget old events."""
        rooms = [cap - (len(self._times) - _first_within(self._times, now - span))
                 for cap, span in self.caps]  # fmt: skip
        return min(rooms) if rooms else None

    def take(self, now: float) -> None:
        if self.caps:
            self._times.append(now)


def _first_within(times: deque[float], start: float) -> int:
    lo, hi = 0, len(times)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] <= start:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CaptureDecision:
    category: Category
    reasons: tuple[Category, ...]
    note: str | None = None


@dataclass
class PolicyStats:
    """Per category: captures taken, and frames that qualified but were rate-limited."""

    captured: dict[str, int] = field(default_factory=dict)
    limited: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0


class Policy:
    """Owned by the frame loop; `request_snapshot` may come from the MQTT thread."""

    def __init__(self, config: UploadConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self._limits = {c: RollingLimit(getattr(config.limits, c)) for c in CATEGORY_PRIORITY}
        self._snapshots: deque[str | None] = deque()
        self._lock = threading.Lock()  # the snapshot marks and limits: two threads use them
        self._last_thumb: np.ndarray | None = None
        self.stats = PolicyStats()

    def request_snapshot(self, note: str | None) -> int:
        """Mark the next classified frame; returns how many marks are pending. ValueError,
        saying why, when the mark could not become a capture: more pending than
        `upload.limits.snapshot` lets through now, or than MAX_SNAPSHOTS."""
        with self._lock:
            pending = len(self._snapshots)
            room = self._limits["snapshot"].room(time.monotonic())
            if room is not None and pending >= room:
                raise ValueError(
                    f"upload.limits.snapshot lets {max(room, 0)} more through now and "
                    f"{pending} are pending; try later"
                )
            if pending >= MAX_SNAPSHOTS:
                raise ValueError(f"{pending} snapshots already pending; try later")
            self._snapshots.append(note)
            return pending + 1

    def reasons(self, analysis: Analysis) -> tuple[list[Category], str | None]:
        cfg = self.config
        reasons: list[Category] = []
        note = None
        with self._lock:
            marked = bool(self._snapshots)
            if marked:
                note = self._snapshots.popleft()
        if marked:
            reasons.append("snapshot")
        if analysis.flagged:
            reasons.append("flagged")
        if analysis.rust_probability is not None and analysis.rust_threshold is not None:
            near = abs(analysis.rust_probability - analysis.rust_threshold) <= cfg.near_probability
        else:
            near = abs(analysis.corrosion_pct - analysis.threshold) <= cfg.near_pct
        if near or analysis.uncertain_pct >= cfg.uncertain_pct:
            reasons.append("near_threshold")
        if not analysis.flagged and self._rng.random() < cfg.sample_fraction:
            reasons.append("sample")
        return reasons, note

    def decide(self, analysis: Analysis, image: np.ndarray) -> CaptureDecision | None:
        """The capture this frame deserves, or None; counts what was limited or a duplicate."""
        reasons, note = self.reasons(analysis)
        if not reasons:
            return None
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        thumb = np.asarray(cv2.resize(grey, THUMB, interpolation=cv2.INTER_AREA))
        if "snapshot" not in reasons and self._duplicate(thumb):
            self.stats.duplicates += 1
            return None
        now = time.monotonic()
        ordered = sorted(reasons, key=lambda c: -CATEGORY_PRIORITY[c])
        for category in ordered:
            with self._lock:
                allowed = self._limits[category].allow(now)
                if allowed:
                    self._limits[category].take(now)
            if allowed:
                self._last_thumb = thumb
                self.stats.captured[category] = self.stats.captured.get(category, 0) + 1
                return CaptureDecision(category, tuple(ordered), note)
            self.stats.limited[category] = self.stats.limited.get(category, 0) + 1
        return None

    def _duplicate(self, thumb: np.ndarray) -> bool:
        last = self._last_thumb
        if last is None or self.config.dedupe_diff <= 0:
            return False
        return float(cv2.absdiff(thumb, last).mean()) < self.config.dedupe_diff
