"""Per-pixel features of feature models: the one implementation training and devices share.

A colour model sees one pixel; rust and reddish paint can share a colour but not a texture,
so a feature model also sees the pixel's neighbourhood. Its manifest names every feature
(`input.features`, in column order) and fixes the working resolution and stride
(`features`): this module turns those names into numbers. `export` trains on rows from
`FeaturePipeline.planes` and the device classifies rows from the same call, so the cloud
and the device cannot drift apart; a test proves the rows are identical.

Feature names: a base plane, optionally wrapped by operators (applied right to left):

- base planes: `R`, `G`, `B`; `H`, `S`, `V` (OpenCV 8-bit HSV, H in 0..179); `L*`, `a*`,
  `b*` (OpenCV 8-bit Lab: L scaled to 0..255, a and b offset by 128);
- `meanK:X`, `stdK:X`: mean and standard deviation of X over a KxK window (K odd, 3..63),
  from box filters of x and x^2;
- `grad:X`: 3x3 Sobel gradient magnitude of X; `lap:X`: |3x3 Laplacian| of X.

E.g. `std7:a*` (how much the red-green axis varies around the pixel), `mean7:grad:L*`.
All planes are float32 on the working image, borders reflected (OpenCV's default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
RGB_FEATURES = ("R", "G", "B")
_BASE = {  # name -> (colour space, channel) of OpenCV's 8-bit conversions
    "R": ("BGR", 2), "G": ("BGR", 1), "B": ("BGR", 0),
    "H": ("HSV", 0), "S": ("HSV", 1), "V": ("HSV", 2),
    "L*": ("Lab", 0), "a*": ("Lab", 1), "b*": ("Lab", 2),
}  # fmt: skip
_CONVERSIONS = {"HSV": cv2.COLOR_BGR2HSV, "Lab": cv2.COLOR_BGR2Lab}
BASE_PLANES = tuple(_BASE)
_WINDOW_OP = re.compile(r"^(mean|std)([1-9][0-9]?)$")
MAX_WINDOW = 63


class FeatureError(ValueError):
    """A feature name or pipeline setting this engine cannot compute."""


def texture_features(windows: Sequence[int] = (7,)) -> tuple[str, ...]:
    """The recipe's feature set: colour in three spaces plus local texture per window.

    With one 7x7 window this is the 21-feature set measured in
    ../shared/notes/feature-models-and-boxes.md.
    """
    names = list(BASE_PLANES)
    for k in windows:
        for plane in ("L*", "a*", "b*", "S"):
            names += [f"mean{k}:{plane}", f"std{k}:{plane}"]
    names += ["grad:L*", "lap:L*"]
    names += [f"mean{k}:{edge}:L*" for k in windows for edge in ("grad", "lap")]
    return tuple(names)


def check_name(name: str) -> None:
    """Refuse a name this module cannot compute, saying which part is wrong."""
    *ops, base = name.split(":")
    if base not in BASE_PLANES:
        raise FeatureError(f"feature {name!r}: unknown base plane {base!r} (have {BASE_PLANES})")
    for op in ops:
        if op in ("grad", "lap"):
            continue
        match = _WINDOW_OP.match(op)
        if match is None:
            raise FeatureError(f"feature {name!r}: unknown operator {op!r}")
        k = int(match.group(2))
        if k % 2 == 0 or not 3 <= k <= MAX_WINDOW:
            raise FeatureError(f"feature {name!r}: window {k} must be odd, 3..{MAX_WINDOW}")


def working_image(bgr: U8, long_side: int) -> U8:
    """INTER_AREA downscale to the model's working resolution (never upscales).

    Part of the pipeline's definition (window sizes mean pixels at this scale), so it lives
    here and not with the detector's own analysis resize.
    """
    height, width = bgr.shape[:2]
    if max(height, width) <= long_side:
        return bgr
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), np.uint8)


def grid_offsets(shape: tuple[int, ...], stride: int) -> tuple[int, int]:
    """First sampled row and column: the middle of each stride x stride block, or the last
    row or column of an image thinner than that (a 1 px strip still gets a sample)."""
    return min(stride // 2, shape[0] - 1), min(stride // 2, shape[1] - 1)


def expand(grid: U8, size: tuple[int, int]) -> U8:
    """Grid scores up to `size` (w, h) by linear interpolation, so the mask's edges are smooth."""
    if (grid.shape[1], grid.shape[0]) == size:
        return grid
    return np.asarray(cv2.resize(grid, size, interpolation=cv2.INTER_LINEAR), np.uint8)


