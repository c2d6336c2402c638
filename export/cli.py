"""corrosion-export: the cloud side's command line."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import __version__
from agent.contract import (
    MANIFEST_FILE,
    Decision,
    Provenance,
    RegistryUrl,
    describe,
    key_part,
    manifest_key,
)
from agent.contract.manifest import PIXEL_THRESHOLD_RANGE
from agent.engine.model import ModelError
from agent.signing import key_id, keyring, load_public_key
from export import accuracy_cli, dataset_cli, demo, reanalyze, registry, retrain, sagemaker
from export.argtypes import float_within, int_at_least
from export.convert import (
    ConvertError,
    export_model,
    load_booster,
    objective_of,
    parity_proven,
    staged,
)
from export.datasets import DatasetError, build
from export.synthetic import generate
from export.train import FOLDER_METRICS, fit, hyperparameters, metrics_path


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"preparing the demo in {args.out} (synthetic scenes, model, frames)...", file=sys.stderr)
    manifest = demo.prepare(args.out, seed=args.seed)
    print(manifest)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    paths = generate(args.out, args.count, seed=args.seed, width=args.width, height=args.height)
    print(f"{len(paths)} scenes (image, .mask.png, VOC .xml) in {args.out}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    config = dataset_cli.config_of(
        args, voc=args.voc, crops=args.crops, masks=args.masks, negatives=args.negatives
    )
    if not (config.voc or config.crops or config.masks or config.negatives):
        raise DatasetError("no sources: give --voc, --crops, --masks and/or --negatives")
    report = build(config, args.out)
    for name, split in report.splits.items():
        counts = split["counts"]
        print(
            f"{name}: {len(split['images'])} images, {split['rows']} rows "
            f"(clean {counts['0']}, corroded {counts['1']}) -> {args.out / split['csv']}"
        )
    problems = len(report.skipped) + len(report.split_problems)
    if problems:
        print(f"warning: {problems} problems, see above and dataset.json", file=sys.stderr)
    return 1 if problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    params = hyperparameters(args.objective, args.num_round, args.set)
    record = fit(
        args.train,
        args.out,
        params,
        validation=args.validation,
        early_stopping=args.early_stopping,
        threads=args.threads,
        seed=args.seed,
    )
    print(json.dumps(record["metrics"]))
    return 0


def provenance(model: Path) -> Provenance:
    """What `train` or `sagemaker train` recorded of this model: its metrics_path, else the
    folder's metrics.json that earlier versions wrote for whichever model was trained last.
    A record written for another model (its `model` field names a different file) is not
    this one's: it is left out, with a warning. A record without the field (`sagemaker
    train` wrote none before) is taken."""
    trainer = f"corrosion-export {__version__}"
    record_file = metrics_path(model)
    if not record_file.is_file():
        record_file = model.with_name(FOLDER_METRICS)
    if not record_file.is_file():
        return Provenance(trainer=trainer)
    try:
        record = json.loads(record_file.read_text())
        described = record.get("model")
    except (ValueError, AttributeError) as exc:
        raise ConvertError(f"{record_file}: not a training record ({exc})") from None
    if described is not None and described != model.name:
        print(
            f"warning: {record_file} describes {described!r}, not {model.name}: the manifest "
            "gets no training record",
            file=sys.stderr,
        )
        return Provenance(trainer=trainer)
    try:
        return Provenance(
            training_data_sha256=record.get("training_data_sha256"),
            hyperparameters=record.get("hyperparameters", {}),
            metrics=record.get("metrics", {}),
            trainer=trainer,
        )
    except ValidationError as exc:
        raise ConvertError(f"{record_file}: {describe(exc)}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    key_part("model name", args.name)  # before a minute of parity work, not after it
    key_part("version", args.version)
    booster = load_booster(args.model)
    with staged(args.out) as staging:  # a failed convert leaves an earlier export intact
        export_model(
            booster,
            staging,
            name=args.name,
            version=args.version,
            decision=Decision(pixel_threshold=args.pixel_threshold, flag_pct=args.flag_pct),
            provenance=provenance(args.model),
            parity=not args.skip_parity,
            with_table=not args.no_table,
        )
    if args.skip_parity:
        print(
            "warning: --skip-parity: nothing proves the ONNX model answers as xgboost does; "
            "the manifest's provenance notes say so",
            file=sys.stderr,
        )
    else:
        proof = parity_proven(objective_of(booster), args.pixel_threshold)
        print(f"parity proven: {proof}", file=sys.stderr)
    print(args.out / MANIFEST_FILE)
    return 0


def _registry(args: argparse.Namespace) -> tuple[Any, RegistryUrl]:
    return registry.s3_client(args.endpoint_url), RegistryUrl.parse(args.registry)


def _operator() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except OSError:  # no user name in a bare container
        return socket.gethostname()


def cmd_keygen(args: argparse.Namespace) -> int:
    kid = registry.keygen(args.out)
    print(f"private key {args.out / registry.PRIVATE_KEY_FILE} (keep it secret)", file=sys.stderr)
    print(f"public key {args.out / registry.PUBLIC_KEY_FILE} (for devices)", file=sys.stderr)
    print(kid)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    s3, url = _registry(args)
    key = registry.load_private_key(args.key)
    m = registry.publish(s3, url, args.model_dir, key)
    where = url.uri(manifest_key(url.prefix, m.name, m.version))
    print(f"published {m.name} {m.version}: {where} (key {key_id(key.public_key())})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    s3, url = _registry(args)
    key = registry.load_private_key(args.key) if args.key else None
    keys = None
    if args.public_key:
        keys = keyring(load_public_key(p) for p in args.public_key)
    elif key is not None:  # who signs pointers with a key trusts manifests it signed
        keys = keyring([key.public_key()])
        print(f"checking the signature with the public half of {args.key}", file=sys.stderr)
    pointer, previous = registry.promote(
        s3,
        url,
        args.name,
        args.version,
        args.channel,
        public_keys=keys,
        promoted_by=args.by or _operator(),
        key=key,
    )
    was = "nothing"
    if previous is not None:
        when = f"{previous.promoted_at:%Y-%m-%d %H:%M %Z}"
        was = f"{previous.version} (promoted {when} by {previous.promoted_by})"
    print(f"{pointer.name} {pointer.channel}: now {pointer.version}, was {was}")
    if keys is None:
        print("warning: no --public-key nor --key, the signature was not checked", file=sys.stderr)
    if args.key is None:
        print(
            "warning: no --key, the pointer is unsigned: devices that require signatures "
            "refuse it on a channel once signed, and elsewhere take it only to a newer version",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    s3, url = _registry(args)
    listing = registry.list_registry(s3, url, args.name)
    if args.json:
        print(json.dumps(registry.listing_json(listing), indent=2))
    else:
        print(registry.format_listing(listing))
    if not (listing.manifests or listing.pointers or listing.invalid):
        what = f"{args.name} " if args.name else ""
        print(f"nothing {what}published under {url.uri()}", file=sys.stderr)
    if listing.invalid:
        print(
            f"warning: {len(listing.invalid)} invalid objects in the registry, listed as such",
            file=sys.stderr,
        )
    return 1 if listing.invalid else 0


def cmd_sagemaker_train(args: argparse.Namespace) -> int:
    # The container checks keys against its own XGBoost and its extras (early_stopping_rounds).
    params = hyperparameters(args.objective, args.num_round, args.set, local=False)
    work = RegistryUrl.parse(args.s3)
    aws = sagemaker.clients(args.region)
    image = args.image_uri or sagemaker.image_uri(aws.region, args.xgboost_version)
    name = args.job_name or sagemaker.job_name()
    sources = {"train": args.train} | ({"validation": args.validation} if args.validation else {})
    sagemaker.ensure_new(aws, name)
    job = sagemaker.Job(
        name=name,
        role_arn=args.role,
        image=image,
        channels=sagemaker.stage_inputs(aws.s3, work, name, sources),
        output=work.uri(sagemaker.jobs_key(work)) + "/",
        hyperparameters=params,
        instance_type=args.instance_type,
        max_runtime=args.max_runtime,
    )
    print(f"started {sagemaker.start(aws, job)}", file=sys.stderr)
    try:
        described = sagemaker.wait(aws.sagemaker, name, args.poll)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: training job {name} keeps running (and billing) on SageMaker; "
            f"stop it with: aws sagemaker stop-training-job --region {aws.region} "
            f"--training-job-name {name}",
            file=sys.stderr,
        )
        return 130
    model = sagemaker.fetch_model(aws.s3, described, args.out)
    sagemaker.write_record(described, params, args.train, model)
    print(model)
    print(
        f"next: corrosion-export convert {model} --out DIR --name NAME --version X.Y.Z",
        file=sys.stderr,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="corrosion-export", description=__doc__)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train the bundled demo model and write demo frames")
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--seed", type=int_at_least(0), default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="synthetic rust scenes with masks and VOC boxes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int_at_least(1), default=20)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("dataset", help="pixel CSVs from labelled images, split by image")
    for flag, text in (
        ("--voc", "Pascal VOC: images + labelImg XML"),
        ("--crops", "crops named <Label>-*.png: every pixel gets the label"),
        ("--masks", "images with <stem>.mask.png beside them: nonzero = corroded"),
        ("--negatives", "photos without corrosion: every pixel clean"),
    ):
        p.add_argument(flag, type=Path, action="append", default=[], metavar="DIR", help=text)
    dataset_cli.add_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("train", help="XGBoost on a label-first CSV (AWS payload by default)")
    p.add_argument("train", type=Path, metavar="TRAIN", help="CSV, or a `dataset` directory")
    p.add_argument("--validation", type=Path, default=None, metavar="CSV")
    p.add_argument("--out", type=Path, required=True, help="model .json/.ubj, or a directory")
    p.add_argument("--objective", choices=["multi:softmax", "multi:softprob", "binary:logistic"])
    p.add_argument("--num-round", type=int_at_least(1), default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyperparameter (one this XGBoost would ignore is refused)",
    )
    p.add_argument(
        "--early-stopping",
        type=int_at_least(0),
        default=10,
        metavar="ROUNDS",
        help="on the validation data; 0 disables",
    )
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="booster -> ONNX + manifest + exact table, parity proven")
    p.add_argument("model", type=Path, metavar="MODEL", help="model.json/.ubj or model.tar.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", dest="version", required=True, help="semantic version")
    p.add_argument("--pixel-threshold", type=float_within(*PIXEL_THRESHOLD_RANGE), default=0.5)
    p.add_argument("--flag-pct", type=float_within(0.0, 100.0), default=5.0)
    p.add_argument("--skip-parity", action="store_true", help="skip the all-colour parity proof")
    p.add_argument("--no-table", action="store_true", help="let devices compile the table")
    p.set_defaults(func=cmd_convert)
    _add_registry_commands(sub)
    _add_sagemaker_commands(sub)
    reanalyze.add_command(sub)
    retrain.add_command(sub)
    accuracy_cli.add_recipe_commands(sub)
    accuracy_cli.add_evaluate_commands(sub)
    return ap


def _add_registry_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="Ed25519 key pair that signs registry models")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(func=cmd_keygen)

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", required=True, metavar="s3://BUCKET/PREFIX")
    where.add_argument(
        "--endpoint-url", metavar="URL", help="S3-compatible store (default: AWS_ENDPOINT_URL_S3)"
    )

    p = sub.add_parser("publish", parents=[where], help="sign an export and upload it, immutable")
    p.add_argument("model_dir", type=Path, metavar="DIR", help="directory written by convert")
    p.add_argument("--key", type=Path, required=True, metavar="PRIVATE.pem")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("promote", parents=[where], help="point a channel at a published version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION")
    p.add_argument(
        "--channel",
        default="stable",
        help="channel to point at the version (default: stable, which devices follow unless "
        "their model.channel says otherwise)",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBLIC.pem",
        help="refuse unless the manifest verifies with this key (repeatable; recommended; "
        "default: the public half of --key)",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="PRIVATE.pem",
        help="sign the pointer (contract 1.6; recommended): devices refuse it replayed later, "
        "and an unsigned pointer cannot take them back to an older version nor follow a signed "
        "one on the channel",
    )
    p.add_argument("--by", help="who promotes, recorded in the pointer (default: user@host)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "list",
        parents=[where],
        help="published versions and channel pointers; exits 1 when some are invalid (each is "
        "listed with its reason, the rest as usual)",
    )
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)


def _add_sagemaker_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sm = sub.add_parser("sagemaker", help="train on AWS SageMaker").add_subparsers(
        dest="sagemaker_command", required=True
    )
    p = sm.add_parser(
        "train", help="built-in XGBoost training job; waits, then downloads model.tar.gz"
    )
    p.add_argument("train", metavar="TRAIN", help="label-first CSV, local or s3://")
    p.add_argument("--validation", metavar="CSV", help="local or s3://")
    p.add_argument(
        "--s3", required=True, metavar="s3://BUCKET/PREFIX", help="inputs and outputs: jobs/JOB/"
    )
    p.add_argument("--role", required=True, metavar="ARN", help="SageMaker execution role")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model.tar.gz goes here")
    p.add_argument("--region", help="default: the AWS configuration's")
    p.add_argument("--xgboost-version", default=sagemaker.DEFAULT_VERSION, metavar="VERSION")
    p.add_argument("--image-uri", help="training image, instead of the built-in XGBoost's")
    p.add_argument("--instance-type", default="ml.c5.2xlarge")
    p.add_argument("--max-runtime", type=int, default=7200, metavar="SECONDS")
    p.add_argument("--job-name", help="default: corrosion-xgb-YYYYMMDD-HHMMSS")
    p.add_argument("--objective", choices=["multi:softmax", "multi:softprob", "binary:logistic"])
    p.add_argument("--num-round", type=int_at_least(1), default=None)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any hyperparameter"
    )
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(func=cmd_sagemaker_train)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # results cite their command
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `corrosion-export list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # mute the exit flush
        return 141  # as a shell reports a process SIGPIPE stopped
    except (ConvertError, DatasetError, ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
