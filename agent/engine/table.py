"""Compile a tree-ensemble colour model into an exact table over all 2^24 colours.

Why: a table lookup classifies a 1080p frame in a few milliseconds where the trees take
seconds. The table IS the model: its label equals onnxruntime's for every colour.

How (see docs/ARCHITECTURE.md): every leaf is an axis-aligned box of integer colours
carrying a constant, so the ensemble's margin is a sum of boxes. The boxes go into a
difference array on axes compressed to the trees' cut points; a sweep along R with running
2-D prefix sums gives the margin of every grid cell. Cells whose margin lies within EPSILON
of the decision boundary (float32 summation order differs from the runtime's) are settled
by asking onnxruntime itself, one representative colour per cell: every colour in a cell
reaches the same leaves, so the runtime's answer is the same for all of them.

Table values are "scores": v >= 128 exactly when the pixel is corroded; below and above
128, v rises monotonically with P(corroded), so the near-boundary share of a frame is
known without a second table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.engine.model import ModelError, PixelModel, verify_file

SIZE = 1 << 24
CORRODED = 128  # score >= CORRODED  <=>  label 1
EPSILON = 1e-3  # margin band re-checked by onnxruntime (float32 error is ~1e-5 here)
TABLE_DTYPE = np.uint8


@dataclass(frozen=True)
class Leaves:
    """Leaf boxes as integer half-open ranges per channel, and each box's margin term."""

    lo: np.ndarray  # (L, 3) int64
    hi: np.ndarray  # (L, 3) int64
    value: np.ndarray  # (L,) float64
    base: float


def _cut(mode: str, threshold: float) -> tuple[int, bool]:
    """Integer cut c and whether the true branch is the low side [.., c)."""
    if mode == "BRANCH_LT":
        return math.ceil(threshold), True
    if mode == "BRANCH_LEQ":
        return math.floor(threshold) + 1, True
    if mode == "BRANCH_GTE":
        return math.ceil(threshold), False
    if mode == "BRANCH_GT":
        return math.floor(threshold) + 1, False
    raise ModelError(f"unsupported tree node mode {mode}")


def extract_leaves(model: PixelModel) -> Leaves:
    """Walk every tree of the ONNX node into leaf boxes."""
    t = model.tree
    tree_ids, node_ids = t.ints("nodes_treeids"), t.ints("nodes_nodeids")
    features, values = t.ints("nodes_featureids"), t.floats("nodes_values")
    modes = t.strings("nodes_modes")
    true_ids, false_ids = t.ints("nodes_truenodeids"), t.ints("nodes_falsenodeids")
    if np.any((features < 0) | (features > 2)):
        raise ModelError(f"{model.path}: a tree reads feature {features.max()}: not an RGB model")

    # One score per leaf (the model check refused per-class layouts): margin of class 1.
    leaf_value: dict[tuple[int, int], float] = {}
    for tid, nid, w in zip(
        t.ints("class_treeids").tolist(),
        t.ints("class_nodeids").tolist(),
        t.floats("class_weights").tolist(),
        strict=True,
    ):
        leaf_value[(tid, nid)] = leaf_value.get((tid, nid), 0.0) + w
    base_values = t.floats("base_values")
    base = float(base_values[0]) if len(base_values) else 0.0

    keys = zip(tree_ids.tolist(), node_ids.tolist(), strict=True)
    index = {key: i for i, key in enumerate(keys)}
    lo_out: list[tuple[int, int, int]] = []
    hi_out: list[tuple[int, int, int]] = []
    val_out: list[float] = []
    for tid in sorted(set(tree_ids.tolist())):
        stack = [(index[(tid, 0)], (0, 0, 0), (256, 256, 256))]
        while stack:
            i, lo, hi = stack.pop()
            if modes[i] == "LEAF":
                if all(a < b for a, b in zip(lo, hi, strict=True)):
                    lo_out.append(lo)
                    hi_out.append(hi)
                    val_out.append(leaf_value.get((tid, int(node_ids[i])), 0.0))
                continue
            cut, true_low = _cut(modes[i], float(values[i]))
            cut = min(max(cut, 0), 256)
            f = int(features[i])
            low = (lo, tuple(min(h, cut) if k == f else h for k, h in enumerate(hi)))
            high = (tuple(max(v, cut) if k == f else v for k, v in enumerate(lo)), hi)
            t_child = index[(tid, int(true_ids[i]))]
            f_child = index[(tid, int(false_ids[i]))]
            stack.append((t_child, *(low if true_low else high)))
            stack.append((f_child, *(high if true_low else low)))
    return Leaves(
        lo=np.asarray(lo_out, dtype=np.int64).reshape(-1, 3),
        hi=np.asarray(hi_out, dtype=np.int64).reshape(-1, 3),
        value=np.asarray(val_out, dtype=np.float64),
        base=base,
    )


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def scores_from(label: np.ndarray, proba: np.ndarray, threshold: float) -> np.ndarray:
    """Encode (label, probability) as table scores; the label alone decides the side of 128."""
    up = CORRODED + np.rint(127.0 * (proba - threshold) / (1.0 - threshold))
    down = np.rint(127.0 * proba / threshold)
    value = np.where(label.astype(bool), np.clip(up, CORRODED, 255), np.clip(down, 0, CORRODED - 1))
    return value.astype(TABLE_DTYPE)


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * margin))


