"""Learned region proposals: candidates and their features, the scorer's training, export,
load-time checks, the detector using it, and a registry round trip over real HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.config import ClassifierConfig
from agent.contract import ModelManifest, Region, RegionScorerSpec
from agent.engine.classifier import ColourModel, corroded_mask, load_model
from agent.engine.detector import Detector
from agent.engine.model import ModelError
from agent.engine.proposals import (
    FEATURES,
    Maps,
    RegionScorer,
    box_features,
    candidates,
    probability_map,
)
from export.boxes import evaluate_boxes, iou_matrix
from export.convert import ConvertError
from export.proposals import (
    SCORER_FILE,
    Annotated,
    best_f1_floor,
    choose_floor,
    export_scorer,
    train_scorer,
)
from export.synthetic import generate
from tests.registry_helpers import NAME, Registry, train
from tests.test_model import copy_model, edit_manifest
from tests.test_updates import updater

W, H = 320, 240


def scene(rng: np.random.Generator) -> Annotated:
    """Scores of a frame: one or two annotated rust patches and a few specks nobody boxed."""
    scores = rng.integers(0, 60, (H, W)).astype(np.uint8)
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        bw, bh = int(rng.integers(40, 120)), int(rng.integers(40, 100))
        x0, y0 = int(rng.integers(0, W - bw)), int(rng.integers(0, H - bh))
        scores[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(150, 256, (bh, bw))
        boxes.append((x0, y0, x0 + bw, y0 + bh))
    for _ in range(4):
        x, y = int(rng.integers(0, W - 4)), int(rng.integers(0, H - 4))
        scores[y : y + 3, x : x + 3] = 220
    return Annotated(scores, boxes)


def maps_of(scores: np.ndarray, side: int = 160) -> Maps:
    return Maps.of(probability_map(scores, side), corroded_mask(scores.copy()))


def regions_of(
    scorer: RegionScorer,
    scores: np.ndarray,
    size: tuple[int, int],
    min_region_pct: float = 0.05,
    max_regions: int = 50,
    *,
    min_score: float | None = None,
) -> list[tuple[Region, float]]:
    """The scorer's regions of a frame's scores, fed as the detector feeds it."""
    p, mask = scorer.probability(scores), corroded_mask(scores.copy())
    return scorer.regions(
        p, mask, size, min_region_pct=min_region_pct, max_regions=max_regions, min_score=min_score
    )


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RegionScorerSpec]:
    """A scorer trained in seconds on synthetic frames, exported into a folder."""
    rng = np.random.default_rng(3)
    booster, rows = train_scorer([scene(rng) for _ in range(12)], 160, threads=2)
    folder = tmp_path_factory.mktemp("scorer")
    return folder, export_scorer(booster, rows, folder, 160)


def test_candidates_hold_each_patch_and_the_whole_map() -> None:
    scores = np.full((H, W), 10, np.uint8)
    scores[30:110, 40:120] = 230
    maps = maps_of(scores)
    assert maps.p.shape == (120, 160)
    boxes = candidates(maps.p).tolist()
    assert [20, 15, 60, 55] in boxes and [0, 0, 160, 120] in boxes
    assert len(boxes) == len({tuple(b) for b in boxes})  # distinct
    assert maps.coverage.sum() == pytest.approx(40 * 40)  # corroded cells, exactly


def test_features_of_the_whole_frame_by_hand() -> None:
    scores = np.full((H, W), 10, np.uint8)
    scores[30:110, 40:120] = 230
    maps = maps_of(scores)
    row = dict(zip(FEATURES, box_features(maps, np.array([[0, 0, 160, 120]])).ravel(), strict=True))
    assert row["log_area_share"] == 0 and row["frame_edges_touched"] == 4
    assert row["mean_p"] == pytest.approx(maps.p.mean()) == pytest.approx(row["frame_mean_p"])
    assert row["corroded_share"] == pytest.approx(1 / 12)  # 40 x 40 of 160 x 120
    assert row["p_mass_share"] == pytest.approx(1.0)
    assert row["ring0.25_mean_p"] == 0.0  # nothing around the whole frame
    assert row["edge_left_mean_p"] == pytest.approx(10 / 255)


def test_the_trained_scorer_finds_the_annotated_patches(
    scorer: tuple[Path, RegionScorerSpec],
) -> None:
    folder, spec = scorer
    loaded = RegionScorer.load(folder, spec)
    assert spec.features == FEATURES and len(spec.golden) == 16
    hits = 0
    rng = np.random.default_rng(11)  # frames the scorer never saw
    for _ in range(6):
        frame = scene(rng)
        found = regions_of(loaded, frame.scores, (W * 2, H * 2))  # a frame twice the map's size
        assert found and all(0 <= s <= 1 for _, s in found)
        best = max(found, key=lambda rs: rs[1])[0]
        box = np.array([[best.x, best.y, best.x + best.w, best.y + best.h]]) / 2.0
        hits += int(iou_matrix(box, np.array(frame.boxes, float)).max() >= 0.5)
        areas = [r.area_pct for r, _ in found]
        assert areas == sorted(areas, reverse=True)  # the contract's order
    assert hits >= 5


def test_a_tampered_scorer_is_refused_with_the_reason(
    scorer: tuple[Path, RegionScorerSpec], tmp_path: Path
) -> None:
    folder, spec = scorer
    golden = list(spec.golden)
    golden[0] = golden[0].model_copy(update={"score": min(1.0, golden[0].score + 0.1)})
    with pytest.raises(ModelError, match="golden sample 0"):
        RegionScorer.load(folder, spec.model_copy(update={"golden": tuple(golden)}))
    with pytest.raises(ModelError, match=r"not agent\.engine\.proposals'"):
        RegionScorer.load(folder, spec.model_copy(update={"features": FEATURES[:-1]}))
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / SCORER_FILE).write_bytes((folder / SCORER_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="box scorer"):
        RegionScorer.load(bad, spec)


def with_scorer(manifest_path: Path, scorer: tuple[Path, RegionScorerSpec]) -> Path:
    """A model folder with the scorer beside it and named in its manifest."""
    folder, spec = scorer
    shutil.copy(folder / SCORER_FILE, manifest_path.parent / SCORER_FILE)
    manifest = ModelManifest.read(manifest_path).model_copy(update={"regions": spec})
    ModelManifest.model_validate(manifest.model_dump()).write(manifest_path)
    return manifest_path


def test_the_detector_reports_the_scorers_regions(
    logistic_model: Path, scorer: tuple[Path, RegionScorerSpec], tmp_path: Path
) -> None:
    manifest = with_scorer(copy_model(logistic_model, tmp_path / "m"), scorer)
    model = load_model(manifest)
    assert model.regions is not None
    assert [r.file for r in model.manifest.files()] == ["model.onnx", "table.npy", SCORER_FILE]
    frame = np.full((240, 320, 3), (200, 200, 200), np.uint8)
    frame[40:140, 60:200] = (40, 70, 160)  # BGR rust
    analysis = Detector(model).analyse(frame)
    assert analysis.regions and len(analysis.region_scores) == len(analysis.regions)
    assert all(r.area_pct <= analysis.corrosion_pct for r in analysis.regions)
    found = regions_of(model.regions, model.classify(frame).scores, (320, 240))
    assert analysis.regions == tuple(r for r, _ in found)
    assert analysis.region_scores == tuple(s for _, s in found)
    plain = Detector(load_model(logistic_model)).analyse(frame)
    assert plain.regions and plain.regions != analysis.regions  # ring contrast without it


def test_manifest_checks_of_the_scorer_block(
    logistic_model: Path, scorer: tuple[Path, RegionScorerSpec], tmp_path: Path
) -> None:
    manifest = with_scorer(copy_model(logistic_model, tmp_path / "m"), scorer)
    edit_manifest(manifest, regions__model__file="model.onnx")
    with pytest.raises(ValueError, match="different files"):
        ModelManifest.read(manifest)
    manifest = with_scorer(copy_model(logistic_model, tmp_path / "n"), scorer)
    data = json.loads(manifest.read_text())
    data["regions"]["golden"][3]["features"] = data["regions"]["golden"][3]["features"][:-1]
    manifest.write_text(json.dumps(data))
    width = len(FEATURES)
    with pytest.raises(ValueError, match=rf"regions.*golden\[3\] carries {width - 1} features"):
        ModelManifest.read(manifest)
    bare = json.loads(logistic_model.read_text())
    assert "regions" not in bare  # a model without a scorer reads as before (contract 1.2)
    assert "min_score" not in data["regions"]  # nor a scorer without a floor (contract 1.3)


def test_a_labels_only_model_cannot_carry_a_scorer(
    softmax_model: Path, scorer: tuple[Path, RegionScorerSpec], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="box scorer reads probabilities"):
        with_scorer(copy_model(softmax_model, tmp_path / "m"), scorer)


def test_scorer_limits_and_training_errors(scorer: tuple[Path, RegionScorerSpec]) -> None:
    loaded = RegionScorer.load(*scorer)
    frame = scene(np.random.default_rng(5)).scores
    assert regions_of(loaded, frame, (W, H), max_regions=0) == []
    assert len(regions_of(loaded, frame, (W, H), max_regions=2)) == 2
    assert regions_of(loaded, frame, (W, H), min_region_pct=100.0) == []
    assert regions_of(loaded, np.zeros((H, W), np.uint8), (W, H)) == []  # nothing corroded
    with pytest.raises(ConvertError, match="0 frames, 0 candidates"):
        train_scorer([], 160)
    with pytest.raises(ConvertError, match="golden samples need 16"):
        booster, rows = train_scorer([scene(np.random.default_rng(1))], 160, threads=2)
        export_scorer(booster, rows[:3], Path("unused"), 160)


def test_the_best_f1_floor_by_hand() -> None:
    scores = np.array([0.6, 0.9, 0.7, 0.8])  # pooled, in any order
    hits = np.array([False, True, True, False])
    # reporting the best k of 4 with 3 boxes to find: F1 = 2 TP / (k + 3) = .5, .4, .67, .57;
    # the floor keeps the best 3, halfway between the 3rd score and the 4th
    assert best_f1_floor(scores, hits, 3) == pytest.approx(0.65)
    # a floor keeps every box of its score: [0.9 hit, 0.7 hit, 0.7 miss] cannot stop at two
    floor = best_f1_floor(np.array([0.9, 0.7, 0.7]), np.array([True, True, False]), 2)
    assert floor == pytest.approx(0.35)  # nothing lower: halfway to 0
    assert best_f1_floor(np.array([0.9, 0.5]), np.array([False, False]), 2) is None
    assert best_f1_floor(np.empty(0), np.empty(0, bool), 2) is None


def test_a_device_reports_only_regions_at_or_above_the_cross_validated_floor(
    scorer: tuple[Path, RegionScorerSpec], logistic_model: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)  # the frames the fixture's scorer was trained on
    drawn = [scene(rng) for _ in range(12)]
    frames = [Annotated(f.scores, f.boxes, group=str(i % 6)) for i, f in enumerate(drawn)]
    floor = choose_floor(frames, 160, threads=2)
    assert floor is not None and 0.0 < floor < 1.0
    assert choose_floor(frames[:1], 160) is None  # one group: nothing to hold out
    paint = [scene(rng) for _ in range(4)]  # clean photos: rust-like patches nobody boxed
    clean = [Annotated(f.scores, (), group=f"clean{i}") for i, f in enumerate(paint)]
    stricter = choose_floor([*frames, *clean], 160, threads=2)  # their regions are false
    assert stricter is not None and stricter >= floor
    folder, spec = scorer
    floored = RegionScorer.load(folder, spec.model_copy(update={"min_score": floor}))
    plain = RegionScorer.load(folder, spec)
    frame = scene(np.random.default_rng(11)).scores
    every = regions_of(plain, frame, (W, H))
    shown = regions_of(floored, frame, (W, H))
    assert shown and all(s >= floor for _, s in shown)
    assert shown == [(r, s) for r, s in every if s >= floor] and len(shown) < len(every)
    assert regions_of(floored, frame, (W, H), min_score=0.0) == every  # the operator's override
    assert regions_of(floored, frame, (W, H), max_regions=0) == []
    assert floored.floor() == floor and floored.floor(0.9) == 0.9 and plain.floor() == 0.0
    manifest = with_scorer(copy_model(logistic_model, tmp_path / "m"), (folder, floored.spec))
    assert json.loads(manifest.read_text())["regions"]["min_score"] == floor
    edit_manifest(manifest, regions__min_score=1.2)
    with pytest.raises(ValueError, match=r"regions\.min_score"):
        ModelManifest.read(manifest)
    edit_manifest(manifest, regions__min_score=floor)
    model = load_model(manifest)
    image = np.full((240, 320, 3), (200, 200, 200), np.uint8)
    image[40:140, 60:200] = (40, 70, 160)  # BGR rust
    assert all(s >= floor for s in Detector(model).analyse(image).region_scores)
    everything = Detector(model, ClassifierConfig(min_region_score=0.0)).analyse(image)
    assert min(everything.region_scores) < floor
    voc = tmp_path / "voc"
    generate(voc, 6, seed=1, width=160, height=120)
    result = evaluate_boxes(manifest, voc)  # AP ranks every region, a device shows fewer
    detections = sum(p["detections"] for p in result["per_image"]) / result["n_images"]
    assert 0 < result["reported"]["per_image"] < detections


def test_a_scorer_travels_through_the_registry_to_the_device(
    registry: Registry, logistic_model: Path, scorer: tuple[Path, RegionScorerSpec], tmp_path: Path
) -> None:
    """Over moto's S3 server: publish uploads the scorer, the updater fetches and verifies it."""
    manifest = with_scorer(train(tmp_path / "v2", "2.0.0", 40), scorer)
    registry.publish(manifest.parent)
    registry.point("2.0.0")
    detector = Detector(ColourModel.load(logistic_model))
    outcome = updater(registry, tmp_path, detector).check()
    assert outcome.served is not None and outcome.served.version == "2.0.0"
    pulled = tmp_path / "models" / NAME / "2.0.0"
    assert (pulled / SCORER_FILE).read_bytes() == (manifest.parent / SCORER_FILE).read_bytes()
    assert detector.model.regions is not None
