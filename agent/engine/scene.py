"""What the whole frame shows: a pretrained image embedder's numbers for the image rule.

Why: per pixel, a brick wall or a red door looks like rust; what the frame shows (a door, a
bridge, a car) separates them far better than any pixel statistic. A manifest may pin an
ONNX embedder (contract 1.4, `scene`) that maps the whole frame, resized to a square, to a
few numbers the image rule reads after its own statistics. export.scene builds it and
computes its golden answers with `golden_frame` and `preprocess` from here, so a device and
the cloud feed it identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from agent.contract import SceneSpec
from agent.engine.model import ModelError, checked_session, verified, worst_miss

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
GOLDEN_FRAMES = 3
TOLERANCE = 1e-3  # relative: float32 convolutions differ slightly across CPUs and runtimes


def golden_frame(index: int) -> np.ndarray:
    """A deterministic BGR test card, different for each index: 120x160, or 360x640 for every
    third (index 2, 5, ...), so that both the enlarging and the shrinking resize are checked."""
    height, width = (360, 640) if index % 3 == 2 else (120, 160)
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * (3 + index) + y * (5 + 2 * c) + 37 * index * (c + 1)) % 256 for c in range(3)]
    return np.ascontiguousarray(np.stack(planes, axis=-1).astype(np.uint8))


def preprocess(bgr: np.ndarray, size: int, mean: float, std: float) -> F32:
    """The embedder's input: the frame squeezed to size x size (OpenCV INTER_AREA), RGB,
    scaled, NCHW."""
    square = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(square, cv2.COLOR_BGR2RGB).astype(np.float32)
    return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1)[None])


class SceneEmbedder:
    """A verified embedder: its ONNX network and the manifest block that pins it."""

    def __init__(self, spec: SceneSpec, onnx_path: Path, *, threads: int = 1) -> None:
        self.spec = spec
        self.path = onnx_path
        self.session, self._input = checked_session(
            onnx_path, "scene", [3, spec.size, spec.size], spec.output, len(spec.names),
            threads=threads, optimize=True,
        )  # fmt: skip
        self._check_golden()

    @classmethod
    def load(cls, folder: Path, spec: SceneSpec, *, threads: int = 1) -> SceneEmbedder:
        return cls(spec, verified(folder, spec.model, "scene embedder"), threads=threads)

    def embed(self, bgr: np.ndarray) -> F64:
        """The frame's numbers, in `spec.names` order."""
        x = preprocess(bgr, self.spec.size, self.spec.mean, self.spec.std)
        (out,) = self.session.run([self.spec.output], {self._input: x})
        return np.asarray(out, np.float64).reshape(-1)

    def _check_golden(self) -> None:
        for sample in self.spec.golden:
            got = self.embed(golden_frame(sample.frame))
            want = np.asarray(sample.outputs)
            i = worst_miss(got, want, TOLERANCE)
            if i is not None:
                name = self.spec.names[i] if i < len(self.spec.names) else "output"
                value = got[i] if i < len(got) else float("nan")
                raise ModelError(
                    f"{self.path}: scene golden frame {sample.frame} gives {name} = "
                    f"{value:.6f}, manifest expects {want[i]:.6f}"
                )
