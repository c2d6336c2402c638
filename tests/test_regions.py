"""Region grouping on hand-drawn masks: one box per rusty thing, in frame pixels."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from agent.contract import Region
from agent.engine.regions import scored_regions, suppress


def canvas(w: int = 320, h: int = 240) -> np.ndarray:
    return np.zeros((h, w), np.uint8)


def square(mask: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    mask[y : y + side, x : x + side] = 255
    return mask


def grouped(mask: np.ndarray, frame: tuple[int, int], **kwargs: Any) -> tuple[Region, ...]:
    return tuple(region for region, _ in scored_regions(mask, frame, **kwargs))


def contains(r: Region, x: int, y: int) -> bool:
    return r.x <= x < r.x + r.w and r.y <= y < r.y + r.h


def test_two_patches_close_together_are_one_region() -> None:
    mask = square(square(canvas(), 100, 100, 40), 146, 100, 40)  # 6 px apart
    regions = grouped(mask, (320, 240))
    assert contains(regions[0], 105, 105) and contains(regions[0], 180, 135)
    cell = 320 // 16  # coarse boxes are whole grid cells: at most one cell too wide
    assert 100 - cell <= regions[0].x <= 100 and 186 <= regions[0].x + regions[0].w <= 186 + cell


def test_patches_far_apart_stay_apart() -> None:
    mask = square(square(canvas(), 20, 20, 40), 250, 180, 40)
    regions = grouped(mask, (320, 240))
    assert not any(contains(r, 30, 30) and contains(r, 260, 190) for r in regions)
    boxes = {(r.x, r.y, r.w, r.h) for r in regions}
    assert {(20, 20, 40, 40), (250, 180, 40, 40)} <= boxes


def test_a_speckled_surface_is_one_region_and_lone_specks_are_dropped() -> None:
    rng = np.random.default_rng(0)
    mask = canvas()
    surface = rng.random((100, 120)) < 0.45  # fragmented rust on one plate
    mask[60:160, 80:200][surface] = 255
    specks = rng.random(mask.shape) < 0.004  # isolated rust-coloured pixels elsewhere
    specks[50:170, 70:210] = False
    mask[specks] = 255
    regions = grouped(mask, (320, 240))
    assert regions, "the surface is found"
    top = max(regions, key=lambda r: r.w * r.h)
    assert abs(top.x - 80) <= 4 and abs(top.y - 60) <= 4
    assert abs(top.w - 120) <= 8 and abs(top.h - 100) <= 8
    for r in regions:  # nothing is made of specks alone
        assert r.x < 210 and r.x + r.w > 70 and r.y < 170 and r.y + r.h > 50


def test_components_only_when_the_grid_is_off() -> None:
    mask = square(square(canvas(), 100, 100, 40), 146, 100, 40)
    regions = grouped(mask, (320, 240), grid=(), close_px=0)
    assert sorted((r.x, r.y, r.w, r.h) for r in regions) == [(100, 100, 40, 40), (146, 100, 40, 40)]


def test_boxes_are_in_frame_pixels() -> None:
    mask = square(canvas(320, 180), 160, 90, 32)  # analysis size; the frame is 1080p
    regions = grouped(mask, (1920, 1080))
    r = next(r for r in regions if r.w < 400)
    assert (r.x, r.y, r.w, r.h) == (960, 540, 192, 192)
    assert all(r.x + r.w <= 1920 and r.y + r.h <= 1080 for r in regions)
    assert abs(r.area_pct - 100 * 32 * 32 / (320 * 180)) < 1e-9


def test_long_side_scales_the_grouping_not_the_answer() -> None:
    mask = square(canvas(1280, 960), 400, 400, 200)
    full = grouped(mask, (1280, 960), long_side=None)
    small = grouped(mask, (1280, 960), long_side=320)
    assert (full[0].x, full[0].y, full[0].w, full[0].h) == (400, 400, 200, 200)
    assert (small[0].x, small[0].y, small[0].w, small[0].h) == (400, 400, 200, 200)
    assert abs(full[0].area_pct - small[0].area_pct) < 1e-6


def test_max_regions_min_region_pct_and_order() -> None:
    mask = canvas()
    for i in range(6):
        for j in range(4):
            square(mask, 10 + 50 * i, 10 + 55 * j, 8 + 2 * i + j)
    regions = grouped(mask, (320, 240))
    assert len(regions) > 5
    pcts = [r.area_pct for r in regions]
    assert pcts == sorted(pcts, reverse=True), "largest first"
    assert sum(1 for _ in grouped(mask, (320, 240), max_regions=5)) == 5
    assert grouped(mask, (320, 240), max_regions=0) == ()
    small = grouped(mask, (320, 240), min_region_pct=0.2)
    assert small and all(r.area_pct >= 0.2 for r in small)
    assert grouped(canvas(), (320, 240)) == ()


def test_regions_never_claim_more_rust_than_the_frame_has() -> None:
    mask = square(canvas(), 0, 0, 240)
    frame_pct = 100 * cv2.countNonZero(mask) / mask.size
    assert all(r.area_pct <= frame_pct + 1e-9 for r in grouped(mask, (320, 240)))


def test_scores_rank_a_clean_bordered_patch_above_a_strip_of_a_larger_one() -> None:
    mask = square(canvas(), 200, 40, 60)
    mask[150:230, 20:180] = 255
    found = scored_regions(mask, (320, 240))
    best = max(found, key=lambda rs: rs[1])[0]
    assert (best.x, best.y, best.w, best.h) in {(20, 150, 160, 80), (200, 40, 60, 60)}
    assert all(score >= 0 for _, score in found)


def test_suppress_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = np.array([0.5, 0.9, 0.1, 0.4])
    assert suppress(boxes, scores, 0.5, 10).tolist() == [1, 2]
    assert suppress(boxes, scores, 0.5, 1).tolist() == [1]
    assert suppress(boxes, scores, 1.0, 10).tolist() == [1, 0, 3, 2]


def test_config_defaults_are_the_grouping_defaults() -> None:
    import inspect

    from agent.config import ClassifierConfig
    from agent.engine.detector import grouping_of

    defaults = {
        name: p.default
        for name, p in inspect.signature(scored_regions).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert grouping_of(ClassifierConfig()) == {
        k: tuple(v) if isinstance(v, list) else v for k, v in defaults.items()
    }
