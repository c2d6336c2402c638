"""Evaluation results for people: a Markdown report with PNG plots, and bench/ACCURACY.md.

The JSON of `corrosion-export evaluate ... --json` is the record; this module only draws it:
a precision-recall curve (pixels, boxes), a threshold sweep and per-image bars (images).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on build machines
import matplotlib.pyplot as plt

import export.recipe
import export.rgb_recipe

Result = Mapping[str, Any]


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_pr(curves: Mapping[str, list[list[float]]], title: str, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, curve in curves.items():
        if curve:
            recall, precision = zip(*curve, strict=True)
            ax.plot(recall, precision, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sweep(result: Result, path: Path) -> str:
    """Accuracy, rust recall and precision against the flag threshold."""
    t, acc, rec, prec = zip(*result["sweep"], strict=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for values, label in ((acc, "accuracy"), (rec, "rust recall"), (prec, "precision")):
        ax.step(t, values, where="post", label=label)
    default = float(result.get("flag_pct", -1.0))
    for flag in sorted({round(float(r.get("flag_pct", default)), 2) for r in _per(result)}):
        if flag >= 0:
            ax.axvline(flag, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="flag threshold (% corroded pixels)", ylabel="share", ylim=(0, 1.02))
    ax.set_title("threshold sweep (dashed: the decision's flag %)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _per(result: Result) -> list[dict[str, Any]]:
    return list(result.get("per_image", []))


def plot_bars(result: Result, path: Path) -> str:
    """Each image's corrosion %, sorted, rust in red; hollow bars were decided wrong. Where
    cross-validation was repeated, split 0 only: one bar per photo stays readable."""
    images = sorted((r for r in _per(result) if not r.get("repeat")), key=lambda r: r["pct"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.09 * len(images)), 4))
    for i, r in enumerate(images):
        colour = "tab:red" if r["rust"] else "tab:blue"
        wrong = r["flagged"] != r["rust"]
        ax.bar(i, r["pct"], color="none" if wrong else colour, edgecolor=colour, width=0.8)
    ax.set(xlabel="images, by corrosion %", ylabel="% corroded pixels", xticks=[])
    split = " (split 0)" if _split_count(result) > 1 else ""
    ax.set_title(f"per image{split}: red rust, blue no rust; hollow = wrong decision")
    return _save(fig, path)


def _confusion_md(result: Result) -> list[str]:
    (tn, fp), (fn, tp) = result["confusion"]["matrix"]
    return [
        "| true \\ predicted | clean | rust |",
        "|---|---|---|",
        f"| clean | {tn} | {fp} |",
        f"| rust | {fn} | {tp} |",
    ]


def write_report(result: Result, directory: Path) -> Path:
    """DIRECTORY/<kind>.md with its plots beside it; returns the Markdown file."""
    directory.mkdir(parents=True, exist_ok=True)
    kind = str(result["kind"])
    lines = [f"# Evaluation: {kind}", "", f"Command: `{result.get('command', '')}`", ""]
    figures: list[str] = []
    if kind == "pixels":
        lines += [
            f"{result['rows']} rows of `{result['csv']}`, model `{result['model']}`.",
            "",
            *[f"- {k}: {result[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1", "auc")],
            "",
            *_confusion_md(result),
        ]
        figures.append(
            plot_pr({"pixels": result["pr_curve"]}, "pixels", directory / "pixels-pr.png")
        )
    elif kind in ("images", "cv-images"):
        lines += [
            f"{_counted(result)}.",
            "",
            *[f"- {k}: {result[k]:.4f}" for k in ("accuracy", "rust_recall", "precision")],
            "",
            *_confusion_md(result),
            *_splits_md(result),
        ]
        figures.append(plot_sweep(result, directory / f"{kind}-sweep.png"))
        figures.append(plot_bars(result, directory / f"{kind}-bars.png"))
    else:
        lines += [f"- {k}: {result[k]:.4f}" for k in ("ap50", "ap", "ar100")]
        lines += [f"- {result['n_images']} images, {result['n_boxes']} boxes"]
        shown = result.get("reported")
        if shown and any(shown["floors"]):
            floors = ", ".join(f"{f:.3f}" for f in shown["floors"])
            lines += [
                f"- reported (box scorer's floor {floors}): {shown['per_image']:.1f} a photo, "
                f"precision {shown['precision']:.4f}, recall {shown['recall']:.4f}, "
                f"F1 {shown['f1']:.4f} at IoU 0.5"
            ]
        curves = {"boxes": result.get("pr_curve", [])}
        figures.append(plot_pr(curves, "boxes, IoU 0.5", directory / f"{kind}-pr.png"))
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    path = directory / f"{kind}.md"
    path.write_text("\n".join(lines))
    return path


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def accuracy_markdown(results: Mapping[str, Result], report_dir: Path | None = None) -> str:
    """bench/ACCURACY.md from `make evaluate`'s JSON results (keys: the result files' stems)."""
    px, base = results.get("pixels-aws-rgb"), results.get("pixels-aws-payload")
    img, box = results.get("cv-images"), results.get("cv-boxes")
    held = results.get("images-validation")
    rows = ["| measure | result | goal | reference |", "|---|---|---|---|"]
    if img:
        splits = img.get("splits", [])
        groups = f"{img['images']} photos, {img['groups']} groups"
        pooled, spread = "", ""
        if len(splits) > 1:
            accuracies = [r["accuracy"] for r in splits]
            pooled = f", pooled over {len(splits)} fold splits"
            spread = f" (per split {_pct(min(accuracies))} to {_pct(max(accuracies))})"
        tp, fn = (int(img["confusion"]["matrix"][1][i]) for i in (1, 0))
        unit = "rust decisions" if len(splits) > 1 else "rust photos"
        rows.append(
            f"| image accuracy, nested CV on rustnorust/train ({groups}{pooled}) "
            f"| {_pct(img['accuracy'])}{spread} | >= 90 % "
            "| VGG16: 86.1 % on its 15-image test split |"
        )
        rows.append(
            f"| rust recall, same ({tp} of {tp + fn} {unit}) "
            f"| {_pct(img['rust_recall'])} | 100 % | |"
        )
    if px:
        payload = f"payload measured here: {_pct(base['accuracy'])}" if base else "payload: 87.8 %"
        rows.append(
            f"| pixel accuracy on AWS validation.csv, RGB model trained on train.csv "
            f"| {_pct(px['accuracy'])} | >= 89.3 % | {payload} |"
        )
    if box:
        rows.append(
            f"| box AP@0.5, out-of-fold on objdet/train ({box['n_images']} photos) "
            f"| {box['ap50']:.3f} | >= 0.30 | SSD: 0.183 on its 6-image test split |"
        )
    lines = [
        "# Accuracy",
        "",
        f"Written by `make evaluate` (export/report.py) on {datetime.now(UTC):%Y-%m-%d}, "
        f"{platform.machine()}, from `../shared/data` (train and validation only; the test "
        "splits of both references are kept apart). Every figure is measured on data the "
        "measured model never saw: nested cross-validation by photo group where there is no "
        "separate test set, so the image decision is chosen without the photos it is scored "
        "on. The recipe's fixed settings (features, trees, pixel counts) were chosen from "
        "cross-validated experiments on the same training photos, as the variants below are.",
        "",
        *rows,
        "",
        "## Commands",
        "",
        "`make evaluate` runs `make model` (`corrosion-export recipe texture --data "
        "../shared/data --out build/model`), then:",
        "",
        "```",
        *[str(r["command"]) for r in results.values() if "command" in r],
        "```",
    ]
    lines += _details(px, base, img, box, held)
    lines += _variants(
        {k: r for k, r in results.items() if k.startswith(("cv-images-", "cv-boxes-"))}
    )
    if report_dir is not None:
        lines += ["", f"Plots: `{report_dir}/*.md` (precision-recall, sweeps, per-image bars)."]
    for module in (export.recipe, export.rgb_recipe):
        title = module.__name__.replace(".", "/")
        lines += ["", f"## Recipe: {title}.py", "", (module.__doc__ or "").strip()]
    lines.append("")
    return "\n".join(lines)


def _variants(results: Mapping[str, Result]) -> list[str]:
    """Recipe variants measured the same way (e.g. another --outside-pixels), one row each."""
    if not results:
        return []
    lines = [
        "",
        "## Variants",
        "",
        "`--no-image-rule` flags by the corrosion % alone (the decision before the image "
        "rule). Fewer clean pixels from outside the boxes (250, the recipe before the image "
        "rule) loosen the mask around what annotators box: box AP falls, while the image "
        "decision, which no longer rests on the %, does about as well (the recipe keeps one "
        "pixel model for both and is not re-chosen on these outer splits). `--no-box-scorer` "
        "ranks regions by their rust contrast with the ring around them "
        "(agent/engine/regions.py, the grouping chosen by inner CV), as before the "
        "learned box scorer. `--no-scene` leaves the pretrained scene embedder out of the "
        "image rule (pixel statistics only, as before it). `--rule-threshold lowest` flags "
        "at the lowest out-of-fold P(rust) of a training rust photo, without lowering it by "
        "the gap to the next.",
        "",
        "| variant | measure | result |",
        "|---|---|---|",
    ]
    for r in results.values():
        command = f"`{str(r.get('command', '')).removeprefix('corrosion-export ')}`"
        if r["kind"] == "cv-images":
            figure = f"accuracy {_pct(r['accuracy'])}, rust recall {_pct(r['rust_recall'])}"
        else:
            figure = f"AP@0.5 {r['ap50']:.3f}, AP@[.5:.95] {r['ap']:.3f}"
        lines.append(f"| {command} | {r['kind']} | {figure} |")
    return lines


def _split_count(result: Result) -> int:
    return len(result.get("splits", [])) or 1


def _counted(result: Result) -> str:
    """The image count, and the decision count where images were decided more than once."""
    images, decisions = result["images"], result.get("decisions", result["images"])
    return f"{images} images" + (f", {decisions} decisions" if decisions != images else "")


def _named(records: list[dict[str, Any]], splits: int) -> str:
    """File names of wrong decisions; with several splits, in how many each was wrong, which
    tells a photo the recipe always gets wrong from one a fold split happened to expose."""
    counts: dict[str, int] = {}
    for r in records:
        counts[Path(r["path"]).name] = counts.get(Path(r["path"]).name, 0) + 1
    if splits == 1:
        return ", ".join(sorted(counts)) or "none"
    return ", ".join(f"{n} ({c}/{splits})" for n, c in sorted(counts.items())) or "none"


def _splits_md(img: Result) -> list[str]:
    """Each outer split's figures and the thresholds its folds chose: the spread that one
    pooled figure hides."""
    splits = img.get("splits", [])
    if not splits:
        return []
    unit = "P(rust)" if img.get("decided_by") == "image rule" else "flag %"
    lines = [
        "",
        f"| split (outer seed) | accuracy | rust recall | false alarms | missed "
        f"| thresholds ({unit}) |",
        "|---|---|---|---|---|---|",
    ]
    for r in splits:
        lines.append(
            f"| {r['repeat']} ({r['seed']}) | {_pct(r['accuracy'])} | {_pct(r['rust_recall'])} "
            f"| {r['fp']} | {r['fn']} | {', '.join(f'{t:.3f}' for t in r['thresholds'])} |"
        )
    return lines


def _images_details(img: Result) -> list[str]:
    per = img["per_image"]
    splits = _split_count(img)
    missed = [r for r in per if r["rust"] and not r["flagged"]]
    false = [r for r in per if r["flagged"] and not r["rust"]]
    ruled = img.get("decided_by") == "image rule"
    if ruled:
        scene = int(img.get("scene_components", 0))
        reads = (
            f", and the first {scene} principal components of what a pretrained "
            "EfficientNet-Lite0 sees in the whole photo (agent/engine/scene.py), fitted on "
            "the outer-training photos"
            if scene
            else ""
        )
        threshold = (
            "lowered by its gap to the second lowest, in logits"
            if img.get("rule_threshold") == "extrapolated"
            else ""
        )
        how = (
            "the image rule (agent/engine/imagerule.py: a logistic regression over the "
            f"frame's feature quantiles, its % and what its corroded pixels look like{reads}) "
            f"was fitted by {img['inner_folds']}-fold CV on the outer-training photos, its "
            "flag threshold the lowest out-of-fold P(rust) of a training rust photo"
            + (f" {threshold}" if threshold else "")
        )
    else:
        how = f"the flag % was chosen by {img['inner_folds']}-fold CV on the outer-training photos"
    repeated = (
        f" The whole nested CV ran over {splits} different outer fold splits; every photo is "
        f"decided once per split ({img['decisions']} decisions), and the confusion counts "
        "them all."
        if splits > 1
        else ""
    )
    causes = (
        "Where the errors come from: pixel truth is the annotators' boxes, which hold much "
        "that is not rust; 31 of the rust photos have no boxes at all; per pixel, reddish "
        "doors, bricks, sandstone and wood look like rust, and rust photos with a little rust "
        "on a large clean surface have a low %. No flag % separates the two classes (the "
        "sweep); the image rule separates them better."
    )
    if ruled and img.get("scene_components"):
        causes += (
            " Two choices were made by looking at nested-CV results on these same photos: "
            "the number of scene components (export/recipe.py) and the extrapolated "
            "threshold (against `--rule-threshold lowest`, below); these figures are "
            "therefore somewhat optimistic for new photos."
        )
    if ruled:
        causes += (
            " Its recall-first threshold is set by the weakest rust photos of each training "
            "set, which is what the remaining false alarms pay for; a training set that "
            "happens to lack the weakest rust photos sets it higher, and can miss one of them."
        )
    return [
        "",
        "## Images: nested cross-validation",
        "",
        f"{img['outer_folds']} outer folds; in each, {how}.{repeated} "
        f"Precision {img['precision']:.3f}.",
        "",
        *_confusion_md(img),
        *_splits_md(img),
        "",
        f"Missed rust photos: {_named(missed, splits)}.",
        f"False alarms: {_named(false, splits)}.",
        "",
        causes,
    ]


def _details(
    px: Result | None,
    base: Result | None,
    img: Result | None,
    box: Result | None,
    held: Result | None,
) -> list[str]:
    lines: list[str] = []
    for title, r in (("Pixels: AWS RGB model", px), ("Pixels: AWS payload", base)):
        if r:
            lines += ["", f"## {title}", ""]
            lines += [
                f"{r['rows']} rows; accuracy {r['accuracy']:.4f}, precision "
                f"{r['precision']:.4f}, recall {r['recall']:.4f}, F1 {r['f1']:.4f}, "
                f"AUC {r['auc']:.4f}."
            ]
    if img:
        lines += _images_details(img)
    if held:
        lines += ["", "## Images: the recommended model on rustnorust/validation", ""]
        lines += [
            f"`build/model` on the {held['images']} validation photos (never used for "
            f"training or choices): accuracy {_pct(held['accuracy'])}, rust recall "
            f"{_pct(held['rust_recall'])}. Too few photos to compare; a sanity check.",
        ]
    if box:
        learned = bool(box.get("box_scorer"))
        ranking = (
            "with regions ranked by the recipe's box scorer, itself trained on out-of-fold "
            "maps of the training photos only"
            if learned
            else "with the region grouping chosen by inner CV on the training photos"
        )
        lines += ["", "## Boxes: out-of-fold", ""]
        lines += [
            f"export.boxes.out_of_fold, {box.get('folds', '?')} folds over the boxed photos: "
            f"each photo is scored by a texture model trained without it (nor its copies), "
            f"{ranking}; detections pooled. AP@0.5 {box['ap50']:.3f}, AP@[.5:.95] "
            f"{box['ap']:.3f}, AR@100 {box['ar100']:.3f}.",
        ]
        shown = box.get("reported")
        if learned and shown and any(shown["floors"]):
            floors = ", ".join(f"{f:.3f}" for f in shown["floors"])
            lines += [
                "",
                "AP ranks every region. A device reports only those its box scorer rates at or "
                "above the floor chosen with the scorer (the best F1 at IoU 0.5 by cross-"
                "validation over the boxed and clean training photos' out-of-fold maps; per "
                f"outer fold {floors}): {shown['per_image']:.1f} regions a boxed photo, "
                f"precision {shown['precision']:.3f}, recall {shown['recall']:.3f}, "
                f"F1 {shown['f1']:.3f} at IoU 0.5.",
            ]
        if "recommended" in box and not learned:
            rec = box["recommended"]
            lines += [
                "",
                f"Grouping recommended for devices: `{json.dumps(rec['grouping'])}` (its "
                f"AP@0.5 of {rec['ap50']:.3f} is optimistic: chosen on the same photos).",
            ]
    return lines
