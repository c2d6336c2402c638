"""XGBoost booster -> ONNX + manifest + exact colour table, with parity proven.

onnxmltools does the conversion; our job is to prove it: labels identical to xgboost's and
probabilities within 1e-5 over every colour (an RGB model has only 2^24 inputs, so we can
check them all), then to write the manifest the device verifies against. A feature model's
inputs cannot be enumerated: it is proven on a large sample of real feature rows (its
training rows), and ships no table.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import takewhile
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
import onnx
import onnxmltools
import xgboost as xgb
from onnxmltools.convert.common.data_types import FloatTensorType

from agent.contract import (
    MANIFEST_FILE,
    Decision,
    FileRef,
    GoldenSample,
    InputSpec,
    ModelManifest,
    OutputSpec,
    Provenance,
    RegionScorerSpec,
    SceneSpec,
)
from agent.contract.manifest import PIXEL_THRESHOLD_RANGE, FeatureSpec
from agent.engine.features import RGB_FEATURES, FeaturePipeline
from agent.engine.model import POST_TRANSFORM, TREE_OP, PixelModel, read_tree, sha256_file
from agent.engine.table import compile_table, save_table
from export import legacy

ONNX_FILE = "model.onnx"
TABLE_FILE = "table.npy"
EXPORT_FILES = (ONNX_FILE, TABLE_FILE, MANIFEST_FILE)  # what `convert` owns in its --out
SAGEMAKER_MEMBER = "xgboost-model"  # the model's name in SageMaker's model.tar.gz
# A model member is read whole (xgboost parses bytes): a pixel model is tens of MB, twice the
# device's default max_model_bytes is room to spare, and a wrong archive's only file (a
# dataset, images) is refused from its header before it can take the machine's memory.
MAX_MEMBER_BYTES = 512 << 20
COLOURS = 1 << 24
PARITY_TOLERANCE = 1e-5
UNPROVEN = "xgboost/onnxruntime parity not proven (exported with --skip-parity)"
GOLDEN_COUNT = 128
GOLDEN_MARGIN = 1e-4
CHUNK = 1 << 20
HEAD_BYTES = 32  # of a file that is no model, shown so that the user sees what it is


class ConvertError(ValueError):
    """A model that cannot be exported faithfully; the message says why and what to do."""


@dataclass(frozen=True)
class Objective:
    name: str
    num_class: int

    @property
    def kind(self) -> str:
        return "labels" if self.name == "multi:softmax" else "probabilities"


def objective_of(booster: xgb.Booster) -> Objective:
    config = json.loads(booster.save_config())["learner"]
    name = config["objective"]["name"]
    num_class = int(config["learner_model_param"].get("num_class", "0"))
    if name not in ("binary:logistic", "multi:softprob", "multi:softmax"):
        raise ConvertError(f"objective {name!r} is not a pixel classifier we can serve")
    if name.startswith("multi:") and num_class != 2:
        raise ConvertError(f"{name} with num_class={num_class}: only 2 classes are supported")
    return Objective(name, num_class)


def load_booster(path: Path) -> xgb.Booster:
    """A JSON, UBJ, old binary or pickled model file (export.legacy), or SageMaker's
    model.tar.gz holding `xgboost-model` as any of them (see `archive_member`)."""
    if path.name.endswith((".tar.gz", ".tgz")):
        where, data = archive_member(path)
    else:
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConvertError(f"{path}: cannot read the model: {exc.strerror or exc}") from None
    try:
        return legacy.booster(data)  # JSON, UBJ, or what xgboost >= 3.1 no longer reads
    except legacy.NotAModelError as exc:  # a CSV, a training record: show what it is instead
        raise ConvertError(f"{where}: not an XGBoost model ({exc}; {_head(data)})") from exc
    except legacy.LegacyFormatError as exc:
        raise ConvertError(
            f"{where}: cannot read this model ({str(exc).strip().splitlines()[0]}); if an older "
            "xgboost wrote it, load it there and save_model('model.json') to migrate"
        ) from exc


def _head(data: bytes) -> str:
    """The first bytes, escaped as Python writes bytes: text stays readable, binary exact."""
    if not data:
        return "it is empty"
    more = "..." if len(data) > HEAD_BYTES else ""
    return f"it starts with {str(data[:HEAD_BYTES])[1:]}{more}"


def archive_member(path: Path) -> tuple[str, bytes]:
    """The model in a .tar.gz, as (`ARCHIVE!MEMBER` for messages, its bytes): the one file
    named `xgboost-model` (in any folder), else the archive's only file. Of several other
    files, which one is the model would be a guess, so that is refused, as is a member
    larger than MAX_MEMBER_BYTES."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            if not files:
                raise ConvertError(f"{path}: archive holds no model file")
            named = [m for m in files if PurePosixPath(m.name).name == SAGEMAKER_MEMBER]
            candidates = named or files
            if len(candidates) > 1:
                what = (
                    f"{len(named)} {SAGEMAKER_MEMBER} members"
                    if named
                    else f"no {SAGEMAKER_MEMBER} but {len(files)} files"
                )
                listed = ", ".join(m.name for m in candidates[:5])
                raise ConvertError(
                    f"{path}: {what} ({listed}{', ...' if len(candidates) > 5 else ''}); "
                    "extract the model and convert that file"
                )
            member = candidates[0]
            where = f"{path}!{member.name}"
            if member.size > MAX_MEMBER_BYTES:
                raise ConvertError(
                    f"{where}: {member.size} bytes, over the {MAX_MEMBER_BYTES >> 20} MiB a "
                    "model member may have: is this the right archive? If it is, extract the "
                    "model and convert that file"
                )
            reader = tar.extractfile(member)
            assert reader is not None  # a regular file
            return where, reader.read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ConvertError(f"{path}: not a readable .tar.gz archive ({exc})") from None


