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


def find_regions(
    mask: np.ndarray,
    frame_size: tuple[int, int],
    *,
    open_px: int = 3,
    close_px: int = 5,
    min_region_pct: float = 0.05,
    max_regions: int = 50,
) -> tuple[Region, ...]:
    """Connected components of the cleaned mask, largest first.

    Opening drops isolated specks (sensor noise, single rust-coloured pixels on paint);
    closing joins the fragments of one patch. `area_pct` counts the component's corroded
    pixels of the raw mask, so regions add up to no more than the frame's corrosion %.
    """
    if max_regions == 0:
        return ()
    cleaned = _morph(_morph(mask, cv2.MORPH_OPEN, open_px), cv2.MORPH_CLOSE, close_px)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cleaned, connectivity=8)
    if count <= 1:
        return ()
    height, width = mask.shape
    total = float(height * width)
    raw = np.bincount(labels[mask > 0].ravel(), minlength=count)
    sx, sy = frame_size[0] / width, frame_size[1] / height
    regions = []
    for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1:
        x, y, w, h, area = (int(v) for v in stats[i, :5])
        if 100.0 * area / total < min_region_pct:
            break
        x0, y0 = int(x * sx), int(y * sy)
        x1 = min(frame_size[0], max(x0 + 1, round((x + w) * sx)))
        y1 = min(frame_size[1], max(y0 + 1, round((y + h) * sy)))
        regions.append(Region(x=x0, y=y0, w=x1 - x0, h=y1 - y0, area_pct=100.0 * raw[i] / total))
        if len(regions) == max_regions:
            break
    return tuple(regions)
