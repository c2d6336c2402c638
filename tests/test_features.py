"""Feature models: one feature pipeline for training and device, refusals at load, the stride."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import ClassifierConfig
from agent.contract import ModelManifest
from agent.engine.classifier import ColourModel, FeatureModel, load_model
from agent.engine.detector import Detector
from agent.engine.features import FeatureError, FeaturePipeline, check_name, texture_features
from agent.engine.model import ModelError
from agent.imageio import read
from export.recipe import Recipe, fit, load_photo
from export.synthetic import make_scene
from export.voc import parse
from tests.photos import export_texture, scene_photo, scene_photos
from tests.test_model import copy_model, edit_manifest

TINY = Recipe(
    params={"objective": "binary:logistic", "num_round": 15, "max_depth": 4, "eta": 0.3},
    long_side=160,
    threads=2,
    scene_components=0,  # tests/test_scene.py trains with scene features
)


@pytest.fixture(scope="module")
def feature_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small feature model trained on synthetic scenes: rust boxes vs clean scenes."""
    root = tmp_path_factory.mktemp("feature-model")
    _, photos = scene_photos(root / "scenes", TINY)
    return export_texture(fit(photos, TINY, 0), photos, TINY, root / "model", name="test-features")


def test_the_recipe_feature_set_is_the_measured_21() -> None:
    names = texture_features((7,))
    assert len(names) == 21 and len(set(names)) == 21
    for name in names:
        check_name(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("X", "unknown base plane"),
        ("blur3:L*", "unknown operator"),
        ("mean8:L*", "must be odd"),
        ("std65:S", "must be odd, 3..63"),
    ],
)
def test_unknown_features_are_refused(name: str, reason: str) -> None:
    with pytest.raises(FeatureError, match=reason):
        FeaturePipeline(("R", name), 320)


def test_planes_on_hand_made_images() -> None:
    """R, G, B come from the right BGR channel; flat images have no texture."""
    flat = np.zeros((20, 30, 3), np.uint8)
    flat[...] = (10, 20, 200)  # BGR: a red
    pipe = FeaturePipeline(("R", "G", "B", "std7:L*", "grad:L*", "lap:a*", "mean7:S"), 320)
    rows = pipe.rows(flat)
    assert rows.shape == (600, 7)
    hsv = cv2.cvtColor(flat, cv2.COLOR_BGR2HSV)
    assert np.array_equal(rows[0], [200, 20, 10, 0, 0, 0, hsv[0, 0, 1]])
    step = np.zeros((9, 9, 3), np.uint8)
    step[:, 5:] = 255  # a vertical edge: gradient there, none far from it
    grad = FeaturePipeline(("grad:L*",), 320).planes(step)[0]
    assert grad[4, 0] == 0 and grad[4, 4] > 0 and grad[4, 5] > 0


def test_working_resolution_and_grid() -> None:
    pipe = FeaturePipeline(("R",), 160, stride=2)
    work = pipe.working(np.zeros((240, 320, 3), np.uint8))
    assert work.shape == (120, 160, 3)
    assert pipe.grid_shape(work.shape) == (60, 80)
    assert pipe.working(np.zeros((50, 80, 3), np.uint8)).shape == (50, 80, 3)  # no upscaling


def test_export_and_agent_compute_identical_features(tmp_path: Path) -> None:
    """The recipe's rows for a photo are bit-for-bit the device's rows for the same file."""
    path = scene_photo(tmp_path, 11)
    photo = load_photo(path, True, parse(path.with_suffix(".xml")), TINY, np.random.default_rng(0))
    pipeline = TINY.pipeline
    work = pipeline.working(read(path).image)
    assert np.array_equal(photo.grid, pipeline.rows(work))
    everything = pipeline.rows(work, stride=1)
    found = (photo.rows[:, None, :] == everything[None, :, :]).all(axis=2).any(axis=1)
    assert found.all() and len(photo.rows) > 100  # every training row is a device row


def test_feature_model_loads_and_serves(feature_model: Path) -> None:
    model = load_model(feature_model)
    assert isinstance(model, FeatureModel)
    manifest = ModelManifest.read(feature_model)
    assert manifest.table is None and manifest.features is not None
    scene = make_scene(np.random.default_rng(21), 320, 240)
    analysis = Detector(model).analyse(scene.image)
    assert analysis.mask.shape == (240, 320)
    assert abs(analysis.corrosion_pct - scene.corrosion_pct) < 25