def to_onnx(booster: xgb.Booster, n_features: int = 3) -> bytes:
    """onnxmltools rejects feature names such as `R`: clear them on a copy first."""
    clean = booster.copy()
    clean.feature_names = None
    clean.feature_types = None
    initial = [("input", FloatTensorType([None, n_features]))]
    proto = onnxmltools.convert_xgboost(clean, initial_types=initial)
    objective = objective_of(booster)
    if objective.name.startswith("multi:"):
        _fold_two_classes(proto, objective)
    return cast(bytes, proto.SerializeToString())


def _fold_two_classes(proto: onnx.ModelProto, objective: Objective) -> None:
    """Rewrite a 2-class softmax node as one margin, the form onnxruntime computes right.

    onnxmltools writes one weight set per class, but onnxruntime treats a 2-label node as
    binary and answers something else than xgboost (measured: every margin off). With
    d = margin1 - margin0, softmax gives P1 = sigmoid(d) and argmax gives d > 0, so a
    single score with LOGISTIC (softprob) or NONE (softmax, labels) is exactly the model.
    """
    node = next(n for n in proto.graph.node if n.op_type == TREE_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    class_ids = np.asarray(attrs["class_ids"])
    weights = np.asarray(attrs["class_weights"], dtype=np.float32)
    base = attrs.get("base_values") or [0.0, 0.0]
    replaced = {
        "class_ids": [0] * len(class_ids),
        "class_weights": np.where(class_ids == 1, weights, -weights).tolist(),
        "base_values": [float(np.float32(base[1]) - np.float32(base[0]))],
        "post_transform": POST_TRANSFORM[objective.name],
    }
    kept = [a for a in node.attribute if a.name not in replaced]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in replaced.items())


def all_colours(start: int, stop: int) -> np.ndarray:
    """Colours start..stop-1 of the R << 16 | G << 8 | B order, as float32 [N, 3]."""
    idx = np.arange(start, stop, dtype=np.int64)
    return np.column_stack(((idx >> 16) & 255, (idx >> 8) & 255, idx & 255)).astype(np.float32)


def xgb_predict(booster: xgb.Booster, objective: Objective, rgb: np.ndarray) -> np.ndarray:
    """P(corroded) for probability models, the label for multi:softmax."""
    out = np.asarray(booster.inplace_predict(rgb))
    if objective.name == "multi:softprob":
        return np.asarray(out[:, 1])
    return out


