"""Fitting the image rule (agent.engine.imagerule) on out-of-fold frame statistics.

The statistics of a training photo must come from a pixel model that never saw it, as on a
device, so they are computed from out-of-fold probability maps (export.recipe). On them:

- a logistic regression on standardized statistics, its ridge penalty chosen among `RIDGES`
  by the log-loss of an inner cross-validation (folds by photo group); with scene features,
  their principal components are fitted inside each fold too, so every out-of-fold P(rust)
  comes from numbers fitted without that photo;
- the flag threshold is recall-first (rust recall matters more than precision; a missed
  rusty girder costs more than a second look at a brick wall). `lowest`: the lowest
  out-of-fold P(rust) of any rust photo, so that every rust photo of the training set would
  have been flagged by a rule that did not see it. `extrapolated` (the default): that lowest
  value lowered by its gap to the second lowest, in logits. The lowest of n photos is where
  the next rust photo falls below with chance about 1/(n + 1); the last spacing estimates
  how far below the sample the class still reaches (the endpoint estimator 2 x(1) - x(2)).
  It flags every photo `lowest` flags and a few more: in nested CV over five splits it
  caught 344 of 345 rust decisions against 341, for 7 more false alarms of 300
  (bench/ACCURACY.md, the `--rule-threshold lowest` variant). Recall first: it is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.contract import ImageRule
from export.scene import Projection

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
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


@dataclass(frozen=True)
class SceneInput:
    """The photos' pooled scene features and how many principal components the rule reads."""

    embeddings: F64  # (photos, features)
    components: int


def design(
    stats: F64, scene: SceneInput | None, fit_on: Mask
) -> tuple[Callable[[Mask], F64], Projection | None]:
    """The rule's inputs for any photos, with the scene projection fitted on `fit_on` only:
    a photo's out-of-fold P(rust) must come from numbers fitted without it, as on a device."""
    if scene is None:
        return (lambda rows: stats[rows]), None
    k = min(scene.components, int(fit_on.sum()) - 1)
    projection = Projection.fit(scene.embeddings[fit_on], k)
    return (lambda rows: projection.extend(stats[rows], scene.embeddings[rows])), projection


def out_of_fold(
    stats: F64, y: F64, folds: npt.NDArray[np.int64], ridge: float, scene: SceneInput | None
) -> F64:
    """P(rust) of every photo from a regression (and projection) fitted without its fold."""
    out = np.empty(len(y))
    for k in np.unique(folds):
        held = folds == k
        x_of, _ = design(stats, scene, ~held)
        out[held] = _predict(fit_logistic(x_of(~held), y[~held], ridge), x_of(held))
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


@dataclass(frozen=True)
class Fitted:
    """A rule, the out-of-fold P(rust) its threshold was set on, and its scene projection."""

    rule: ImageRule
    oof: F64
    projection: Projection | None


def fit_rule(
    stats: F64,
    rust: Mask,
    names: Sequence[str],
    folds: npt.NDArray[np.int64],
    *,
    threshold: ThresholdRule = "extrapolated",
    scene: SceneInput | None = None,
) -> Fitted:
    """The rule for photos with these (out-of-fold) pixel statistics, named `names`
    (agent.contract.statistic_names), plus, with `scene`, the projected scene features.

    `folds` (by photo group) serve both the ridge choice and the recall-first `threshold`.
    """
    if rust.all() or not rust.any():
        raise ValueError("an image rule needs photos of both classes")
    y = rust.astype(np.float64)
    losses = {r: log_loss(out_of_fold(stats, y, folds, r, scene), y) for r in RIDGES}
    ridge = min(losses, key=lambda r: losses[r])
    oof = out_of_fold(stats, y, folds, ridge, scene)
    everyone = np.ones(len(y), bool)
    x_of, projection = design(stats, scene, everyone)
    center, scale, weights, intercept = fit_logistic(x_of(everyone), y, ridge)
    rule = ImageRule(
        statistics=tuple(names) + (() if projection is None else projection.names),
        center=tuple(center.tolist()),
        scale=tuple(scale.tolist()),
        weights=tuple(weights.tolist()),
        intercept=intercept,
        threshold=recall_first(oof[rust], threshold),
    )
    return Fitted(rule, oof, projection)
