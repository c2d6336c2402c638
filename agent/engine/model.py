"""Load an ONNX pixel model and prove it is the model its manifest describes.

Every check runs at load time, so a model that does not fit is refused with one precise
reason and nothing can fail later on a frame. The checks are the same whether the model
comes from the local disk or from the registry.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# onnxruntime keeps a device id and usage events under ~/.cache and may upload them: not on
# an inspection drone, whichever way it was started (the unit and the image set it too).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # after the telemetry switch

from agent.contract import MANIFEST_FILE, FileRef, ModelManifest
from agent.engine.onnxproto import Attribute, parse_nodes

TREE_OP = "TreeEnsembleClassifier"
# post_transform of the tree node for each objective, as onnxmltools writes it.
POST_TRANSFORM = {
    "binary:logistic": "LOGISTIC",
    "multi:softprob": "LOGISTIC",  # two classes fold into one score, as binary:logistic
    "multi:softmax": "NONE",
}
PROBABILITY_TOLERANCE = 1e-5


class ModelError(ValueError):
    """A model, manifest or table that must not be served; the message says exactly why."""


class RuntimeFaultError(ModelError):
    """onnxruntime failed on a model for the device's sake (memory short, a thread it could
    not start), not the model's: worth trying again later."""


# onnxruntime's own exception types that say "the runtime failed", not "the model is bad"
# (those are InvalidGraph, InvalidProtobuf, InvalidArgument, NoSuchFile, NotImplemented...).
_RUNTIME_FAULTS = frozenset({"RuntimeException", "Fail", "EngineError", "EPFail"})


def runtime_fault(exc: BaseException) -> bool:
    """True for a failure of onnxruntime or of memory rather than of the model."""
    kind = type(exc)
    return isinstance(exc, (MemoryError, RuntimeFaultError)) or (
        kind.__module__.startswith("onnxruntime") and kind.__name__ in _RUNTIME_FAULTS
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Size first (cheap, stops a lying 2 GB claim), then the hash."""
    try:
        actual = path.stat().st_size
        digest = sha256_file(path) if actual == size else ""
    except OSError as exc:  # a missing file, or a bad block on a device's SD card
        raise ModelError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    if actual != size:
        raise ModelError(f"{what} {path}: size {actual} bytes, manifest says {size}")
    if digest != sha256:
        raise ModelError(f"{what} {path}: sha256 {digest} does not match manifest {sha256}")


def verified(folder: Path, ref: FileRef, what: str) -> Path:
    """The path of a file the manifest pins, after verify_file."""
    path = folder / ref.file
    verify_file(path, ref.size, ref.sha256, what)
    return path


def resolve_manifest(model: Path) -> Path:
    """MODEL may be a manifest, a folder holding one, or an .onnx with its manifest beside it."""
    if model.is_dir():
        model = model / MANIFEST_FILE
    elif model.suffix == ".onnx":
        model = model.with_name(MANIFEST_FILE)
    if not model.is_file():
        raise ModelError(f"{model}: no model manifest here")
    return model


@dataclass(frozen=True)
class TreeNode:
    """The single tree-ensemble node of an exported model, with its attributes decoded."""

    attrs: dict[str, Attribute]

    def ints(self, key: str) -> np.ndarray:
        return np.asarray(self.attrs.get(key, []), dtype=np.int64)

    def floats(self, key: str) -> np.ndarray:
        return np.asarray(self.attrs.get(key, []), dtype=np.float64)

    def strings(self, key: str) -> list[str]:
        value = self.attrs.get(key, [])
        return [str(v) for v in value] if isinstance(value, list) else []

    def text(self, key: str, default: str = "") -> str:
        value = self.attrs.get(key, default)
        return value if isinstance(value, str) else default


def read_tree(path: Path) -> TreeNode:
    """Parse the ONNX file and decode its one tree-ensemble node."""
    try:
        nodes = parse_nodes(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc
    trees = [attrs for op, attrs in nodes if op == TREE_OP]
    others = sorted({op for op, _ in nodes} - {TREE_OP})
    if len(trees) != 1 or others:
        raise ModelError(
            f"{path}: expected one {TREE_OP} node and nothing else, "
            f"found {len(trees)} and {others or 'no other ops'}"
        )
    return TreeNode(trees[0])


def onnx_session(
    onnx_path: Path, threads: int = 1, *, optimize: bool = False
) -> ort.InferenceSession:
    """A CPU session sized for tree ensembles (graph optimizations off: nothing to fuse in one
    tree node), or, with `optimize`, for a network (conv and activation fusion pay there); a
    model onnxruntime refuses is a ModelError."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = False  # tiny batches: an arena only holds on to memory
    options.enable_mem_pattern = False
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        reason = str(exc).splitlines()[0][-300:] if str(exc) else type(exc).__name__
        if runtime_fault(exc):
            msg = f"{onnx_path}: onnxruntime failed to load it: {reason}"
            raise RuntimeFaultError(msg) from exc
        raise ModelError(f"{onnx_path}: onnxruntime refuses the model: {reason}") from exc


def checked_session(
    onnx_path: Path,
    what: str,
    input_tail: list[int],
    output: str,
    output_width: int,
    *,
    threads: int = 1,
    optimize: bool = False,
) -> tuple[ort.InferenceSession, str]:
    """A session of a side model (box scorer, scene embedder) whose one input is
    [N, *input_tail] and whose `output` is [N, output_width]; returns it and its input name."""
    session = onnx_session(onnx_path, threads, optimize=optimize)
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape)[1:] != input_tail:
        shapes = [i.shape for i in inputs]
        raise ModelError(f"{onnx_path}: {what} inputs {shapes}, expected [N, {input_tail}]")
    outputs = {o.name: o for o in session.get_outputs()}
    if output not in outputs:
        raise ModelError(f"{onnx_path}: no output {output!r} (has {sorted(outputs)})")
    shape = outputs[output].shape
    if len(shape) != 2 or shape[1] != output_width:
        raise ModelError(f"{onnx_path}: output {output!r} is {shape}, expected [N, {output_width}]")
    return session, inputs[0].name


