"""The table IS the model: exact against onnxruntime over all 2^24 colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from agent.contract import Decision
from agent.engine.model import ModelError, PixelModel
from agent.engine.table import CORRODED, SIZE, check_table, compile_table, load_table, scores_from
from export.convert import ConvertError, all_colours, export_model
from tests.conftest import rust_pixels

CHUNK = 1 << 21


def runtime_labels_all(model: PixelModel) -> np.ndarray:
    out = np.empty(SIZE, dtype=bool)
    for start in range(0, SIZE, CHUNK):
        labels, _ = model.predict(all_colours(start, start + CHUNK))
        out[start : start + CHUNK] = labels.astype(bool)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["logistic_model", "softmax_model"])
def test_table_equals_onnxruntime_for_every_colour(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model = PixelModel.load(request.getfixturevalue(fixture))
    table = compile_table(model)
    expected = runtime_labels_all(model)
    got = table >= CORRODED
    mismatches = np.flatnonzero(got != expected)
    assert len(mismatches) == 0, f"{len(mismatches)} colours differ, first index {mismatches[:5]}"
    assert 0.01 < expected.mean() < 0.9  # both classes present: the test can fail


@pytest.mark.slow
def test_table_is_exact_at_the_highest_threshold_a_manifest_may_hold(tmp_path: Path) -> None:
    """Nearer 1 than 0.999, float32 probabilities are too coarse for the band the compiler
    re-checks, so export refuses such thresholds (and, for symmetry, below 0.001, where
    float32 is fine). The model's margins are shifted (base_score) so that many colours sit
    on both sides of the threshold."""
    threshold, shift = 0.999, 5.0
    x, y = rust_pixels()
    params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "nthread": 2}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), 8)
    base = float(y.mean())
    booster.set_param({"base_score": 1 / (1 + np.exp(-(np.log(base / (1 - base)) + shift)))})
    decision = Decision(pixel_threshold=threshold, flag_pct=2.0)
    manifest = export_model(  # parity=True: every colour's label against onnxruntime's
        booster, tmp_path / "m", name="extreme", version="1.0.0", decision=decision, parity=True
    )
    corroded = (load_table(PixelModel.load(manifest)) >= CORRODED).mean()
    assert 0.001 < corroded < 0.999
    for outside in (0.0009, 0.9991):
        with pytest.raises(ConvertError, match=r"outside 0\.001\.\.0\.999"):
            export_model(
                booster,
                tmp_path / "x",
                name="extreme",
                version="1.0.0",
                decision=Decision(pixel_threshold=outside),
            )


def test_scores_keep_the_label_on_its_side_of_128() -> None:
    proba = np.array([0.0, 0.2, 0.499, 0.5, 0.51, 0.9, 1.0])
    label = proba >= 0.5
    scores = scores_from(label, proba, 0.5)
    assert np.array_equal(scores >= CORRODED, label)
    assert np.all(np.diff(scores.astype(int)) >= 0)  # monotone in probability
    # A runtime label that disagrees with our float (near-tie) still decides the side.
    assert scores_from(np.array([True]), np.array([0.4999]), 0.5)[0] == CORRODED


def test_compile_is_deterministic_and_fast_path_matches_shipped(logistic_model: Path) -> None:
    model = PixelModel.load(logistic_model)
    shipped = load_table(model)
    assert np.array_equal(shipped, compile_table(model))


def test_tampered_table_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    model = PixelModel.load(logistic_model)
    table = compile_table(model)
    flipped = table.copy()
    flipped[(200 << 16) | (60 << 8) | 20 :] ^= 0x80  # flip labels of a large block of colours
    with pytest.raises(ModelError, match="table disagrees with the model"):
        check_table(model, flipped, "tampered")
    with pytest.raises(ModelError, match=r"uint8\[16777216\]"):
        check_table(model, table[:-1], "short")
