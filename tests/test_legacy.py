"""Old XGBoost models (export.legacy): fixtures written by xgboost 0.90, 1.0.2 and 1.7.6
(tests/data/legacy/make_fixtures.py) read by today's xgboost with the old predictions."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from agent.contract import ModelManifest
from export.cli import main as export_main
from export.convert import ConvertError, load_booster
from tests.conftest import LEGACY_MODELS

VERSIONS = ("0.90", "1.0.2", "1.7.6")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("form", ["bin", "pkl"])
def test_old_models_predict_as_they_did(version: str, form: str) -> None:
    folder = LEGACY_MODELS / f"xgboost-{version}"
    expected = np.load(folder / "expected.npz")
    probe = xgb.DMatrix(expected["colours"].astype(np.float32))
    softmax = load_booster(folder / f"softmax.{form}")
    logistic = load_booster(folder / f"logistic.{form}")
    assert json_objective(softmax) == "multi:softmax"
    np.testing.assert_allclose(
        softmax.predict(probe, output_margin=True), expected["softmax_margin"], atol=1e-6
    )
    np.testing.assert_allclose(logistic.predict(probe), expected["logistic_probability"], atol=1e-6)


def json_objective(booster: xgb.Booster) -> str:
    return str(json.loads(booster.save_config())["learner"]["objective"]["name"])


def test_convert_reads_an_old_sagemaker_tarball(tmp_path: Path) -> None:
    """The AWS solution's case: model.tar.gz from a 0.90 container, a pickled AWS payload."""
    model = tmp_path / "xgboost-model"
    model.write_bytes((LEGACY_MODELS / "xgboost-0.90" / "softmax.pkl").read_bytes())
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(model, arcname="xgboost-model")
    code = export_main(
        ["convert", str(tmp_path / "model.tar.gz"), "--out", str(tmp_path / "m"),
         "--name", "aws-090", "--version", "1.0.0"]
    )  # fmt: skip
    assert code == 0
    manifest = ModelManifest.read(tmp_path / "m" / "manifest.json")
    assert manifest.output.kind == "labels" and manifest.table is not None


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return os.system, (f"touch {marker}",)

    bad = tmp_path / "xgboost-model"
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ConvertError, match=r"xgboost-model: .*asks for (posix|os)\.system"):
        load_booster(bad)
    assert not marker.exists()


def test_a_pickle_without_a_booster_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "xgboost-model"
    bad.write_bytes(pickle.dumps({"handle": None}))
    with pytest.raises(ConvertError, match=r"xgboost-model: .*holds no xgboost Booster"):
        load_booster(bad)


def test_a_cut_binary_model_says_where_it_ends(tmp_path: Path) -> None:
    whole = (LEGACY_MODELS / "xgboost-1.7.6" / "softmax.bin").read_bytes()
    cut = tmp_path / "model.bin"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConvertError, match=r"model\.bin: .*file ends inside tree \d+.*save_model"):
        load_booster(cut)
