"""How good a model is, and how good the recipe is on photos it never saw.

`evaluate_pixels`, `evaluate_images` and `evaluate_boxes` measure one exported model the way
the device runs it (the manifest's decision, the served scores). Where ../shared/data has
no separate test set, `cv_images` and `cv_boxes` measure the texture recipe by
cross-validation: every figure comes from photos that neither trained the pixel model nor
chose its decision (nested CV for the image decision).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ClassifierConfig
from agent.contract import Decision, Provenance
from agent.engine import imagerule
from agent.engine.classifier import load_model
from agent.engine.detector import Detector
from agent.engine.model import PixelModel, resolve_manifest
from agent.imageio import read
from export.convert import export_model
from export.datasets import DatasetError
from export.recipe import (
    Photo,
    Recipe,
    Sources,
    choose_decision,
    data_sha256,
    fit,
    group_folds,
    image_files,
    image_metrics,
    image_pct,
    load_photos,
    log,
    oof_maps,
    probability_maps,
    region_scorer,
    sha256,
    training_rows,
)
from export.train import metrics, read_csv
from export.voc import Annotation

PR_POINTS = 200


def pr_curve(truth: np.ndarray, score: np.ndarray) -> list[list[float]]:
    """[recall, precision] at every distinct score, thinned to about PR_POINTS points."""
    order = np.argsort(-score, kind="mergesort")
    hits = np.cumsum(truth[order])
    ranks = np.arange(1, len(order) + 1)
    last = np.r_[np.flatnonzero(np.diff(score[order]) != 0), len(order) - 1]
    recall = hits[last] / max(1, int(truth.sum()))
    precision = hits[last] / ranks[last]
    keep = np.unique(np.linspace(0, len(last) - 1, min(PR_POINTS, len(last))).astype(int))
    return [
        [round(float(r), 5), round(float(p), 5)]
        for r, p in zip(recall[keep], precision[keep], strict=True)
    ]


def evaluate_pixels(model_path: Path, csv: Path) -> dict[str, Any]:
    """Pixel metrics of a label-first CSV whose columns are the model's features."""
    model = PixelModel.load(resolve_manifest(model_path))
    x, y = read_csv(csv)
    width = len(model.manifest.input.features)
    if x.shape[1] != width:
        raise DatasetError(f"{csv}: {x.shape[1]} feature columns, the model reads {width}")
    labels, proba = model.predict(x)
    score = labels.astype(np.float32) if proba is None else proba
    threshold = np.float32(0.5 if proba is None else model.manifest.decision.pixel_threshold)
    m = metrics(y, score, float(threshold))
    return {
        "kind": "pixels",
        "model": model.manifest.name,
        "csv": str(csv),
        "rows": len(y),
        **{k: m[k] for k in ("accuracy", "precision", "recall", "f1", "auc")},
        "confusion": _confusion(m),
        "pr_curve": pr_curve(y.astype(bool), score),
    }


def _confusion(m: dict[str, float]) -> dict[str, Any]:
    return {
        "rows": "true clean, rust",
        "columns": "predicted clean, rust",
        "matrix": [[int(m["tn"]), int(m["fp"])], [int(m["fn"]), int(m["tp"])]],
    }


def sweep(pcts: np.ndarray, rust: np.ndarray) -> list[list[float]]:
    """[flag %, accuracy, rust recall, precision] at every threshold that changes a flag."""
    out = []
    for t in np.unique(np.concatenate(([0.0], pcts, [100.0]))):
        m = image_metrics(pcts >= t, rust)
        out.append([round(float(t), 4), m["accuracy"], m["rust_recall"], m["precision"]])
    return out


def _image_result(
    kind: str, pcts: np.ndarray, rust: np.ndarray, flagged: np.ndarray, paths: Sequence[Path]
) -> dict[str, Any]:
    m = image_metrics(flagged, rust)
    return {
        "kind": kind,
        "images": len(set(paths)),
        "decisions": len(rust),  # more than images where cross-validation was repeated
        **{k: m[k] for k in ("accuracy", "rust_recall", "precision")},
        "confusion": _confusion(m),
        "sweep": sweep(pcts, rust),
        "per_image": [
            {"path": str(p), "rust": bool(r), "pct": round(float(v), 4), "flagged": bool(f)}
            for p, r, v, f in zip(paths, rust, pcts, flagged, strict=True)
        ],
    }


