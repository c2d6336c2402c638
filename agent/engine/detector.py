"""The engine's front door: a frame in, an Analysis out, the serving model swappable.

The model is read once per frame into a local, so a swap between frames is atomic from
the frame's point of view: no frame is classified half by one model and half by another.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import ClassifierConfig
from agent.contract import DetectionMessage, Gps, ModelRef, Region, Size
from agent.engine.classifier import ServingModel, corroded_mask, load_model
from agent.engine.regions import fit_long_side, scored_regions

BORDERLINE = (96, 159)
"""Scores of pixels the model is unsure of: P within about 1/4 of the way from the pixel
threshold to either end (scores are 128 at the threshold, 0 and 255 at P = 0 and 1)."""

log = logging.getLogger(__name__)


def grouping_of(cfg: ClassifierConfig) -> dict[str, Any]:
    """The ring-contrast grouping's arguments a config asks for (models without a box scorer;
    evaluation groups boxes the same way)."""
    return {
        "long_side": cfg.region_long_side,
        "open_px": cfg.open_px,
        "close_px": cfg.close_px,
        "min_region_pct": cfg.min_region_pct,
        "max_regions": cfg.max_regions,
        "grid": cfg.region_grid,
        "densities": cfg.region_densities,
        "overlap": cfg.region_overlap,
    }


@dataclass(frozen=True)
class Analysis:
    """What the engine found in one frame."""

    mask: np.ndarray  # 0/255 at analysis size
    corrosion_pct: float
    uncertain_pct: float  # borderline pixels (see BORDERLINE), % of the frame
    flagged: bool
    rust_probability: float | None  # the image rule's answer; None when the % decides
    rust_threshold: float | None  # the image rule's threshold, when it decided
    threshold: float
    regions: tuple[Region, ...]
    frame_size: Size
    analysis_size: Size
    model: ModelRef
    elapsed_ms: float
    region_scores: tuple[float, ...] = ()  # what ranked each region (box AP); not in the contract

    def message(
        self,
        *,
        device_id: str,
        source: str,
        frame_index: int,
        captured_at: datetime,
        latency_ms: float | None = None,
        gps: Gps | None = None,
    ) -> DetectionMessage:
        """The contract's view of this analysis (MQTT payload, CLI --json line)."""
        return DetectionMessage(
            device_id=device_id,
            source=source,
            frame_index=frame_index,
            captured_at=captured_at,
            model=self.model,
            corrosion_pct=round(self.corrosion_pct, 4),
            flagged=self.flagged,
            rust_probability=(
                None if self.rust_probability is None else round(self.rust_probability, 4)
            ),
            threshold=self.threshold,
            regions=self.regions,
            frame_size=self.frame_size,
            analysis_size=self.analysis_size,
            latency_ms=round(self.elapsed_ms if latency_ms is None else latency_ms, 3),
            gps=gps,
        )