def _disagreements(
    booster: xgb.Booster,
    model: PixelModel,
    objective: Objective,
    rows: np.ndarray,
    *,
    ties: bool = False,
) -> np.ndarray:
    """Rows where onnxruntime and xgboost differ: label, or probability beyond tolerance.

    With `ties`, a label may differ where P lies within the tolerance of the threshold:
    float32 sums in another order land on either side (the device follows onnxruntime).
    """
    ref = xgb_predict(booster, objective, rows)
    labels, proba = model.predict(rows)
    if proba is None:
        return np.flatnonzero(labels != ref.astype(np.uint8))
    bad = np.flatnonzero(np.abs(proba - ref) > PARITY_TOLERANCE)
    if len(bad):
        return bad
    threshold = np.float32(model.manifest.decision.pixel_threshold)
    differ = labels != (ref.astype(np.float32) >= threshold)
    if ties:
        differ &= np.abs(ref - threshold) > PARITY_TOLERANCE
    return np.flatnonzero(differ)


def check_parity(booster: xgb.Booster, model: PixelModel, objective: Objective) -> int:
    """Compare xgboost and onnxruntime over every colour; returns colours checked."""
    for start in range(0, COLOURS, CHUNK):
        rgb = all_colours(start, start + CHUNK)
        bad = _disagreements(booster, model, objective, rgb)
        if len(bad):
            colour = rgb[bad[0]].astype(int).tolist()
            raise ConvertError(
                f"ONNX and xgboost disagree on {len(bad)} colours of chunk {start}, e.g. {colour}"
            )
    return COLOURS


def parity_proven(objective: Objective, pixel_threshold: float) -> str:
    """What check_parity has proven of a colour model, in words, for `convert` to say."""
    if objective.kind == "labels":
        return f"onnxruntime gives xgboost's label for every one of the {COLOURS} colours"
    return (
        f"onnxruntime matches xgboost on every one of the {COLOURS} colours: probabilities "
        f"within {PARITY_TOLERANCE:g}, the same label at pixel threshold {pixel_threshold:g}"
    )


def check_sample_parity(
    booster: xgb.Booster, model: PixelModel, objective: Objective, rows: np.ndarray
) -> int:
    """Compare xgboost and onnxruntime on feature rows; returns rows checked.

    Continuous features put some rows within float error of the threshold, where the two
    runtimes may label differently (see `_disagreements`); colours never did.
    """
    for start in range(0, len(rows), CHUNK):
        chunk = np.ascontiguousarray(rows[start : start + CHUNK], np.float32)
        bad = _disagreements(booster, model, objective, chunk, ties=True)
        if len(bad):
            raise ConvertError(
                f"ONNX and xgboost disagree on {len(bad)} sample rows, e.g. row {start + bad[0]}"
            )
    return len(rows)


