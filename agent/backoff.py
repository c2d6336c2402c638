"""Retry waits shared by the broker link and the uploader."""

from __future__ import annotations

import random


def full_jitter(attempt: int, low: float, high: float) -> float:
    """AWS's "full jitter": uniform in [low, min(high, low * 2**attempt)]."""
    return random.uniform(low, min(high, low * 2 ** min(attempt, 30)))
