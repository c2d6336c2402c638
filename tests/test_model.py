"""A model that does not fit its manifest is refused at load, with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from agent.engine import model as engine_model
from agent.engine.model import (
    ModelError,
    PixelModel,
    RuntimeFaultError,
    runtime_fault,
    sha256_file,
    verify_file,
)
from tests.conftest import train_export


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src.parent, dst)
    return dst / src.name


def edit_manifest(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(data))


def rehash(manifest: Path) -> None:
    onnx_path = manifest.parent / "model.onnx"
    edit_manifest(
        manifest, model__sha256=sha256_file(onnx_path), model__size=onnx_path.stat().st_size
    )


def test_good_model_loads(logistic_model: Path) -> None:
    model = PixelModel.load(logistic_model)
    assert model.manifest.output.kind == "probabilities"
    assert len(model.manifest.golden) >= 64


def test_wrong_sha256_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    edit_manifest(m, model__sha256="0" * 64)
    with pytest.raises(ModelError, match=r"sha256 .* does not match manifest"):
        PixelModel.load(m)


def test_truncated_file_is_refused_by_size(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    onnx_path = m.parent / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:100])
    with pytest.raises(ModelError, match="size 100 bytes, manifest says"):
        PixelModel.load(m)


def test_not_onnx_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    (m.parent / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    rehash(m)
    with pytest.raises(ModelError, match="not an ONNX model"):
        PixelModel.load(m)


def test_onnxruntime_failing_is_told_apart_from_a_bad_model(
    logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that cannot be created for want of memory is the device's fault, worth a
    retry; a graph onnxruntime rejects is the model's, refused for good."""
    onnx_path = logistic_model.parent / "model.onnx"
    for error, kind in (
        (ort_state.RuntimeException("Failed to allocate memory"), RuntimeFaultError),
        (ort_state.InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH"), ModelError),
        (MemoryError(), RuntimeFaultError),
    ):

        def refuse(*_: object, error: Exception = error, **__: object) -> None:
            raise error

        monkeypatch.setattr(engine_model.ort, "InferenceSession", refuse)
        with pytest.raises(ModelError) as info:
            engine_model.onnx_session(onnx_path)
        assert type(info.value) is kind and str(onnx_path) in str(info.value)
        assert runtime_fault(info.value) == (kind is RuntimeFaultError)


def test_labels_declared_as_probabilities_is_refused(softmax_model: Path, tmp_path: Path) -> None:
    m = copy_model(softmax_model, tmp_path / "m")
    edit_manifest(m, output__kind="probabilities", output__objective="binary:logistic")
    data = json.loads(m.read_text())
    for g in data["golden"]:
        g["probability"] = 0.5
    m.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"declares probabilities .* gives labels only"):
        PixelModel.load(m)


def test_wrong_input_shape_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    edit_manifest(m, input__shape=[None, 4], input__features=["R", "G", "B", "X"])
    with pytest.raises(ModelError, match=r"input shape \[.*3\], expected \[N, 4\]"):
        PixelModel.load(m)


def test_three_classes_are_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    onnx_path = m.parent / "model.onnx"
    proto = onnx.load(str(onnx_path))
    node = proto.graph.node[0]
    for attr in node.attribute:
        if attr.name == "classlabels_int64s":
            attr.ints.append(2)
    onnx.save(proto, str(onnx_path))
    rehash(m)
    with pytest.raises(ModelError, match=r"classes \[0, 1, 2\], expected exactly \[0, 1\]"):
        PixelModel.load(m)


def test_per_class_onnxmltools_layout_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    onnx_path = m.parent / "model.onnx"
    proto = onnx.load(str(onnx_path))
    for attr in proto.graph.node[0].attribute:
        if attr.name == "class_ids":
            attr.ints[0] = 1
    onnx.save(proto, str(onnx_path))
    rehash(m)
    with pytest.raises(ModelError, match="separate weights per class"):
        PixelModel.load(m)


def test_golden_mismatch_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    data = json.loads(m.read_text())
    data["golden"][0]["label"] = 1 - data["golden"][0]["label"]
    m.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"golden sample 0 .* manifest expects"):
        PixelModel.load(m)


def test_unknown_manifest_field_is_refused(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    edit_manifest(m, surprise=1)
    with pytest.raises(ValueError, match=r"manifest.json: invalid manifest.*surprise"):
        PixelModel.load(m)


def test_two_gb_size_claim_is_refused_before_reading(logistic_model: Path, tmp_path: Path) -> None:
    m = copy_model(logistic_model, tmp_path / "m")
    edit_manifest(m, model__size=2 * 1024**3)
    with pytest.raises(ValueError, match=r"model\.size"):
        PixelModel.load(m)


def test_model_without_table_compiles_on_device(tmp_path: Path) -> None:
    manifest = train_export(tmp_path / "m", "binary:logistic", rounds=5, depth=3, table=False)
    from agent.engine.classifier import ColourModel

    model = ColourModel.load(manifest)
    assert model.classifier.table.shape == (1 << 24,)


def test_a_file_that_cannot_be_read_is_a_model_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EIO while hashing (a bad block on a device's SD card) escaped as an OSError, which
    stopped the daemon from booting an earlier stored version or the bundled model."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x" * 10)

    def bad_block(*_: object) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(engine_model, "sha256_file", bad_block)
    with pytest.raises(ModelError, match=f"model {path}: cannot read: Input/output error"):
        verify_file(path, 10, "0" * 64, "model")


def test_softprob_models_export_with_all_colour_parity(tmp_path: Path) -> None:
    """The folded node was written with SOFTMAX: onnxruntime then gave the raw margin as
    'probabilities' and convert refused every multi:softprob model."""
    manifest = train_export(tmp_path, "multi:softprob", rounds=5, depth=3, parity=True)
    model = PixelModel.load(manifest)
    assert model.manifest.output.objective == "multi:softprob"