def golden_samples(
    model: PixelModel, rng: np.random.Generator, pool: np.ndarray | None = None
) -> tuple[GoldenSample, ...]:
    """Rows nearest the boundary, where a broken model shows first, plus some of each label.

    `pool` holds feature rows to draw from (a feature model's); a colour model draws random
    colours.
    """
    names = model.manifest.input.features
    if pool is None:
        rows = rng.integers(0, 256, size=(1 << 16, 3)).astype(np.float32)
    else:
        rows = pool[rng.choice(len(pool), min(len(pool), 1 << 16), replace=False)]
    labels, proba = model.predict(rows)
    score = proba if proba is not None else labels.astype(np.float32)
    # Nearest the threshold, yet not within float error of it, where another CPU's float32
    # sums could land on the other side and fail a sound model.
    gap = np.abs(score - model.manifest.decision.pixel_threshold)
    near = np.argsort(np.where(gap < GOLDEN_MARGIN, np.inf, gap))[: GOLDEN_COUNT // 2]
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    half = GOLDEN_COUNT // 4
    picks = [near, pos[:half], neg[:half]]
    chosen = np.unique(np.concatenate(picks))
    extra = np.setdiff1d(np.arange(len(rows)), chosen)[: max(0, GOLDEN_COUNT - len(chosen))]
    chosen = np.concatenate((chosen, extra))
    rgb_columns = [names.index(c) for c in RGB_FEATURES] if set(RGB_FEATURES) <= set(names) else []
    samples = []
    for i in chosen.tolist():
        rgb = rows[i, rgb_columns] if rgb_columns else np.zeros(3)
        samples.append(
            GoldenSample(
                rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
                features=None if pool is None else tuple(float(v) for v in rows[i]),
                label=int(labels[i]),
                probability=None if proba is None else float(proba[i]),
            )
        )
    return tuple(samples)


def file_ref(path: Path) -> FileRef:
    """A written file pinned for a manifest: name, sha256, size."""
    return FileRef(file=path.name, sha256=sha256_file(path), size=path.stat().st_size)


def export_model(
    booster: xgb.Booster,
    out_dir: Path,
    *,
    name: str,
    version: str,
    decision: Decision | None = None,
    provenance: Provenance | None = None,
    parity: bool = True,
    with_table: bool = True,
    seed: int = 0,
    pipeline: FeaturePipeline | None = None,
    sample: np.ndarray | None = None,
    regions: RegionScorerSpec | None = None,
    scene: SceneSpec | None = None,
) -> Path:
    """Write model.onnx, manifest.json and table.npy into out_dir; returns the manifest path.

    With `pipeline` the booster is a feature model: `sample` (feature rows, e.g. the training
    rows) is what parity is proven on and golden samples are drawn from; no table is written.
    `regions` is a box scorer already written into out_dir (export.proposals), `scene` an
    embedder (export.scene). Without `parity` the provenance notes say it was not proven.
    Every check that needs no written file comes first; see `staged` for leaving an
    existing export intact when a later one fails.
    """
    objective = objective_of(booster)
    names = RGB_FEATURES if pipeline is None else pipeline.names
    if booster.num_features() != len(names):
        raise ConvertError(f"the booster reads {booster.num_features()} features, not {len(names)}")
    if pipeline is not None and (sample is None or len(sample) == 0):
        raise ConvertError("a feature model needs sample rows to prove parity on")
    decision = decision or Decision()
    low, high = PIXEL_THRESHOLD_RANGE
    if not low <= decision.pixel_threshold <= high:
        raise ConvertError(
            f"pixel threshold {decision.pixel_threshold:g} is outside {low:g}..{high:g}, where "
            "the colour table is proven exact"
        )
    if objective.kind == "labels" and decision.pixel_threshold != 0.5:
        raise ConvertError("multi:softmax gives labels only: the pixel threshold must be 0.5")
    provenance = provenance or Provenance()
    if not parity:
        notes = "; ".join(filter(None, [provenance.notes, UNPROVEN]))
        provenance = provenance.model_copy(update={"notes": notes})
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    onnx_path.write_bytes(to_onnx(booster, len(names)))
    base: dict[str, Any] = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC),
        "model": file_ref(onnx_path),
        "input": InputSpec(shape=(None, len(names)), features=names),
        "output": OutputSpec(kind=objective.kind, objective=objective.name),
        "decision": decision,
        "provenance": provenance,
    }
    if regions is not None:
        base["regions"] = regions
    if scene is not None:
        base["scene"] = scene
    if pipeline is not None:
        base["features"] = FeatureSpec(long_side=pipeline.long_side, stride=pipeline.stride)
    # Golden samples come from the converted model itself: a draft without them lets the
    # runtime load it first (its golden check then trivially re-derives the same answers).
    draft = ModelManifest.model_construct(**base, golden=())
    tree = read_tree(onnx_path)
    model = PixelModel(draft, onnx_path, tree)
    pool = None if sample is None else np.asarray(sample, np.float32)
    if parity:
        if pool is None:
            check_parity(booster, model, objective)
        else:
            check_sample_parity(booster, model, objective, pool)
    golden = golden_samples(model, np.random.default_rng(seed), pool)
    manifest = ModelManifest(**base, golden=golden)
    if with_table and pipeline is None:
        table_path = out_dir / TABLE_FILE
        save_table(table_path, compile_table(PixelModel(manifest, onnx_path, tree)))
        manifest = manifest.model_copy(update={"table": file_ref(table_path)})
    manifest_path = out_dir / MANIFEST_FILE
    manifest.write(manifest_path)
    return manifest_path


