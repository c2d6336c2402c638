"""Synthetic scenes: the ground truth every other test and the demo model rely on."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.synthetic import Scene, _render, generate, make_scene, write_scene

W, H = 200, 150  # small and non-square: catches swapped axes, keeps the file fast


def _read(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return np.asarray(img)


def _scene(seed: int, **kwargs: bool) -> Scene:
    return make_scene(np.random.default_rng(seed), W, H, **kwargs)


def test_deterministic_for_a_seed() -> None:
    a, b = _scene(3), _scene(3)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    assert a.boxes == b.boxes
    assert not np.array_equal(a.image, _scene(4).image)


@pytest.mark.parametrize("size", [(W, H), (640, 480)])
def test_shapes_dtypes_and_binary_mask(size: tuple[int, int]) -> None:
    w, h = size
    s = make_scene(np.random.default_rng(0), w, h)
    assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (h, w) and s.mask.dtype == np.uint8
    assert set(np.unique(s.mask).tolist()) <= {0, 1}
    assert s.corrosion_pct == pytest.approx(100.0 * s.mask.mean())


def test_clean_scene_has_no_rust() -> None:
    for seed in range(5):
        s = _scene(seed, rust=False)
        assert not s.mask.any()
        assert s.boxes == ()
        assert s.corrosion_pct == 0.0


def test_rusty_scenes_vary_in_coverage_and_have_valid_boxes() -> None:
    pcts = []
    for seed in range(20):
        s = _scene(seed)
        pcts.append(s.corrosion_pct)
        assert s.boxes, "a rusty scene needs at least one box"
        for xmin, ymin, xmax, ymax in s.boxes:
            assert 0 <= xmin < xmax <= W and 0 <= ymin < ymax <= H
            assert s.mask[ymin:ymax, xmin:xmax].any()
        covered = np.zeros_like(s.mask)  # every sizeable component lies inside some box
        for xmin, ymin, xmax, ymax in s.boxes:
            covered[ymin:ymax, xmin:xmax] = 1
        assert (s.mask & covered).sum() >= 0.9 * s.mask.sum()
    assert min(pcts) > 0.5 and max(pcts) < 40.0
    assert max(pcts) > 3 * min(pcts)


def test_hard_negative_paint_is_present_distinct_and_never_labelled() -> None:
    rust_px, paint_px, with_paint = [], [], 0
    for seed in range(30):
        scene, paint = _render(np.random.default_rng(seed), W, H, rust=True, hard_negatives=True)
        assert not (paint & scene.mask).any()
        rgb = scene.image[..., ::-1].astype(np.float64)
        rust_px.append(rgb[scene.mask == 1])
        if paint.any():
            with_paint += 1
            paint_px.append(rgb[paint == 1])
    assert 5 <= with_paint < 30  # in some scenes, not all
    rust_mean = np.concatenate(rust_px).mean(axis=0)
    paint_mean = np.concatenate(paint_px).mean(axis=0)
    assert np.linalg.norm(rust_mean - paint_mean) > 15
    # The cue a colour model can learn: paint is bluer relative to green than rust is.
    assert max(p[:, 2].mean() / p[:, 1].mean() for p in rust_px) < 0.62
    assert min(p[:, 2].mean() / p[:, 1].mean() for p in paint_px) > 0.62


def test_hard_negatives_off() -> None:
    for seed in range(10):
        _, paint = _render(np.random.default_rng(seed), W, H, rust=True, hard_negatives=False)
        assert not paint.any()


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_write_scene(tmp_path: Path, fmt: str) -> None:
    s = _scene(1)
    out = tmp_path / "new" / "dir"
    img_path = write_scene(s, out, "x", fmt=fmt)
    assert img_path == out / f"x.{fmt}"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"x.{fmt}", "x.mask.png", "x.xml"])
    img = _read(img_path)
    assert img.shape == (H, W, 3)
    if fmt == "png":
        assert np.array_equal(img, s.image)
    mask = _read(out / "x.mask.png", cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, s.mask * 255)

    root = ET.parse(out / "x.xml").getroot()
    assert root.tag == "annotation"
    assert root.findtext("folder") == "dir" and root.findtext("filename") == f"x.{fmt}"
    assert root.findtext("size/width") == str(W) and root.findtext("size/height") == str(H)
    assert root.findtext("size/depth") == "3"
    objs = root.findall("object")
    assert len(objs) == len(s.boxes)
    for obj, box in zip(objs, s.boxes, strict=True):
        assert obj.findtext("name") == "rust" and obj.findtext("pose") == "Unspecified"
        assert obj.findtext("truncated") == "0" and obj.findtext("difficult") == "0"
        keys = ("xmin", "ymin", "xmax", "ymax")
        got = tuple(int(obj.findtext(f"bndbox/{k}") or -1) for k in keys)
        assert got == box


def test_write_scene_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        write_scene(_scene(0), tmp_path, "x", fmt="bmp")


def test_generate(tmp_path: Path) -> None:
    paths = generate(tmp_path / "a", 12, seed=5, width=W, height=H, clean_fraction=0.25)
    assert [p.name for p in paths] == [f"scene-{i:04d}.jpg" for i in range(12)]
    assert all(p.exists() for p in paths)
    clean = [
        not _read(p.with_name(p.stem + ".mask.png"), cv2.IMREAD_UNCHANGED).any() for p in paths
    ]
    assert sum(clean) == 3
    objects = [len(ET.parse(p.with_suffix(".xml")).getroot().findall("object")) for p in paths]
    assert all((n == 0) == c for n, c in zip(objects, clean, strict=True))

    again = generate(tmp_path / "b", 12, seed=5, width=W, height=H, fmt="png")
    for p, q in zip(paths, again, strict=True):
        m1 = p.with_name(p.stem + ".mask.png").read_bytes()
        assert m1 == q.with_name(q.stem + ".mask.png").read_bytes()
    other = generate(tmp_path / "c", 4, seed=6, width=W, height=H)
    assert other[0].read_bytes() != paths[0].read_bytes()


def test_rejects_tiny_scenes() -> None:
    with pytest.raises(ValueError, match="16x16"):
        make_scene(np.random.default_rng(0), 8, 8)


def test_demo_replaces_an_earlier_demo_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo --out DIR` clears DIR/model and DIR/frames: only when they hold a demo."""
    from export import demo
    from export.cli import main

    model, frames = tmp_path / "model", tmp_path / "frames"
    model.mkdir()
    (model / "my-model.onnx").write_bytes(b"mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "model: not an earlier demo model" in capsys.readouterr().err
    (model / "my-model.onnx").unlink()
    frames.mkdir()
    (frames / "scene-0000.jpg").write_bytes(b"demo")
    (frames / "site-photo.jpg").write_bytes(b"mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "frames: holds files the demo did not write (site-photo.jpg)" in capsys.readouterr().err
    assert (frames / "site-photo.jpg").read_bytes() == b"mine"
    (frames / "site-photo.jpg").unlink()
    (model / "manifest.json").write_text('{"name": "demo-rgb", "schema_version": "0.9"}')
    demo._replaceable(model, frames)  # an earlier demo, even of an older contract: replaced
