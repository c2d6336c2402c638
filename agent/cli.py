"""corrosion-agent: the device's command line."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agent import __version__
from agent.config import AgentConfig, ClassifierConfig, ConfigError, TlsConfig
from agent.exif import camera_zone
from agent.health import heartbeat_age
from agent.memory import tune_malloc

if TYPE_CHECKING:
    from agent.engine.detector import Analysis, Detector

# The engine, OpenCV and the broker stack load inside the commands that need them, so
# `health` (a Docker HEALTHCHECK every minute) and `check-config` start in a blink.


def _detector(args: argparse.Namespace) -> Detector:
    from agent.engine.detector import Detector
    from agent.engine.model import resolve_manifest

    options = {
        "analysis_long_side": args.analysis_long_side,
        "threads": args.threads,
        "flag_pct": args.flag_pct,
    }
    try:
        config = ClassifierConfig(**options)
    except ValidationError as exc:  # named as the user typed it: --threads, not `threads`
        err = exc.errors(include_url=False)[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    return Detector.load(resolve_manifest(args.model), config)


def _line(name: str, a: Analysis) -> str:
    flag = "FLAGGED" if a.flagged else "ok"
    rust = "" if a.rust_probability is None else f" (P(rust) {a.rust_probability:.2f})"
    return (
        f"{name}: {a.corrosion_pct:6.2f}% corroded  {flag:7s}{rust}  {len(a.regions)} regions  "
        f"{a.frame_size.width}x{a.frame_size.height}  {a.elapsed_ms:.1f} ms"
    )


def cmd_detect(args: argparse.Namespace) -> int:
    from agent import imageio
    from agent.batch import detect_file, overlay_path, write_overlay

    detector = _detector(args)
    failed = 0
    names: set[str] = set()
    for i, path in enumerate(args.images):
        try:
            message, analysis, decoded = detect_file(
                detector, path, device_id=args.device_id, index=i, zone=args.camera_tz
            )
        except imageio.ImageError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.out:  # dir1/a.jpg and dir2/a.jpg: the second is named a-<n>.jpg
            name, n = path.name, 1
            while name in names:
                name, n = f"{path.stem}-{n}{path.suffix}", n + 1
            names.add(name)
            try:
                write_overlay(overlay_path(args.out, name), decoded, analysis)
            except OSError as exc:
                print(f"overlay not written: {exc}", file=sys.stderr)
                failed += 1
        print(message.model_dump_json() if args.json else _line(str(path), analysis), flush=True)
    return 1 if failed else 0


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from agent.archive import Limits, iter_inputs
    from agent.batch import MAP_FILE, run_batch

    detector = _detector(args)
    try:
        inputs = iter_inputs(args.path, Limits(max_long_side=detector.config.analysis_long_side))
        bar = tqdm(inputs, desc="images", unit="img", disable=None, file=sys.stderr)
        summary = run_batch(
            detector,
            bar,
            args.out,
            on_result=lambda name, a: print(_line(name, a), flush=True),
            on_refused=lambda reason: tqdm.write(f"refused: {reason}", file=sys.stderr),
            on_unwritten=lambda why: tqdm.write(f"not written: {why}", file=sys.stderr),
            zone=args.camera_tz,
        )
    except ValueError as exc:  # not a folder or zip at all
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary.analysed} analysed, {summary.flagged} flagged, {len(summary.refused)} refused, "
        f"{len(summary.unwritten)} output file(s) not written; "
        f"results in {args.out / 'results.csv'} (geotagged photos: {args.out / MAP_FILE})",
        file=sys.stderr,
    )
    return 0 if summary.ok else 1


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("paho").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _load_config(args: argparse.Namespace) -> AgentConfig:
    overrides: dict[str, Any] = {}
    if getattr(args, "exit_when_done", False):
        overrides["source"] = {"exit_when_done": True}
    return AgentConfig.load(args.config, **overrides)


@contextmanager
def _naming(config_file: Path) -> Iterator[None]:
    """A fault in what the config names (the model, the source, TLS files, public keys,
    state_dir; each message names its setting) names the config file too, as a fault in
    the config itself does."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"{config_file}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    _setup_logging(config.log_level)
    from agent.daemon import Agent  # imports the broker and source stacks: run only

    with _naming(args.config):
        agent = Agent(config)
    return leave(agent.run())  # a fault at start propagates: main names it, exit 2


