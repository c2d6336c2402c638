"""The bundled demo: a small model trained by our own pipeline on synthetic scenes.

`make run` calls this when demo/ is absent. Everything is generated, nothing downloaded,
so the demo works on a fresh machine with no data and no network.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from agent.contract import MANIFEST_FILE, Decision, Provenance
from export.convert import export_model
from export.datasets import DatasetError, sample_mask_pixels
from export.synthetic import Scene, generate, make_scene
from export.train import choose_flag_pct, positive_score, train

DEMO_PARAMS = {
    "objective": "binary:logistic",
    "num_round": 60,
    "max_depth": 4,
    "eta": 0.3,
    "min_child_weight": 5,
    "subsample": 0.8,
}
TRAIN_SCENES = 30
FOLDS = 3
VALID_SCENES = 6
PIXELS_PER_CLASS = 3000
DEMO_NAME = "demo-rgb"
DEMO_FRAME = re.compile(r"scene-\d+\.jpg")  # what export.synthetic.generate names a frame


def _pixels(scenes: list[Scene], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    parts = [sample_mask_pixels(s.image, s.mask, PIXELS_PER_CLASS, rng) for s in scenes]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _oof_flag_pct(scenes: list[Scene], seed: int) -> float:
    """Image threshold chosen on out-of-fold scene percentages (folds by scene)."""
    pcts = np.zeros(len(scenes))
    folds = np.arange(len(scenes)) % FOLDS
    for k in range(FOLDS):
        fit = [s for s, f in zip(scenes, folds, strict=True) if f != k]
        x, y = _pixels(fit, np.random.default_rng(seed + k))
        booster = train(x, y, DEMO_PARAMS, seed=seed).booster
        for i in np.flatnonzero(folds == k):
            rgb = scenes[i].image[..., ::-1].reshape(-1, 3).astype(np.float32)
            pcts[i] = 100.0 * np.mean(positive_score(booster, rgb) >= 0.5)
    rusty = np.array([s.mask.any() for s in scenes])
    return choose_flag_pct(pcts, rusty)


def _replaceable(model_dir: Path, frame_dir: Path) -> None:
    """Refuse to clear folders that hold anything but an earlier demo: `--out` may be a
    folder with someone's own model or photos in it."""
    manifest = model_dir / MANIFEST_FILE
    if model_dir.exists() and any(model_dir.iterdir()):
        try:  # the name alone: a demo of an older contract version is still ours to replace
            name = json.loads(manifest.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != DEMO_NAME:
            raise DatasetError(f"{model_dir}: not an earlier demo model; choose another --out")
    if frame_dir.exists():
        foreign = [p.name for p in frame_dir.iterdir() if not DEMO_FRAME.fullmatch(p.name)]
        if foreign:
            raise DatasetError(
                f"{frame_dir}: holds files the demo did not write ({', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose another --out"
            )


def prepare(directory: Path, *, seed: int = 7, frames: int = 12) -> Path:
    """Write directory/model (manifest, ONNX, table) and directory/frames, replacing an earlier
    demo there and nothing else; returns the manifest."""
    model_dir, frame_dir = directory / "model", directory / "frames"
    _replaceable(model_dir, frame_dir)
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, rust=i % 4 != 0) for i in range(TRAIN_SCENES)]
    flag_pct = _oof_flag_pct(scenes, seed)
    x, y = _pixels(scenes[:-VALID_SCENES], rng)
    trained = train(x, y, DEMO_PARAMS, valid=_pixels(scenes[-VALID_SCENES:], rng), seed=seed)
    shutil.rmtree(model_dir, ignore_errors=True)
    manifest = export_model(
        trained.booster,
        model_dir,
        name=DEMO_NAME,
        version="0.1.0",
        decision=Decision(pixel_threshold=0.5, flag_pct=flag_pct),
        provenance=Provenance(
            hyperparameters=DEMO_PARAMS,
            metrics={k: round(v, 6) for k, v in trained.metrics.items()},
            trainer="corrosion-export demo",
            notes=f"{TRAIN_SCENES} synthetic scenes, seed {seed}; flag_pct from {FOLDS}-fold CV",
        ),
    )
    shutil.rmtree(frame_dir, ignore_errors=True)
    generate(frame_dir, frames, seed=seed + 1000, width=1280, height=720)
    for extra in [*frame_dir.glob("*.mask.png"), *frame_dir.glob("*.xml")]:
        extra.unlink()
    return manifest


def ready(directory: Path) -> bool:
    return (directory / "model" / MANIFEST_FILE).is_file() and any(
        (directory / "frames").glob("*.jpg")
    )
