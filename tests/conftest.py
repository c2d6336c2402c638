"""Shared fixtures: tiny models trained in seconds on synthetic pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from agent.contract import Decision
from export.convert import export_model

pytest_plugins = ["tests.broker"]  # Mosquitto fixtures: broker, own_broker, pki
pytest_plugins += ["tests.s3_server"]  # moto over HTTP: moto_server, s3_bucket, aws_endpoint
pytest_plugins += ["tests.registry_helpers"]  # a signed model registry on moto: registry
LEGACY_MODELS = Path(__file__).parent / "data" / "legacy"  # written by old xgboost versions


def rust_pixels(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random colours labelled by a rust-like rule: red well above green, green above blue."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3)).astype(np.float32)
    r, g, b = x.T
    y = ((r > g + 25) & (g > b) & (r > 70)).astype(np.int64)
    flip = rng.random(n) < 0.03  # label noise makes boundary cells near-ties, like real data
    return x, np.where(flip, 1 - y, y)


def train_export(
    out: Path,
    objective: str,
    rounds: int = 20,
    depth: int = 4,
    *,
    parity: bool = False,
    table: bool = True,
) -> Path:
    x, y = rust_pixels()
    params: dict[str, object] = {
        "objective": objective,
        "max_depth": depth,
        "eta": 0.3,
        "nthread": 2,
    }
    if objective.startswith("multi:"):
        params["num_class"] = 2
    booster = xgb.train(params, xgb.DMatrix(x, label=y), rounds)
    return export_model(
        booster,
        out,
        name="test-rgb",
        version="1.0.0",
        decision=Decision(flag_pct=2.0),
        parity=parity,
        with_table=table,
    )


@pytest.fixture(scope="session")
def logistic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary:logistic model with its compiled table (manifest path)."""
    return train_export(tmp_path_factory.mktemp("logistic"), "binary:logistic")


@pytest.fixture(scope="session")
def softmax_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AWS solution's kind: multi:softmax, 2 classes, labels only."""
    return train_export(tmp_path_factory.mktemp("softmax"), "multi:softmax", rounds=30, depth=3)
