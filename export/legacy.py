"""Old XGBoost models: the pre-JSON binary format and Boosters pickled by old containers.

xgboost >= 3.1 reads neither, yet SageMaker's built-in XGBoost containers before the JSON
era wrote `xgboost-model` as one or the other, so older `model.tar.gz` archives hold one.
The binary format is a fixed little-endian C layout written through dmlc-core streams
(xgboost's src/learner.cc, gbm/gbtree_model.h and tree/tree_model.cc): parsed here into
xgboost's JSON model schema, which current xgboost reads, so no old library is needed. Each
tree's structure is checked first: xgboost trusts it, and a bad index crashes the process. A
pickle is opened by an unpickler that builds nothing but a Booster's state from byte strings,
so an untrusted file can neither run code nor allocate without bound. Bytes in none of
these forms (a CSV, another JSON document, another object's pickle) raise NotAModelError,
not counts read from them as if they were a header. tests/test_legacy.py proves predictions
equal to those of the xgboost versions that wrote its fixtures (0.90, 1.0.2 and 1.7.6).
"""

from __future__ import annotations

import codecs
import io
import json
import math
import pickle
import re
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xgboost as xgb

BINARY_HEADER = b"binf"  # optional, before the learner parameters (1.x writes it)
SNAPSHOT_HEADER = b"CONFIG-offset:"  # 1.0-1.2 pickles: binary model, then a JSON config
LEARNER_PARAM = struct.Struct("<fIiiiII27i")  # LearnerModelParamLegacy, 136 bytes
GBTREE_PARAM = struct.Struct("<iiiiqii32i")  # GBTreeModelParam, 160 bytes
TREE_PARAM = struct.Struct("<iiiiii31i")  # TreeParam, 148 bytes
NODE = np.dtype([("parent", "<i4"), ("left", "<i4"), ("right", "<i4"),
                 ("sindex", "<u4"), ("value", "<f4")])  # fmt: skip
STAT = np.dtype([("loss_chg", "<f4"), ("sum_hess", "<f4"), ("base_weight", "<f4"),
                 ("leaf_child_cnt", "<i4")])  # fmt: skip
LOGISTIC = ("binary:logistic", "reg:logistic")  # before 1.0 their base score was a margin
SOFTMAX = ("multi:softmax", "multi:softprob")
SCHEMA = (1, 7, 0)  # the JSON model schema written: current xgboost reads 1.6 and later as is
MAX_STRING = 1 << 20
MAX_COUNT = 1 << 24
MAX_CLASSES = 1 << 10  # prediction allocates rows x classes: a hostile count must not
MAX_FEATURES = 1 << 20
# What every binary model's header holds, whatever its counts: bytes without it are no model,
# and counts read from them would be made up (a CSV read as a header gives 875637808 classes).
OBJECTIVE_NAME = re.compile(r"(?:gpu:)?[a-z_]+:[a-z_]+")  # binary:logistic, rank:ndcg...
GPU = "gpu:"  # 0.7x-0.90 objectives run on a GPU (gpu:binary:logistic): the same maths
BOOSTERS = ("gbtree", "gblinear", "dart")
LAST_BINARY_MAJOR = 3  # the major versions that had the binary format (3.1 dropped it)
EXPECTED = "expected JSON, UBJ, the legacy binary or a pickled Booster"


class LegacyFormatError(ValueError):
    """An old model that cannot be read; the message says what is wrong with it."""


class NotAModelError(LegacyFormatError):
    """Bytes that are no XGBoost model in any form read here (another JSON document, another
    object's pickle, a CSV): advice on migrating an old model would mislead."""


