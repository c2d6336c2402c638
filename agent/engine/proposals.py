"""Learned region proposals: candidate boxes of a score map, ranked by a trained box scorer.

Annotators box rusty objects and surfaces, and which blob of rust-coloured pixels makes a
box is a judgement no fixed formula captures (agent.engine.regions' ring contrast times
sqrt(area) is one such formula). So a model trained on annotated boxes judges instead: the
candidates are the connected components of the corrosion probability map, as it is and
blurred at four scales, cut at seven levels (a speck, a patch, a surface), plus the whole
frame; each is
described by how its probability sits inside, at its edges and in rings around it; the
scorer (gradient-boosted trees in ONNX, trained by export.proposals on out-of-fold maps with
the IoU of each candidate with its best annotated box as the soft label) predicts how well a
candidate matches a box someone would draw; greedy NMS keeps the best, and a frame reports
only those scored at or above the manifest's floor (contract 1.5, chosen with the scorer by
cross-validation for F1 at IoU 0.5 over boxed and clean photos).

Measured by nested CV on CorrosionDetector objdet/train (`make evaluate`, bench/ACCURACY.md):
box AP@0.5 0.141 with ring contrast, 0.180 with the scorer. Cost per frame: bench/RESULTS.md
(`make bench-features`); candidates and features work on a 160 px map, but the map is
resampled from the full-size scores, which grows with the frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from agent.contract import Region, RegionScorerSpec
from agent.engine.model import (
    PROBABILITY_TOLERANCE,
    ModelError,
    checked_session,
    verified,
    worst_miss,
)
from agent.engine.regions import box_sums, components, fit_long_side, suppress, to_region

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)  # Gaussian blurs of the map, in map pixels (0: none)
LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # P at which a blurred map is cut
RINGS = (0.1, 0.25, 0.5)  # rings grow the box by this share of its size on each side
CORES = (0.15, 0.3)  # cores shrink it by this share on each side
EDGE = 0.1  # an edge strip is this share of the box's width or height
MIN_SIDE = 2  # candidates narrower or lower than this many map pixels are dropped

FEATURES: tuple[str, ...] = (
    "log_area_share",
    "log_aspect",
    "frame_edges_touched",
    "mean_p",
    "corroded_share",
    "p_mass_share",
    "corroded_mass_share",
    *(f"ring{r}_{q}" for r in RINGS for q in ("mean_p", "corroded_share")),
    *(f"core{c}_{q}" for c in CORES for q in ("band_mean_p", "mean_p")),
    *(f"edge_{side}_mean_p" for side in ("left", "right", "top", "bottom")),
    "edge_min_mean_p",
    "edge_max_mean_p",
    "frame_mean_p",
    "frame_corroded_share",
)
"""What the scorer reads of each candidate, in order (the manifest names them too)."""


def probability_map(scores: np.ndarray, long_side: int) -> F32:
    """P(corroded) at `long_side` from a frame's uint8 scores: mean score / 255 of each cell
    (P itself at a 0.5 pixel threshold). Take it before corroded_mask overwrites the scores."""
    return np.asarray(fit_long_side(scores, long_side), np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class Maps:
    """A frame at the scorer's resolution: P(corroded) and the corroded share of each cell."""

    p: F32  # probability_map of the frame's scores
    coverage: F64  # share of each cell's pixels that are corroded (the 0/255 mask, averaged)
    frame_pct: float  # the frame's corrosion %, from the full-size mask
    coverage_integral: F64  # integral image of `coverage`: box sums for area % and features

    @classmethod
    def of(cls, p: F32, mask: np.ndarray) -> Maps:
        """From a frame's probability_map and its full-size 0/255 corroded mask."""
        height, width = p.shape
        coverage = (
            np.asarray(cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA), np.float64)
            / 255.0
        )
        frame_pct = 100.0 * cv2.countNonZero(mask) / mask.size
        return cls(p, coverage, frame_pct, _integral(coverage))


def candidates(p: F32) -> I64:
    """Distinct boxes (x0, y0, x1, y1; max exclusive) of `p`: components of each blurred
    map at each level, and the whole map."""
    height, width = p.shape
    found = [np.array([[0, 0, width, height]], np.int64)]
    for sigma in SIGMAS:
        blurred = p if sigma == 0 else cv2.GaussianBlur(p, (0, 0), sigma)
        for level in LEVELS:
            found.append(components((blurred >= np.float32(level)).astype(np.uint8)))
    boxes = np.concatenate(found)
    size = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(size >= MIN_SIDE).all(axis=1)]
    return np.asarray(np.unique(boxes, axis=0), np.int64)


