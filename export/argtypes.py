"""argparse types the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a usage error at parse time beats a failure minutes into a run."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def float_within(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a float in [low, high], named in the usage error."""

    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be within {low:g}..{high:g}, got {value:g}")
        return value

    parse.__name__ = "float"
    return parse
