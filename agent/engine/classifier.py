"""Per-frame classification: one table lookup per pixel, in cache-sized row strips.

This is the one place where OpenCV's BGR order meets the models' RGB: a strip is copied
into an 8-byte-per-pixel buffer as B, G, R, 0, 0, 0, 0, 0, whose little-endian int64 view
is R << 16 | G << 8 | B, the index of the colour in the table. No other pixel path reorders
channels (the scene embedder, agent.engine.scene, converts its own squeezed copy). Strips
keep the index buffer in cache (measured: 3.6 ms per 1080p frame on one core against 7 ms
for whole-frame passes); numpy and OpenCV release the GIL, so strips can
also run on several threads.

Feature models (`FeatureModel`) cannot be tabulated: they compute their named features on
a downscaled working image (agent.engine.features) and run the trees on every `stride`-th
pixel. `load_model` is the one door both kinds come through.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from agent.contract import ModelManifest, ModelRef
from agent.engine import imagerule
from agent.engine.features import RGB_FEATURES, FeatureError, FeaturePipeline, expand
from agent.engine.model import ModelError, PixelModel
from agent.engine.proposals import RegionScorer
from agent.engine.scene import SceneEmbedder
from agent.engine.table import CORRODED, SIZE, load_table, scores_from

STRIP_ROWS = 48
BGR_TO_INDEX = [0, 0, 1, 1, 2, 2]  # mixChannels pairs: B -> byte 0, G -> byte 1, R -> byte 2


class TableClassifier:
    """Scores a BGR frame through a 2^24 score table (see agent.engine.table)."""

    def __init__(self, table: np.ndarray, *, threads: int = 1) -> None:
        if table.dtype != np.uint8 or table.shape != (SIZE,):
            raise ValueError(f"table must be uint8[{SIZE}], got {table.dtype}{list(table.shape)}")
        self.table = table
        self.threads = max(1, threads)
        self._local = threading.local()
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="classify")
            if self.threads > 1
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _buffer(self, width: int) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None or buf.shape[1] != width:
            buf = np.zeros((STRIP_ROWS, width, 8), dtype=np.uint8)
            self._local.buf = buf
        return buf

    def _rows(self, bgr: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        buf = self._buffer(bgr.shape[1])
        for y in range(start, stop, STRIP_ROWS):
            n = min(STRIP_ROWS, stop - y)
            strip = buf[:n]
            cv2.mixChannels([np.ascontiguousarray(bgr[y : y + n])], [strip], BGR_TO_INDEX)
            np.take(self.table, strip.view(np.int64)[..., 0], out=out[y : y + n])

    def scores(self, bgr: np.ndarray) -> np.ndarray:
        """uint8 HxW scores; a pixel is corroded where score >= 128."""
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 BGR frame, got {bgr.dtype}{bgr.shape}")
        height = bgr.shape[0]
        out = np.empty(bgr.shape[:2], dtype=np.uint8)
        if self._pool is None or height < 2 * STRIP_ROWS:
            self._rows(bgr, out, 0, height)
            return out
        step = -(-height // self.threads)
        step = -(-step // STRIP_ROWS) * STRIP_ROWS
        futures = [
            self._pool.submit(self._rows, bgr, out, y, min(y + step, height))
            for y in range(0, height, step)
        ]
        for f in futures:
            f.result()
        return out


def corroded_mask(scores: np.ndarray) -> np.ndarray:
    """Turn scores into the 0/255 mask OpenCV's morphology and copyTo want, IN PLACE.

    In place because a 1080p frame's scores are 2 MB the device need not hold twice;
    callers that still need the scores pass a copy.
    """
    cv2.threshold(scores, CORRODED - 1, 255, cv2.THRESH_BINARY, dst=scores)
    return scores


@dataclass(frozen=True)
class Classified:
    """A frame's pixel scores and, when the model has an image rule, P(the frame shows rust)."""

    scores: np.ndarray  # uint8 HxW; a pixel is corroded where score >= 128
    rust_probability: float | None = None


class ServingModel(Protocol):
    """What the detector and the model updater use of a model, whatever its kind."""

    manifest: ModelManifest
    regions: RegionScorer | None  # the manifest's box scorer, if it has one

    @property
    def ref(self) -> ModelRef: ...

    def scores(self, bgr: np.ndarray) -> np.ndarray:
        """uint8 HxW scores of an HxWx3 BGR frame; a pixel is corroded where score >= 128."""
        ...

    def classify(self, bgr: np.ndarray, *, rule: bool = True) -> Classified:
        """`scores`, with the image rule's answer where the manifest has one and `rule` asks
        for it (its statistics cost ~6 ms a frame and a scene embedder ~9 more at 640x360 on
        one core: skipped when an operator's % decides)."""
        ...

    def close(self) -> None: ...


def _ref(m: ModelManifest) -> ModelRef:
    return ModelRef(name=m.name, version=m.version, sha256=m.model.sha256)


def _regions(manifest: ModelManifest, manifest_path: Path) -> RegionScorer | None:
    spec = manifest.regions
    return None if spec is None else RegionScorer.load(manifest_path.parent, spec)


def load_model(manifest_path: Path, *, threads: int = 1) -> ServingModel:
    """Verify a model against its manifest and make it ready to serve, table or features."""
    model = PixelModel.load(manifest_path, threads=threads)
    regions = _regions(model.manifest, manifest_path)
    if model.manifest.features is None:
        return ColourModel.of(model, threads=threads, source=manifest_path, regions=regions)
    spec = model.manifest.scene
    scene = (
        None if spec is None else SceneEmbedder.load(manifest_path.parent, spec, threads=threads)
    )
    return FeatureModel.of(model, source=manifest_path, regions=regions, scene=scene)


