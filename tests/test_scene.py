"""The scene embedder: pretrained weights read without torch, the network as ONNX with the
projection folded in, pinned by the manifest, and the same numbers in training and on device."""

from __future__ import annotations

import pickle
import shutil
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
from agent.engine.model import ModelError
from agent.engine.scene import SceneEmbedder, golden_frame
from agent.imageio import read
from export import scene as scene_module
from export.datasets import DatasetError
from export.recipe import Chosen, choose_decision, fit, probability_maps
from export.scene import SCENE_FILE, Backbone, Projection, export_scene, read_state_dict
from tests.photos import export_texture, scene_photos
from tests.registry_helpers import NAME, Registry
from tests.test_features import TINY
from tests.test_model import copy_model, edit_manifest
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
        scene_module.weights_path()


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_a_weight_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, f)
        pickle.dump({"w": _RunsCode()}, f)
    with pytest.raises(DatasetError, match=r"builtins\.print, which is not admitted"):
        read_state_dict(path)


def test_projection_is_orthonormal_deterministic_and_bounded() -> None:
    x = np.random.default_rng(0).normal(size=(12, 40)) * np.linspace(0.1, 3.0, 40)
    p = Projection.fit(x, 4)
    assert np.allclose(p.components @ p.components.T, np.eye(4), atol=1e-9)
    assert np.array_equal(p.components, Projection.fit(x, 4).components)
    assert np.allclose(p.apply(p.center[None]), 0.0)
    assert p.names == ("scene:pc0", "scene:pc1", "scene:pc2", "scene:pc3")
    with pytest.raises(ValueError, match=r"need 1\.\.12"):
        Projection.fit(x, 13)


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


def test_device_and_training_compute_the_same_probability(scened: Scened) -> None:
    """Training's statistics (xgboost, numpy projection) and the device's (ONNX) agree."""
    manifest, _, booster, chosen = scened
    model = load_model(manifest)
    assert isinstance(model, FeatureModel) and model.scene is not None
    rule = model.manifest.decision.image_rule
    assert rule is not None
    assert rule.statistics == statistic_names(
        SCENED.features, ("scene:pc0", "scene:pc1", "scene:pc2")
    )
    _, photos = scene_photos(manifest.parent.parent / "again", SCENED, seed=100, count=3,
                             backbone=Backbone())  # fmt: skip
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
