"""Out-of-fold box AP of the recipe on CorrosionDetector's objdet/train, and grouping speed.

Run as `.venv/bin/python bench/boxes.py --data ../shared/data` (a few minutes on 2 cores:
25 colour models for nested 5x4-fold CV). Without the data folder it falls back to synthetic
scenes, said on stderr. First the grouping's cost per 1080p mask (one core, OpenCV's default
640 px grouping side), then the nested CV; the last line is `box_ap50=X box_ap=Y`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

from agent.config import ClassifierConfig
from agent.engine.detector import Detector
from agent.engine.regions import scored_regions
from agent.imageio import read
from export.boxes import colour_trainer, load_annotations, main_oof, region_kwargs
from export.synthetic import generate

FRAME = (1920, 1080)
REPEATS = 5


def warn(message: str) -> None:
    print(f"bench/boxes: {message}", file=sys.stderr, flush=True)


def grouping_ms(voc: Path, work: Path) -> list[float]:
    """ms of scored_regions (the ring-contrast grouping) on real 1080p masks: every photo
    stretched to 1920x1080 and classified by a colour model trained on all of them (speed
    only, not accuracy)."""
    anns, _ = load_annotations(voc)
    manifest = colour_trainer()(anns, work / "model")
    config = ClassifierConfig()
    detector = Detector.load(manifest, config)
    masks = [detector.analyse(cv2.resize(read(a.image).image, FRAME)).mask.copy() for a in anns]
    detector.close()
    kwargs = region_kwargs(config)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    times = []
    try:
        for _ in range(REPEATS):
            for mask in masks:
                start = time.perf_counter()
                scored_regions(mask, FRAME, **kwargs)
                times.append(1000.0 * (time.perf_counter() - start))
    finally:
        cv2.setNumThreads(threads)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("build/boxes/oof.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-boxes-") as tmp:
        voc = args.data / "corrosion-detector" / "objdet" / "train"
        if not voc.is_dir():
            warn(f"{voc} not found: synthetic scenes instead (numbers are not comparable)")
            voc = Path(tmp) / "voc"
            generate(voc, 20, seed=0, width=320, height=240)
        times = sorted(grouping_ms(voc, Path(tmp)))
        median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
        print(
            f"grouping ms per 1080p mask: median {median:.2f}, p90 {p90:.2f}, max {times[-1]:.2f}"
        )
        main_oof(voc, args.out)


if __name__ == "__main__":
    main()
