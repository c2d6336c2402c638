"""Box accuracy, COCO style: AP@0.5, AP@[.5:.95] and AR@100 of the engine's regions.

The matching and interpolation follow pycocotools (area range "all", at most 100 detections
per image): detections are taken best score first, each claims the unmatched ground-truth box
it overlaps most if that IoU reaches the threshold, and the precision envelope is read at the
101 recalls 0, 0.01, ..., 1. A second detection of an already claimed box is a false positive.

Detections are the regions `Detector.analyse` reports, ranked by the score they were chosen
by (`Analysis.region_scores`; the contract carries none): the model's box scorer
(`agent.engine.proposals`) or, without one, `agent.engine.regions`' rust contrast with the
ring around the box times the square root of its area share. AP ranks every region, below
the box scorer's reporting floor too (as COCO ranks every detection); `reported` measures
what a device reports: the regions at or above the floor.

`out_of_fold` measures a whole recipe on annotated photos that have no separate test set:
folds by photo (identical files together), a pixel model trained per fold by a `Trainer`,
grouping settings chosen by inner cross-validation on the training folds alone, and the
held-out folds' detections pooled into one ranking.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.config import ClassifierConfig
from agent.engine.detector import Analysis, Detector, grouping_of
from agent.engine.regions import scored_regions
from agent.imageio import ImageError, read
from export.convert import export_model
from export.datasets import Config, DatasetError, Item, image_rows
from export.train import hyperparameters, train
from export.voc import Annotation, VocError, parse

F64 = npt.NDArray[np.float64]
IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, 10).tolist())  # as pycocotools
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100


@dataclass(frozen=True)
class ImageBoxes:
    """One image's ground truth and scored detections; boxes are (x0, y0, x1, y1), max exclusive."""

    gt: F64  # (M, 4)
    boxes: F64  # (N, 4)
    scores: F64  # (N,)
    floor: float = 0.0  # a device reports the detections scored at or above it

    @classmethod
    def of(
        cls,
        gt: Sequence[Sequence[float]],
        boxes: Sequence[Sequence[float]],
        scores: Sequence[float],
        floor: float = 0.0,
    ) -> ImageBoxes:
        return cls(
            np.asarray(gt, np.float64).reshape(-1, 4),
            np.asarray(boxes, np.float64).reshape(-1, 4),
            np.asarray(scores, np.float64).reshape(-1),
            floor,
        )

    def reported(self) -> ImageBoxes:
        """The detections a device reports."""
        keep = self.scores >= self.floor
        return ImageBoxes(self.gt, self.boxes[keep], self.scores[keep], self.floor)


def iou_matrix(a: F64, b: F64) -> F64:
    """IoU of every box of `a` (rows) with every box of `b` (columns)."""
    a, b = a.reshape(-1, 4), b.reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: F64 = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def _top(image: ImageBoxes) -> tuple[F64, F64]:
    """Detections best first (stable, as pycocotools), at most MAX_DETECTIONS."""
    order = np.argsort(-image.scores, kind="mergesort")[:MAX_DETECTIONS]
    return image.boxes[order], image.scores[order]


def match(boxes: F64, gt: F64, threshold: float) -> npt.NDArray[np.bool_]:
    """True positives of `boxes` (already best first): greedy, one detection per truth box."""
    ious = iou_matrix(boxes, gt)
    taken = np.zeros(len(gt), bool)
    tp = np.zeros(len(boxes), bool)
    for i in range(len(boxes)):
        candidates = np.where(taken, -1.0, ious[i])
        j = int(np.argmax(candidates)) if len(gt) else -1
        if j >= 0 and candidates[j] >= min(threshold, 1 - 1e-10):
            taken[j] = tp[i] = True
    return tp


def precision_recall(images: Sequence[ImageBoxes], threshold: float) -> tuple[F64, F64, int]:
    """Raw (recall, precision) after each detection of the pooled ranking, and the truth count."""
    scores, hits = [], []
    for image in images:
        boxes, s = _top(image)
        scores.append(s)
        hits.append(match(boxes, image.gt, threshold))
    n_gt = sum(len(im.gt) for im in images)
    if not scores:
        return np.empty(0), np.empty(0), n_gt
    order = np.argsort(-np.concatenate(scores), kind="mergesort")
    tp = np.concatenate(hits)[order]
    ctp = np.cumsum(tp, dtype=np.float64)
    cfp = np.cumsum(~tp, dtype=np.float64)
    recall = ctp / n_gt if n_gt else np.zeros_like(ctp)
    return recall, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps), n_gt