def _integral(plane: np.ndarray) -> F64:
    return np.asarray(cv2.integral(plane.astype(np.float64)), np.float64)


def _area(boxes: I64) -> F64:
    return np.asarray(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1), np.float64)


def _ring(boxes: I64, share: float, width: int, height: int) -> I64:
    grow = np.rint((boxes[:, 2:] - boxes[:, :2]) * share).astype(np.int64)
    ring = np.column_stack((boxes[:, :2] - grow, boxes[:, 2:] + grow))
    return np.asarray(np.clip(ring, 0, np.array([width, height, width, height])), np.int64)


def _core(boxes: I64, share: float) -> I64:
    cut = np.floor((boxes[:, 2:] - boxes[:, :2]) * share).astype(np.int64)
    start = boxes[:, :2] + cut
    return np.column_stack((start, np.maximum(boxes[:, 2:] - cut, start + 1)))


def _edges(boxes: I64) -> list[I64]:
    """Strips along the left, right, top and bottom edge inside each box."""
    x0, y0, x1, y1 = boxes.T
    gx, gy = (np.maximum(1, np.rint((boxes[:, 2:] - boxes[:, :2]) * EDGE)).astype(np.int64)).T
    return [
        np.column_stack((x0, y0, np.minimum(x0 + gx, x1), y1)),
        np.column_stack((np.maximum(x1 - gx, x0), y0, x1, y1)),
        np.column_stack((x0, y0, x1, np.minimum(y0 + gy, y1))),
        np.column_stack((x0, np.maximum(y1 - gy, y0), x1, y1)),
    ]


def _mean(integral: F64, boxes: I64, hole: tuple[F64, F64] | None = None) -> F64:
    """Mean of a map over boxes, less a hole's (sum, area) when given: a ring or a band."""
    total, area = box_sums(integral, boxes), _area(boxes)
    if hole is not None:
        total, area = total - hole[0], area - hole[1]
    return np.divide(total, area, out=np.zeros(len(boxes)), where=area > 0)


def box_features(maps: Maps, boxes: I64) -> F32:
    """FEATURES of each box, one row per box."""
    p, corroded = maps.p, maps.coverage
    height, width = p.shape
    ip, ic = _integral(p), maps.coverage_integral
    area = _area(boxes)
    sp, sc = box_sums(ip, boxes), box_sums(ic, boxes)
    size = (boxes[:, 2:] - boxes[:, :2]).astype(np.float64)
    cols: list[F64] = [
        np.log(area / (width * height)),
        np.log(size[:, 0] / size[:, 1]),
        (
            (boxes[:, 0] == 0).astype(np.float64)
            + (boxes[:, 1] == 0)
            + (boxes[:, 2] == width)
            + (boxes[:, 3] == height)
        ),
        sp / area,
        sc / area,
        sp / max(float(ip[-1, -1]), 1e-6),
        sc / max(float(ic[-1, -1]), 1e-6),
    ]
    for share in RINGS:
        ring = _ring(boxes, share, width, height)
        cols += [_mean(ip, ring, (sp, area)), _mean(ic, ring, (sc, area))]
    for share in CORES:
        core = _core(boxes, share)
        inner = box_sums(ip, core)
        cols += [_mean(ip, boxes, (inner, _area(core))), inner / _area(core)]
    edges = [_mean(ip, strip) for strip in _edges(boxes)]
    cols += [*edges, np.min(edges, axis=0), np.max(edges, axis=0)]
    cols += [np.full(len(boxes), p.mean()), np.full(len(boxes), corroded.mean())]
    return np.column_stack(cols).astype(np.float32)