def evaluate_images(model_path: Path, rust_dir: Path, norust_dir: Path) -> dict[str, Any]:
    """Image flags by the manifest's decision, through the device's own detector."""
    manifest = resolve_manifest(model_path)
    detector = Detector(load_model(manifest), ClassifierConfig(max_regions=0))
    rusty, clean = image_files(rust_dir), image_files(norust_dir)
    paths = rusty + clean
    rust = np.array([True] * len(rusty) + [False] * len(clean))
    pcts, flagged = np.empty(len(paths)), np.empty(len(paths), bool)
    probabilities: list[float | None] = []
    for i, path in enumerate(paths):
        analysis = detector.analyse(read(path).image)
        pcts[i], flagged[i] = analysis.corrosion_pct, analysis.flagged
        probabilities.append(analysis.rust_probability)
    detector.close()
    result = _image_result("images", pcts, rust, flagged, paths)
    for record, p in zip(result["per_image"], probabilities, strict=True):
        if p is not None:
            record["rust_probability"] = round(p, 4)
    groups = [sha256(p) for p in paths]
    return {
        "model": detector.model.manifest.name,
        "flag_pct": detector.threshold,
        "duplicates": len(groups) - len(set(groups)),
        **result,
    }


def evaluate_boxes(
    model_path: Path, voc: Path, labels: Collection[str] | None = None
) -> dict[str, Any]:
    """COCO-style box AP of the engine's regions (export.boxes does the matching); `labels`:
    the VOC names that are truth (default export.boxes.LABELS)."""
    from export.boxes import LABELS
    from export.boxes import evaluate_boxes as boxes

    chosen = tuple(labels or LABELS)
    result: dict[str, Any] = boxes(resolve_manifest(model_path), voc, labels=chosen)
    return {"kind": "boxes", "voc": str(voc), "labels": list(chosen), **result}


def cv_images(
    sources: Sources, recipe: Recipe, *, outer: int = 5, repeats: int = 1
) -> dict[str, Any]:
    """Nested CV of the texture recipe: outer folds by photo group; in each, the decision
    (flag % and image rule) is chosen by inner CV on the outer-training photos alone, then
    applied to the held-out fold with the model trained on all outer-training photos.

    `repeats` runs it over that many different outer fold splits and pools the decisions,
    because one split's figure depends on which weak rust photos happen to share a fold;
    every split's own figures stay in the result (`splits`) to show how far they spread.
    """
    if repeats < 1:
        raise ValueError(f"repeats (--repeats) must be at least 1, got {repeats}")
    photos = load_photos(sources, recipe)
    rust = np.array([p.rust for p in photos])
    runs = [_nested_split(photos, rust, recipe, outer, r) for r in range(repeats)]
    result = _image_result(
        "cv-images",
        np.concatenate([run.pcts for run in runs]),
        np.tile(rust, repeats),
        np.concatenate([run.flagged for run in runs]),
        [p.path for p in photos] * repeats,
    )
    extras = [more for run in runs for more in run.extra]
    for record, more in zip(result["per_image"], extras, strict=True):
        record.update(more)
    splits = []
    for r, run in enumerate(runs):
        m = image_metrics(run.flagged, rust)
        splits.append(
            {
                "repeat": r,
                "seed": _outer_seed(recipe, r),
                **{k: m[k] for k in ("accuracy", "rust_recall", "precision", "fp", "fn")},
                "thresholds": sorted(set(run.thresholds)),
            }
        )
    return {
        "outer_folds": outer,
        "inner_folds": recipe.folds,
        "groups": _groups(photos),
        "decided_by": "image rule" if recipe.image_rule else "corrosion %",
        "scene_components": recipe.scene_components if recipe.reads_scene else 0,
        "rule_threshold": recipe.rule_threshold,
        **result,
        "splits": splits,
    }


def _outer_seed(recipe: Recipe, repeat: int) -> int:
    """Repeat 0 is the split single runs have always used; the stride keeps the splits of
    nearby --seed values apart."""
    return recipe.seed + 1000 + 10007 * repeat


