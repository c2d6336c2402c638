"""Capture policy: categories, priorities, rolling rate limits, near-duplicates."""

from __future__ import annotations

import random

import numpy as np
import pytest

from agent.config import CategoryLimits, RateLimit, UploadConfig
from agent.contract import ModelRef, Size
from agent.engine.detector import Analysis
from agent.policy import Policy, RollingLimit

REF = ModelRef(name="m", version="1.0.0", sha256="0" * 64)


def analysis(
    pct: float,
    threshold: float = 5.0,
    uncertain: float = 0.0,
    rule: tuple[float, float] | None = None,  # P(rust), the rule's threshold
) -> Analysis:
    return Analysis(
        mask=np.zeros((4, 4), np.uint8),
        corrosion_pct=pct,
        uncertain_pct=uncertain,
        flagged=pct >= threshold if rule is None else rule[0] >= rule[1],
        rust_probability=None if rule is None else rule[0],
        rust_threshold=None if rule is None else rule[1],
        threshold=threshold,
        regions=(),
        frame_size=Size(width=4, height=4),
        analysis_size=Size(width=4, height=4),
        model=REF,
        elapsed_ms=1.0,
    )


def frame(value: int) -> np.ndarray:
    return np.full((36, 64, 3), value, np.uint8)


def unlimited(**kw: object) -> UploadConfig:
    free = RateLimit()
    limits = CategoryLimits(snapshot=free, flagged=free, near_threshold=free, sample=free)
    base = {"sample_fraction": 0.0, "dedupe_diff": 0.0, "limits": limits}
    return UploadConfig(**(base | kw))  # type: ignore[arg-type]


def test_categories_and_priority() -> None:
    p = Policy(unlimited(near_pct=1.0))
    assert p.decide(analysis(1.0), frame(0)) is None
    d = p.decide(analysis(9.0), frame(10))
    assert d is not None and d.category == "flagged" and d.reasons == ("flagged",)
    d = p.decide(analysis(4.5), frame(20))
    assert d is not None and d.category == "near_threshold"
    d = p.decide(analysis(1.0, uncertain=6.0), frame(30))
    assert d is not None and d.category == "near_threshold"
    assert p.request_snapshot("look here") == 1
    d = p.decide(analysis(5.5), frame(40))
    assert d is not None and d.category == "snapshot" and d.note == "look here"
    assert d.reasons == ("snapshot", "flagged", "near_threshold")


def test_near_threshold_with_an_image_rule_is_near_its_probability() -> None:
    p = Policy(unlimited(near_pct=1.0, near_probability=0.1))
    # the % is at its threshold, but the rule decides: far below its threshold is not near
    assert p.decide(analysis(5.0, rule=(0.1, 0.5)), frame(0)) is None
    d = p.decide(analysis(0.0, rule=(0.45, 0.5)), frame(60))
    assert d is not None and d.reasons == ("near_threshold",)
    d = p.decide(analysis(0.0, rule=(0.55, 0.5)), frame(120))
    assert d is not None and d.reasons == ("flagged", "near_threshold")


def test_sample_fraction() -> None:
    p = Policy(unlimited(sample_fraction=0.25), rng=random.Random(1))
    taken = sum(p.decide(analysis(0.0), frame(i % 256)) is not None for i in range(4000))
    assert 850 < taken < 1150


def test_rate_limit_falls_back_to_the_next_category() -> None:
    limits = CategoryLimits(flagged=RateLimit(per_minute=2), near_threshold=RateLimit(per_minute=1))
    p = Policy(unlimited(limits=limits, near_pct=10.0))
    got = [p.decide(analysis(9.0), frame(i * 30)) for i in range(5)]
    assert [d.category if d else None for d in got] == [
        "flagged",
        "flagged",
        "near_threshold",
        None,
        None,
    ]
    assert p.stats.limited == {"flagged": 3, "near_threshold": 2}


def test_rolling_windows() -> None:
    limit = RollingLimit(RateLimit(per_minute=2, per_hour=3))
    t = 1000.0
    for dt in (0, 1):
        assert limit.allow(t + dt)
        limit.take(t + dt)
    assert not limit.allow(t + 30)  # minute full
    assert limit.allow(t + 61)  # minute rolled over
    limit.take(t + 61)
    assert not limit.allow(t + 200)  # hour full
    assert limit.allow(t + 3601)
    assert RollingLimit(RateLimit()).allow(t)


def test_near_identical_frames_are_captured_once() -> None:
    p = Policy(unlimited(dedupe_diff=3.0))
    assert p.decide(analysis(9.0), frame(100)) is not None
    assert p.decide(analysis(9.0), frame(101)) is None  # hovering: same view
    assert p.stats.duplicates == 1
    assert p.decide(analysis(9.0), frame(140)) is not None  # the view changed
    p.request_snapshot(None)
    assert p.decide(analysis(9.0), frame(140)) is not None  # a snapshot is always taken


def test_bucket_required_when_enabled() -> None:
    with pytest.raises(ValueError, match="bucket is required"):
        UploadConfig(enabled=True)
    assert UploadConfig(enabled=False).bucket == ""


def test_a_snapshot_the_limits_would_drop_is_refused_when_asked() -> None:
    """The answer was ok with `pending`, yet the rate limit or a full queue dropped the mark."""
    free = RateLimit()
    limits = CategoryLimits(
        snapshot=RateLimit(per_minute=2), flagged=free, near_threshold=free, sample=free
    )
    policy = Policy(unlimited(limits=limits))
    assert policy.request_snapshot("a") == 1 and policy.request_snapshot("b") == 2
    with pytest.raises(ValueError, match=r"upload.limits.snapshot lets 2 more .* 2 are pending"):
        policy.request_snapshot("c")
    decided = policy.decide(analysis(0.0), frame(1))
    assert decided is not None and decided.note == "a"
    with pytest.raises(ValueError, match="lets 1 more through now and 1 are pending"):
        policy.request_snapshot("c")  # one capture taken, one mark pending: the minute is full

    policy = Policy(unlimited())
    for i in range(100):
        policy.request_snapshot(str(i))
    with pytest.raises(ValueError, match="100 snapshots already pending"):
        policy.request_snapshot("late")
    assert policy.decide(analysis(0.0), frame(1)).note == "0"  # type: ignore[union-attr]
