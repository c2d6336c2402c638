"""Synthetic rusty-metal scenes with exact pixel masks and Pascal VOC boxes.

Real corrosion labels are scarce and fuzzy at the edges; these scenes give the tests and the demo
model ground truth that is exact by construction. Reddish paint is added as a hard negative so a
colour classifier cannot get away with "red means rust".
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Box = tuple[int, int, int, int]

# RGB. Ordinary industrial coatings: grey, blues, greens, white, safety yellow, cream.
_PAINTS = (
    (128, 130, 128), (172, 174, 170), (45, 85, 140), (30, 95, 165), (62, 112, 72),
    (40, 80, 52), (222, 222, 215), (225, 185, 45), (210, 200, 172),
)  # fmt: skip
# RGB. Maroon / oxide-red / purple-brown coatings: near rust in hue but bluer (B/G ~0.8+ vs
# ~0.45 for rust) and uniform: learnable, yet they punish a "red means rust" model.
_RED_PAINTS = ((140, 40, 40), (120, 60, 50), (110, 42, 58), (150, 50, 55))
_RUST_LIGHT = np.array((175, 90, 35), np.float32)  # fresh orange-brown oxide
_RUST_DARK = np.array((105, 50, 28), np.float32)  # old, dark brown scale
_LIGHT_RANGE = ((150, 70, 20), (200, 110, 50))
_DARK_RANGE = ((90, 40, 20), (120, 60, 35))
_VOC_OBJECT = {"name": "rust", "pose": "Unspecified", "truncated": 0, "difficult": 0}
_MIN_BOX_FRACTION = 0.001  # connected rust specks smaller than this get no box


@dataclass(frozen=True)
class Scene:
    """One rendered image with exact ground truth."""

    image: U8  # HxWx3, BGR (OpenCV order)
    mask: U8  # HxW, 1 = corroded, 0 = clean
    boxes: tuple[Box, ...]  # (xmin, ymin, xmax, ymax), max exclusive

    @property
    def corrosion_pct(self) -> float:
        """Share of corroded pixels, in percent: the number the edge agent reports."""
        return 100.0 * float(self.mask.mean())


def _fbm(
    rng: np.random.Generator, h: int, w: int, cells: tuple[int, ...], gains: tuple[float, ...]
) -> F32:
    """Octaves of upsampled Gaussian noise: cheap organic texture without per-pixel loops."""
    out = np.zeros((h, w), np.float32)
    side = max(h, w)
    for c, g in zip(cells, gains, strict=True):
        small = rng.standard_normal((max(2, c * h // side), max(2, c * w // side)), np.float32)
        out += g * _resize(small, w, h, cv2.INTER_CUBIC)
    return out


def _resize(a: F32, w: int, h: int, interpolation: int = cv2.INTER_LINEAR) -> F32:
    return np.asarray(cv2.resize(a, (w, h), interpolation=interpolation), np.float32)


def _surface(rng: np.random.Generator, h: int, w: int) -> F32:
    """Painted or brushed-steel background, RGB float, before lighting."""
    if rng.random() < 0.35:  # bare steel: bluish grey with directional brushing marks
        grey = rng.uniform(105, 175)
        base = np.array((grey, grey + rng.uniform(0, 6), grey + rng.uniform(2, 12)), np.float32)
        k = int(rng.integers(31, 91))
        grain = rng.standard_normal((h, w), np.float32)
        grain = cv2.blur(grain, (k, 1) if rng.random() < 0.7 else (1, k)) * math.sqrt(k)
        tex = 0.04 * grain + 0.03 * _fbm(rng, h, w, (6, 24), (1.0, 0.5))
    else:  # paint: uniform colour, faint mottling
        base = np.array(_PAINTS[rng.integers(len(_PAINTS))], np.float32)
        base += rng.uniform(-8, 8, 3).astype(np.float32)
        tex = 0.02 * _fbm(rng, h, w, (8, 32), (1.0, 0.5))
    img = (base * (1.0 + tex)[..., None]).astype(np.float32)
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):  # panel seams / welds
        colour = tuple(float(c) for c in base * rng.uniform(0.55, 0.8))
        if rng.random() < 0.5:
            y = int(rng.integers(0, h))
            cv2.line(img, (0, y), (w, y), colour, int(rng.integers(2, 5)))
        else:
            x = int(rng.integers(0, w))
            cv2.line(img, (x, 0), (x, h), colour, int(rng.integers(2, 5)))
    return img


def _paint_mask(rng: np.random.Generator, h: int, w: int) -> U8:
    """Bands, plates and discs where reddish hard-negative paint goes."""
    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        if kind == 0:  # full-width marking band (pipe or beam stripe)
            y, t = int(rng.integers(0, h)), int(rng.integers(side // 20, side // 5))
            cv2.rectangle(mask, (0, y), (w, y + t), 1, -1)
        elif kind == 1:  # rotated plate or sign
            rect = (
                (float(rng.uniform(0, w)), float(rng.uniform(0, h))),
                (float(rng.uniform(0.1, 0.4) * w), float(rng.uniform(0.1, 0.4) * h)),
                float(rng.uniform(0, 180)),
            )
            cv2.fillPoly(mask, [cv2.boxPoints(rect).astype(np.int32)], 1)
        else:  # disc (valve wheel, flange)
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(mask, centre, int(rng.integers(side // 16, side // 5)), 1, -1)
    return mask


def _rust_mask(rng: np.random.Generator, h: int, w: int) -> U8:
    """Organic patches: noisy min-distance to random ellipses, thresholded at the target coverage.

    Thresholding at a quantile pins the coverage (1-35 %, log-uniform) whatever the noise does.
    """
    coverage = math.exp(rng.uniform(math.log(0.01), math.log(0.35)))
    sh, sw = max(8, h // 4), max(8, w // 4)  # distance field at 1/4 res; edges get detail later
    yy = np.arange(sh, dtype=np.float32)[:, None]
    xx = np.arange(sw, dtype=np.float32)[None, :]
    field = np.full((sh, sw), np.inf, np.float32)
    n_patches = int(rng.integers(1, 5))
    radius = math.sqrt(coverage * sh * sw / n_patches / math.pi)
    for _ in range(n_patches):
        cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
        for _ in range(int(rng.integers(1, 4))):  # each patch is a union of 1-3 ellipses
            r, aspect = radius * rng.uniform(0.5, 1.0), rng.uniform(0.5, 2.0)
            th = rng.uniform(0, math.pi)
            rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
            dx = xx - (cx + rng.normal(0, 0.6 * r))
            dy = yy - (cy + rng.normal(0, 0.6 * r))
            u = (dx * math.cos(th) + dy * math.sin(th)) / rx
            v = (dy * math.cos(th) - dx * math.sin(th)) / ry
            np.minimum(field, np.sqrt(u * u + v * v), out=field)
    full = _resize(field, w, h)
    full += _fbm(rng, h, w, (5, 14, max(h, w) // 4), (0.45, 0.25, 0.1))
    k = min(h * w - 1, int(coverage * h * w))
    threshold = float(np.partition(full.ravel(), k)[k])
    mask = (full <= threshold).astype(np.uint8)
    if rng.random() < 0.35:  # rust running downwards from the lower edges of patches
        ys, xs = np.nonzero(mask[:-1] & (1 - mask[1:]))
        for i in rng.choice(len(ys), size=min(len(ys), int(rng.integers(3, 12))), replace=False):
            x, y, half = int(xs[i]), int(ys[i]), int(rng.integers(1, 5))
            tip = (x + int(rng.integers(-6, 7)), y + int(rng.integers(h // 16, h // 3)))
            cv2.fillPoly(mask, [np.array(((x - half, y), (x + half, y), tip), np.int32)], 1)
    return mask


def _shade(rng: np.random.Generator, h: int, w: int) -> F32:
    """Multiplicative lighting: a linear gradient times 0-2 soft shadows (bands or blobs)."""
    th, gain = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    gx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * math.cos(th)
    gy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * math.sin(th)
    light = 1.0 + gain * (gx + gy)
    sh, sw = max(8, h // 4), max(8, w // 4)  # shadows are blurry: draw and blur at 1/4 res
    dark = np.zeros((sh, sw), np.float32)
    for _ in range(int(rng.integers(0, 3))):
        layer = np.zeros((sh, sw), np.float32)
        if rng.random() < 0.5:  # band cast by a beam or pipe
            p1 = (int(rng.integers(-sw, 2 * sw)), -sh)
            p2 = (int(rng.integers(-sw, 2 * sw)), 2 * sh)
            cv2.line(layer, p1, p2, 1.0, int(rng.integers(max(2, sh // 10), max(3, sh // 3))))
        else:  # blob from some nearby object
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = rng.uniform(0.1, 0.4, n) * min(sh, sw)
            cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
            pts = np.stack((cx + rad * np.cos(ang), cy + rad * np.sin(ang)), axis=1)
            cv2.fillPoly(layer, [pts.astype(np.int32)], 1.0)
        layer = np.asarray(cv2.GaussianBlur(layer, (0, 0), rng.uniform(1.5, 6.0)), np.float32)
        np.maximum(dark, layer * rng.uniform(0.3, 0.6), out=dark)
    return light * (1.0 - _resize(dark, w, h))


def _render(
    rng: np.random.Generator, width: int, height: int, *, rust: bool, hard_negatives: bool
) -> tuple[Scene, U8]:
    """Build a scene; also return the visible hard-negative paint mask (used by the tests)."""
    if min(width, height) < 16:
        raise ValueError(f"scene must be at least 16x16, got {width}x{height}")
    h, w = height, width
    img = _surface(rng, h, w)
    paint = np.zeros((h, w), np.uint8)
    if hard_negatives and rng.random() < 0.6:
        paint = _paint_mask(rng, h, w)
        colour = np.array(_RED_PAINTS[rng.integers(len(_RED_PAINTS))], np.float32)
        colour += rng.uniform(-6, 6, 3).astype(np.float32)
        p = paint.astype(bool)
        img[p] = colour * (1.0 + 0.01 * rng.standard_normal((int(p.sum()), 1), np.float32))
    mask = _rust_mask(rng, h, w) if rust else np.zeros((h, w), np.uint8)
    m = mask.astype(bool)
    if m.any():
        scale = rng.uniform(0.88, 1.12)
        light = np.clip(_RUST_LIGHT * scale + rng.uniform(-10, 10, 3), *_LIGHT_RANGE)
        dark = np.clip(_RUST_DARK * scale + rng.uniform(-6, 6, 3), *_DARK_RANGE)
        t = 0.5 + _fbm(rng, h, w, (10, 40, max(h, w) // 3), (0.22, 0.12, 0.08))[m]
        t = np.clip(t, 0.0, 1.0)[:, None]
        px = light * (1.0 - t) + dark * t
        speck = rng.random(len(px))
        px[speck < 0.04] *= 0.65  # pits
        px[speck > 0.98] = np.minimum(light * 1.1, 230)  # fresh flakes
        img[m] = px
    img *= _shade(rng, h, w)[..., None]
    img += rng.normal(0.0, 2.0, (h, w, 1)).astype(np.float32)  # sensor noise
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    scene = Scene(np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.uint8), mask, _boxes(mask))
    return scene, paint & (1 - mask)


def _boxes(mask: U8) -> tuple[Box, ...]:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = _MIN_BOX_FRACTION * mask.size
    return tuple(
        sorted(
            (int(x), int(y), int(x + bw), int(y + bh))
            for x, y, bw, bh, area in stats[1:n]
            if area >= min_area
        )
    )


def make_scene(
    rng: np.random.Generator,
    width: int = 640,
    height: int = 480,
    *,
    rust: bool = True,
    hard_negatives: bool = True,
) -> Scene:
    """Render one scene; `rust=False` gives a clean scene (empty mask, no boxes)."""
    return _render(rng, width, height, rust=rust, hard_negatives=hard_negatives)[0]


def _voc_xml(scene: Scene, folder: str, filename: str) -> ET.ElementTree[ET.Element]:
    """labelImg-style annotation, so the files open in common labelling tools."""
    root = ET.Element("annotation")
    h, w = scene.mask.shape

    def sub(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        el = ET.SubElement(parent, tag)
        if text is not None:
            el.text = str(text)
        return el

    sub(root, "folder", folder)
    sub(root, "filename", filename)
    sub(sub(root, "source"), "database", "Unknown")
    size = sub(root, "size")
    for tag, val in (("width", w), ("height", h), ("depth", 3)):
        sub(size, tag, val)
    sub(root, "segmented", 0)
    for box in scene.boxes:
        obj = sub(root, "object")
        for tag, val in _VOC_OBJECT.items():
            sub(obj, tag, val)
        bnd = sub(obj, "bndbox")
        for tag, coord in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            sub(bnd, tag, coord)
    tree: ET.ElementTree[ET.Element] = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_scene(scene: Scene, directory: Path, stem: str, *, fmt: str = "jpg") -> Path:
    """Write image, 0/255 mask PNG and VOC XML side by side; return the image path."""
    if fmt not in ("jpg", "png"):
        raise ValueError(f"fmt must be 'jpg' or 'png', not {fmt!r}")
    directory.mkdir(parents=True, exist_ok=True)
    image_path = directory / f"{stem}.{fmt}"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else []
    for path, data, extra in (
        (image_path, scene.image, params),
        (directory / f"{stem}.mask.png", scene.mask * 255, []),
    ):
        if not cv2.imwrite(str(path), data, extra):
            raise OSError(f"could not write {path}")
    _voc_xml(scene, directory.name, image_path.name).write(
        directory / f"{stem}.xml", encoding="utf-8", xml_declaration=False
    )
    return image_path


def generate(
    directory: Path,
    count: int,
    *,
    seed: int = 0,
    width: int = 640,
    height: int = 480,
    clean_fraction: float = 0.25,
    fmt: str = "jpg",
) -> list[Path]:
    """Write `count` scenes; exactly round(count * clean_fraction) of them, at random, are clean.

    Each scene has its own generator seeded by (seed, index), so its pixels do not depend on
    how many scenes were rendered before it.
    """
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
    order = np.random.default_rng(seed).permutation(count)
    clean = set(order[: round(count * clean_fraction)].tolist())
    return [
        write_scene(
            make_scene(np.random.default_rng([seed, i]), width, height, rust=i not in clean),
            directory,
            f"scene-{i:04d}",
            fmt=fmt,
        )
        for i in range(count)
    ]
