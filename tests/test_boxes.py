"""Box AP (COCO style) on hand-computed cases, and the evaluation and out-of-fold protocol
on a tiny synthetic VOC set. (The AP functions also agree with pycocotools to 1e-16 on
85 random multi-image cases with tied scores; pycocotools is not a test dependency.)"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from export.boxes import (
    ImageBoxes,
    average_precision,
    average_recall,
    colour_trainer,
    evaluate_boxes,
    iou_matrix,
    load_annotations,
    operating_point,
    out_of_fold,
    photo_folds,
    summary,
)
from export.synthetic import generate
from export.voc import Annotation

A, B, C = (0, 0, 10, 10), (20, 20, 40, 40), (60, 0, 70, 10)


def test_iou() -> None:
    got = iou_matrix(np.array([A, B], float), np.array([A, (5, 0, 15, 10), C], float))
    assert np.allclose(got, [[1.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert iou_matrix(np.empty((0, 4)), np.array([A], float)).shape == (0, 1)


def test_perfect_detections_score_one() -> None:
    images = [ImageBoxes.of([A, B], [B, A], [0.9, 0.8]), ImageBoxes.of([C], [C], [0.1])]
    s = summary(images)
    assert s["ap50"] == s["ap"] == s["ar100"] == 1.0
    assert (s["n_images"], s["n_boxes"]) == (2, 3)
    assert s["pr_curve"][0] == [0.0, 1.0] and s["pr_curve"][-1] == [1.0, 1.0]


def test_a_duplicate_detection_is_a_false_positive() -> None:
    # A (tp, recall .5, precision 1), A again (fp, precision .5), B (tp, recall 1, precision 2/3)
    images = [ImageBoxes.of([A, B], [A, A, B], [0.9, 0.8, 0.7])]
    assert average_precision(images) == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert average_recall(images) == 1.0


def test_a_confident_miss_halves_the_curve() -> None:
    # C (fp, precision 0), A (tp, recall .5, precision .5); B never found
    images = [ImageBoxes.of([A, B], [C, A], [0.9, 0.8])]
    assert average_precision(images) == pytest.approx(51 * 0.5 / 101)
    # the same detections ranked the other way: precision 1 up to recall .5
    assert average_precision([ImageBoxes.of([A, B], [C, A], [0.1, 0.8])]) == pytest.approx(51 / 101)


def test_ranking_is_pooled_across_images() -> None:
    # image 1's false positive outranks image 2's hit: precision at recall 1 is 1/2
    images = [ImageBoxes.of([], [A], [0.9]), ImageBoxes.of([B], [B], [0.5])]
    assert average_precision(images) == pytest.approx(0.5)


def test_what_a_device_reports_is_measured_at_its_floor() -> None:
    # image 1: A hit (0.9), C false (0.4); image 2: B hit (0.3), A false (0.8); 3 boxes to find
    images = [
        ImageBoxes.of([A, (30, 30, 50, 50)], [A, C], [0.9, 0.4], floor=0.35),
        ImageBoxes.of([B], [B, A], [0.3, 0.8], floor=0.35),
    ]
    got = operating_point(images)
    assert got.pop("floors") == [0.35]
    assert got == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "per_image": 1.5}
    )
    assert {k: v for k, v in summary(images)["reported"].items() if k != "floors"} == got
    assert (
        summary(images)["ap50"]
        == summary([ImageBoxes.of(i.gt, i.boxes, i.scores) for i in images])["ap50"]
    )


def test_iou_thresholds() -> None:
    loose = (0, 0, 10, 7.2)  # IoU 0.72 with A: a hit at 0.5 ... 0.7, a miss from 0.75
    s = summary([ImageBoxes.of([A], [loose], [1.0])])
    assert s["ap50"] == 1.0
    assert s["ap"] == pytest.approx(0.5) and s["ar100"] == pytest.approx(0.5)


def test_empty_cases() -> None:
    assert math.isnan(average_precision([]))
    assert math.isnan(average_precision([ImageBoxes.of([], [A], [1.0])]))
    assert math.isnan(average_recall([ImageBoxes.of([], [], [])]))
    assert average_precision([ImageBoxes.of([A], [], [])]) == 0.0
    assert average_recall([ImageBoxes.of([A], [], [])]) == 0.0
    assert summary([ImageBoxes.of([A], [], [])])["pr_curve"][0] == [0.0, 0.0]


def test_only_the_best_100_detections_of_an_image_count() -> None:
    misses = [(100 + i, 100, 110 + i, 110) for i in range(100)]
    images = [ImageBoxes.of([A], [*misses, A], [0.9] * 100 + [0.1])]
    assert average_precision(images) == 0.0
    assert average_recall(images) == 0.0


def test_photo_folds_keep_copies_together_and_are_seeded() -> None:
    shas = ["a", "b", "a", "c", "d", "e", "b", "f"]
    folds = photo_folds(shas, 3, seed=4)
    assert folds[0] == folds[2] and folds[1] == folds[6]
    assert set(folds.tolist()) == {0, 1, 2}
    assert np.array_equal(folds, photo_folds(shas, 3, seed=4))


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("voc")
    generate(directory, 8, seed=1, width=160, height=120)
    return directory


def test_evaluate_boxes_on_synthetic_scenes(voc: Path, logistic_model: Path) -> None:
    result = evaluate_boxes(logistic_model, voc)
    assert result["n_images"] == 8 and result["n_boxes"] >= 6
    assert result["ap50"] > 0.4, "a clean synthetic map gives most boxes at IoU 0.5"
    assert 0.0 < result["ap"] <= result["ap50"] and 0.0 < result["ar100"] <= 1.0
    assert len(result["pr_curve"]) == 101
    assert sum(p["gt"] for p in result["per_image"]) == result["n_boxes"]
    assert sum(p["tp50"] for p in result["per_image"]) >= result["n_boxes"] // 2
    assert result["skipped"] == []


def test_out_of_fold_never_trains_on_what_it_scores(voc: Path, logistic_model: Path) -> None:
    seen: list[set[str]] = []

    def trainer(photos: Sequence[Annotation], out: Path) -> Path:
        seen.append({a.image.name for a in photos})
        shutil.copytree(logistic_model.parent, out)
        return out / logistic_model.name

    groupings: list[dict[str, object]] = [{"grid": ()}, {"grid": (16, 32)}]
    result = out_of_fold(
        voc, trainer=trainer, groupings=groupings, folds=2, inner_folds=2, log=lambda _: None
    )
    assert len(seen) == 2 * (1 + 2)  # per outer fold: two inner models and the outer one
    held = [
        {p["file"] for p in result["per_image"][:4]},
        {p["file"] for p in result["per_image"][4:]},
    ]
    assert all(
        not (h & s) for h, group in zip(held, (seen[:3], seen[3:]), strict=True) for s in group
    )
    assert result["n_images"] == 8 and {c["fold"] for c in result["chosen"]} == {0, 1}
    assert all(c["grouping"] in groupings for c in result["chosen"])
    assert 0.0 < result["ap50"] <= 1.0


def test_colour_trainer_learns_rust_from_the_boxes(voc: Path, tmp_path: Path) -> None:
    anns, problems = load_annotations(voc)
    fit = colour_trainer(params={"objective": "binary:logistic", "num_round": 10, "max_depth": 3})
    manifest = fit(anns, tmp_path / "model")
    assert problems == [] and manifest.is_file()
    assert evaluate_boxes(manifest, voc)["ap50"] > 0.3  # in-sample: a sanity check only


def test_evaluate_boxes_refuses_a_run_with_no_truth(
    voc: Path, logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong --voc or another label name gave AP NaN and exit 0; now each names the cause,
    and --label takes the other name."""
    from export.cli import main

    relabelled = tmp_path / "voc"
    shutil.copytree(voc, relabelled)
    for xml in relabelled.glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>rust</name>", "<name>corrosion</name>"))
    args = ["evaluate", "boxes", "--model", str(logistic_model), "--json"]
    assert main([*args, "--voc", str(tmp_path / "absent")]) == 2
    assert "absent: not a directory of VOC annotations" in capsys.readouterr().err
    assert main([*args, "--voc", str(relabelled)]) == 2
    err = capsys.readouterr().err
    assert "no box labelled Corroded or rust in 8 annotation file(s)" in err
    assert "labels found: corrosion (pass --label NAME)" in err
    assert main([*args, "--voc", str(relabelled), "--label", "corrosion"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == ["corrosion"] and result["ap50"] > 0.4
