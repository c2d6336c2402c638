"""The image rule: statistics computed once for training and device, fitted recall-first,
carried in the manifest, deciding the flag on the device (unless an operator's % overrides)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from agent.cli import main as agent_main
from agent.config import ClassifierConfig
from agent.contract import DetectionMessage, ImageRule, ModelManifest, statistic_names
from agent.contract.common import utc_now
from agent.engine import imagerule
from agent.engine.classifier import FeatureModel, load_model
from agent.engine.detector import Detector
from agent.imageio import read
from export.imagerule import fit_logistic, fit_rule, recall_first
from export.recipe import (
    choose_decision,
    fit,
    frame_statistics,
    load_photo,
    probability_maps,
)
from tests.agentproc import AgentProcess, Subscriber, agent_settings, write_config
from tests.broker import Broker
from tests.photos import export_texture, scene_photos
from tests.test_features import TINY
from tests.test_model import copy_model, edit_manifest

RULED = replace(TINY, folds=2)
Ruled = tuple[Path, list[Path], xgb.Booster]


def test_statistics_are_named_and_computed_in_one_order() -> None:
    assert statistic_names(("R", "S")) == (
        "q10:R",
        "q10:S",
        "q50:R",
        "q50:S",
        "q90:R",
        "q90:S",
        "log1p_pct",
        "mean_p",
        "pmean:R",
        "pmean:S",
    )
    rows = np.array([[0.0, 10.0], [10.0, 20.0], [20.0, 30.0], [30.0, 40.0]], np.float32)
    proba = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    stats = imagerule.statistics(rows, proba, 0.5)
    assert stats.shape == (10,)
    assert stats[2:4].tolist() == [15.0, 25.0]  # medians
    assert stats[6] == pytest.approx(np.log1p(50.0)) and stats[7] == 0.5
    assert stats[8:].tolist() == [25.0, 35.0]  # P-weighted means: the two corroded rows
    with pytest.raises(ValueError, match="do not describe one frame"):
        imagerule.statistics(rows, proba[:3], 0.5)


def test_a_rule_whose_parts_do_not_line_up_is_refused() -> None:
    with pytest.raises(ValueError, match="2 statistics but 1 centres"):
        ImageRule(
            statistics=("a", "b"),
            center=(0.0,),
            scale=(1.0, 1.0),
            weights=(1.0, 1.0),
            intercept=0.0,
            threshold=0.5,
        )
    with pytest.raises(ValueError, match="greater than 0"):
        ImageRule(
            statistics=("a",), center=(0.0,), scale=(0.0,), weights=(1.0,), intercept=0, threshold=0
        )


def test_fitted_rule_flags_every_rust_photo_out_of_fold() -> None:
    rng = np.random.default_rng(0)
    rust = np.arange(60) % 2 == 0
    names = ("R",)  # 3 quantiles + 2 overall + 1 weighted mean = 6 statistics
    shift = np.array([1.5, 0.0, -1.0, 0.0, 0.0, 0.0])
    stats = rng.normal(size=(60, 6)) + rust[:, None] * shift
    folds = np.arange(60) % 5
    fitted = fit_rule(stats, rust, statistic_names(names), folds, threshold="lowest")
    rule, oof = fitted.rule, fitted.oof
    assert fitted.projection is None
    assert rule.statistics == statistic_names(names)
    assert rule.threshold <= oof[rust].min()
    assert (oof[rust] >= rule.threshold).all()
    assert ((oof >= rule.threshold) == rust).mean() > 0.7  # and it still tells them apart
    lowered = fit_rule(stats, rust, statistic_names(names), folds)  # "extrapolated"
    assert np.array_equal(lowered.oof, oof) and lowered.rule.threshold < rule.threshold
    assert lowered.rule.threshold == recall_first(oof[rust], "extrapolated")
    _, _, weights, _ = fit_logistic(stats, rust.astype(float), 1.0)
    assert weights[0] > 0 > weights[2]  # the informative statistics, with their signs
    with pytest.raises(ValueError, match="both classes"):
        fit_rule(stats, np.ones(60, bool), statistic_names(names), folds)


def test_the_extrapolated_threshold_lies_one_gap_below_the_lowest() -> None:
    p = np.array([0.9, 0.5, 0.2])  # logits 2.197, 0, -1.386: the edge is -2.773
    assert recall_first(p, "lowest") == 0.2
    assert recall_first(p, "extrapolated") == pytest.approx(
        1 / (1 + np.exp(2 * np.log(4))), abs=1e-6
    )
    assert recall_first(p[:1], "extrapolated") == 0.9  # one photo: nothing to extrapolate


@pytest.fixture(scope="module")
def ruled(tmp_path_factory: pytest.TempPathFactory) -> Ruled:
    """A tiny feature model whose decision carries a rule fitted on out-of-fold maps."""
    root = tmp_path_factory.mktemp("ruled")
    paths, photos = scene_photos(root / "scenes", RULED, seed=100)
    chosen = choose_decision(photos, RULED, 0)
    assert chosen.decision.image_rule is not None
    booster = fit(photos, RULED, 0)
    manifest = export_texture(
        booster, photos, RULED, root / "model", name="ruled", decision=chosen.decision
    )
    return manifest, paths, booster


def test_device_and_training_compute_the_same_probability(ruled: Ruled) -> None:
    """Training's statistics (xgboost's trees) and the device's (ONNX) give one P(rust)."""
    manifest, paths, booster = ruled
    model = load_model(manifest)
    assert isinstance(model, FeatureModel)
    rule = model.manifest.decision.image_rule
    assert rule is not None
    photos = [load_photo(p, True, None, RULED, np.random.default_rng(0)) for p in paths[:3]]
    maps = probability_maps(booster, photos)
    stats = frame_statistics(photos, maps, RULED.pixel_threshold)
    for photo, row in zip(photos, stats, strict=True):
        device = model.classify(read(photo.path).image).rust_probability
        assert device == pytest.approx(imagerule.probability(rule, row), abs=1e-4)


