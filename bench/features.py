"""Feature model speed on one core: ms per 640x360 frame, as served vs brute force.

Run as `make bench-features` (`OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/features.py
--data ../shared/data --model build/model`). Frames: mosaics of CorrosionDetector photos
(rust and norust) at 640x360. Model: build/model from `make model`; without it, a model of
the recipe's shape (same features and trees) trained on synthetic scenes, said on stderr.

- served: `FeatureModel.scores` as the device runs it (the manifest's stride);
- brute: every working pixel through the full tree ensemble in onnxruntime (stride 1),
  the reference the served path equals at every pixel it classifies.

Both on one onnxruntime thread. Also printed: the feature extraction alone, how far the
served corrosion % is from brute force, the scene embedder's cost per frame (the image
rule's pretrained network: a whole-frame decision, not the pixel model, so `feature_ms`
leaves it out and the served total is printed beside it), and the box scorer's cost per
frame against the ring-contrast grouping. The last line is machine-readable.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one core: set before numpy/xgboost load OpenMP

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from agent.engine.classifier import FeatureModel

WIDTH, HEIGHT = 640, 360
FRAMES = 6
REPEATS = 5


def warn(message: str) -> None:
    print(f"bench/features: {message}", file=sys.stderr, flush=True)


def mosaics(data: Path) -> list[np.ndarray]:
    """640x360 tiles of real photos (3 rows, photos at native aspect), else synthetic scenes."""
    root = data / "corrosion-detector" / "rustnorust" / "train"
    paths = sorted(root.glob("*/*.jpg"))
    if not paths:
        from export.synthetic import make_scene

        warn(f"no photos under {root}: synthetic scenes instead")
        rng = np.random.default_rng(0)
        return [make_scene(rng, WIDTH, HEIGHT).image for _ in range(FRAMES)]
    from classify import mosaic  # bench/, the script's own folder

    photos = [cv2.imread(str(p)) for p in np.random.default_rng(0).permutation(paths)]
    frames, k = [], 0
    for _ in range(FRAMES):
        frame, k = mosaic(photos, k, WIDTH, HEIGHT)
        frames.append(frame)
    return frames


def synthetic_model(directory: Path) -> Path:
    """The recipe's features and trees, trained on synthetic scenes (no decision search)."""
    from export.recipe import Recipe, fit
    from tests.photos import export_texture, scene_photos

    recipe = Recipe(threads=1)
    _, photos = scene_photos(directory / "scenes", recipe, size=(WIDTH, HEIGHT))
    return export_texture(
        fit(photos, recipe, 0), photos, recipe, directory / "model", name="bench", version="0.0.0"
    )


def median_ms(fn: Callable[[np.ndarray], object], frames: list[np.ndarray]) -> float:
    for frame in frames[:2]:
        fn(frame)  # warm-up: first-call allocations, caches
    times = []
    for _ in range(REPEATS):
        for frame in frames:
            start = time.perf_counter()
            fn(frame)
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def regions_line(model: FeatureModel, frames: list[np.ndarray]) -> str:
    """ms per frame of the model's box scorer against the ring-contrast grouping it replaces,
    both from the frame's served scores and mask (computed beforehand, not timed)."""
    from agent.config import ClassifierConfig
    from agent.engine.classifier import corroded_mask
    from agent.engine.detector import grouping_of
    from agent.engine.regions import scored_regions

    scorer = model.regions
    if scorer is None:
        return "regions: the model has no box scorer"
    scores = {id(f): model.scores(f) for f in frames}
    masks = {id(f): corroded_mask(scores[id(f)].copy()) for f in frames}
    kwargs = grouping_of(ClassifierConfig())

    def learned_regions(f: np.ndarray) -> object:  # the P map's resampling included
        return scorer.regions(scorer.probability(scores[id(f)]), masks[id(f)], (WIDTH, HEIGHT))

    learned = median_ms(learned_regions, frames)
    ring = median_ms(lambda f: scored_regions(masks[id(f)], (WIDTH, HEIGHT), **kwargs), frames)
    return (
        f"regions per frame: box scorer {learned:.2f} ms, ring contrast {ring:.2f} ms "
        f"(scorer/ring = {learned / ring:.2f})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", type=Path, default=Path("build/model"))
    args = ap.parse_args()

    from agent.engine.classifier import FeatureModel, load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        manifest = args.model / "manifest.json"
        if not manifest.is_file():
            warn(f"no {manifest} (run `make model`): a synthetic model of the recipe's shape")
            manifest = synthetic_model(tmp)
        model = load_model(manifest, threads=1)
        if not isinstance(model, FeatureModel):
            warn(f"{manifest} is not a feature model")
            return 2
        frames = mosaics(args.data)
        pipeline = model.pipeline
        total = median_ms(model.classify, frames)  # with the image rule, as a device serves
        embedder = model.scene
        scene = 0.0 if embedder is None else median_ms(embedder.embed, frames)
        served = total - scene  # the feature model's part: pixels, scores, rule statistics
        brute = median_ms(lambda f: model.scores(f, stride=1), frames)
        features = median_ms(lambda f: pipeline.rows(pipeline.working(f)), frames)
        diffs = [
            abs(np.mean(model.scores(f) >= 128) - np.mean(model.scores(f, stride=1) >= 128))
            for f in frames
        ]
        spec = model.manifest.features
        assert spec is not None
        work = pipeline.working(frames[0])
        print(f"model {manifest}: {len(pipeline.names)} features, working {work.shape[1]}x"
              f"{work.shape[0]}, stride {spec.stride}")  # fmt: skip
        print(f"ms per {WIDTH}x{HEIGHT} frame (median of {REPEATS}x{len(frames)}, one core):")
        print(f"  features only (every working pixel)   {features:8.2f}")
        print(f"  served (stride {spec.stride}, rule statistics incl.) {served:8.2f}")
        print(f"  scene embedder (whole frame, 224x224) {scene:8.2f}")
        print(f"  served total, scene embedder included {total:8.2f}")
        print(f"  brute force (stride 1, all trees, ORT) {brute:8.2f}")
        print(f"corrosion % served vs brute: max |diff| {100 * max(diffs):.2f} pp")
        print(regions_line(model, frames))
        print(f"feature_ms={served:.2f} brute_ms={brute:.2f}")
        model.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