class _Planes:
    """Memoised planes of one working image: shared sub-terms are computed once."""

    def __init__(self, bgr: U8) -> None:
        self.spaces: dict[str, U8] = {"BGR": bgr}
        self.cache: dict[str, F32] = {}

    def get(self, name: str) -> F32:
        plane = self.cache.get(name)
        if plane is None:
            plane = self._compute(name)
            self.cache[name] = plane
        return plane

    def _base(self, name: str) -> F32:
        space, channel = _BASE[name]
        image = self.spaces.get(space)
        if image is None:
            image = np.asarray(cv2.cvtColor(self.spaces["BGR"], _CONVERSIONS[space]), np.uint8)
            self.spaces[space] = image
        return image[..., channel].astype(np.float32)

    def _compute(self, name: str) -> F32:
        op, sep, inner = name.partition(":")
        if not sep:
            return self._base(name)
        x = self.get(inner)
        if op == "grad":
            dx = np.asarray(cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3), np.float32)
            dy = np.asarray(cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3), np.float32)
            # Not cv2.magnitude: its SIMD square root differs in the last bit from its scalar
            # tail, so a value would depend on where the row sits in memory. numpy's is exact.
            return np.sqrt(dx * dx + dy * dy)
        if op == "lap":
            return np.abs(np.asarray(cv2.Laplacian(x, cv2.CV_32F, ksize=3), np.float32))
        match = _WINDOW_OP.match(op)
        assert match is not None  # names were checked when the pipeline was built
        k = int(match.group(2))
        if match.group(1) == "mean":
            return np.asarray(cv2.blur(x, (k, k)), np.float32)
        mean = self.get(f"mean{k}:{inner}")
        square = np.asarray(cv2.blur(x * x, (k, k)), np.float32)
        return np.sqrt(np.maximum(square - mean * mean, 0.0, dtype=np.float32))


@dataclass(frozen=True)
class FeaturePipeline:
    """Named features of a model at its working resolution, sampled every `stride` pixels."""

    names: tuple[str, ...]
    long_side: int
    stride: int = 1

    def __post_init__(self) -> None:
        if not self.names:
            raise FeatureError("a feature model needs at least one feature")
        if len(set(self.names)) != len(self.names):
            raise FeatureError(f"duplicate feature names in {self.names}")
        for name in self.names:
            check_name(name)
        if self.long_side < 16 or self.stride < 1:
            raise FeatureError(f"long_side {self.long_side} < 16 or stride {self.stride} < 1")

    def working(self, bgr: U8) -> U8:
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 BGR frame, got {bgr.dtype}{bgr.shape}")
        return working_image(bgr, self.long_side)

    def planes(self, work: U8) -> list[F32]:
        """Every feature as an HxW float32 plane of the working image, in column order."""
        cache = _Planes(work)
        return [cache.get(name) for name in self.names]

    def grid_shape(self, shape: tuple[int, ...], stride: int | None = None) -> tuple[int, int]:
        """(rows, columns) that `rows` samples from a working image of `shape`."""
        s = self.stride if stride is None else stride
        oy, ox = grid_offsets(shape, s)
        return -(-(shape[0] - oy) // s), -(-(shape[1] - ox) // s)

    def rows(self, work: U8, stride: int | None = None) -> F32:
        """[N, features] at every `stride`-th pixel each way (row-major grid); stride 1 = all."""
        return self.grid(self.planes(work), stride)

    def grid(self, planes: list[F32], stride: int | None = None) -> F32:
        """`rows` of already computed planes (training computes them once per photo)."""
        s = self.stride if stride is None else stride
        oy, ox = grid_offsets(planes[0].shape, s)
        out = np.empty((*self.grid_shape(planes[0].shape, s), len(planes)), np.float32)
        for i, plane in enumerate(planes):
            out[..., i] = plane[oy::s, ox::s]
        return out.reshape(-1, len(planes))

    @staticmethod
    def at(planes: list[F32], ys: np.ndarray, xs: np.ndarray) -> F32:
        """[N, features] at the given pixels of the working image (training samples)."""
        return np.stack([p[ys, xs] for p in planes], axis=1).astype(np.float32, copy=False)