def test_the_rule_decides_unless_an_operator_sets_a_pct(ruled: Ruled) -> None:
    manifest, paths, _ = ruled
    rule = ModelManifest.read(manifest).decision.image_rule
    assert rule is not None
    image = read(paths[1]).image
    detector = Detector.load(manifest, ClassifierConfig(max_regions=0))
    analysis = detector.analyse(image)
    assert analysis.rust_probability is not None
    assert analysis.flagged == (analysis.rust_probability >= rule.threshold)
    message = analysis.message(device_id="d", source="s", frame_index=0, captured_at=utc_now())
    assert message.rust_probability == round(analysis.rust_probability, 4)
    detector.command_threshold(0.0)  # the set-threshold command: the % decides
    overridden = detector.analyse(image)
    assert overridden.rust_probability is None and overridden.flagged
    detector.close()


def test_manifests_with_a_rule_that_does_not_fit_are_refused(ruled: Ruled, tmp_path: Path) -> None:
    manifest, _, _ = ruled
    rule = json.loads(manifest.read_text())["decision"]["image_rule"]
    cases: list[tuple[dict[str, object], str]] = [
        ({"decision__image_rule__statistics": rule["statistics"][:-1]}, "statistics but"),
        (
            {"decision__image_rule__statistics": ["x"] * len(rule["statistics"])},
            "must be agent.engine.imagerule's statistics",
        ),
        ({"decision__image_rule__weights": [None] * len(rule["weights"])}, "weights"),
        ({"decision__image_rule__threshold": 1.5}, "threshold"),
    ]
    for i, (change, reason) in enumerate(cases):
        m = copy_model(manifest, tmp_path / f"m{i}")
        edit_manifest(m, **change)
        with pytest.raises(ValueError, match=reason):
            load_model(m)


def test_batch_reports_the_rules_answer(ruled: Ruled, tmp_path: Path) -> None:
    manifest, paths, _ = ruled
    out, folder = tmp_path / "out", tmp_path / "photos"
    folder.mkdir()
    for path in paths:  # the photos alone (their masks and XML are no frames)
        shutil.copy(path, folder)
    assert agent_main(["batch", str(folder), "--model", str(manifest), "--out", str(out)]) == 0
    rule = ModelManifest.read(manifest).decision.image_rule
    assert rule is not None
    threshold = rule.threshold
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(list(folder.glob("*.jpg")))
    for row in rows:
        flagged = float(row["rust_probability"]) >= threshold
        assert flagged == (row["flagged"] == "true")


def test_the_daemon_publishes_the_rules_answer_over_mqtt(
    ruled: Ruled, tmp_path: Path, broker: Broker
) -> None:
    """Over a real Mosquitto: every detection carries P(rust) and is flagged by the rule."""
    manifest, paths, _ = ruled
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in paths:
        shutil.copy(path, frames)
    # a device of its own: the session's broker holds other tests' retained messages
    sub = Subscriber(broker.port, ["corrosion/ruled/#"], client_id="rule")
    settings = agent_settings(tmp_path, manifest, broker.port, frames, device="ruled")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    assert sub.wait_for(lambda: any(p["state"] == "stopped" for p in sub.payloads("/status")))
    sub.close()
    assert len(sub.payloads("/detections")) == len(paths)
    rule = ModelManifest.read(manifest).decision.image_rule
    assert rule is not None
    assert sub.payloads("/model")[-1]["rule_threshold"] == rule.threshold
    for payload in sub.payloads("/detections"):
        message = DetectionMessage.model_validate(payload)
        assert message.rust_probability is not None
        assert message.flagged == (message.rust_probability >= rule.threshold)