@pytest.mark.parametrize("shape", [(2, 1000), (1000, 3), (1, 1), (1, 7)])
def test_strips_thinner_than_the_stride_are_classified(
    feature_model: Path, shape: tuple[int, int]
) -> None:
    """A frame 1 working pixel high or wide had no sampled row: the model raised and the
    frame was counted failed (a line-scan camera, a cropped strip)."""
    detector = Detector(load_model(feature_model))
    frame = np.full((*shape, 3), (40, 70, 150), np.uint8)  # BGR rust brown
    analysis = detector.analyse(frame)
    assert analysis.mask.shape == shape and 0.0 <= analysis.corrosion_pct <= 100.0


def test_feature_model_behind_analysis_long_side_is_warned_about(
    feature_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The frame is then resampled twice (decode or analysis size, then the pipeline's
    working size) where training resampled once: the features drift, so the operator is told,
    once, and only when a frame is larger than the analysis size."""
    small, large = np.zeros((480, 640, 3), np.uint8), np.zeros((720, 1280, 3), np.uint8)
    Detector(load_model(feature_model)).analyse(large)
    assert "analysis_long_side" not in caplog.text
    limited = Detector(load_model(feature_model), ClassifierConfig(analysis_long_side=640))
    limited.analyse(small)
    assert "analysis_long_side" not in caplog.text
    limited.analyse(large)
    limited.analyse(small, frame_size=(1280, 720))  # decoded at reduced size from a larger one
    assert caplog.text.count("analysis_long_side = 640 resamples frames") == 1
    warned = weakref.ref(limited._model)
    limited.swap(load_model(feature_model))  # the updater's swap: the old model is freed
    limited.analyse(small)  # closes the retired one
    gc.collect()
    assert warned() is None, "the warning's memory held the swapped-out model"


def test_stride_is_exact_where_it_classifies(feature_model: Path) -> None:
    """Documented guarantee: every sampled working pixel gets the brute-force answer;
    in between, scores are interpolated (measured here: labels agree on >= 95 % of pixels)."""
    model = load_model(feature_model)
    assert isinstance(model, FeatureModel)
    pipe = model.pipeline
    assert pipe.stride == 2
    for seed in range(3):
        frame = make_scene(np.random.default_rng(30 + seed), 480, 360).image
        work = pipe.working(frame)
        fast, _ = model.model.predict(pipe.rows(work))
        brute, _ = model.model.predict(pipe.rows(work, stride=1))
        brute_grid = brute.reshape(work.shape[:2])[1::2, 1::2]
        assert np.array_equal(fast.reshape(pipe.grid_shape(work.shape)), brute_grid)
        served, reference = model.scores(frame) >= 128, model.scores(frame, stride=1) >= 128
        assert np.mean(served == reference) >= 0.95
        assert abs(served.mean() - reference.mean()) < 0.02


def test_feature_models_that_do_not_fit_are_refused(feature_model: Path, tmp_path: Path) -> None:
    manifest = ModelManifest.read(feature_model)
    names = list(manifest.input.features)
    narrow = [
        {**g.model_dump(), "features": g.features[:-1]} for g in manifest.golden if g.features
    ]
    cases: list[tuple[dict[str, object], str]] = [
        (
            {"input__features": names[:-1], "input__shape": [None, 20], "golden": narrow},
            "input shape|reads feature",
        ),
        ({"input__features": [*names[:-1], "fog"]}, "unknown base plane"),
        ({"features": None}, "golden samples of a colour model carry no features"),
        ({"features__stride": 0}, "stride"),
    ]
    for i, (change, reason) in enumerate(cases):
        m = copy_model(feature_model, tmp_path / f"m{i}")
        edit_manifest(m, **change)
        with pytest.raises((ModelError, ValueError), match=reason):
            load_model(m)
    m = copy_model(feature_model, tmp_path / "golden")
    data = json.loads(m.read_text())
    data["golden"][0]["features"] = data["golden"][0]["features"][:5]
    m.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="must carry 21 features"):
        load_model(m)


def test_colour_manifests_read_as_contract_1_0(logistic_model: Path) -> None:
    """Unset 1.1 fields are left out, so older devices still load (and verify) colour models."""
    data = json.loads(logistic_model.read_text())
    assert "features" not in data
    assert all("features" not in g for g in data["golden"])
    assert isinstance(load_model(logistic_model), ColourModel)