class RegionScorer:
    """A verified box scorer: its ONNX trees and the manifest block that pins them."""

    def __init__(self, spec: RegionScorerSpec, onnx_path: Path, *, threads: int = 1) -> None:
        self.spec = spec
        self.path = onnx_path
        if spec.features != FEATURES:
            differ = next(
                (f"{i}: {a!r} vs {b!r}"
                 for i, (a, b) in enumerate(zip(spec.features, FEATURES, strict=False))
                 if a != b),
                f"{len(spec.features)} names vs {len(FEATURES)}",
            )  # fmt: skip
            raise ModelError(
                f"{onnx_path}: manifest regions.features are not agent.engine.proposals' "
                f"FEATURES (first difference {differ}): export the scorer with this version"
            )
        self.session, self._input = checked_session(
            onnx_path, "box scorer", [len(FEATURES)], spec.output, 2, threads=threads
        )
        self._check_golden()

    @classmethod
    def load(cls, folder: Path, spec: RegionScorerSpec, *, threads: int = 1) -> RegionScorer:
        return cls(spec, verified(folder, spec.model, "box scorer"), threads=threads)

    def predict(self, rows: F32) -> F32:
        """The scorer's answer for each feature row: its expected IoU with an annotated box."""
        x = np.ascontiguousarray(rows, np.float32).reshape(-1, len(FEATURES))
        if not len(x):
            return np.empty(0, np.float32)
        (out,) = self.session.run([self.spec.output], {self._input: x})
        return np.asarray(out, np.float32)[:, 1]

    def _check_golden(self) -> None:
        rows = np.array([g.features for g in self.spec.golden], np.float32)
        got = self.predict(rows)
        want = np.array([g.score for g in self.spec.golden])
        i = worst_miss(got, want, PROBABILITY_TOLERANCE)
        if i is not None:
            raise ModelError(
                f"{self.path}: box scorer golden sample {i} gives {got[i]:.6f}, "
                f"manifest expects {want[i]:.6f}"
            )

    def floor(self, override: float | None = None) -> float:
        """The score a reported region needs: the operator's `override`, else the manifest's."""
        if override is not None:
            return override
        return self.spec.min_score or 0.0

    def probability(self, scores: np.ndarray) -> F32:
        """The frame's probability_map at this scorer's side (before the mask is made)."""
        return probability_map(scores, self.spec.long_side)

    def regions(
        self,
        p: F32,
        mask: np.ndarray,
        frame_size: tuple[int, int],
        *,
        min_region_pct: float = 0.05,
        max_regions: int = 50,
        min_score: float | None = None,
    ) -> list[tuple[Region, float]]:
        """Regions of a frame (its `probability` and 0/255 corroded mask) with their scores,
        largest `area_pct` first, at or above `floor(min_score)`.

        `area_pct` is the corroded share of the frame inside the box (never more than the
        frame's corrosion %, as agent.engine.regions reports it).
        """
        if max_regions == 0:
            return []
        maps = Maps.of(p, mask)
        boxes, scores, area_pct = select(
            maps,
            self.predict,
            overlap=self.spec.overlap,
            min_region_pct=min_region_pct,
            max_regions=max_regions,
            min_score=self.floor(min_score),
        )
        height, width = maps.p.shape
        order = np.argsort(-area_pct, kind="stable")
        return [
            (to_region(boxes[i], (width, height), frame_size, area_pct[i]), float(scores[i]))
            for i in order.tolist()
        ]


def select(
    maps: Maps,
    predict: Callable[[F32], F32],
    *,
    overlap: float,
    min_region_pct: float,
    max_regions: int,
    min_score: float,
) -> tuple[I64, F64, F64]:
    """The boxes a frame reports, best score first, with their scores and `area_pct`: boxes
    holding less than `min_region_pct` of the frame or scored below `min_score` are dropped
    before NMS (a box at or above the floor is only ever suppressed by a better one, so the
    order does not change what is kept). Training chooses the floor through this same code."""
    boxes = candidates(maps.p)
    height, width = maps.p.shape
    area_pct = np.minimum(
        100.0 * box_sums(maps.coverage_integral, boxes) / (width * height), maps.frame_pct
    )
    keep = area_pct >= min_region_pct
    boxes, area_pct = boxes[keep], area_pct[keep]
    if max_regions == 0 or not len(boxes):
        return boxes[:0], np.empty(0), np.empty(0)
    scores = np.asarray(predict(box_features(maps, boxes)), np.float64)
    keep = scores >= min_score
    boxes, scores, area_pct = boxes[keep], scores[keep], area_pct[keep]
    chosen = suppress(boxes, scores, overlap, max_regions)
    return boxes[chosen], scores[chosen], area_pct[chosen]