def interpolated(recall: F64, precision: F64) -> F64:
    """Precision at RECALL_POINTS: the best precision at that recall or beyond (0 if unreached)."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    out: F64 = np.zeros(len(RECALL_POINTS))
    reached = at < len(envelope)
    out[reached] = envelope[at[reached]]
    return out


def average_precision(images: Sequence[ImageBoxes], threshold: float = 0.5) -> float:
    """COCO 101-point AP at one IoU threshold; NaN when there is no ground truth at all."""
    recall, precision, n_gt = precision_recall(images, threshold)
    if n_gt == 0:
        return float("nan")
    return float(interpolated(recall, precision).mean())


def average_recall(images: Sequence[ImageBoxes]) -> float:
    """COCO AR@100: recall with the top 100 detections per image, averaged over IoU .5:.95."""
    n_gt = sum(len(im.gt) for im in images)
    if n_gt == 0:
        return float("nan")
    found = [sum(int(match(_top(im)[0], im.gt, t).sum()) for im in images) for t in IOU_THRESHOLDS]
    return float(np.mean(found) / n_gt)


def operating_point(images: Sequence[ImageBoxes], threshold: float = 0.5) -> dict[str, Any]:
    """Precision, recall and F1 at IoU `threshold` of what a device reports, and how many
    regions it reports per image."""
    shown = [image.reported() for image in images]
    n_gt = sum(len(image.gt) for image in shown)
    found = sum(int(match(_top(image)[0], image.gt, threshold).sum()) for image in shown)
    reported = sum(min(len(image.boxes), MAX_DETECTIONS) for image in shown)
    precision = found / reported if reported else 0.0
    recall = found / n_gt if n_gt else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2.0 * found / (reported + n_gt) if reported + n_gt else 0.0,
        "per_image": reported / len(shown) if shown else 0.0,
        "floors": sorted({image.floor for image in images}),
    }


def summary(images: Sequence[ImageBoxes]) -> dict[str, Any]:
    """The headline numbers, what a device reports and the 101-point precision-recall curve
    at IoU 0.5."""
    recall, precision, n_gt = precision_recall(images, 0.5)
    curve = interpolated(recall, precision)
    return {
        "ap50": average_precision(images, 0.5),
        "ap": float(np.mean([average_precision(images, t) for t in IOU_THRESHOLDS])),
        "ar100": average_recall(images),
        "reported": operating_point(images),
        "n_images": len(images),
        "n_boxes": n_gt,
        "pr_curve": [
            [round(float(r), 2), float(p)] for r, p in zip(RECALL_POINTS, curve, strict=True)
        ],
    }


LABELS = ("rust", "Corroded")  # VOC names that are ground truth; other boxes are ignored
Trainer = Callable[[Sequence[Annotation], Path], Path]  # training photos, out dir -> manifest
Grouping = Mapping[str, Any]  # scored_regions keyword arguments beyond the ClassifierConfig's


def region_kwargs(config: ClassifierConfig, grouping: Grouping | None = None) -> dict[str, Any]:
    """The scored_regions arguments the detector passes for `config`, plus `grouping`."""
    return {**grouping_of(config), **(grouping or {})}


def image_boxes(
    analysis: Analysis,
    truth: Annotation,
    config: ClassifierConfig,
    grouping: Grouping | None = None,
    labels: Collection[str] = LABELS,
    *,
    floor: float = 0.0,
) -> ImageBoxes:
    """One photo's truth and detections: without `grouping`, the regions the detector reported
    ranked by the scores it chose them by (evaluation cannot drift from the device); with
    one, the ring-contrast grouping of the detector's mask with those settings. `floor`: the
    score below which a device would not report a region."""
    if grouping:
        frame = (analysis.frame_size.width, analysis.frame_size.height)
        found = scored_regions(analysis.mask, frame, **region_kwargs(config, grouping))
    else:
        found = list(zip(analysis.regions, analysis.region_scores, strict=True))
    return ImageBoxes.of(
        [o.box for o in truth.objects if o.name in labels],
        [(r.x, r.y, r.x + r.w, r.y + r.h) for r, _ in found],
        [score for _, score in found],
        0.0 if grouping else floor,
    )


def ranking(config: ClassifierConfig | None) -> tuple[ClassifierConfig, float | None]:
    """`config` with the box scorer's floor off, so AP ranks every region, and the floor it
    set (None: the model's), for what a device reports."""
    config = config or ClassifierConfig()
    return config.model_copy(update={"min_region_score": 0.0}), config.min_region_score


def load_annotations(voc_dir: Path) -> tuple[list[Annotation], list[str]]:
    """Every annotation under `voc_dir` (sorted) and the problems of those that cannot be used."""
    if not voc_dir.is_dir():
        raise DatasetError(f"{voc_dir}: not a directory of VOC annotations")
    found, problems = [], []
    for xml in sorted(voc_dir.rglob("*.xml")):
        try:
            found.append(parse(xml))
        except VocError as exc:
            problems.append(str(exc))
    return found, problems


def require_truth(anns: Sequence[Annotation], labels: Collection[str], voc_dir: Path) -> None:
    """Refuse annotations without one box labelled as `labels` (AP would be undefined),
    naming the labels the files do use."""
    if not any(o.name in labels for a in anns for o in a.objects):
        seen = sorted({o.name for a in anns for o in a.objects})
        raise DatasetError(
            f"{voc_dir}: no box labelled {' or '.join(sorted(labels))} in {len(anns)} "
            f"annotation file(s); labels found: {', '.join(seen) or 'none'} (pass --label NAME)"
        )


def _detect(
    detector: Detector,
    anns: Sequence[Annotation],
    groupings: Sequence[Grouping | None],
    labels: Collection[str],
    problems: list[str],
    *,
    override: float | None = None,
) -> list[tuple[Annotation, list[ImageBoxes]]]:
    """Each readable photo with its ImageBoxes under every grouping (one analysis per photo);
    `override`: the reporting floor the caller's config set (None: the model's)."""
    out = []
    scorer = detector.model.regions
    floor = 0.0 if scorer is None else scorer.floor(override)
    for ann in anns:
        try:
            image = read(ann.image).image
        except ImageError as exc:
            problems.append(f"{exc}; image skipped")
            continue
        size = (image.shape[1], image.shape[0])
        if ann.size is not None and ann.size != size:
            problems.append(
                f"{ann.xml}: <size> {ann.size} but the image decodes to {size}; skipped"
            )
            continue
        analysis = detector.analyse(image)
        boxes = [
            image_boxes(analysis, ann, detector.config, g, labels, floor=floor) for g in groupings
        ]
        out.append((ann, boxes))
    return out


def _per_image(ann: Annotation, image: ImageBoxes) -> dict[str, Any]:
    boxes, _ = _top(image)
    return {
        "file": ann.image.name,
        "gt": len(image.gt),
        "detections": len(image.boxes),
        "reported": len(image.reported().boxes),
        "tp50": int(match(boxes, image.gt, 0.5).sum()),
    }


def evaluate_boxes(
    manifest: Path,
    voc_dir: Path,
    *,
    config: ClassifierConfig | None = None,
    grouping: Grouping | None = None,
    labels: Collection[str] = LABELS,
) -> dict[str, Any]:
    """AP@0.5, AP@[.5:.95], AR@100, the PR curve and per-photo counts of one exported model
    on the VOC photos of `voc_dir`; `grouping` overrides scored_regions settings."""
    config, override = ranking(config)
    anns, problems = load_annotations(voc_dir)
    require_truth(anns, labels, voc_dir)
    detector = Detector.load(manifest, config)
    try:
        found = _detect(detector, anns, [grouping], labels, problems, override=override)
    finally:
        detector.close()
    result = summary([boxes[0] for _, boxes in found])
    result["per_image"] = [_per_image(ann, boxes[0]) for ann, boxes in found]
    result["skipped"] = problems
    return result


def photo_folds(shas: Sequence[str], k: int, seed: int) -> npt.NDArray[np.int64]:
    """Fold of each photo: identical files (same sha256) share one, groups dealt at random."""
    groups = sorted(set(shas))
    fold_of = {
        groups[j]: n % k
        for n, j in enumerate(np.random.default_rng([seed, 5]).permutation(len(groups)))
    }
    return np.array([fold_of[s] for s in shas], np.int64)


def colour_trainer(
    *,
    crop: Literal["middle", "whole"] = "middle",
    params: Mapping[str, Any] | None = None,
    threads: int = 2,
    seed: int = 0,
    labels: Collection[str] = LABELS,
) -> Trainer:
    """An RGB pixel model per fold: box pixels (the `crop` of each box) are rust, pixels
    outside every box of the same photos are clean (the measured best choice for boxes:
    rust-coloured wood and paint beside the rust learn to stay out of the mask)."""
    config = Config(
        labels={name: 1 for name in labels},
        crop=crop,
        outside_boxes_negatives=True,
        seed=seed,
    )
    recipe = dict(params or hyperparameters("binary:logistic"))

    def fit(train_anns: Sequence[Annotation], out: Path) -> Path:
        ys, xs = [], []
        for i, ann in enumerate(train_anns):
            item = Item("voc", ann.image, "", annotation=ann)
            try:
                rows = image_rows(item, config, np.random.default_rng([seed, i]))
            except DatasetError as exc:  # evaluation skips the same photo and says why
                print(f"warning: {exc}", file=sys.stderr, flush=True)
                continue
            ys.append(rows.labels)
            xs.append(rows.rgb)
        x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)
        booster = train(x, y, recipe, threads=threads, seed=seed).booster
        return export_model(booster, out, name="oof", version="0.0.0", parity=False, seed=seed)

    return fit


