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
EXPECTED = "expected JSON, UBJ, the legacy binary or a pickled Booster"


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


def test_a_gpu_objective_of_xgboost_0_90_reads_as_its_cpu_twin(tmp_path: Path) -> None:
    """0.7x-0.90 saved `gpu:binary:logistic` for models trained on a GPU: the same model,
    which the header check called no XGBoost model at all."""
    folder = LEGACY_MODELS / "xgboost-0.90"
    data = (folder / "logistic.bin").read_bytes()
    at = (4 if data.startswith(b"binf") else 0) + 136  # the objective, after the parameters
    size = int.from_bytes(data[at : at + 8], "little")
    assert data[at + 8 : at + 8 + size] == b"binary:logistic"
    gpu = b"gpu:binary:logistic"
    model = tmp_path / "gpu.bin"
    model.write_bytes(data[:at] + len(gpu).to_bytes(8, "little") + gpu + data[at + 8 + size :])
    expected = np.load(folder / "expected.npz")
    probe = xgb.DMatrix(expected["colours"].astype(np.float32))
    booster = load_booster(model)
    assert json_objective(booster) == "binary:logistic"
    np.testing.assert_allclose(booster.predict(probe), expected["logistic_probability"], atol=1e-6)


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


def first_tree_node(model: bytes, node: int) -> int:
    """Byte offset of a node of the first tree in a 1.x binary softmax model."""
    header = 4 + 136 + 8 + len("multi:softmax") + 8 + len("gbtree") + 160
    assert model[header - 160 - 14 : header - 160] == b"\x06" + b"\x00" * 7 + b"gbtree"
    return header + 148 + 20 * node


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (4, 0, "node 0 has child 0"),  # the root's left child is the root: a cycle
        (20 + 0, 10**8, r"node 0 has child 1"),  # node 1 names another parent
        (12, 10**8, "node 0 splits on feature 100000000 of 3"),
    ],
)
def test_a_tree_that_would_crash_xgboost_is_refused(
    tmp_path: Path, field: int, value: int, message: str
) -> None:
    model = bytearray((LEGACY_MODELS / "xgboost-1.7.6" / "softmax.bin").read_bytes())
    at = first_tree_node(bytes(model), 0) + field
    model[at : at + 4] = value.to_bytes(4, "little")
    bad = tmp_path / "model.bin"
    bad.write_bytes(bytes(model))
    with pytest.raises(ConvertError, match=rf"model\.bin: .*tree 0: {message}"):
        load_booster(bad)


def test_a_huge_class_count_is_refused_before_any_allocation(tmp_path: Path) -> None:
    model = bytearray((LEGACY_MODELS / "xgboost-1.7.6" / "softmax.bin").read_bytes())
    model[4 + 8 : 4 + 12] = (10**9).to_bytes(4, "little")  # num_class
    bad = tmp_path / "model.bin"
    bad.write_bytes(bytes(model))
    with pytest.raises(ConvertError, match=r"1000000000 classes of 3 features.*save_model"):
        load_booster(bad)  # the rest of its header is a model's: it is one, damaged


@pytest.mark.parametrize(
    "body",
    [
        b"cbuiltins\nbytearray\nJ\xff\xff\xff\x7f\x85R.",  # bytearray(2**31 - 1)
        b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x03\x00\x00\x00hex\x86R.",  # doubles per level
    ],
)
def test_a_pickle_cannot_make_memory(tmp_path: Path, body: bytes) -> None:
    bad = tmp_path / "xgboost-model"
    bad.write_bytes(b"\x80\x04" + body)
    with pytest.raises(ConvertError, match=r"xgboost-model: .*the pickle (builds|encodes)"):
        load_booster(bad)


def test_a_booster_pickle_with_a_strange_state_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "xgboost-model"
    bad.write_bytes(b"\x80\x04cxgboost.core\nBooster\n)\x81]b.")  # Booster(), state [ ]
    with pytest.raises(ConvertError, match="the pickled xgboost Booster holds no model bytes"):
        load_booster(bad)


@pytest.mark.parametrize("bits", [0x3F000280, 0x3F00007B])  # starts like a pickle; like JSON
def test_an_old_binary_that_looks_like_a_pickle_or_json_still_reads(
    tmp_path: Path, bits: int
) -> None:
    """0.90 writes no header: the file starts with the base score (a margin for softmax)."""
    folder = LEGACY_MODELS / "xgboost-0.90"
    model = bytearray((folder / "softmax.bin").read_bytes())
    model[:4] = bits.to_bytes(4, "little")
    path = tmp_path / "xgboost-model"
    path.write_bytes(bytes(model))
    base = float(np.frombuffer(bits.to_bytes(4, "little"), "<f4")[0])
    expected = np.load(folder / "expected.npz")
    got = load_booster(path).predict(
        xgb.DMatrix(expected["colours"].astype(np.float32)), output_margin=True
    )
    np.testing.assert_allclose(got, expected["softmax_margin"] + (base - 0.5), atol=1e-5)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"0,12,34,56\n1,200,80,60\n" * 20, f"{EXPECTED}; it starts with '0,12,34,56\\n"),
        (np.random.default_rng(0).bytes(4096), EXPECTED),
        (b"binf" + bytes(200), EXPECTED),  # a header, but no objective, no booster name
        (b"", f"{EXPECTED}; it is empty"),
        (b'{"model": "model.json", "metrics": {}}', "JSON without the `learner`"),
        (pickle.dumps(np.zeros(3)), "the pickle asks for numpy"),
        (pickle.dumps({"handle": b"x"}), "the pickle holds no xgboost Booster"),
    ],
    ids=["csv", "random", "binf-zeros", "empty", "training-record", "numpy-pickle", "dict-pickle"],
)
def test_bytes_that_are_no_model_are_called_so(tmp_path: Path, data: bytes, what: str) -> None:
    """Read as a binary model's header, a CSV gave `875637808 classes of 959523888
    features` and garbage `-1765028909 classes`, with advice on migrating an old model."""
    path = tmp_path / "xgboost-model"
    path.write_bytes(data)
    with pytest.raises(ConvertError) as caught:
        load_booster(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not an XGBoost model ("), message
    assert what in message and "classes" not in message and "save_model" not in message


def test_a_pickled_xgboost_estimator_is_a_model_to_migrate(tmp_path: Path) -> None:
    """Not a Booster, but an XGBoost model all the same: its xgboost can save it as JSON."""
    path = tmp_path / "xgboost-model"
    path.write_bytes(b"\x80\x04cxgboost.sklearn\nXGBClassifier\n)\x81.")
    with pytest.raises(ConvertError, match=r"cannot read this model \(as a pickle: .*XGBClass"):
        load_booster(path)
