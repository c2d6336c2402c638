"""Local XGBoost training with the AWS solution's payload as the default recipe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

# The "Rust detection using machine learning on AWS" training payload, as it was sent.
AWS_PAYLOAD: dict[str, Any] = {
    "objective": "multi:softmax",
    "num_class": 2,
    "num_round": 100,
    "max_depth": 3,
    "eta": 0.2,
    "gamma": 0.8,
    "min_child_weight": 10,
    "subsample": 0.8,
    "colsample_bytree": 0.9,
}


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message names the file and the row."""


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SageMaker-style CSV: no header, label first. Returns (X float32, y int)."""
    try:
        data = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise DatasetError(f"{path}: not a numeric label-first CSV ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from exc
    if data.shape[0] == 0 or data.shape[1] < 2:
        raise DatasetError(f"{path}: expected rows of class,feature..., got shape {data.shape}")
    labels = data[:, 0]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DatasetError(
            f"{path}: row {bad[0] + 1} has class {labels[bad[0]]:g}, expected 0 or 1"
        )
    return data[:, 1:], labels.astype(np.int64)


@dataclass(frozen=True)
class Trained:
    booster: xgb.Booster
    params: dict[str, Any]
    metrics: dict[str, float]


def xgb_params(params: Mapping[str, Any], threads: int, seed: int) -> tuple[dict[str, Any], int]:
    """Split num_round off (a train() argument, not a booster parameter)."""
    booster_params = {k: v for k, v in params.items() if k != "num_round"}
    booster_params.setdefault("tree_method", "hist")
    booster_params.update(nthread=threads, seed=seed)
    return booster_params, int(params.get("num_round", 100))


def positive_score(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """P(corroded) for probability objectives; the 0/1 label for multi:softmax."""
    out = np.asarray(booster.inplace_predict(x))
    return np.asarray(out[:, 1]) if out.ndim == 2 else out


def metrics(y: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1, ROC AUC and the confusion counts."""
    pred = score >= threshold
    truth = y.astype(bool)
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / max(1.0, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": roc_auc(truth, score),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def roc_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U with tied scores averaged; 0.5 when one class is absent."""
    pos, neg = int(truth.sum()), int((~truth).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def train(
    x: np.ndarray,
    y: np.ndarray,
    params: Mapping[str, Any] = AWS_PAYLOAD,
    *,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    early_stopping: int | None = None,
    threads: int = 0,
    seed: int = 0,
) -> Trained:
    """Train; metrics are on `valid` when given (early stopping watches it too)."""
    booster_params, rounds = xgb_params(params, threads, seed)
    dtrain = xgb.DMatrix(x, label=y)
    evals = [(dtrain, "train")]
    if valid is not None:
        evals.append((xgb.DMatrix(valid[0], label=valid[1]), "validation"))
    booster = xgb.train(
        booster_params,
        dtrain,
        rounds,
        evals=evals,
        early_stopping_rounds=early_stopping if valid is not None else None,
        verbose_eval=False,
    )
    vx, vy = valid if valid is not None else (x, y)
    return Trained(booster, dict(params), metrics(vy, positive_score(booster, vx)))


def choose_flag_pct(pcts: np.ndarray, rusty: np.ndarray) -> float:
    """Image threshold that maximises accuracy on out-of-fold percentages.

    Ties go to the lowest threshold: missing rust costs an inspector more than a second
    look at clean steel. Candidates are midpoints between sorted percentages.
    """
    values = np.unique(pcts)
    candidates = np.concatenate(([0.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1e-6]))
    best = max(candidates, key=lambda t: (np.mean((pcts >= t) == rusty), -t))
    return float(round(best, 4))