@dataclass
class ColourModel:
    """A verified colour model ready to serve: its manifest and its exact table."""

    manifest: ModelManifest
    classifier: TableClassifier
    source: Path = field(default_factory=Path)
    regions: RegionScorer | None = None

    @classmethod
    def load(cls, manifest_path: Path, *, threads: int = 1) -> ColourModel:
        """Verify the ONNX model, then take its shipped table (checked) or compile one."""
        model = PixelModel.load(manifest_path)
        regions = _regions(model.manifest, manifest_path)
        return cls.of(model, threads=threads, source=manifest_path, regions=regions)

    @classmethod
    def of(
        cls,
        model: PixelModel,
        *,
        threads: int = 1,
        source: Path = Path(),
        regions: RegionScorer | None = None,
    ) -> ColourModel:
        if model.manifest.input.features != RGB_FEATURES:
            raise ModelError(
                f"{model.path}: a model without a feature pipeline must read R, G, B, "
                f"not {list(model.manifest.input.features)}"
            )
        table = load_table(model)
        return cls(model.manifest, TableClassifier(table, threads=threads), source, regions)

    @property
    def ref(self) -> ModelRef:
        return _ref(self.manifest)

    def scores(self, bgr: np.ndarray) -> np.ndarray:
        return self.classifier.scores(bgr)

    def classify(self, bgr: np.ndarray, *, rule: bool = True) -> Classified:
        return Classified(self.scores(bgr))

    def close(self) -> None:
        self.classifier.close()


def frame_scores(
    labels: np.ndarray,
    proba: np.ndarray | None,
    threshold: float,
    grid_shape: tuple[int, int],
    size: tuple[int, int],
) -> np.ndarray:
    """A feature model's grid answers as uint8 scores of a `size` (w, h) frame.

    The encoding is the colour table's (>= 128 exactly where the label is 1), so masks,
    borderline shares and the image % mean the same for both kinds. Training computes its
    cross-validated image % through this same function.
    """
    if proba is None:  # labels-only objective: no confidence to spread around 128
        grid = np.where(labels.astype(bool), np.uint8(255), np.uint8(0))
    else:
        grid = scores_from(labels, proba, threshold)
    return expand(grid.reshape(grid_shape), size)


@dataclass
class FeatureModel:
    """A verified feature model: features of the working image, trees through onnxruntime.

    Exact where it classifies: every `stride`-th working pixel gets precisely the runtime's
    answer for its feature row (the brute-force result at that pixel). The expansion to the
    frame interpolates between those samples and, at stride > 1, places each up to half a
    working pixel from where it was taken (cv2.resize's grid, not the sampling grid); training
    computes its % through the same `frame_scores`, so the two sides agree.
    """

    manifest: ModelManifest
    model: PixelModel
    pipeline: FeaturePipeline
    source: Path = field(default_factory=Path)
    regions: RegionScorer | None = None
    scene: SceneEmbedder | None = None  # the manifest's scene embedder, if it has one

    @classmethod
    def of(
        cls,
        model: PixelModel,
        *,
        source: Path = Path(),
        regions: RegionScorer | None = None,
        scene: SceneEmbedder | None = None,
    ) -> FeatureModel:
        spec = model.manifest.features
        if spec is None:
            raise ModelError(f"{model.path}: the manifest declares no feature pipeline")
        try:
            pipeline = FeaturePipeline(model.manifest.input.features, spec.long_side, spec.stride)
        except FeatureError as exc:
            raise ModelError(f"{source}: {exc}") from exc
        pinned = model.manifest.scene
        if (None if scene is None else scene.spec) != pinned:
            state = "none" if pinned is None else pinned.model.file
            given = "none" if scene is None else str(scene.path)
            raise ModelError(
                f"{source}: the manifest pins scene embedder {state}, the loader gave {given}"
            )
        return cls(model.manifest, model, pipeline, source, regions, scene)

    @property
    def ref(self) -> ModelRef:
        return _ref(self.manifest)

    def scores(self, bgr: np.ndarray, *, stride: int | None = None) -> np.ndarray:
        """`stride` overrides the manifest's (1 = brute force over every working pixel)."""
        return self._classify(bgr, stride, rule=False).scores

    def classify(self, bgr: np.ndarray, *, rule: bool = True) -> Classified:
        return self._classify(bgr, None, rule=rule)

    def _classify(self, bgr: np.ndarray, stride: int | None, *, rule: bool) -> Classified:
        work = self.pipeline.working(bgr)
        rows = self.pipeline.rows(work, stride)
        labels, proba = self.model.predict(rows)
        shape = self.pipeline.grid_shape(work.shape, stride)
        decision = self.manifest.decision
        scores = frame_scores(
            labels, proba, decision.pixel_threshold, shape, (bgr.shape[1], bgr.shape[0])
        )
        if not rule or decision.image_rule is None or proba is None:
            return Classified(scores)
        scene = None if self.scene is None else self.scene.embed(bgr)
        stats = imagerule.statistics(rows, proba, decision.pixel_threshold, scene)
        return Classified(scores, imagerule.probability(decision.image_rule, stats))

    def close(self) -> None:
        """Nothing to release: the session goes with the object."""
