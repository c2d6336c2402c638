"""Small texture-model training sets of synthetic scenes, shared by tests and benchmarks:
every fourth scene clean, the rest rusty with VOC boxes, loaded the way the recipe loads
real photos, so a model trained on them in seconds has the recommended model's shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xgboost as xgb

from agent.contract import Decision, SceneSpec
from export.convert import export_model
from export.recipe import Photo, Recipe, load_photo, training_rows
from export.scene import Backbone
from export.synthetic import make_scene, write_scene
from export.voc import parse


def scene_photo(
    directory: Path, seed: int, rust: bool = True, size: tuple[int, int] = (320, 240)
) -> Path:
    scene = make_scene(np.random.default_rng(seed), *size, rust=rust)
    return write_scene(scene, directory, f"s{seed}")


def scene_photos(
    directory: Path,
    recipe: Recipe,
    *,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    count: int = 8,
    backbone: Backbone | None = None,
) -> tuple[list[Path], list[Photo]]:
    """`count` scene files under `directory` (seeds from `seed`) and their recipe Photos
    (with scene features when a `backbone` is given)."""
    paths, photos = [], []
    for i in range(count):
        rust = i % 4 != 0
        path = scene_photo(directory, seed + i, rust, size)
        boxes = parse(path.with_suffix(".xml")) if rust else None
        paths.append(path)
        rng = np.random.default_rng(i)
        photos.append(load_photo(path, rust, boxes, recipe, rng, backbone=backbone))
    return paths, photos


def export_texture(
    booster: xgb.Booster,
    photos: list[Photo],
    recipe: Recipe,
    out: Path,
    *,
    name: str,
    version: str = "1.0.0",
    decision: Decision | None = None,
    scene: SceneSpec | None = None,
) -> Path:
    """The manifest of `booster` exported as a feature model of `recipe`'s pipeline."""
    return export_model(
        booster,
        out,
        name=name,
        version=version,
        decision=decision,
        pipeline=recipe.pipeline,
        sample=training_rows(photos)[0],
        scene=scene,
    )
