"""Pixel datasets: label-first rows from labelled images."""

from __future__ import annotations

import numpy as np


def sample_mask_pixels(
    image_bgr: np.ndarray, mask: np.ndarray, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_class` RGB rows of each class from one image (mask: nonzero = corroded).

    Sampling per image and per class keeps one large rust patch from drowning the clean
    surfaces (and the hard-negative paint) the model must learn to leave alone.
    """
    rgb = image_bgr[..., ::-1].reshape(-1, 3)
    flat = mask.reshape(-1) > 0
    xs, ys = [], []
    for label, where in ((1, np.flatnonzero(flat)), (0, np.flatnonzero(~flat))):
        if len(where) == 0:
            continue
        pick = rng.choice(where, size=min(per_class, len(where)), replace=False)
        xs.append(rgb[pick])
        ys.append(np.full(len(pick), label, dtype=np.int64))
    if not xs:
        return np.empty((0, 3), np.float32), np.empty(0, np.int64)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
