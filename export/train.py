"""Local XGBoost training with the AWS solution's payload as the default recipe."""

from __future__ import annotations

import difflib
import json
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from agent.engine.model import sha256_file
from export.datasets import CLASS_NAMES, DatasetError

F32 = npt.NDArray[np.float32]

# The "Rust detection using machine learning on AWS" training payload, as it was sent.
AWS_PAYLOAD: dict[str, Any] = {
    "objective": "multi:softmax",
    "num_class": 2,
    "num_round": 100,
    "max_depth": 3,
    "eta": 0.2,
    "gamma": 0.8,
    "min_child_weight": 10,
    "subsample": 0.8,
    "colsample_bytree": 0.9,
}
MODEL_SUFFIXES = (".json", ".ubj")  # XGBoost's own formats: stable across versions, convertible
METRICS_SUFFIX = ".metrics.json"  # NAME.metrics.json: the training record of NAME.json
FOLDER_METRICS = "metrics.json"  # the one record per folder that earlier versions wrote
_COMMA, _NEWLINE = ord(","), ord("\n")
_NOT_USED = re.compile(r"Parameters: \{(.*?)\} are not used")


def _unsigned_ints(buf: npt.NDArray[np.uint8], starts: np.ndarray, lengths: np.ndarray) -> F32:
    """Digit fields to numbers: one vectorised pass per digit position, not per row."""
    values = np.zeros(len(starts), np.int64)
    last = len(buf) - 1
    for k in range(int(lengths.max())):
        digit = buf[np.minimum(starts + k, last)].astype(np.int64) - ord("0")
        values = np.where(lengths > k, values * 10 + digit, values)
    return values.astype(np.float32)


def _general(text: bytes, path: Path, width: int) -> F32:
    """Decimals, signs, exponents: numpy's own conversion, and the bad cell when it fails."""
    cells = text.replace(b"\n", b",").split(b",")
    try:
        return np.array(cells).astype(np.float32)
    except ValueError:
        for k, cell in enumerate(cells):
            try:
                float(cell)
            except ValueError:
                header = "; a header? these CSVs have none, label first" if k < width else ""
                raise DatasetError(
                    f"{path}: row {k // width + 1} column {k % width + 1} is not a number "
                    f"({cell.decode(errors='replace')!r}{header})"
                ) from None
        raise


def _parse(data: bytes, path: Path) -> F32:
    """Label-first CSV bytes to a float32 table. Integer files (what `dataset` writes, and the
    AWS CSVs) take a vectorised path: 283k rows in ~0.05 s where np.loadtxt needs ~0.17 s."""
    text = data.replace(b"\r", b"").rstrip(b"\n")
    if not text:
        raise DatasetError(f"{path}: empty file, expected rows of class,feature...")
    buf = np.frombuffer(text + b"\n", np.uint8)
    is_sep = (buf == _COMMA) | (buf == _NEWLINE)
    seps = np.flatnonzero(is_sep)
    row_ends = np.flatnonzero(buf[seps] == _NEWLINE)
    fields = np.diff(row_ends, prepend=-1)
    width = int(fields[0])
    if (bad := np.flatnonzero(fields != width)).size:
        row = int(bad[0])
        raise DatasetError(f"{path}: row {row + 1} has {fields[row]} fields, row 1 has {width}")
    starts = np.concatenate(([0], seps[:-1] + 1))
    lengths = seps - starts
    if (empty := np.flatnonzero(lengths == 0)).size:
        k = int(empty[0])
        raise DatasetError(f"{path}: row {k // width + 1} column {k % width + 1} is empty")
    if lengths.max() <= 9 and bool(np.all((buf[~is_sep] - ord("0")) < 10)):
        values = _unsigned_ints(buf, starts, lengths)
    else:
        values = _general(text, path, width)
    return values.reshape(-1, width)


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SageMaker-style CSV: no header, label first. Returns (X float32, y int)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from exc
    table = _parse(data, path)
    if table.shape[1] < 2:
        raise DatasetError(f"{path}: expected rows of class,feature..., got {table.shape[1]} field")
    labels = table[:, 0]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DatasetError(
            f"{path}: row {bad[0] + 1} has class {labels[bad[0]]:g}, expected 0 or 1"
        )
    if table.shape[1] == 4:  # class,R,G,B: a colour model's table covers 0..255 only
        off = np.argwhere((table[:, 1:] < 0) | (table[:, 1:] > 255) | (table[:, 1:] % 1 != 0))
        if len(off):
            row, col = (int(v) for v in off[0])
            raise DatasetError(
                f"{path}: row {row + 1} column {col + 2} is {table[row, col + 1]:g}, not a "
                "colour value (an integer 0..255)"
            )
    return table[:, 1:], labels.astype(np.int64)


@dataclass(frozen=True)
class Trained:
    booster: xgb.Booster
    params: dict[str, Any]
    metrics: dict[str, float]
    best_iteration: int  # 0-based round the booster ends at (the last one without early stopping)


