"""corrosion-agent: the device's command line."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from agent import __version__, imageio
from agent.archive import iter_inputs
from agent.batch import detect_file, overlay_path, run_batch, write_overlay
from agent.config import ClassifierConfig
from agent.contract import write_schemas
from agent.engine.detector import Analysis, Detector
from agent.engine.model import ModelError
from agent.memory import tune_malloc

MANIFEST = "manifest.json"


def resolve_manifest(model: Path) -> Path:
    """MODEL may be a manifest, a folder holding one, or an .onnx with its manifest beside it."""
    if model.is_dir():
        model = model / MANIFEST
    elif model.suffix == ".onnx":
        model = model.with_name(MANIFEST)
    if not model.is_file():
        raise ModelError(f"{model}: no model manifest here")
    return model


def _detector(args: argparse.Namespace) -> Detector:
    config = ClassifierConfig(
        analysis_long_side=args.analysis_long_side, threads=args.threads, flag_pct=args.flag_pct
    )
    return Detector.load(resolve_manifest(args.model), config)


def _line(name: str, a: Analysis) -> str:
    flag = "FLAGGED" if a.flagged else "ok"
    return (
        f"{name}: {a.corrosion_pct:6.2f}% corroded  {flag:7s}  {len(a.regions)} regions  "
        f"{a.frame_size.width}x{a.frame_size.height}  {a.elapsed_ms:.1f} ms"
    )


def cmd_detect(args: argparse.Namespace) -> int:
    detector = _detector(args)
    failed = 0
    for i, path in enumerate(args.images):
        try:
            message, analysis, decoded = detect_file(
                detector, path, device_id=args.device_id, index=i
            )
        except imageio.ImageError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.out:
            write_overlay(overlay_path(args.out, path.name), decoded, analysis)
        print(message.model_dump_json() if args.json else _line(str(path), analysis), flush=True)
    return 1 if failed else 0


def cmd_batch(args: argparse.Namespace) -> int:
    detector = _detector(args)
    try:
        inputs = iter_inputs(args.path)
        bar = tqdm(inputs, desc="images", unit="img", disable=None, file=sys.stderr)
        summary = run_batch(
            detector,
            bar,
            args.out,
            on_result=lambda name, a: print(_line(name, a), flush=True),
            on_refused=lambda reason: tqdm.write(f"refused: {reason}", file=sys.stderr),
        )
    except ValueError as exc:  # not a folder or zip at all
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary.analysed} analysed, {summary.flagged} flagged, {len(summary.refused)} refused; "
        f"results in {args.out / 'results.csv'}",
        file=sys.stderr,
    )
    return 0 if summary.ok else 1


def cmd_schemas(args: argparse.Namespace) -> int:
    for path in write_schemas(args.out):
        print(path)
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, required=True, help="manifest.json, its folder, or the .onnx"
    )
    p.add_argument(
        "--analysis-long-side",
        type=int,
        default=None,
        metavar="PX",
        help="classify at this long side (JPEGs decode straight to it)",
    )
    p.add_argument("--threads", type=int, default=1, help="lookup threads (default 1)")
    p.add_argument(
        "--flag-pct", type=float, default=None, help="flag threshold %% (default: the model's)"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="corrosion-agent", description=__doc__)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="corrosion %% and regions of single images")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    _model_args(p)
    p.add_argument("--out", type=Path, default=None, help="write overlays here")
    p.add_argument("--json", action="store_true", help="one DetectionMessage JSON per line")
    p.add_argument("--device-id", default=socket.gethostname(), help="device id in --json output")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("batch", help="a folder or .zip of images: CSV + overlays")
    p.add_argument("path", type=Path, metavar="PATH")
    _model_args(p)
    p.add_argument("--out", type=Path, required=True, help="results.csv and overlays/ go here")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("schemas", help="write the contract's JSON Schemas")
    p.add_argument("--out", type=Path, default=Path("docs/schemas"))
    p.set_defaults(func=cmd_schemas)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tune_malloc()
    try:
        return int(args.func(args))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic errors name the field
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