def worst_miss(got: np.ndarray, want: np.ndarray, tolerance: float) -> int | None:
    """Index of the answer furthest outside `tolerance` (relative above 1 in magnitude), or
    None when all are inside; a NaN or a wrong count is always outside."""
    got = np.asarray(got, np.float64).reshape(-1)
    want = np.asarray(want, np.float64).reshape(-1)
    if got.shape != want.shape:
        return 0
    excess = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    bad = ~(excess <= tolerance)  # NaN compares False: counted as bad
    if not bad.any():
        return None
    return int(np.argmax(np.where(np.isnan(excess), np.inf, excess)))


class PixelModel:
    """A verified ONNX model with its manifest: the reference every fast path must equal."""

    def __init__(
        self, manifest: ModelManifest, onnx_path: Path, tree: TreeNode, *, threads: int = 1
    ) -> None:
        self.manifest = manifest
        self.path = onnx_path
        self.tree = tree
        self._check_tree()
        self.session = onnx_session(onnx_path, threads)
        self._check_signature()

    @classmethod
    def load(cls, manifest_path: Path, *, threads: int = 1) -> PixelModel:
        """Load a manifest and its ONNX file; refuse anything that does not fit.

        `threads` are onnxruntime's intra-op threads: a colour model only runs its load
        checks through the session, a feature model classifies every frame with it.
        """
        manifest = ModelManifest.read(manifest_path)
        onnx_path = manifest_path.parent / manifest.model.file
        verify_file(onnx_path, manifest.model.size, manifest.model.sha256, "model")
        model = cls(manifest, onnx_path, read_tree(onnx_path), threads=threads)
        model.check_golden()
        return model

    def _check_tree(self) -> None:
        """The tree node must be the binary layout the table compiler and manifest assume."""
        m, where = self.manifest, self.path
        labels = self.tree.ints("classlabels_int64s").tolist()
        if labels != [0, 1]:
            raise ModelError(f"{where}: classes {labels}, expected exactly [0, 1]")
        if np.any(self.tree.ints("class_ids") != 0):
            raise ModelError(
                f"{where}: the tree node keeps separate weights per class; onnxruntime reads a "
                "2-class node as binary and does not compute xgboost's softmax from it. "
                "Export it with `corrosion-export convert`, which folds the classes into one score"
            )
        width = len(m.input.features)
        features = self.tree.ints("nodes_featureids")
        if len(features) and (features.min() < 0 or features.max() >= width):
            raise ModelError(
                f"{where}: a tree reads feature {features.max()}, but the manifest names "
                f"{width} features"
            )
        transform = self.tree.text("post_transform", "NONE")
        expected = POST_TRANSFORM[m.output.objective]
        if transform != expected:
            declared = f"{m.output.kind} ({m.output.objective})"
            actual = "labels only" if transform == "NONE" else f"probabilities ({transform})"
            raise ModelError(f"{where}: manifest declares {declared} but the model gives {actual}")

    def _check_signature(self) -> None:
        """Inputs and outputs must be what the manifest names."""
        m, where = self.manifest, self.path
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{where}: expected 1 input, found {len(inputs)}")
        inp = inputs[0]
        if inp.name != m.input.name:
            raise ModelError(
                f"{where}: input is named {inp.name!r}, manifest says {m.input.name!r}"
            )
        if inp.type != "tensor(float)":
            raise ModelError(f"{where}: input type {inp.type}, expected tensor(float)")
        width = len(m.input.features)
        if len(inp.shape) != 2 or inp.shape[1] != width:
            raise ModelError(f"{where}: input shape {inp.shape}, expected [N, {width}]")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for name, kind in ((m.output.label, "tensor(int64)"), (m.output.scores, "tensor(float)")):
            if name not in outputs:
                raise ModelError(f"{where}: no output {name!r} (has {sorted(outputs)})")
            if outputs[name].type != kind:
                raise ModelError(f"{where}: output {name!r} is {outputs[name].type}, not {kind}")

    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels at the manifest threshold and P(corroded) (None for labels-only models)."""
        x = np.ascontiguousarray(rows, dtype=np.float32).reshape(
            -1, len(self.manifest.input.features)
        )
        out = self.manifest.output
        label, scores = self.session.run([out.label, out.scores], {self.manifest.input.name: x})
        if out.kind == "labels":
            return np.asarray(label, dtype=np.uint8), None
        proba = np.asarray(scores, dtype=np.float32)[:, 1]
        labels = (proba >= np.float32(self.manifest.decision.pixel_threshold)).astype(np.uint8)
        return labels, proba

    def check_golden(self) -> None:
        """The on-device smoke test: every golden colour must get its recorded answer."""
        golden = self.manifest.golden
        rows = np.array([g.rgb if g.features is None else g.features for g in golden], np.float32)
        labels, proba = self.predict(rows)
        for i, sample in enumerate(golden):
            if labels[i] != sample.label:
                raise ModelError(
                    f"{self.path}: golden sample {i} rgb={sample.rgb} gives label {labels[i]}, "
                    f"manifest expects {sample.label}"
                )
            expected = sample.probability
            if (
                proba is not None
                and expected is not None
                and abs(float(proba[i]) - expected) > PROBABILITY_TOLERANCE
            ):
                raise ModelError(
                    f"{self.path}: golden sample {i} rgb={sample.rgb} gives P={proba[i]:.6f}, "
                    f"manifest expects {expected:.6f}"
                )
