"""The texture recipe: folds keep copies together, the decision comes from CV, `make model`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.contract import ModelManifest
from agent.engine.classifier import FeatureModel, load_model
from agent.engine.detector import Detector
from export.cli import main as export_main
from export.datasets import DatasetError
from export.recipe import (
    RECIPE_FILE,
    Recipe,
    Sources,
    choose_flag_pct,
    group_folds,
    load_photos,
)
from export.synthetic import generate, make_scene
from export.voc import Annotation, VocObject

TINY_FLAGS = ["--set", "num_round=8", "--set", "max_depth=3", "--folds", "3", "--long-side", "96"]
TINY = Recipe(
    params={"objective": "binary:logistic", "num_round": 8, "max_depth": 3, "eta": 0.3},
    long_side=96,
    folds=3,
    threads=2,
    scene_components=0,  # tests/test_scene.py trains with scene features
)


def synthetic_layout(root: Path, count: int = 14) -> Sources:
    """CorrosionDetector's shape in small: rust photos, norust photos (one duplicated) and
    VOC boxes for copies of some rust photos."""
    scenes = generate(root / "scenes", count, seed=5, width=192, height=144, clean_fraction=0.4)
    sources = Sources(root / "rust", root / "norust", root / "voc")
    for d in (sources.rust, sources.norust, sources.voc):
        d.mkdir()
    boxed = 0
    for path in scenes:
        xml = path.with_suffix(".xml")
        if "<object>" not in xml.read_text():
            shutil.copy(path, sources.norust / path.name)
            continue
        shutil.copy(path, sources.rust / path.name)
        if boxed < 5:  # boxes for a copy of this rust photo, as objdet/train has
            shutil.copy(path, sources.voc / path.name)
            shutil.copy(xml, sources.voc / xml.name)
            boxed += 1
    first = sorted(sources.norust.iterdir())[0]
    shutil.copy(first, sources.norust / f"copy-of-{first.name}")
    return sources


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return synthetic_layout(tmp_path_factory.mktemp("layout"))


def test_folds_keep_copies_together_and_spread_classes() -> None:
    groups = [f"g{i // 2}" if i < 10 else f"h{i}" for i in range(40)]  # 5 duplicate pairs
    rust = [i % 3 == 0 for i in range(40)]
    for i in range(0, 10, 2):
        rust[i + 1] = rust[i]
    folds = group_folds(groups, rust, 5, seed=3)
    for i in range(0, 10, 2):
        assert folds[i] == folds[i + 1]
    for k in range(5):
        members = np.flatnonzero(folds == k)
        assert {rust[i] for i in members} == {True, False}
    assert np.array_equal(folds, group_folds(groups, rust, 5, seed=3))


def test_photos_copies_share_a_group_and_boxes_find_their_photo(layout: Sources) -> None:
    photos = load_photos(layout, TINY)
    by_name = {p.path.name: p for p in photos}
    copy = next(p for p in photos if p.path.name.startswith("copy-of-"))
    assert by_name[copy.path.name.removeprefix("copy-of-")].group == copy.group
    boxed = [p for p in photos if p.boxed]
    assert len(boxed) == 5 and all(p.rust for p in boxed)
    for p in photos:
        labels = set(np.unique(p.labels).tolist())
        assert labels == ({0, 1} if p.boxed else set() if p.rust else {0})
    folds = group_folds([p.group for p in photos], [p.rust for p in photos], 3, 0)
    assert folds[photos.index(copy)] == folds[photos.index(by_name[copy.path.name[8:]])]


def test_boxes_of_another_photo_are_refused(layout: Sources, tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    shutil.copytree(layout.voc, voc)
    stray = next(voc.glob("*.jpg"))
    stray.write_bytes(stray.read_bytes() + b"\0")  # no longer a copy of any rust photo
    with pytest.raises(DatasetError, match="not among the rust photos"):
        load_photos(Sources(layout.rust, layout.norust, voc), TINY)


def test_flag_threshold_is_the_bayes_rule_of_a_logistic_fit() -> None:
    rng = np.random.default_rng(0)
    rust = np.arange(200) < 100
    pcts = np.where(rust, rng.uniform(5, 60, 200), rng.uniform(0, 20, 200))
    cheap, dear = (choose_flag_pct(pcts, rust, c) for c in (0.5, 4.0))
    assert 0 < dear < choose_flag_pct(pcts, rust, 1.0) < cheap < 60  # misses dearer: lower %
    apart = np.array([1.0, 2.0, 3.0, 30.0, 40.0, 50.0])
    flag = choose_flag_pct(apart, apart > 10, 2.0)
    assert 3.0 < flag < 30.0  # separable: the threshold falls in the gap
    assert choose_flag_pct(apart, np.ones(6, bool), 2.0) == 0.0
    assert choose_flag_pct(apart, np.zeros(6, bool), 2.0) == 100.0
    assert choose_flag_pct(apart, apart < 10, 2.0) == 0.0  # % against rust: flag all


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="shared/data"):
        Sources.under(tmp_path)


def test_box_scaling_to_the_working_image() -> None:
    from export.recipe import _box_mask

    box = VocObject("rust", (100, 50, 200, 150))
    ann = Annotation(Path("a.xml"), Path("a.jpg"), (400, 200), (box,))
    inside = _box_mask(ann, (400, 200), (100, 50))  # a quarter: pixel centres in the box
    assert inside.sum() == 25 * 25 and inside[12:37, 25:50].all()


def test_make_model_smoke(layout: Sources, tmp_path: Path) -> None:
    """`corrosion-export recipe texture` (what `make model` runs), tiny, on synthetic photos."""
    out = tmp_path / "model"
    dirs = ["--rust", str(layout.rust), "--norust", str(layout.norust), "--voc", str(layout.voc)]
    assert export_main(["recipe", "texture", *dirs, "--out", str(out), *TINY_FLAGS]) == 0
    manifest = ModelManifest.read(out / "manifest.json")
    assert manifest.features is not None and manifest.features.long_side == 96
    assert manifest.provenance.hyperparameters["num_round"] == 8
    record = json.loads((out / RECIPE_FILE).read_text())
    assert record["decision"]["flag_pct"] == manifest.decision.flag_pct
    assert len(record["photos"]) == len(list(layout.rust.iterdir())) + len(
        list(layout.norust.iterdir())
    )
    model = load_model(out / "manifest.json")
    assert isinstance(model, FeatureModel)
    analysis = Detector(model).analyse(make_scene(np.random.default_rng(99), 192, 144).image)
    rule = manifest.decision.image_rule
    assert rule is not None and analysis.rust_probability is not None
    assert analysis.flagged == (analysis.rust_probability >= rule.threshold)
    assert manifest.regions is not None and model.regions is not None  # the box scorer
    assert manifest.scene is not None and model.scene is not None  # the scene embedder
    assert rule.statistics[-len(manifest.scene.names) :] == manifest.scene.names
    assert len(analysis.region_scores) == len(analysis.regions)
    floor = manifest.regions.min_score  # chosen by CV with the scorer
    assert floor is not None and all(s >= floor for s in analysis.region_scores)
    assert all("oof_p" in p for p in record["photos"])
    pixels = tmp_path / "pixels"  # the rule without the scene embedder
    flags = [*dirs, "--out", str(pixels), "--no-scene", "--no-box-scorer", *TINY_FLAGS]
    assert export_main(["recipe", "texture", *flags, "--rule-threshold", "lowest"]) == 0
    ruled = ModelManifest.read(pixels / "manifest.json")
    assert ruled.scene is None and not (pixels / "scene.onnx").exists()
    assert ruled.decision.image_rule is not None
    assert not any(n.startswith("scene:") for n in ruled.decision.image_rule.statistics)
    assert json.loads((pixels / RECIPE_FILE).read_text())["recipe"]["rule_threshold"] == "lowest"
    bare = tmp_path / "bare"
    flags = [*dirs, "--out", str(bare), "--no-image-rule", "--no-box-scorer", *TINY_FLAGS]
    assert export_main(["recipe", "texture", *flags]) == 0
    plain = ModelManifest.read(bare / "manifest.json")
    assert plain.decision.image_rule is None and plain.regions is None and plain.scene is None
    assert "image_rule" not in json.loads((bare / "manifest.json").read_text())["decision"]
    analysis = Detector(load_model(bare / "manifest.json")).analyse(
        make_scene(np.random.default_rng(99), 192, 144).image
    )
    assert analysis.rust_probability is None
    assert analysis.flagged == (analysis.corrosion_pct >= plain.decision.flag_pct)
