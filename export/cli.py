"""corrosion-export: the cloud side's command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.contract import Decision, Provenance
from agent.engine.model import ModelError, sha256_file
from export import demo
from export.convert import ConvertError, export_model, load_booster
from export.synthetic import generate
from export.train import AWS_PAYLOAD, DatasetError, read_csv, train


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"preparing the demo in {args.out} (synthetic scenes, model, frames)...", file=sys.stderr)
    manifest = demo.prepare(args.out, seed=args.seed)
    print(manifest)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    paths = generate(args.out, args.count, seed=args.seed, width=args.width, height=args.height)
    print(f"{len(paths)} scenes (image, .mask.png, VOC .xml) in {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    params = dict(AWS_PAYLOAD)
    if args.objective:
        params["objective"] = args.objective
        if args.objective == "binary:logistic":
            params.pop("num_class", None)
    if args.num_round:
        params["num_round"] = args.num_round
    print("hyperparameters: " + json.dumps(params), file=sys.stderr)
    x, y = read_csv(args.train)
    valid = read_csv(args.validation) if args.validation else None
    trained = train(x, y, params, valid=valid, early_stopping=args.early_stopping, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    trained.booster.save_model(str(args.out / "model.json"))
    record = {
        "metrics": trained.metrics,
        "hyperparameters": params,
        "training_data_sha256": sha256_file(args.train),
    }
    (args.out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(trained.metrics))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    booster = load_booster(args.model)
    provenance = Provenance(trainer=f"corrosion-export {__version__}")
    metrics_file = args.model.with_name("metrics.json")
    if metrics_file.is_file():
        record = json.loads(metrics_file.read_text())
        provenance = Provenance(
            training_data_sha256=record.get("training_data_sha256"),
            hyperparameters=record.get("hyperparameters", {}),
            metrics=record.get("metrics", {}),
            trainer=provenance.trainer,
        )
    manifest = export_model(
        booster,
        args.out,
        name=args.name,
        version=args.version,
        decision=Decision(pixel_threshold=args.pixel_threshold, flag_pct=args.flag_pct),
        provenance=provenance,
        parity=not args.skip_parity,
        with_table=not args.no_table,
    )
    print(manifest)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="corrosion-export", description=__doc__)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train the bundled demo model and write demo frames")
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="synthetic rust scenes with masks and VOC boxes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="XGBoost on a label-first CSV (AWS payload by default)")
    p.add_argument("train", type=Path, metavar="TRAIN_CSV")
    p.add_argument("--validation", type=Path, default=None, metavar="CSV")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--objective", choices=["multi:softmax", "multi:softprob", "binary:logistic"])
    p.add_argument("--num-round", type=int, default=None)
    p.add_argument("--early-stopping", type=int, default=None, metavar="ROUNDS")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="booster -> ONNX + manifest + exact table, parity proven")
    p.add_argument("model", type=Path, metavar="MODEL", help="model.json/.ubj or model.tar.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", dest="version", required=True, help="semantic version")
    p.add_argument("--pixel-threshold", type=float, default=0.5)
    p.add_argument("--flag-pct", type=float, default=5.0)
    p.add_argument("--skip-parity", action="store_true", help="skip the all-colour parity proof")
    p.add_argument("--no-table", action="store_true", help="let devices compile the table")
    p.set_defaults(func=cmd_convert)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConvertError, DatasetError, ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
