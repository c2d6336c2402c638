"""Fitting the image rule (agent.engine.imagerule) on out-of-fold frame statistics.

The statistics of a training photo must come from a pixel model that never saw it, as on a
device, so they are computed from out-of-fold probability maps (export.recipe). On them:

- a logistic regression on standardized statistics, its ridge penalty chosen among `RIDGES`
  by the log-loss of an inner cross-validation (folds by photo group);
- the flag threshold is recall-first (rust recall matters more than precision; a missed
  rusty girder costs more than a second look at a brick wall). `lowest`: the lowest
  out-of-fold P(rust) of any rust photo, so that every rust photo of the training set would
  have been flagged by a rule that did not see it. `extrapolated` (the default): that lowest
  value lowered by its gap to the second lowest, in logits. The lowest of n photos is where
  the next rust photo falls below with chance about 1/(n + 1); the last spacing estimates
  how far below the sample the class still reaches (the endpoint estimator 2 x(1) - x(2)).
  Nested CV over five splits: 3 of 345 rust decisions missed with `lowest`, 1 with
  `extrapolated`, at 96.0 % against 94.1 % accuracy (bench/ACCURACY.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.contract import ImageRule

F64 = npt.NDArray[np.float64]
RIDGES = (1.0, 3.0, 10.0, 30.0, 100.0)
ThresholdRule = Literal["extrapolated", "lowest"]


def fit_logistic(x: F64, y: F64, ridge: float) -> tuple[F64, F64, F64, float]:
    """Centre, scale, weights and intercept of an L2-penalised logistic regression (Newton)."""
    center = x.mean(axis=0)
    spread = x.std(axis=0)
    scale = np.where(spread > 1e-9, spread, 1.0)
    z = np.column_stack((np.ones(len(x)), (x - center) / scale))
    penalty = ridge * np.eye(z.shape[1])
    penalty[0, 0] = 1e-6  # the intercept is (almost) free
    w = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -500.0, 500.0)))
        hessian = z.T @ (z * (p * (1.0 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, z.T @ (p - y) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return center, scale, w[1:], float(w[0])


def _predict(model: tuple[F64, F64, F64, float], x: F64) -> F64:
    center, scale, weights, intercept = model
    margin = ((x - center) / scale) @ weights + intercept
    out: F64 = 1.0 / (1.0 + np.exp(-np.clip(margin, -500.0, 500.0)))
    return out


def out_of_fold(x: F64, y: F64, folds: npt.NDArray[np.int64], ridge: float) -> F64:
    """P(rust) of every photo from a regression fitted without its fold."""
    out = np.empty(len(y))
    for k in np.unique(folds):
        held = folds == k
        out[held] = _predict(fit_logistic(x[~held], y[~held], ridge), x[held])
    return out


def log_loss(p: F64, y: F64) -> float:
    p = np.clip(p, 1e-6, 1.0 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def recall_first(p: F64, rule: ThresholdRule) -> float:
    """The flag threshold for rust photos whose out-of-fold P(rust) are `p` (module docstring),
    rounded down so that the photos it is set by stay flagged."""
    eps = 1e-9
    z = np.sort(np.log(np.clip(p, eps, 1.0 - eps) / (1.0 - np.clip(p, eps, 1.0 - eps))))
    edge = z[0] - (z[1] - z[0]) if rule == "extrapolated" and len(z) > 1 else z[0]
    return float(np.floor(1e6 / (1.0 + np.exp(-edge))) / 1e6)


def fit_rule(
    stats: F64,
    rust: npt.NDArray[np.bool_],
    names: Sequence[str],
    folds: npt.NDArray[np.int64],
    threshold: ThresholdRule = "extrapolated",
) -> tuple[ImageRule, F64]:
    """The rule for photos with these (out-of-fold) statistics, and its out-of-fold P(rust).

    `names` are the statistics' (agent.contract.statistic_names); `folds` (by photo group)
    serve both the ridge choice and the recall-first `threshold`.
    """
    if rust.all() or not rust.any():
        raise ValueError("an image rule needs photos of both classes")
    y = rust.astype(np.float64)
    losses = {r: log_loss(out_of_fold(stats, y, folds, r), y) for r in RIDGES}
    ridge = min(losses, key=lambda r: losses[r])
    oof = out_of_fold(stats, y, folds, ridge)
    center, scale, weights, intercept = fit_logistic(stats, y, ridge)
    rule = ImageRule(
        statistics=tuple(names),
        center=tuple(center.tolist()),
        scale=tuple(scale.tolist()),
        weights=tuple(weights.tolist()),
        intercept=intercept,
        threshold=recall_first(oof[rust], threshold),
    )
    return rule, oof