def compile_table(model: PixelModel) -> np.ndarray:
    """The exact score table, indexed by R << 16 | G << 8 | B."""
    leaves = extract_leaves(model)
    threshold = model.manifest.decision.pixel_threshold
    labels_only = model.manifest.output.kind == "labels"
    boundary = _logit(threshold)
    cuts = [
        np.unique(np.concatenate(([0, 256], leaves.lo[:, c], leaves.hi[:, c]))) for c in range(3)
    ]
    lo = [np.searchsorted(cuts[c], leaves.lo[:, c]) for c in range(3)]
    hi = [np.searchsorted(cuts[c], leaves.hi[:, c]) for c in range(3)]
    cell_of = [np.searchsorted(cuts[c], np.arange(256), side="right") - 1 for c in range(3)]
    n_r, n_g, n_b = (len(c) - 1 for c in cuts)

    # Events along R: a box starts adding its value at its low R cell and stops at its high one.
    ev_r = np.concatenate((lo[0], hi[0]))
    ev_v = np.concatenate((leaves.value, -leaves.value))
    ev_g0, ev_g1 = np.tile(lo[1], 2), np.tile(hi[1], 2)
    ev_b0, ev_b1 = np.tile(lo[2], 2), np.tile(hi[2], 2)
    order = np.argsort(ev_r, kind="stable")
    starts = np.searchsorted(ev_r[order], np.arange(n_r + 1))

    diff = np.zeros((n_g + 1, n_b + 1), dtype=np.float64)
    table = np.empty((256, 256, 256), dtype=TABLE_DTYPE)
    border: list[np.ndarray] = []
    border_margin: list[np.ndarray] = []
    for i in range(n_r):
        sel = order[starts[i] : starts[i + 1]]
        v, g0, g1, b0, b1 = ev_v[sel], ev_g0[sel], ev_g1[sel], ev_b0[sel], ev_b1[sel]
        np.add.at(diff, (g0, b0), v)
        np.add.at(diff, (g0, b1), -v)
        np.add.at(diff, (g1, b0), -v)
        np.add.at(diff, (g1, b1), v)
        margin = diff.cumsum(0).cumsum(1)[:n_g, :n_b] + leaves.base
        label = margin > boundary if labels_only else margin >= boundary
        cell_scores = scores_from(label, _sigmoid(margin), threshold)
        table[cuts[0][i] : cuts[0][i + 1]] = cell_scores[np.ix_(cell_of[1], cell_of[2])]
        jk = np.argwhere(np.abs(margin - boundary) < EPSILON)
        if len(jk):
            border.append(np.column_stack((np.full(len(jk), i), jk)))
            border_margin.append(margin[jk[:, 0], jk[:, 1]])
    if border:
        _settle_border(
            model,
            table,
            cuts,
            np.concatenate(border),
            margin=np.concatenate(border_margin),
            threshold=threshold,
        )
    return table.reshape(-1)


def _settle_border(
    model: PixelModel,
    table: np.ndarray,
    cuts: list[np.ndarray],
    cells: np.ndarray,
    *,
    margin: np.ndarray,
    threshold: float,
) -> None:
    """Ask onnxruntime for cells too close to the boundary to trust our float64 sum."""
    rgb = np.column_stack([cuts[c][cells[:, c]] for c in range(3)])
    labels, proba = model.predict(rgb)
    if proba is None:  # labels-only: keep our probability, on the runtime's side of 128
        proba = _sigmoid(margin)
    values = scores_from(labels, proba.astype(np.float64), threshold)
    for (i, j, k), value in zip(cells.tolist(), values.tolist(), strict=True):
        table[
            cuts[0][i] : cuts[0][i + 1], cuts[1][j] : cuts[1][j + 1], cuts[2][k] : cuts[2][k + 1]
        ] = value


SPOT_CHECKS = 4096


def save_table(path: Path, table: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(table, dtype=TABLE_DTYPE), allow_pickle=False)


def check_table(model: PixelModel, table: np.ndarray, what: str, seed: int = 0) -> None:
    """Golden samples and random colours must get the runtime's label from the table."""
    if table.dtype != TABLE_DTYPE or table.shape != (SIZE,):
        raise ModelError(
            f"{what}: table is {table.dtype}{list(table.shape)}, expected uint8[{SIZE}]"
        )
    golden = np.array([g.rgb for g in model.manifest.golden], dtype=np.int64).reshape(-1, 3)
    spots = np.random.default_rng(seed).integers(0, 256, size=(SPOT_CHECKS, 3))
    rgb = np.concatenate((golden, spots))
    labels, _ = model.predict(rgb)
    got = table[(rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]] >= CORRODED
    bad = np.flatnonzero(got != labels.astype(bool))
    if len(bad):
        raise ModelError(
            f"{what}: table disagrees with the model on {len(bad)} of {len(rgb)} checked colours, "
            f"e.g. rgb={rgb[bad[0]].tolist()}"
        )


def load_table(model: PixelModel) -> np.ndarray:
    """The manifest's shipped table when it has one (verified), else compile it here."""
    ref = model.manifest.table
    if ref is None:
        table = compile_table(model)
        check_table(model, table, f"{model.path} (compiled)")
        return table
    path = model.path.parent / ref.file
    verify_file(path, ref.size, ref.sha256, "table")
    try:
        table = np.asarray(np.load(path, allow_pickle=False))
    except ValueError as exc:
        raise ModelError(f"table {path}: not a .npy array ({exc})") from exc
    check_table(model, table, f"table {path}")
    return table
