"""Corroded mask -> regions with boxes in frame pixels."""

from __future__ import annotations

import cv2
import numpy as np

from agent.contract import Region


def _morph(mask: np.ndarray, op: int, px: int) -> np.ndarray:
    if px <= 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (px, px))
    return cv2.morphologyEx(mask, op, kernel)


def fit_long_side(image: np.ndarray, long_side: int | None) -> np.ndarray:
    """INTER_AREA downscale so the long side is at most `long_side` (never upscales).

    On a 0/255 mask the result is coverage: each value is the corroded share of its area.
    """
    height, width = image.shape[:2]
    if long_side is None or max(height, width) <= long_side:
        return image
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def find_regions(
    mask: np.ndarray,
    frame_size: tuple[int, int],
    *,
    long_side: int | None = 640,
    open_px: int = 3,
    close_px: int = 5,
    min_region_pct: float = 0.05,
    max_regions: int = 50,
) -> tuple[Region, ...]:
    """Connected components of the cleaned mask, largest first.

    Grouping runs on the mask scaled to `long_side`: boxes are coarse by nature, kernel
    sizes then mean the same at every camera resolution, and a 1080p frame's label image
    shrinks from 8 MB to 1 MB. Opening drops isolated specks (single rust-coloured pixels
    on paint); closing joins the fragments of one patch. `area_pct` counts corroded pixels
    of the uncleaned mask, so regions add up to no more than the frame's corrosion %.
    """
    if max_regions == 0:
        return ()
    coverage = fit_long_side(mask, long_side)
    _, binary = cv2.threshold(coverage, 127, 255, cv2.THRESH_BINARY)
    cleaned = _morph(_morph(binary, cv2.MORPH_OPEN, open_px), cv2.MORPH_CLOSE, close_px)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cleaned, connectivity=8)
    if count <= 1:
        return ()
    height, width = coverage.shape
    total = float(height * width)
    sx, sy = frame_size[0] / width, frame_size[1] / height
    regions = []
    for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1:
        x, y, w, h, area = (int(v) for v in stats[i, :5])
        if 100.0 * area / total < min_region_pct:
            break
        inside = labels[y : y + h, x : x + w] == i
        corroded = float(coverage[y : y + h, x : x + w][inside].sum(dtype=np.float64)) / 255.0
        x0, y0 = int(x * sx), int(y * sy)
        x1 = min(frame_size[0], max(x0 + 1, round((x + w) * sx)))
        y1 = min(frame_size[1], max(y0 + 1, round((y + h) * sy)))
        regions.append(Region(x=x0, y=y0, w=x1 - x0, h=y1 - y0, area_pct=100.0 * corroded / total))
        if len(regions) == max_regions:
            break
    return tuple(regions)
