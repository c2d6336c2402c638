"""`corrosion-export recipe ...` and `corrosion-export evaluate ...`: build models, measure them.

Kept apart from export/cli.py, which wires them in, so each file stays one concern.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from export import evaluate
from export.argtypes import int_at_least
from export.datasets import DatasetError
from export.recipe import Recipe, Sources, build_texture
from export.rgb_recipe import build_aws_rgb
from export.train import check_used, hyperparameters

DEFAULT_DATA = Path("../shared/data")


def _sources(args: argparse.Namespace) -> Sources:
    if args.rust or args.norust or args.voc:
        if not (args.rust and args.norust and args.voc):
            raise DatasetError("give all of --rust, --norust and --voc, or --data")
        return Sources(args.rust, args.norust, args.voc)
    return Sources.under(args.data)


def _recipe(args: argparse.Namespace) -> Recipe:
    recipe = Recipe(seed=args.seed, threads=args.threads)
    if args.set:
        parsed = hyperparameters(None, None, args.set, local=False)  # types the values
        keys = [pair.partition("=")[0].strip() for pair in args.set]
        recipe = replace(recipe, params={**recipe.params, **{k: parsed[k] for k in keys}})
        check_used(recipe.params)
    if args.folds:
        recipe = replace(recipe, folds=args.folds)
    if args.long_side:
        recipe = replace(recipe, long_side=args.long_side)
    if args.outside_pixels is not None:
        recipe = replace(recipe, outside_pixels=args.outside_pixels)
    if args.no_image_rule:
        recipe = replace(recipe, image_rule=False)
    if args.no_box_scorer:
        recipe = replace(recipe, box_scorer=False)
    if args.no_scene:
        recipe = replace(recipe, scene_components=0)
    recipe = replace(recipe, rule_threshold=args.rule_threshold)
    return recipe


def cmd_recipe(args: argparse.Namespace) -> int:
    if args.recipe_command == "texture":
        manifest = build_texture(_sources(args), args.out, _recipe(args), version=args.version)
    else:
        csv = args.csv or args.data / "aws-rust-detection" / "train.csv"
        if not csv.is_file():
            raise DatasetError(f"{csv}: not found (see ../shared/data/README.md)")
        manifest = build_aws_rgb(
            csv, args.out, payload=args.payload, seed=args.seed, threads=args.threads
        )
    print(manifest)
    return 0


def _result(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DatasetError(f"{path}: not an evaluation result ({exc})") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from export import report  # matplotlib: only when a report or summary is drawn

    what = args.evaluate_command
    if what == "summary":
        files = sorted(args.results.glob("*.json"), key=lambda p: p.stat().st_mtime)  # run order
        results = {p.stem: _result(p) for p in files}
        if not results:
            raise DatasetError(f"{args.results}: no evaluation results (*.json)")
        args.out.write_text(report.accuracy_markdown(results, args.report))
        print(args.out)
        return 0
    result: dict[str, Any]
    if what == "pixels":
        result = evaluate.evaluate_pixels(args.model, args.csv)
    elif what == "images":
        result = evaluate.evaluate_images(args.model, args.rust, args.norust)
    elif what == "boxes":
        result = evaluate.evaluate_boxes(args.model, args.voc, args.label)
    elif what == "cv-images":
        result = evaluate.cv_images(
            _sources(args), _recipe(args), outer=args.outer, repeats=args.repeats
        )
    else:
        result = evaluate.cv_boxes(_sources(args), _recipe(args), folds=args.outer)
    result = {"command": " ".join(["corrosion-export", *args.argv]), **result}
    if args.report:
        print(f"report: {report.write_report(result, args.report)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        keys = ("accuracy", "precision", "recall", "f1", "auc", "rust_recall", "ap50", "ap")
        print(" ".join(f"{k}={result[k]:.4f}" for k in keys if k in result))
    return 0


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the ../shared/data layout")
    for flag, text in (
        ("--rust", "rust photos (instead of --data)"),
        ("--norust", "photos without rust"),
        ("--voc", "VOC XML rust boxes of (copies of) some rust photos"),
    ):
        p.add_argument(flag, type=Path, metavar="DIR", help=text)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int, default=0, help="XGBoost threads, 0 = all cores")
    p.add_argument("--folds", type=int, default=0, help="(inner) CV folds; 0 = the recipe's 5")
    p.add_argument("--long-side", type=int, default=0, help="working resolution; 0 = 320")
    p.add_argument(
        "--outside-pixels",
        type=int,
        metavar="N",
        help="clean pixels sampled outside the boxes of each boxed photo (default 3000; more "
        "tightens the mask to the annotated boxes, see bench/ACCURACY.md)",
    )
    p.add_argument(
        "--no-image-rule",
        action="store_true",
        help="flag photos by their corrosion %% alone, without the image rule "
        "(agent/engine/imagerule.py; see bench/ACCURACY.md)",
    )
    p.add_argument(
        "--no-box-scorer",
        action="store_true",
        help="rank regions by their rust contrast with the ring around them instead of the "
        "learned box scorer (agent/engine/proposals.py; see bench/ACCURACY.md)",
    )
    p.add_argument(
        "--no-scene",
        action="store_true",
        help="leave the pretrained scene embedder out of the image rule "
        "(agent/engine/scene.py; see bench/ACCURACY.md)",
    )
    p.add_argument(
        "--rule-threshold",
        choices=("extrapolated", "lowest"),
        default="extrapolated",
        help="the image rule's recall-first threshold: the lowest out-of-fold P(rust) of a "
        "training rust photo, or that lowered by its gap to the next (export/imagerule.py)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="XGBoost hyperparameter"
    )


def add_recipe_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recipes = sub.add_parser("recipe", help="train a documented recipe (export/recipe.py)")
    rs = recipes.add_subparsers(dest="recipe_command", required=True)
    p = rs.add_parser("texture", help="the recommended texture model (what `make model` runs)")
    _source_flags(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--version", default="1.0.0", help="model version for the manifest")
    p.set_defaults(func=cmd_recipe)
    p = rs.add_parser("aws-rgb", help="RGB model of the AWS pixels, with its exact table")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--csv", type=Path, help="training CSV (default DATA/aws-rust-detection/...)")
    p.add_argument("--payload", action="store_true", help="the AWS solution's own payload")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_recipe)


def add_evaluate_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("evaluate", help="accuracy of a model, or of the recipe by CV")
    es = ev.add_subparsers(dest="evaluate_command", required=True)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="the full result as JSON on stdout")
    out.add_argument("--report", type=Path, metavar="DIR", help="Markdown report with PNG plots")
    model = argparse.ArgumentParser(add_help=False, parents=[out])
    model.add_argument("--model", type=Path, required=True, help="manifest or its directory")

    p = es.add_parser("pixels", parents=[model], help="accuracy, precision, recall, F1, AUC")
    p.add_argument("--csv", type=Path, required=True, help="label-first CSV of model features")
    p = es.add_parser("images", parents=[model], help="image flags by the manifest's decision")
    p.add_argument("--rust", type=Path, required=True, metavar="DIR")
    p.add_argument("--norust", type=Path, required=True, metavar="DIR")
    p = es.add_parser("boxes", parents=[model], help="AP@0.5, AP@[.5:.95], AR@100 (COCO)")
    p.add_argument("--voc", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="VOC object name that is rust truth (repeatable; default: rust and Corroded)",
    )
    for name, text in (
        ("cv-images", "nested CV of the texture recipe: image accuracy and rust recall"),
        ("cv-boxes", "out-of-fold box AP of the texture recipe"),
    ):
        p = es.add_parser(name, parents=[out], help=text)
        _source_flags(p)
        p.add_argument("--outer", type=int_at_least(2), default=5, help="outer folds")
        if name == "cv-images":
            p.add_argument(
                "--repeats",
                type=int_at_least(1),
                default=1,
                metavar="N",
                help="pool N different outer fold splits (one split's accuracy swings by a "
                "few points; `make evaluate` uses 5)",
            )
    p = es.add_parser("summary", help="bench/ACCURACY.md from the JSON results")
    p.add_argument("--results", type=Path, required=True, metavar="DIR", help="*.json results")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument("--report", type=Path, metavar="DIR", help="where the plots were written")
    ev.set_defaults(func=cmd_evaluate)