@dataclass(frozen=True)
class _Split:
    """One outer split of `cv_images`: each photo's %, flag and what decided it."""

    pcts: np.ndarray
    flagged: np.ndarray
    extra: list[dict[str, Any]]
    thresholds: list[float]  # per outer fold: the rule's P(rust) threshold, or the flag %


def _nested_split(
    photos: Sequence[Photo], rust: np.ndarray, recipe: Recipe, outer: int, repeat: int
) -> _Split:
    folds = group_folds(
        [p.group for p in photos], rust.tolist(), outer, _outer_seed(recipe, repeat)
    )
    pcts, flagged = np.empty(len(photos)), np.empty(len(photos), bool)
    extra: list[dict[str, Any]] = [{} for _ in photos]
    thresholds = []
    for k in range(outer):
        train = [p for p, f in zip(photos, folds, strict=True) if f != k]
        held = np.flatnonzero(folds == k).tolist()
        chosen = choose_decision(train, recipe, recipe.seed + 100 * k)
        decision = chosen.decision
        booster = fit(train, recipe, recipe.seed + 100 * k)
        shown = [photos[i] for i in held]
        maps = probability_maps(booster, shown)
        stats = chosen.statistics(shown, maps)
        rule = decision.image_rule
        thresholds.append(decision.flag_pct if rule is None else rule.threshold)
        for j, i in enumerate(held):
            pcts[i] = image_pct(photos[i], maps[j], recipe.pixel_threshold)
            extra[i] = {"repeat": repeat, "fold": k, "flag_pct": decision.flag_pct}
            if rule is None:
                flagged[i] = pcts[i] >= decision.flag_pct
                continue
            p = imagerule.probability(rule, stats[j])
            flagged[i] = p >= rule.threshold
            extra[i] |= {"rust_probability": round(p, 4), "rule_threshold": rule.threshold}
        done = image_metrics(flagged[held], rust[held])
        by = f"flag_pct {decision.flag_pct}" if rule is None else f"rule P >= {rule.threshold}"
        log(f"split {repeat} outer fold {k}: {by}, accuracy {done['accuracy']:.3f}")
    return _Split(pcts, flagged, extra, thresholds)


def _groups(photos: Sequence[Photo]) -> int:
    return len({p.group for p in photos})


def texture_trainer(
    sources: Sources, recipe: Recipe
) -> Callable[[Sequence[Annotation], Path], Path]:
    """export.boxes' trainer for out-of-fold box AP: the texture recipe trained on the
    given boxed photos plus every photo that is not box-scored (norust, unboxed rust), so a
    held-out photo (or a copy of it) never trains the model that scores it. Boxes never read
    the image rule's scene features, so photos are loaded without them."""
    photos = load_photos(sources, replace(recipe, scene_components=0))

    def train(anns: Sequence[Annotation], out: Path) -> Path:
        keep = {sha256(a.image) for a in anns}
        chosen = [p for p in photos if not p.boxed or p.group in keep]
        x, y = training_rows(chosen)
        regions = None
        if recipe.box_scorer:  # trained on maps of its photos' own folds, as in build_texture
            regions = region_scorer(chosen, oof_maps(chosen, recipe, recipe.seed), recipe, out)
        return export_model(
            fit(chosen, recipe, recipe.seed),
            out,
            name="cv-boxes",
            version="0.0.0",
            decision=Decision(pixel_threshold=recipe.pixel_threshold),
            provenance=Provenance(training_data_sha256=data_sha256(x, y)),
            pipeline=recipe.pipeline,
            sample=x,
            regions=regions,
        )

    return train


def cv_boxes(sources: Sources, recipe: Recipe, *, folds: int = 5) -> dict[str, Any]:
    """Nested out-of-fold box AP of the texture recipe (its box scorer, or export.boxes'
    groupings without one): held-out photos are scored by models trained without them,
    detections pooled."""
    from export import boxes

    trainer = texture_trainer(sources, recipe)
    # a learned box scorer leaves no grouping to choose: the detector's own ({}) is measured
    groupings = ({},) if recipe.box_scorer else boxes.GROUPINGS
    result = boxes.out_of_fold(
        sources.voc, trainer=trainer, groupings=groupings, folds=folds, seed=recipe.seed, log=log
    )
    return {"kind": "cv-boxes", "box_scorer": recipe.box_scorer, **result}
