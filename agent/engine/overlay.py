"""The picture a person looks at: corroded pixels tinted, regions boxed, % written."""

from __future__ import annotations

import cv2
import numpy as np

from agent.contract import Region

TINT_BGR = (0, 0, 255)
BOX_BGR = (0, 255, 255)


def render(
    image: np.ndarray,
    mask: np.ndarray,
    corrosion_pct: float,
    regions: tuple[Region, ...] = (),
    *,
    flagged: bool = False,
    frame_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Whole-array OpenCV calls only (about 1 ms at 1080p): no per-pixel Python."""
    height, width = image.shape[:2]
    if mask.shape != (height, width):
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    out = image.copy()
    tinted = cv2.addWeighted(image, 0.45, np.full_like(image, TINT_BGR), 0.55, 0.0)
    cv2.copyTo(tinted, mask, out)
    fw, fh = frame_size or (width, height)
    sx, sy = width / fw, height / fh
    thickness = max(1, round(max(width, height) / 500))
    for r in regions:
        p0 = (round(r.x * sx), round(r.y * sy))
        p1 = (round((r.x + r.w) * sx) - 1, round((r.y + r.h) * sy) - 1)
        cv2.rectangle(out, p0, p1, BOX_BGR, thickness)
    label = f"corrosion {corrosion_pct:.1f}%" + ("  FLAGGED" if flagged else "")
    scale = max(0.5, max(width, height) / 1200)
    org = (10, round(30 * scale))
    cv2.putText(
        out, label, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA
    )
    cv2.putText(
        out, label, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
    )
    return out