def _make_folders(out: Path, made: list[Path]) -> None:
    """`mkdir -p out`, noting in `made` each folder it makes, outermost first, for a failed
    export to take back."""
    missing = list(takewhile(lambda p: not p.is_dir(), (out, *out.parents)))
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if folder.is_dir():
                continue  # made meanwhile, by someone else
            what = (
                f"a link to {os.readlink(folder)}, which is not a directory"
                if folder.is_symlink()
                else "exists and is not a directory"
            )
            raise ConvertError(f"{folder}: {what}") from None
        except OSError as exc:
            raise ConvertError(f"{folder}: cannot create ({exc.strerror or exc})") from None
        made.append(folder)


STAGING = (".convert-", ".partial")  # prefix and suffix of a convert's staging folder
LOCK = ".lock"  # in a staging folder, flocked while its convert works
ABANDONED_AFTER_S = 60.0  # older and unlocked: its convert was killed (never one starting)


def _lock(folder: Path, *, create: bool) -> int | None:
    """The descriptor of `folder`'s lock, taken: held while it is open. None when another
    holds it, or where the file system has no locks (some NFS mounts): nobody can tell then.
    A file opened for writing, as NFS locks want it."""
    fd = os.open(folder / LOCK, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _sweep_abandoned(out: Path) -> None:
    """Remove the staging folders of converts that were killed (SIGKILL, the OOM killer, a
    power cut: no `finally` ran), which would otherwise hold a model's worth of disk each.
    One still locked is a convert at work, in this process or another; one whose lock
    cannot be taken for another reason is left too."""
    cutoff = datetime.now(UTC).timestamp() - ABANDONED_AFTER_S
    for old in out.glob(f"{STAGING[0]}*{STAGING[1]}"):
        try:
            if old.is_symlink() or old.stat().st_mtime > cutoff:
                continue
            fd = _lock(old, create=False)
        except FileNotFoundError:  # killed before it took its lock (or gone meanwhile)
            fd = -1
        except OSError:
            continue
        if fd is None:
            continue
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder to export into, whose files replace `out`'s only once the block has
    finished without an error: a failed export leaves `out` as it was.

    It is staged inside `out`, made first (with its parents) when missing: that needs no
    more right than the export itself, leaves nothing beside `out`, and no rename crosses
    file systems even when `out` is a mount point or a link to another disk. A failed export
    takes back the folders it made, so a new `out` is absent again. The export's files
    replace ours (EXPORT_FILES; one this export did not write, e.g. table.npy after
    --no-table, is removed, as a stale file beside a manifest that does not pin it would
    mislead) and anything else there is left alone. The old manifest goes first and the new
    one comes last, so no moment shows a manifest beside files it does not describe.
    """
    made: list[Path] = []
    try:
        _make_folders(out, made)
        _sweep_abandoned(out)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING[0], suffix=STAGING[1], dir=out))
            held = _lock(staging, create=True)  # None: no locks here, the export goes on
        except OSError as exc:  # its own message names the random staging name, not `out`
            raise ConvertError(f"{out}: cannot write ({exc.strerror or exc})") from None
        try:
            yield staging
            written = {p.name for p in staging.iterdir()} - {LOCK}
            (out / MANIFEST_FILE).unlink(missing_ok=True)
            for name in sorted(written - {MANIFEST_FILE}):
                os.replace(staging / name, out / name)
            for name in set(EXPORT_FILES) - written:
                (out / name).unlink(missing_ok=True)
            os.replace(staging / MANIFEST_FILE, out / MANIFEST_FILE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if held is not None:
                os.close(held)
    except BaseException:
        for folder in reversed(made):
            with suppress(OSError):  # not empty: someone else's files are in it now
                folder.rmdir()
        raise
