"""Frame statistics -> P(the frame shows rust): the image decision of a feature model.

Why more than a corrosion %: per pixel, brick, sandstone and reddish paint look like rust,
so their % overlaps that of rust photos with a little rust on a large clean surface (nested
CV on the CorrosionDetector photos, pooled over five fold splits: 83.3 % image accuracy,
no % threshold separates them). What the whole frame looks like (quantiles of its pixel
features) and what the pixels the model calls rust look like (their P-weighted mean features)
separate them much better: a logistic regression over those statistics raised the same
nested CV to 87.9 % (`--no-scene`), and with what the whole frame shows (a pretrained scene
embedder, agent.engine.scene) to 95.7 % (bench/ACCURACY.md).

The statistics are computed here once, from the feature rows and pixel probabilities the
model already produced for the frame, and training (export) calls this same code, so a
device and the cloud compute identical numbers. A model with a scene embedder appends its
outputs (agent.engine.scene): float32 ONNX on the device, the float64 projection of the same
network's features in training, equal within about 1e-4 (tests/test_scene.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.contract.manifest import IMAGE_QUANTILES, ImageRule

F64 = npt.NDArray[np.float64]


def statistics(
    rows: np.ndarray, proba: np.ndarray, pixel_threshold: float, scene: F64 | None = None
) -> F64:
    """The statistics of one frame in `statistic_names` order, from the rows (N, features)
    the model classified and their P(corroded) (N,), then the scene embedder's outputs."""
    x = np.asarray(rows, np.float64)
    p = np.asarray(proba, np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(p) or not len(p):
        raise ValueError(f"rows {x.shape} and probabilities {p.shape} do not describe one frame")
    quantiles = np.percentile(x, IMAGE_QUANTILES, axis=0).reshape(-1)
    pct = 100.0 * np.count_nonzero(p >= pixel_threshold) / len(p)
    weights = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
    extra = np.empty(0) if scene is None else np.asarray(scene, np.float64).reshape(-1)
    return np.concatenate((quantiles, [np.log1p(pct), p.mean()], weights @ x, extra))


def probability(rule: ImageRule, stats: F64) -> float:
    """P(rust) of a frame with these statistics under the rule's logistic regression."""
    z = (stats - np.asarray(rule.center)) / np.asarray(rule.scale)
    margin = float(z @ np.asarray(rule.weights) + rule.intercept)
    return float(1.0 / (1.0 + np.exp(-np.clip(margin, -500.0, 500.0))))