def is_pickle(data: bytes) -> bool:
    """A pickled Booster: protocol 2-5 (PROTO opcode) or 0-1 (starts by naming the class)."""
    return (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or (
        data.startswith(b"cxgboost.core\nBooster\n")
    )


def booster(data: bytes) -> xgb.Booster:
    """The Booster in any model file xgboost ever wrote: JSON or UBJSON (xgboost reads them),
    an old binary model, a memory snapshot or a pickled Booster."""
    if is_pickle(data):
        return _either("as a pickle", lambda: _from_snapshot(_unpickle(data)), data)
    if data.startswith(b"{"):
        return _either("as JSON/UBJSON", lambda: _document(data), data)
    if data.startswith(SNAPSHOT_HEADER) or _binary_header(data):
        return _from_snapshot(data)
    raise NotAModelError(EXPECTED)


def _either(first: str, attempt: Callable[[], xgb.Booster], data: bytes) -> xgb.Booster:
    """A pre-1.0 binary model starts with its base score, whose first byte can look like a
    pickle or JSON: when reading it `first` way fails and it starts as a binary model does,
    it is read as binary, and an error names both attempts."""
    try:
        return attempt()
    except LegacyFormatError as exc:
        if not _binary_header(data):  # what the file looked like is all it can be
            if isinstance(exc, NotAModelError):
                raise
            raise LegacyFormatError(f"{first}: {exc}") from None
        try:
            return _binary(data)
        except LegacyFormatError as binary:
            raise LegacyFormatError(f"{first}: {exc}; as a binary model: {binary}") from None


def _xgboost(data: bytes, *, snapshot: bool) -> xgb.Booster:
    """xgboost's own reading of a JSON/UBJSON model, or of a pickle's memory snapshot."""
    out = xgb.Booster()
    try:
        if snapshot:
            with warnings.catch_warnings():  # its advice (re-save with the old version) is ours
                warnings.simplefilter("ignore")
                out.__setstate__({"handle": bytearray(data)})
        else:
            out.load_model(bytearray(data))
    except xgb.core.XGBoostError as exc:
        raise LegacyFormatError(_first(exc)) from exc
    return out


def _document(data: bytes) -> xgb.Booster:
    """A JSON/UBJSON model. JSON without a `learner` is another document (a training record,
    a manifest), which xgboost answers with a cast error that says nothing of the kind."""
    try:
        return _xgboost(data, snapshot=False)
    except LegacyFormatError:
        if _other_json(data):
            raise NotAModelError("JSON without the `learner` an XGBoost model holds") from None
        raise


def _other_json(data: bytes) -> bool:
    """JSON that parses but is no model document."""
    try:
        document = json.loads(data)
    except ValueError:  # UBJSON, or broken JSON: only xgboost can say what is wrong
        return False
    return not (isinstance(document, dict) and "learner" in document)


def _binary_header(data: bytes) -> bool:
    """Whether `data` starts as a binary model does: learner parameters with 0/1 flags and a
    version xgboost had, then an objective and a booster name. Counts are left out: a model
    whose class count is damaged is still one, and its error says so."""
    r = _Reader(data)
    if data.startswith(BINARY_HEADER):
        r.take(len(BINARY_HEADER), "header")
    try:
        _, _, _, extra, eval_metrics, major, *_ = r.unpack(LEARNER_PARAM, "the parameters")
        objective, gbm = r.string("the objective name"), r.string("the booster name")
    except LegacyFormatError:
        return False
    return (
        extra in (0, 1)
        and eval_metrics in (0, 1)
        and major <= LAST_BINARY_MAJOR
        and OBJECTIVE_NAME.fullmatch(objective) is not None
        and gbm in BOOSTERS
    )


def _from_snapshot(raw: bytes) -> xgb.Booster:
    """A pickle's `handle` (or a file): a 1.3+ JSON/UBJSON memory snapshot, a 1.0-1.2 one
    (binary model, then JSON config), or a binary model."""
    if raw.startswith(b"{"):
        return _either("as a snapshot", lambda: _xgboost(raw, snapshot=True), raw)
    if raw.startswith(SNAPSHOT_HEADER):
        start = len(SNAPSHOT_HEADER) + 8
        if len(raw) < start:
            raise LegacyFormatError("memory snapshot cut short")
        (size,) = struct.unpack_from("<q", raw, len(SNAPSHOT_HEADER))
        if not 0 < size <= len(raw) - start:
            raise LegacyFormatError(f"memory snapshot gives a model of {size} bytes")
        raw = raw[start : start + size]
    return _binary(raw)


def _binary(raw: bytes) -> xgb.Booster:
    out = xgb.Booster()
    try:
        out.load_model(bytearray(json.dumps(to_json(raw)).encode()))
    except xgb.core.XGBoostError as exc:
        raise LegacyFormatError(f"xgboost rejects the parsed model ({_first(exc)})") from exc
    return out


def _first(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Reader:
    """Bounds-checked reads of a dmlc stream."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise LegacyFormatError(f"file ends inside {what} (byte {self.at} of {len(self.data)})")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size, what))

    def count(self, what: str, limit: int = MAX_COUNT) -> int:
        (n,) = struct.unpack("<Q", self.take(8, what))
        if n > limit:
            raise LegacyFormatError(f"{what} gives a length of {n}: not an XGBoost model")
        return int(n)

    def string(self, what: str) -> str:
        raw = self.take(self.count(what, MAX_STRING), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise LegacyFormatError(f"{what} is not text: not an XGBoost model") from None

    def array(self, dtype: np.dtype[Any], n: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(dtype.itemsize * n, what), dtype)


def to_json(data: bytes) -> dict[str, Any]:
    """The JSON model document (xgboost's 1.7 schema) of a binary model."""
    r = _Reader(data)
    if data.startswith(BINARY_HEADER):
        r.take(len(BINARY_HEADER), "header")
    base_score, num_feature, num_class, extra, _, major, *_ = r.unpack(
        LEARNER_PARAM, "the learner parameters"
    )
    if not 0 <= num_class <= MAX_CLASSES or not 0 < num_feature <= MAX_FEATURES:
        raise LegacyFormatError(f"{num_class} classes of {num_feature} features: unreadable")
    objective, gbm = r.string("the objective name"), r.string("the booster name")
    objective = objective.removeprefix(GPU)
    if gbm != "gbtree":
        raise LegacyFormatError(f"booster {gbm!r}: only gbtree models hold pixel classifiers")
    ensemble = r.unpack(GBTREE_PARAM, "the tree ensemble parameters")
    num_trees, leaf_vector = ensemble[0], ensemble[6]
    if not 0 <= num_trees <= MAX_COUNT or leaf_vector:
        raise LegacyFormatError(f"{num_trees} trees with leaf vectors {leaf_vector}: unreadable")
    trees = [_tree(r, i, num_feature) for i in range(num_trees)]
    groups = r.array(np.dtype("<i4"), num_trees, "the tree groups")
    if np.any((groups < 0) | (groups >= max(num_class, 1))):
        raise LegacyFormatError(f"a tree's class group lies outside 0..{max(num_class, 1) - 1}")
    tree_info = groups.tolist()
    attributes: dict[str, str] = {}
    if extra:
        for _ in range(r.count("the attributes")):
            key = r.string("an attribute name")
            attributes[key] = r.string(f"attribute {key!r}")
    config = _objective(objective, num_class, attributes.pop("objective", None))
    kept = {
        k: v for k, v in attributes.items() if k != "metrics" and not k.startswith("SAVED_PARAM_")
    }
    if major < 1:  # before 1.0 the base score was saved as a margin
        base_score = _from_margin(objective, base_score)
    return {
        "version": list(SCHEMA),
        "learner": {
            "attributes": kept,
            "feature_names": [],
            "feature_types": [],
            "gradient_booster": {
                "name": "gbtree",
                "model": {
                    "gbtree_model_param": {"num_trees": str(num_trees), "num_parallel_tree": "1"},
                    "tree_info": tree_info,
                    "trees": trees,
                },
            },
            "learner_model_param": {
                "base_score": repr(float(base_score)),
                "num_class": str(num_class),
                "num_feature": str(num_feature),
                "num_target": "1",
                "boost_from_average": "0",  # a trained model: its base score stays as saved
            },
            "objective": config,
        },
    }


def _tree(r: _Reader, index: int, features: int) -> dict[str, Any]:
    what = f"tree {index}"
    _, num_nodes, num_deleted, _, num_feature, leaf_vector, *_ = r.unpack(TREE_PARAM, what)
    if not 0 < num_nodes <= MAX_COUNT or leaf_vector:
        raise LegacyFormatError(f"{what}: {num_nodes} nodes, leaf vectors {leaf_vector}")
    nodes = r.array(NODE, num_nodes, f"{what}'s nodes")
    stats = r.array(STAT, num_nodes, f"{what}'s node statistics")
    sindex = nodes["sindex"]
    parents = nodes["parent"].view("<u4") & 0x7FFFFFFF  # the top bit marks a left child
    problem = _shape_problem(nodes["left"], nodes["right"], parents, sindex & 0x7FFFFFFF, features)
    if problem:  # xgboost trusts the layout: a bad index would crash it, not raise
        raise LegacyFormatError(f"{what}: {problem}")
    return {
        "id": index,
        "tree_param": {
            "num_nodes": str(num_nodes),
            "num_deleted": str(num_deleted),
            "num_feature": str(num_feature),
            "size_leaf_vector": "0",
        },
        "parents": parents.tolist(),
        "left_children": nodes["left"].tolist(),
        "right_children": nodes["right"].tolist(),
        "split_indices": (sindex & 0x7FFFFFFF).tolist(),
        "default_left": (sindex >> 31).tolist(),
        "split_conditions": nodes["value"].tolist(),  # a leaf keeps its value here
        "split_type": [0] * num_nodes,
        "loss_changes": stats["loss_chg"].tolist(),
        "sum_hessian": stats["sum_hess"].tolist(),
        "base_weights": stats["base_weight"].tolist(),
        "categories": [],
        "categories_nodes": [],
        "categories_segments": [],
        "categories_sizes": [],
    }


def _shape_problem(
    left: np.ndarray, right: np.ndarray, parents: np.ndarray, split: np.ndarray, features: int
) -> str | None:
    """What makes these nodes no tree: walked from the root, each node reached once, each child
    naming its parent, splits on known features; None when they are one."""
    if parents[0] != 0x7FFFFFFF:
        return "its root has a parent"
    seen, todo = {0}, [0]
    while todo:
        node = todo.pop()
        kids = (int(left[node]), int(right[node]))
        if kids == (-1, -1):
            continue
        if split[node] >= features:
            return f"node {node} splits on feature {split[node]} of {features}"
        for kid in kids:
            if not 0 < kid < len(left) or kid in seen or parents[kid] != node:
                return f"node {node} has child {kid}, not a node of its own below it"
            seen.add(kid)
            todo.append(kid)
    return None


def _objective(name: str, num_class: int, saved: str | None) -> dict[str, Any]:
    """The objective's JSON configuration: 1.x saved it as an attribute; before, its name."""
    if saved is not None:
        try:
            config = json.loads(saved)
        except json.JSONDecodeError:
            raise LegacyFormatError("its `objective` attribute is not JSON") from None
        if isinstance(config, dict) and config.get("name") == name:
            return config
        raise LegacyFormatError(f"its `objective` attribute does not describe {name!r}")
    if name in LOGISTIC:
        return {"name": name, "reg_loss_param": {"scale_pos_weight": "1"}}
    if name in SOFTMAX:
        return {"name": name, "softmax_multiclass_param": {"num_class": str(num_class)}}
    raise LegacyFormatError(
        f"objective {name!r} from xgboost < 1.0 is not a classifier this reader knows"
    )


def _from_margin(objective: str, margin: float) -> float:
    """The base score as 1.0+ saves it (what the user gave) from the margin 0.x saved."""
    if not math.isfinite(margin):
        raise LegacyFormatError(f"base score {margin}")
    if objective in LOGISTIC:
        return 0.5 * (1.0 + math.tanh(0.5 * margin))  # the sigmoid, without overflow
    return margin


class _State:
    """What a pickled xgboost Booster unpickles to here: its attribute dict, nothing run."""

    state: dict[str, Any]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def _bytearray(data: bytes | str = b"", encoding: str = "latin-1") -> bytearray:
    """bytearray as a Booster's pickle uses it (bytes, or Python 2's latin-1 text), never a
    size: bytearray(2**31) in a pickle would allocate it."""
    if isinstance(data, bytes):
        return bytearray(data)
    if isinstance(data, str) and codecs.lookup(encoding).name == "iso8859-1":
        return bytearray(data.encode("latin-1"))
    raise LegacyFormatError("the pickle builds a byte array from something other than bytes")


def _latin1(text: str, encoding: str = "latin-1") -> bytes:
    """_codecs.encode as protocol 2 uses it for bytes; no other codec (hex would double)."""
    if isinstance(text, str) and codecs.lookup(encoding).name == "iso8859-1":
        return text.encode("latin-1")
    raise LegacyFormatError("the pickle encodes something other than latin-1 text")


class _Unpickler(pickle.Unpickler):
    """Admits only a Booster's class (built as _State) and the byte strings its state holds."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("xgboost.core", "Booster"): _State,
            ("builtins", "bytearray"): _bytearray,
            ("_codecs", "encode"): _latin1,  # protocol 2 writes bytes through it
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        # xgboost's other classes (a pickled XGBClassifier) are models to migrate; others not
        error = LegacyFormatError if module.partition(".")[0] == "xgboost" else NotAModelError
        raise error(f"the pickle asks for {module}.{name}, not an xgboost Booster")


def _unpickle(data: bytes) -> bytes:
    """The raw model bytes (`handle`) of a pickled Booster."""
    try:
        obj = _Unpickler(io.BytesIO(data), encoding="latin-1").load()  # Python 2's str too
    except LegacyFormatError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same
        raise LegacyFormatError(f"unreadable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, _State):
        raise NotAModelError("the pickle holds no xgboost Booster")
    state = getattr(obj, "state", None)
    handle = state.get("handle") if isinstance(state, dict) else None
    if not isinstance(handle, bytes | bytearray) or not handle:
        raise LegacyFormatError("the pickled xgboost Booster holds no model bytes")
    return bytes(handle)
