"""Per-frame lookup: BGR handled once, strips and threads change nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.config import ClassifierConfig
from agent.contract import DetectionMessage
from agent.engine.classifier import ColourModel, TableClassifier, corroded_mask
from agent.engine.detector import Detector
from agent.engine.table import SIZE
from export.synthetic import make_scene

RUST_RGB = (200, 60, 10)  # asymmetric: swapping R and B gives a different colour


def one_colour_table(rgb: tuple[int, int, int]) -> np.ndarray:
    table = np.zeros(SIZE, dtype=np.uint8)
    table[(rgb[0] << 16) | (rgb[1] << 8) | rgb[2]] = 255
    return table


def test_bgr_frames_are_looked_up_as_rgb() -> None:
    clf = TableClassifier(one_colour_table(RUST_RGB))
    frame = np.zeros((4, 4, 3), dtype=np.uint8)
    frame[0, 0] = RUST_RGB[::-1]  # OpenCV order: B, G, R
    frame[0, 1] = RUST_RGB  # the same bytes in the wrong order must NOT match
    scores = clf.scores(frame)
    assert scores[0, 0] == 255
    assert scores[0, 1] == 0
    assert np.count_nonzero(scores) == 1


@pytest.mark.parametrize("shape", [(1, 1), (47, 5), (48, 7), (97, 33), (1080, 1920)])
def test_strips_and_threads_equal_a_plain_gather(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    table = rng.integers(0, 256, SIZE, dtype=np.uint8)
    frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb = frame[..., ::-1].astype(np.int64)
    expected = table[(rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]]
    one = TableClassifier(table, threads=1)
    two = TableClassifier(table, threads=2)
    try:
        assert np.array_equal(one.scores(frame), expected)
        assert np.array_equal(two.scores(frame), expected)
        view = frame[:, ::-1]  # non-contiguous input
        assert np.array_equal(one.scores(view), expected[:, ::-1])
    finally:
        two.close()


def test_bad_frames_are_refused_with_the_shape() -> None:
    clf = TableClassifier(np.zeros(SIZE, dtype=np.uint8))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        clf.scores(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"uint8\[16777216\]"):
        TableClassifier(np.zeros(10, dtype=np.uint8))


def test_detector_finds_synthetic_rust(logistic_model: Path) -> None:
    detector = Detector.load(logistic_model)
    rng = np.random.default_rng(3)
    scene = make_scene(rng, 320, 240)
    a = detector.analyse(scene.image)
    truth = scene.corrosion_pct
    assert truth > 0.5
    assert abs(a.corrosion_pct - truth) < max(3.0, 0.5 * truth)
    assert a.regions and a.regions[0].area_pct <= a.corrosion_pct + 1e-9
    assert a.flagged == (a.corrosion_pct >= 2.0)
    mask = corroded_mask(detector.model.scores(scene.image))
    assert np.array_equal(mask, a.mask)


def test_analysis_resolution_and_frame_coordinates(logistic_model: Path) -> None:
    detector = Detector.load(logistic_model, ClassifierConfig(analysis_long_side=160))
    scene = make_scene(np.random.default_rng(4), 640, 480)
    a = detector.analyse(scene.image)
    assert (a.analysis_size.width, a.analysis_size.height) == (160, 120)
    assert (a.frame_size.width, a.frame_size.height) == (640, 480)
    for r in a.regions:  # boxes are in frame pixels, inside the frame
        assert r.x + r.w <= 640 and r.y + r.h <= 480


def test_swap_takes_effect_on_the_next_frame(logistic_model: Path, softmax_model: Path) -> None:
    detector = Detector.load(logistic_model)
    frame = np.full((8, 8, 3), RUST_RGB[::-1], dtype=np.uint8)
    first = detector.analyse(frame).model
    old = detector.swap(ColourModel.load(softmax_model))
    old.close()
    second = detector.analyse(frame).model
    assert first.sha256 != second.sha256
    assert second.sha256 == detector.model.manifest.model.sha256


def test_analysis_becomes_a_valid_detection_message(logistic_model: Path) -> None:
    detector = Detector.load(logistic_model)
    scene = make_scene(np.random.default_rng(5), 200, 150)
    msg = detector.analyse(scene.image).message(
        device_id="drone-7", source="cam0", frame_index=3, captured_at=datetime.now(UTC)
    )
    again = DetectionMessage.model_validate_json(msg.model_dump_json())
    assert again == msg
    assert again.model.name == "test-rgb"
    assert (scene.image.shape[1], scene.image.shape[0]) == (
        msg.frame_size.width,
        msg.frame_size.height,
    )


def test_a_commanded_threshold_lasts_until_the_next_model(logistic_model: Path) -> None:
    """set-threshold holds "until restart (or the next model, which brings its own)"; it
    once outlived model updates, and with it the new model's image rule stayed off."""
    detector = Detector(ColourModel.load(logistic_model))
    own = detector.threshold  # the manifest's flag %
    detector.command_threshold(own + 1.5)
    assert detector.threshold == own + 1.5
    detector.swap(ColourModel.load(logistic_model))
    assert detector.threshold == own
    configured = Detector(ColourModel.load(logistic_model), ClassifierConfig(flag_pct=9.0))
    configured.swap(ColourModel.load(logistic_model))
    assert configured.threshold == 9.0  # the config's % holds for every model


def test_a_threshold_command_mid_frame_waits_for_the_next_frame() -> None:
    """set-threshold runs on the MQTT thread: a frame was flagged by the image rule while its
    message reported the operator's % as the threshold in force."""
    from types import SimpleNamespace

    from agent.contract import ModelRef
    from agent.engine.classifier import Classified

    class Ruled:
        manifest = SimpleNamespace(
            decision=SimpleNamespace(image_rule=SimpleNamespace(threshold=0.5), flag_pct=5.0),
            features=None,
        )
        regions = None
        ref = ModelRef(name="m", version="1.0.0", sha256="0" * 64)

        def classify(self, bgr: np.ndarray, *, rule: bool = True) -> Classified:
            detector.command_threshold(50.0)  # the command lands while the frame is classified
            return Classified(np.zeros(bgr.shape[:2], np.uint8), 0.9 if rule else None)

        def close(self) -> None:
            pass

    detector = Detector(Ruled())  # type: ignore[arg-type]
    first = detector.analyse(np.zeros((8, 8, 3), np.uint8))
    assert (first.flagged, first.rust_threshold, first.threshold) == (True, 0.5, 5.0)  # one state
    second = detector.analyse(np.zeros((8, 8, 3), np.uint8))
    assert (second.flagged, second.rust_threshold, second.threshold) == (False, None, 50.0)