def xgb_params(params: Mapping[str, Any], threads: int, seed: int) -> tuple[dict[str, Any], int]:
    """Split num_round off (a train() argument, not a booster parameter)."""
    booster_params = {k: v for k, v in params.items() if k != "num_round"}
    booster_params.setdefault("tree_method", "hist")
    booster_params.update(nthread=threads, seed=seed)
    return booster_params, int(params.get("num_round", 100))


def hyperparameters(
    objective: str | None = None,
    num_round: int | None = None,
    overrides: Sequence[str] = (),
    *,
    local: bool = True,
) -> dict[str, Any]:
    """The AWS payload with CLI changes; `num_class` goes when the objective is not multi-class
    (binary:logistic refuses it) unless it was set explicitly. With `local` (training here),
    a key this XGBoost would not use is refused (see `check_used`)."""
    params = dict(AWS_PAYLOAD)
    if objective:
        params["objective"] = objective
    if num_round is not None:
        params["num_round"] = num_round
    explicit = {}
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, not {pair!r}")
        explicit[key.strip()] = _scalar(value.strip())
    params.update(explicit)
    if not str(params["objective"]).startswith("multi:") and "num_class" not in explicit:
        params.pop("num_class", None)
    rounds = params["num_round"]
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"num_round must be a whole number of at least 1, not {rounds!r}")
    if params.get("num_class", 2) != 2:
        raise ValueError(f"num_class must be 2 (clean, corroded), not {params['num_class']!r}")
    if local:
        check_used(params)
    return params