GROUPINGS: tuple[Grouping, ...] = tuple(
    {"grid": grid, "overlap": overlap}
    for grid in ((), (16, 32, 64), (8, 16, 32, 64, 128))
    for overlap in (0.3, 0.5, 0.7)
)


def _best(per_grouping: list[list[ImageBoxes]]) -> tuple[int, float]:
    """Index and AP@0.5 of the grouping whose pooled detections score best (first on ties)."""
    aps = [average_precision(images) for images in per_grouping]
    best = int(np.nanargmax(aps)) if not all(np.isnan(aps)) else 0
    return best, aps[best]


def out_of_fold(
    voc_dir: Path,
    *,
    trainer: Trainer | None = None,
    config: ClassifierConfig | None = None,
    groupings: Sequence[Grouping] = GROUPINGS,
    folds: int = 5,
    inner_folds: int = 4,
    seed: int = 0,
    labels: Collection[str] = LABELS,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Nested cross-validated box accuracy of a recipe (trainer + grouping) on `voc_dir`.

    Each outer fold's grouping is the one with the best pooled AP@0.5 over the inner folds of
    its training photos; the held-out photos never choose anything. The result holds the
    `summary` of the pooled held-out detections, per-photo counts, each fold's choice and
    `recommended`: the grouping that scores best over all out-of-fold photos, the setting a
    device should use (its own `ap50` there is optimistic: it was chosen on those photos).
    """
    trainer = trainer or colour_trainer(labels=labels)
    config, override = ranking(config)
    anns, problems = load_annotations(voc_dir)
    require_truth(anns, labels, voc_dir)
    shas = [hashlib.sha256(a.image.read_bytes()).hexdigest() for a in anns]
    if len(set(shas)) < folds:
        raise ValueError(f"{voc_dir}: {len(set(shas))} distinct photos, fewer than {folds} folds")
    outer = photo_folds(shas, folds, seed)
    pooled: list[tuple[Annotation, ImageBoxes]] = []
    every: list[list[ImageBoxes]] = [[] for _ in groupings]
    chosen: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oof-boxes-") as tmp:

        def detect(
            fit: list[int], held: list[int], tag: str
        ) -> list[tuple[Annotation, list[ImageBoxes]]]:
            manifest = trainer([anns[i] for i in fit], Path(tmp) / tag)
            detector = Detector.load(manifest, config)
            try:
                held_anns = [anns[i] for i in held]
                return _detect(detector, held_anns, groupings, labels, problems, override=override)
            finally:
                detector.close()

        for k in range(folds):
            train_idx = [i for i in range(len(anns)) if outer[i] != k]
            inner = photo_folds([shas[i] for i in train_idx], inner_folds, seed + 1 + k)
            per_grouping: list[list[ImageBoxes]] = [[] for _ in groupings]
            for j in range(inner_folds if len(groupings) > 1 else 0):
                fit = [i for i, f in zip(train_idx, inner, strict=True) if f != j]
                held = [i for i, f in zip(train_idx, inner, strict=True) if f == j]
                for _, boxes in detect(fit, held, f"{k}-{j}"):
                    for g, image in enumerate(boxes):
                        per_grouping[g].append(image)
            best, inner_ap = _best(per_grouping) if per_grouping[0] else (0, None)
            chosen.append({"fold": k, "grouping": dict(groupings[best]), "inner_ap50": inner_ap})
            for ann, boxes in detect(
                train_idx, [i for i in range(len(anns)) if outer[i] == k], str(k)
            ):
                pooled.append((ann, boxes[best]))
                for g, image in enumerate(boxes):
                    every[g].append(image)
            if inner_ap is None:  # one grouping: nothing was chosen
                log(f"fold {k}: done")
            else:
                log(f"fold {k}: grouping {dict(groupings[best])}, inner ap50 {inner_ap:.3f}")
    result = summary([image for _, image in pooled])
    result["per_image"] = [_per_image(ann, image) for ann, image in pooled]
    recommended, recommended_ap = _best(every)
    result.update(
        folds=folds,
        inner_folds=inner_folds,
        seed=seed,
        chosen=chosen,
        recommended={"grouping": dict(groupings[recommended]), "ap50": recommended_ap},
        skipped=problems,
    )
    return result


def main_oof(voc_dir: Path, out_json: Path) -> dict[str, Any]:
    """Run `out_of_fold` with the defaults, write the JSON, print `box_ap50=X box_ap=Y` last."""
    result = out_of_fold(voc_dir)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"box_ap50={result['ap50']:.4f} box_ap={result['ap']:.4f}", flush=True)
    return result
