"""The RGB recipe of the AWS pixels: a colour model that beats the AWS payload on its data.

AWS RGB recipe (`corrosion-export recipe aws-rgb`): XGBoost binary:logistic on R, G, B of
`aws-rust-detection/train.csv`, 300 trees, eta 0.1, depth chosen among 6, 8, 10 by 3-fold
cross-validation on train.csv (folds by row, as that file is split); exported with its exact
colour table, so a device serves it at table speed whatever its depth. `--payload` trains
the AWS solution's own payload instead: the reference.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from agent import __version__
from agent.contract import Provenance
from export.convert import export_model
from export.recipe import log
from export.train import AWS_PAYLOAD, read_csv, xgb_params

AWS_RGB_PARAMS: dict[str, Any] = {"objective": "binary:logistic", "num_round": 300, "eta": 0.1}
AWS_DEPTHS = (6, 8, 10)


def _pixel_folds(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 11]).permutation(n) % k


def build_aws_rgb(
    train_csv: Path,
    out: Path,
    *,
    payload: bool = False,
    folds: int = 3,
    seed: int = 0,
    threads: int = 0,
) -> Path:
    """An RGB model of the AWS pixels with its exact table; depth chosen by CV on train."""
    x, y = read_csv(train_csv)
    params: dict[str, Any] = dict(AWS_PAYLOAD) if payload else dict(AWS_RGB_PARAMS)
    cv: dict[str, float] = {}
    if not payload:
        fold = _pixel_folds(len(y), folds, seed)
        for depth in AWS_DEPTHS:
            booster_params, rounds = xgb_params(params | {"max_depth": depth}, threads, seed)
            right = 0
            for k in range(folds):
                fit_on, held = fold != k, fold == k
                booster = xgb.train(booster_params, xgb.DMatrix(x[fit_on], label=y[fit_on]), rounds)
                right += int(np.sum((booster.inplace_predict(x[held]) >= 0.5) == y[held]))
            cv[f"cv_accuracy_depth_{depth}"] = right / len(y)
            log(f"depth {depth}: {folds}-fold CV pixel accuracy {right / len(y):.4f}")
        params["max_depth"] = max(AWS_DEPTHS, key=lambda d: cv[f"cv_accuracy_depth_{d}"])
    booster_params, rounds = xgb_params(params, threads, seed)
    booster = xgb.train(booster_params, xgb.DMatrix(x, label=y), rounds)
    return export_model(
        booster,
        out,
        name="aws-payload" if payload else "aws-rgb",
        version="1.0.0",
        provenance=Provenance(
            training_data_sha256=hashlib.sha256(train_csv.read_bytes()).hexdigest(),
            hyperparameters=params,
            metrics=cv,
            trainer=f"corrosion-export {__version__} recipe aws-rgb",
            notes=f"{len(y)} rows of {train_csv.name}; depth by {folds}-fold CV on it",
        ),
        seed=seed,
    )
