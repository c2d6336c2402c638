"""Evaluation: metrics on hand-computed cases, the device's decision, CV bookkeeping, reports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.contract import ModelManifest
from agent.engine.model import PixelModel
from export import evaluate
from export.boxes import GROUPINGS
from export.cli import main as export_main
from export.datasets import csv_bytes
from export.recipe import (
    Sources,
    data_sha256,
    image_metrics,
    load_photos,
    sha256,
    training_rows,
)
from export.synthetic import make_scene
from export.voc import parse
from tests.test_recipe import TINY, synthetic_layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return synthetic_layout(tmp_path_factory.mktemp("eval-layout"))


def test_image_metrics_by_hand() -> None:
    flagged = np.array([True, True, False, False, True])
    rust = np.array([True, False, True, False, True])
    m = image_metrics(flagged, rust)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == 3 / 5 and m["rust_recall"] == 2 / 3 and m["precision"] == 2 / 3


def test_pr_curve_and_sweep_by_hand() -> None:
    truth = np.array([True, False, True, False])
    score = np.array([0.9, 0.8, 0.7, 0.1])
    assert evaluate.pr_curve(truth, score) == [[0.5, 1.0], [0.5, 0.5], [1.0, 0.66667], [1.0, 0.5]]
    rows = evaluate.sweep(np.array([1.0, 5.0]), np.array([False, True]))
    assert rows == [[0.0, 0.5, 1.0, 0.5], [1.0, 0.5, 1.0, 0.5], [5.0, 1.0, 1.0, 1.0],
                    [100.0, 0.5, 0.0, 0.0]]  # fmt: skip


def test_pixels_against_labels_we_flipped(logistic_model: Path, tmp_path: Path) -> None:
    model = PixelModel.load(logistic_model)
    rgb = np.random.default_rng(1).integers(0, 256, size=(400, 3)).astype(np.uint8)
    predicted, _ = model.predict(rgb)
    truth = predicted.copy()
    truth[:40] = 1 - truth[:40]  # exactly 40 wrong answers
    csv = tmp_path / "pixels.csv"
    csv.write_bytes(csv_bytes(truth.astype(np.uint8), rgb))
    r = evaluate.evaluate_pixels(logistic_model, csv)
    assert r["rows"] == 400 and r["accuracy"] == pytest.approx(0.9)
    (tn, fp), (fn, tp) = r["confusion"]["matrix"]
    assert fp == int(np.sum(predicted[:40] == 1)) and fn == int(np.sum(predicted[:40] == 0))
    assert tp == int(np.sum(predicted[40:] == 1)) and tn + fp + fn + tp == 400


def test_images_use_the_detector_and_the_manifest_decision(
    logistic_model: Path, tmp_path: Path
) -> None:
    for kind, rust in (("rust", True), ("norust", False)):
        (tmp_path / kind).mkdir()
        for i in range(2):
            scene = make_scene(np.random.default_rng(40 + i + 10 * rust), 160, 120, rust=rust)
            cv2.imwrite(str(tmp_path / kind / f"{i}.png"), scene.image)
    r = evaluate.evaluate_images(logistic_model, tmp_path / "rust", tmp_path / "norust")
    assert r["images"] == 4 and r["flag_pct"] == 2.0  # the fixture's Decision
    for image in r["per_image"]:
        assert image["flagged"] == (image["pct"] >= 2.0)
    flags = np.array([i["flagged"] for i in r["per_image"]])
    assert r["accuracy"] == image_metrics(flags, np.array([True, True, False, False]))["accuracy"]


def test_nested_cv_records_each_fold_decision(layout: Sources) -> None:
    r = evaluate.cv_images(layout, TINY, outer=2)
    assert r["images"] == len(r["per_image"]) and r["groups"] == r["images"] - 1
    assert r["decided_by"] == "image rule"
    for image in r["per_image"]:
        assert image["flagged"] == (image["rust_probability"] >= image["rule_threshold"])
    assert {i["fold"] for i in r["per_image"]} == {0, 1}
    r = evaluate.cv_images(layout, replace(TINY, image_rule=False), outer=2)
    assert r["decided_by"] == "corrosion %" and len(r["splits"]) == 1
    for image in r["per_image"]:
        assert "rust_probability" not in image
        assert image["flagged"] == (image["pct"] >= image["flag_pct"])


def test_repeated_nested_cv_pools_every_split(layout: Sources) -> None:
    r = evaluate.cv_images(layout, TINY, outer=2, repeats=2)
    photos = r["images"]
    assert r["decisions"] == len(r["per_image"]) == 2 * photos
    first, second = r["splits"]
    assert (first["repeat"], second["repeat"]) == (0, 1) and first["seed"] != second["seed"]
    folds = []
    for split in r["splits"]:  # each split decides every photo once
        mine = [i for i in r["per_image"] if i["repeat"] == split["repeat"]]
        assert len(mine) == photos and {i["fold"] for i in mine} == {0, 1}
        folds.append([i["fold"] for i in mine])
        flags, rust = (np.array([i[k] for i in mine]) for k in ("flagged", "rust"))
        assert split["accuracy"] == image_metrics(flags, rust)["accuracy"]
        assert split["thresholds"] == sorted({i["rule_threshold"] for i in mine})
    assert folds[0] != folds[1]  # different splits, not the same one twice
    assert r["accuracy"] == pytest.approx((first["accuracy"] + second["accuracy"]) / 2)
    (tn, fp), (fn, tp) = r["confusion"]["matrix"]
    assert (fp, fn) == (first["fp"] + second["fp"], first["fn"] + second["fn"])
    assert tn + fp + fn + tp == r["decisions"]
    single = evaluate.cv_images(layout, TINY, outer=2)  # split 0 is what one run measures
    assert single["accuracy"] == first["accuracy"] and single["splits"][0] == first
    with pytest.raises(ValueError, match="--repeats"):
        evaluate.cv_images(layout, TINY, repeats=0)


def test_box_cv_trains_without_the_held_out_photos(
    layout: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    anns = [parse(xml) for xml in sorted(layout.voc.glob("*.xml"))]
    manifest = ModelManifest.read(evaluate.texture_trainer(layout, TINY)(anns[:2], tmp_path / "m"))
    kept = {sha256(a.image) for a in anns[:2]}
    chosen = [p for p in load_photos(layout, TINY) if not p.boxed or p.group in kept]
    assert manifest.provenance.training_data_sha256 == data_sha256(*training_rows(chosen))
    assert len(chosen) == len(load_photos(layout, TINY)) - 3 and manifest.features is not None
    assert manifest.regions is not None  # the box scorer, from its photos' out-of-fold maps

    real = evaluate.cv_boxes(layout, TINY, folds=3)  # the scorer ranks the held-out regions
    assert real["n_boxes"] > 0 and 0.0 <= real["ap50"] <= 1.0
    assert [c["grouping"] for c in real["chosen"]] == [{}] * 3

    calls: dict[str, Any] = {}

    def fake(voc: Path, **kwargs: Any) -> dict[str, Any]:
        calls.update(voc=voc, **kwargs)
        return {"ap50": 0.5, "ap": 0.2, "ar100": 0.4, "n_images": 5, "n_boxes": 9}

    monkeypatch.setattr("export.boxes.out_of_fold", fake)
    r = evaluate.cv_boxes(layout, TINY, folds=3)
    assert r["kind"] == "cv-boxes" and r["ap50"] == 0.5
    assert calls["voc"] == layout.voc and calls["folds"] == 3 and callable(calls["trainer"])
    assert calls["groupings"] == ({},)
    evaluate.cv_boxes(layout, replace(TINY, box_scorer=False), folds=3)
    assert calls["groupings"] == GROUPINGS  # without a scorer the grouping is chosen by CV


def test_cli_json_report_and_summary(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(200, 3)).astype(np.uint8)
    labels = (rgb[:, 0] > rgb[:, 2] + 40).astype(np.uint8)
    csv = tmp_path / "v.csv"
    csv.write_bytes(csv_bytes(labels, rgb))
    report, results = tmp_path / "report", tmp_path / "results"
    args = ["evaluate", "pixels", "--model", str(logistic_model), "--csv", str(csv)]
    assert export_main([*args, "--json", "--report", str(report)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["command"].startswith("corrosion-export evaluate pixels")
    assert {"accuracy", "precision", "recall", "f1", "auc"} <= set(result)
    assert (report / "pixels.md").is_file() and (report / "pixels-pr.png").stat().st_size > 1000
    results.mkdir()
    (results / "pixels-aws-rgb.json").write_text(json.dumps(result))
    out = tmp_path / "ACCURACY.md"
    assert export_main(["evaluate", "summary", "--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "pixel accuracy on AWS validation.csv" in text and result["command"] in text
    assert "Texture recipe" in text  # the recipe, from export/recipe.py's docstring
    (results / "cut.json").write_text('{"kind": "pix')  # a run killed mid-write
    assert export_main(["evaluate", "summary", "--results", str(results), "--out", str(out)]) == 2
    assert "cut.json: not an evaluation result" in capsys.readouterr().err
    assert out.read_text() == text  # the last good summary stays


def _summary(tmp_path: Path, result: dict[str, Any]) -> str:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "cv-images.json").write_text(json.dumps(result))
    out = tmp_path / "ACCURACY.md"
    assert export_main(["evaluate", "summary", "--results", str(results), "--out", str(out)]) == 0
    return out.read_text()


def test_cli_repeated_cv_images_in_the_summary(
    layout: Sources, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = ["--rust", str(layout.rust), "--norust", str(layout.norust), "--voc", str(layout.voc)]
    small = ["--folds", "3", "--long-side", "96", "--set", "num_round=8", "--outer", "2"]
    command = ["evaluate", "cv-images", *sources, *small, "--json"]
    assert export_main([*command, "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decisions"] == 2 * result["images"] and len(result["splits"]) == 2
    text = _summary(tmp_path, result)
    assert "pooled over 2 fold splits" in text and "| split (outer seed) |" in text
    assert f"{result['decisions']} decisions" in text and "rust decisions" in text
    wrong = [i for i in result["per_image"] if i["flagged"] != i["rust"]]
    for name in {Path(i["path"]).name for i in wrong}:  # how often each was decided wrong
        times = sum(Path(i["path"]).name == name for i in wrong)
        assert f"{name} ({times}/2)" in text
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            export_main([*command, "--repeats", bad])
        assert "argument --repeats" in capsys.readouterr().err


def test_summary_of_one_split_and_of_the_percent_decision(layout: Sources, tmp_path: Path) -> None:
    one = evaluate.cv_images(layout, TINY, outer=2)
    text = _summary(tmp_path, one)
    assert "pooled over" not in text and "rust photos)" in text and "decisions" not in text
    thresholds = ", ".join(f"{t:.3f}" for t in one["splits"][0]["thresholds"])
    assert "| thresholds (P(rust)) |" in text and thresholds in text
    assert "Its recall-first threshold" in text
    by_pct = evaluate.cv_images(layout, replace(TINY, image_rule=False), outer=2)
    text = _summary(tmp_path, by_pct)
    assert "| thresholds (flag %) |" in text and "Its recall-first" not in text
    assert ", ".join(f"{t:.3f}" for t in by_pct["splits"][0]["thresholds"]) in text