def check_used(params: Mapping[str, Any]) -> None:
    """Refuse keys XGBoost would ignore: a misspelt `max_dept=4` trained with the default
    depth and was recorded in the metrics and the manifest as if it had been used.

    XGBoost itself says which parameters it does not use (unknown, or meaningless with the
    objective and booster given), when a booster is configured; a round of nothing on two
    rows asks it. The near miss comes from the names in the configured booster.
    """
    booster_params, _ = xgb_params(params, threads=1, seed=0)
    data = xgb.DMatrix(np.zeros((2, 3), np.float32), label=[0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        booster = xgb.train({**booster_params, "validate_parameters": True}, data, 0)
    unused = [
        name.strip().strip('"')
        for w in caught
        if (found := _NOT_USED.search(str(w.message)))
        for name in found.group(1).split(",")
    ]
    if not unused:
        return
    known = sorted(set(_keys(json.loads(booster.save_config()))))
    hints = []
    for name in unused:
        near = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise ValueError(
        f"XGBoost {xgb.__version__} would ignore {', '.join(hints)}: unknown, or unused with "
        f"objective {params.get('objective')!r}"
    )


def _keys(config: Any) -> Iterator[str]:
    """Every key of a nested XGBoost configuration: the parameter names it knows."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield key
            yield from _keys(value)


def _scalar(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def positive_score(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """P(corroded) for probability objectives; the 0/1 label for multi:softmax."""
    out = np.asarray(booster.inplace_predict(x))
    return np.asarray(out[:, 1]) if out.ndim == 2 else out


def metrics(y: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1, ROC AUC and the confusion counts."""
    pred = score >= threshold
    truth = y.astype(bool)
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / max(1.0, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": roc_auc(truth, score),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def roc_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U with tied scores averaged; 0.5 when one class is absent."""
    pos, neg = int(truth.sum()), int((~truth).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def train(
    x: np.ndarray,
    y: np.ndarray,
    params: Mapping[str, Any] = AWS_PAYLOAD,
    *,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    early_stopping: int | None = None,
    threads: int = 0,
    seed: int = 0,
) -> Trained:
    """Train; metrics are on `valid` when given. With early stopping on `valid`, the booster is
    cut back to its best round, so what is saved and converted is the model that was scored."""
    booster_params, rounds = xgb_params(params, threads, seed)
    dtrain = xgb.DMatrix(x, label=y)
    evals = [(dtrain, "train")]
    if valid is not None:
        evals.append((xgb.DMatrix(valid[0], label=valid[1]), "validation"))
    stopping = early_stopping if valid is not None and early_stopping else None
    booster = xgb.train(
        booster_params,
        dtrain,
        rounds,
        evals=evals,
        early_stopping_rounds=stopping,
        verbose_eval=False,
    )
    best = booster.num_boosted_rounds() - 1
    if stopping:
        best = booster.best_iteration
        booster = booster[: best + 1]
    vx, vy = valid if valid is not None else (x, y)
    return Trained(booster, dict(params), metrics(vy, positive_score(booster, vx)), best)


def metrics_path(model: Path) -> Path:
    """The training record beside `model`, one per model so that a second model trained into
    the folder leaves the first one's alone: model.json -> model.metrics.json, rgb.ubj ->
    rgb.ubj.metrics.json, model.tar.gz -> model.tar.gz.metrics.json."""
    return model.with_name(model.name.removesuffix(".json") + METRICS_SUFFIX)


def model_path(out: Path) -> Path:
    """--out is a .json/.ubj model file (its metrics_path is written beside it) or a directory
    that gets model.json; pickles, the legacy binary format and a record's name are refused."""
    if out.name == FOLDER_METRICS or out.name.endswith(METRICS_SUFFIX):
        raise ValueError(f"{out}: a training record's name, not a model's")
    if out.suffix.lower() in MODEL_SUFFIXES:
        return out
    if not out.suffix or out.is_dir():
        return out / "model.json"
    raise ValueError(f"{out}: save the model as .json or .ubj (XGBoost's own formats)")


def _inputs(source: Path, validation: Path | None) -> tuple[Path, Path | None, Path | None]:
    """A `dataset` directory stands for its train.csv, validation.csv (unless empty or given)
    and dataset.json, which the metrics then cite."""
    if not source.is_dir():
        return source, validation, None
    if validation is None and (source / "validation.csv").is_file():
        validation = source / "validation.csv"
        validation = validation if validation.stat().st_size else None
    manifest = source / "dataset.json"
    return source / "train.csv", validation, manifest if manifest.is_file() else None


def fit(
    source: Path,
    out: Path,
    params: Mapping[str, Any],
    *,
    validation: Path | None = None,
    early_stopping: int | None = 10,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The `train` command: read, train, save the model and its metrics_path; returns the
    record."""
    model_file = model_path(out)
    train_csv, validation, manifest = _inputs(source, validation)
    print("hyperparameters: " + json.dumps(dict(params)), file=sys.stderr)
    start = time.perf_counter()
    x, y = read_csv(train_csv)
    if missing := missing_classes(y):  # it would train, score itself perfect, flag all or none
        raise DatasetError(
            f"{train_csv}: no {CLASS_NAMES[missing[0]]} ({missing[0]}) rows; a model needs both "
            "classes (photos without rust: --negatives; pixels outside VOC boxes: "
            "--outside-boxes-negatives)"
        )
    valid = read_csv(validation) if validation else None
    warned: list[str] = []
    if valid is None:
        warned.append("no validation rows: the metrics are on the training data")
    else:
        for label in missing_classes(valid[1]):
            # Its metrics stand still from round 0 (AUC 0.5): early stopping kept round 0.
            warned.append(
                f"{validation}: no {CLASS_NAMES[label]} ({label}) rows: early stopping is off "
                "and the metrics describe one class only"
            )
            early_stopping = None
    for message in warned:
        print(f"warning: {message}", file=sys.stderr)
    print(f"read {len(y)} training rows in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    trained = train(
        x, y, params, valid=valid, early_stopping=early_stopping, threads=threads, seed=seed
    )
    rounds = trained.booster.num_boosted_rounds()
    if valid is not None and early_stopping:
        print(f"early stopping: best iteration {trained.best_iteration}", file=sys.stderr)
    m = trained.metrics
    if m["tp"] + m["fn"] and m["tn"] + m["fp"]:  # both classes there to tell apart
        never = [
            CLASS_NAMES[c] for c, n in ((1, m["tp"] + m["fp"]), (0, m["tn"] + m["fn"])) if not n
        ]
        if never:  # saved silently once, and convert and publish would ship it
            where = "validation" if valid is not None else "training"
            message = (
                f"the model calls no {where} pixel {never[0]} (AUC {m['auc']:.3f}, best iteration "
                f"{trained.best_iteration}): served as is, its answer never changes; check the "
                "labels, balance the classes (dataset --balance) or train longer"
            )
            warned.append(message)
            print(f"warning: {message}", file=sys.stderr)
    record = {
        "model": model_file.name,
        "metrics": m,
        "evaluated_on": "validation" if valid is not None else "train (no validation data)",
        "confusion_matrix": {
            "rows": "true class 0, 1",
            "columns": "predicted class 0, 1",
            "matrix": [[int(m["tn"]), int(m["fp"])], [int(m["fn"]), int(m["tp"])]],
        },
        "best_iteration": trained.best_iteration,
        "boosted_rounds": rounds,
        "early_stopping_rounds": early_stopping if valid is not None else None,
        "hyperparameters": dict(params),
        "seed": seed,
        "train_rows": len(y),
        "validation_rows": len(valid[1]) if valid is not None else 0,
        "training_data_sha256": sha256_file(train_csv),
        "validation_data_sha256": sha256_file(validation) if validation else None,
        "dataset_json_sha256": sha256_file(manifest) if manifest else None,
        "warnings": warned,
    }
    model_file.parent.mkdir(parents=True, exist_ok=True)
    trained.booster.save_model(str(model_file))
    metrics_path(model_file).write_text(json.dumps(record, indent=2) + "\n")
    return record


def missing_classes(y: np.ndarray) -> list[int]:
    """The classes (0, 1) with no row in `y`."""
    return [label for label in (0, 1) if not np.any(y == label)]


def choose_flag_pct(pcts: np.ndarray, rusty: np.ndarray) -> float:
    """Image threshold that maximises accuracy on out-of-fold percentages.

    Ties go to the lowest threshold: missing rust costs an inspector more than a second
    look at clean steel. Candidates are midpoints between sorted percentages.
    """
    values = np.unique(pcts)
    candidates = np.concatenate(([0.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1e-6]))
    best = max(candidates, key=lambda t: (np.mean((pcts >= t) == rusty), -t))
    return float(round(best, 4))