class Detector:
    """Classifies frames with the model in service; `swap` replaces it between frames."""

    def __init__(self, model: ServingModel, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        self._model = model
        self._lock = threading.Lock()
        self._retired: list[ServingModel] = []  # swapped out, closed by the next analyse
        self._commanded: float | None = None  # set-threshold's %, until the next model
        self._warned_scale: ModelRef | None = None  # frame loop only; not the model: freed

    @classmethod
    def load(cls, manifest_path: Path, config: ClassifierConfig | None = None) -> Detector:
        config = config or ClassifierConfig()
        return cls(load_model(manifest_path, threads=config.threads), config)

    @property
    def model(self) -> ServingModel:
        return self._model

    @property
    def threshold(self) -> float:
        """Flag % in force: a command's override, else the config's, else the model's.

        An override also sets the model's image rule aside: an operator who names a % means
        the % to decide.
        """
        return self._threshold_of(self._model, self._override())

    def command_threshold(self, flag_pct: float | None) -> None:
        """The set-threshold command: this % decides until the next model, which brings its
        own decision (the config's `flag_pct`, by contrast, holds for every model); None
        hands the decision back."""
        self._commanded = flag_pct

    def _override(self) -> float | None:
        return self._commanded if self._commanded is not None else self.config.flag_pct

    @property
    def rule_threshold(self) -> float | None:
        """The image rule's P(rust) threshold when it decides (no operator's % in force)."""
        return self._rule_threshold_of(self._model, self._override())

    @staticmethod
    def _rule_threshold_of(model: ServingModel, override: float | None) -> float | None:
        rule = model.manifest.decision.image_rule
        return None if rule is None or override is not None else rule.threshold

    @staticmethod
    def _threshold_of(model: ServingModel, override: float | None) -> float:
        return override if override is not None else model.manifest.decision.flag_pct

    def swap(self, model: ServingModel) -> ServingModel:
        """Serve `model` from the next frame on; returns the one it replaced.

        The old model may still be classifying a frame on the frame loop's thread, so it is
        not closed here: the next `analyse` closes it, when nothing can be using it.
        """
        with self._lock:
            old, self._model = self._model, model
            self._retired.append(old)
            self._commanded = None
        return old

    def _check_scale(self, model: ServingModel, frame_long_side: int) -> None:
        """A feature model's pipeline scales the frame itself, as training did; a frame
        decoded or scaled down before it is resampled twice, and its features drift. Said
        once per model, at the first frame it happens to: frames no larger are exact."""
        limit = self.config.analysis_long_side
        spec = model.manifest.features
        if spec is None or limit is None or frame_long_side <= limit:
            return
        if self._warned_scale != model.ref:
            self._warned_scale = model.ref
            log.warning(
                "model %s %s computes features at a %d px long side from the frame it is "
                "given; classifier.analysis_long_side = %d resamples frames before that, so "
                "they differ slightly from training's: leave it unset for exact parity",
                model.ref.name,
                model.ref.version,
                spec.long_side,
                limit,
            )

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for model in retired:
            model.close()

    def analyse(self, image: np.ndarray, frame_size: tuple[int, int] | None = None) -> Analysis:
        """`frame_size` is the original (w, h) when the caller already decoded at reduced size."""
        start = time.perf_counter()
        if self._retired:
            self._close_retired()
        model = self._model
        cfg = self.config
        work = fit_long_side(image, cfg.analysis_long_side)
        height, width = work.shape[:2]
        full = frame_size or (image.shape[1], image.shape[0])
        self._check_scale(model, max(full))
        override = self._override()  # once: a set-threshold landing mid-frame waits a frame
        rust_threshold = self._rule_threshold_of(model, override)
        classified = model.classify(work, rule=rust_threshold is not None)
        scores = classified.scores
        borderline = cv2.countNonZero(cv2.inRange(scores, *BORDERLINE))
        scorer = model.regions
        p = None if scorer is None else scorer.probability(scores)  # before the mask overwrites
        mask = corroded_mask(scores)
        pct = 100.0 * cv2.countNonZero(mask) / float(width * height)
        if scorer is None or p is None:
            found = scored_regions(mask, full, **grouping_of(cfg))
        else:
            found = scorer.regions(
                p,
                mask,
                full,
                min_region_pct=cfg.min_region_pct,
                max_regions=cfg.max_regions,
                min_score=cfg.min_region_score,
            )
        threshold = self._threshold_of(model, override)
        probability = classified.rust_probability
        if probability is not None and rust_threshold is not None:
            flagged = probability >= rust_threshold
        else:
            flagged, rust_threshold = pct >= threshold, None
        return Analysis(
            mask=mask,
            corrosion_pct=pct,
            uncertain_pct=100.0 * borderline / float(width * height),
            flagged=flagged,
            rust_probability=probability,
            rust_threshold=rust_threshold,
            threshold=threshold,
            regions=tuple(region for region, _ in found),
            region_scores=tuple(score for _, score in found),
            frame_size=Size(width=full[0], height=full[1]),
            analysis_size=Size(width=width, height=height),
            model=model.ref,
            elapsed_ms=1000.0 * (time.perf_counter() - start),
        )

    def close(self) -> None:
        self._close_retired()
        self._model.close()