def leave(code: int) -> int:
    """`code`, or the process ends here with it if a thread outlived the shutdown: a daemon
    thread inside native code (the updater loading a model into onnxruntime, a grabber in a
    camera read) aborts the interpreter's teardown (SIGABRT, exit 134, a core dump and a
    restart). Everything durable is closed by now; there is nothing left to finalize."""
    alive = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if not alive:
        return code
    logging.getLogger(__name__).info("exit %d past busy thread(s): %s", code, ", ".join(alive))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.mqtt import make_client
    from agent.signing import trusted_keys

    config = _load_config(args)
    # The files the config names fail here, not at the first connect or model update: the
    # client is built as `run` builds it, so TLS files are parsed (a CA that is not PEM, a
    # key that does not match its certificate), not only opened.
    with _naming(args.config):
        if config.mqtt.enabled:
            make_client(config.mqtt, client_id=config.device_id)
        trusted_keys(config.model)
        _bundled_manifest(config.model.path, registry=config.model.registry is not None)
    print(config.effective())
    print(f"{args.config}: OK", file=sys.stderr)
    return 0


def _bundled_manifest(path: Path, *, registry: bool) -> None:
    """A bundled model that is there must have a manifest that reads (not loaded: check-config
    stays quick, and the model's own checks run at start). One that is not there is only a
    warning: the model is often installed after the config (docs/DEPLOY.md), and a relative
    path is resolved where the service starts (its state dir), not in this shell. A registry
    device needs it too: it serves it until it has stored a registry version, and falls back
    to it when none of those loads."""
    from agent.contract import ModelManifest
    from agent.engine.model import ModelError, resolve_manifest

    try:
        manifest = resolve_manifest(path)
    except ModelError as exc:
        where = "" if path.is_absolute() else f" (looked for relative to {Path.cwd()})"
        until = " until a registry version is stored" if registry else ""
        print(f"warning: model.path: {exc}{where}: run needs it there{until}", file=sys.stderr)
        return
    try:
        ModelManifest.read(manifest)
    except ValueError as exc:
        raise ConfigError(f"model.path: {exc}") from None


def cmd_health(args: argparse.Namespace) -> int:
    age = heartbeat_age(args.state_dir)
    if age is None:
        print(f"unhealthy: no heartbeat in {args.state_dir}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: frame loop silent for {age:.0f} s", file=sys.stderr)
        return 1
    print(f"healthy: heartbeat {age:.0f} s ago")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from agent.watch import broker_config, watch

    tls = TlsConfig(
        enabled=args.ca is not None or args.cert is not None,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
    )
    config = broker_config(args.broker, tls, args.username, args.password)
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    return watch(config, prefix=prefix, device=args.device, as_json=args.json, count=args.count)


def cmd_schemas(args: argparse.Namespace) -> int:
    from agent.contract import write_schemas

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
    p.add_argument(
        "--camera-tz",
        type=_zone,
        default=None,
        metavar="ZONE",
        help="the camera clock's zone, for EXIF times without an offset: Australia/Sydney, "
        "+10:00 or UTC (default: this computer's)",
    )


def _offsets_joined(argv: Sequence[str]) -> list[str]:
    """`--camera-tz -05:30` as `--camera-tz=-05:30`: argparse takes a value starting with
    "-" for an option, and every camera west of Greenwich has one."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--camera-tz" and arg.startswith("-"):
            out[-1] = f"--camera-tz={arg}"
        else:
            out.append(arg)
    return out


def _zone(text: str) -> tzinfo | None:
    try:
        return camera_zone(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    p = sub.add_parser("run", help="the daemon: classify a source, publish over MQTT")
    p.add_argument("--config", type=Path, required=True, help="TOML file (see config/)")
    p.add_argument(
        "--exit-when-done",
        "--once",
        action="store_true",
        help="stop when a file source is exhausted (after handing the outbox to the broker)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config and print it, secrets masked")
    p.add_argument("config", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("health", help="exit 0 if the daemon's frame loop is alive (Docker)")
    p.add_argument("--state-dir", type=Path, required=True, help="the daemon's state_dir")
    p.add_argument("--max-age", type=float, default=60.0, help="seconds (default 60)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("watch", help="print what devices publish (detections, status, ...)")
    p.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port or mqtts://..."
    )
    p.add_argument("--prefix", default="corrosion/", help="topic prefix before the device id")
    p.add_argument("--device", default="+", help="one device id (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--count", type=int, default=None, help="exit after this many messages")
    p.add_argument("--username", default=None)
    p.add_argument("--password", default=None)
    p.add_argument("--ca", type=Path, default=None, help="CA file (TLS)")
    p.add_argument("--cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, default=None, help="client key (mutual TLS)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("schemas", help="write the contract's JSON Schemas")
    p.add_argument("--out", type=Path, default=Path("docs/schemas"))
    p.set_defaults(func=cmd_schemas)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(_offsets_joined(sys.argv[1:] if argv is None else argv))
    tune_malloc()
    try:
        return int(args.func(args))
    except ValueError as exc:  # ModelError, ConfigError, SourceError: one line naming the fault
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
