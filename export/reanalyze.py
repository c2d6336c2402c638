"""Reanalyse uploaded captures on SageMaker Batch Transform with a registry model.

Input: Batch Transform reads S3Prefix or ManifestFile data; AugmentedManifestFile is refused
for transform jobs (API TransformS3DataSource: "not compatible"). A ManifestFile is a JSON
array, `[{"prefix": "s3://B/P/captures/"}, "dev/2024/05/01/<id>.jpg", ...]`, and with
SplitType None every listed object is one request carrying the job's ContentType, which is
what an image needs. So the job reads `input.manifest`; `captures.jsonl` beside it holds one
contract ManifestLine per capture (`source-ref` first): the Ground Truth labelling input, and
the map from each result (`<image key>.out` under the output path) back to its sidecar.

Captures are found by listing the contract's day folders and reading each sidecar, not from
the devices' hourly manifests: a sidecar exists only for a capture that is fully uploaded,
and a device that was offline uploads an old hour late.

Model: the registry version, verified, goes into model.tar.gz with the handler's code
(`export.inference.package`). The default image is AWS's PyTorch inference container: its
Python 3.11 runs the engine (the scikit-learn and XGBoost images have 3.9/3.10), and its
toolkit serves `code/inference.py` from the model directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from pydantic import ValidationError
from tqdm import tqdm

from agent.contract import (
    MANIFEST_FILE,
    ChannelPointer,
    ModelManifest,
    RegistryUrl,
    channel_key,
    describe,
)
from agent.contract.captures import (
    IMAGE_SUFFIX,
    SIDECAR_SUFFIX,
    CaptureSidecar,
    ManifestLine,
    capture_stem,
    captures_prefix,
    is_device_id,
)
from agent.contract.registry import file_key
from agent.engine.model import verify_file
from export import inference, registry, sagemaker
from export.registry import TRANSFER, RegistryError, aws_errors, get_object, head_object

IMAGE_REPOSITORY = "pytorch-inference"
IMAGE_TAG = "2.5.1-cpu-py311"
# ECR account of AWS's Deep Learning Containers per region; source: aws/deep-learning-containers
# available_images.md (and sagemaker-python-sdk image_uri_config for us-gov-west-1).
DLC_ACCOUNTS = dict.fromkeys((
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ap-south-1", "ap-northeast-1",
    "ap-northeast-2", "ap-southeast-1", "ap-southeast-2", "ca-central-1", "eu-central-1",
    "eu-west-1", "eu-west-2", "eu-west-3", "eu-north-1", "sa-east-1",
), "763104351884") | {
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-northeast-3": "364406365360",
    "ap-southeast-3": "907027046896", "eu-south-1": "692866216735", "me-south-1": "217643126080",
    "me-central-1": "914824155844", "cn-north-1": "727897471807", "cn-northwest-1": "727897471807",
    "us-gov-west-1": "442386744353",
}  # fmt: skip
MAX_PAYLOAD_MB = 25  # SplitType None: a whole image per request; 4 x 25 MB is the 100 MB cap
MAX_CONCURRENT = 4
WORK = "reanalysis"


class ReanalysisError(ValueError):
    """Nothing to reanalyse, or a job that did not complete; the message says which."""


def utc_time(text: str) -> datetime:
    """ISO 8601 for --since/--until; a time without a zone is UTC, like the capture layout."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def image_uri(region: str) -> str:
    account = DLC_ACCOUNTS.get(region)
    if account is None:
        raise sagemaker.SageMakerError(
            f"region {region!r}: no PyTorch inference image known here; pass --image-uri"
        )
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{IMAGE_REPOSITORY}:{IMAGE_TAG}"


# --------------------------------------------------------------------------- captures


def _keys(s3: Any, url: RegistryUrl, prefix: str, **extra: str) -> Iterator[dict[str, Any]]:
    """Pages of ListObjectsV2 under `prefix` (CommonPrefixes too, with a Delimiter)."""
    with aws_errors(url.uri(prefix)):
        yield from s3.get_paginator("list_objects_v2").paginate(
            Bucket=url.bucket, Prefix=prefix, **extra
        )


def devices(s3: Any, url: RegistryUrl) -> list[str]:
    """Every device that has uploaded a capture: the folders under captures/ named as device
    ids; another folder (someone's copy) is named and passed over, not fatal."""
    top = captures_prefix(url.prefix)
    pages = _keys(s3, url, top, Delimiter="/")
    names = [
        p["Prefix"][len(top) :].rstrip("/") for pg in pages for p in pg.get("CommonPrefixes", [])
    ]
    for stray in (n for n in names if not is_device_id(n)):
        print(f"warning: {url.uri(top + stray)}/: not a device's folder; skipped", file=sys.stderr)
    return sorted(n for n in names if is_device_id(n))


def _days(since: datetime, until: datetime) -> Iterator[datetime]:
    day = since.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < until:
        yield day
        day += timedelta(days=1)


def _line(url: RegistryUrl, sidecar_key: str, sidecar: CaptureSidecar) -> ManifestLine:
    return ManifestLine(
        source_ref=url.uri(sidecar.image.key),
        frame_id=sidecar.frame_id,
        device_id=sidecar.detection.device_id,
        category=sidecar.category,
        corrosion_pct=sidecar.detection.corrosion_pct,
        model_version=f"{sidecar.model.name}@{sidecar.model.version}",
        captured_at=sidecar.captured_at,
        sidecar_ref=url.uri(sidecar_key),
    )


def list_captures(
    s3: Any, url: RegistryUrl, since: datetime, until: datetime, device: str | None = None
) -> tuple[list[ManifestLine], list[str]]:
    """Captures taken in [since, until) whose image and sidecar are both uploaded, oldest
    first; and one message per capture skipped (unreadable sidecar, image still missing)."""
    since, until = since.astimezone(UTC), until.astimezone(UTC)  # the layout's days are UTC
    sidecars: list[str] = []
    images: dict[str, int] = {}  # key -> bytes
    for dev in [device] if device else devices(s3, url):
        for day in _days(since, until):
            folder = capture_stem(url.prefix, dev, day, "0" * 32).rpartition("/")[0] + "/"
            for page in _keys(s3, url, folder):
                objects = page.get("Contents", [])
                sidecars += (o["Key"] for o in objects if o["Key"].endswith(SIDECAR_SUFFIX))
                images.update(
                    (o["Key"], int(o["Size"])) for o in objects if o["Key"].endswith(IMAGE_SUFFIX)
                )

    def examine(key: str) -> ManifestLine | str | None:
        """The capture's line, a reason it is skipped, or None (outside the window). Parsed
        in the worker, so only lines are kept, never every sidecar's body at once."""
        found = get_object(s3, url, key)
        if found is None:
            return f"{url.uri(key)}: deleted while listing"
        try:
            sidecar = CaptureSidecar.model_validate_json(found[0])
        except ValidationError as exc:
            return f"{url.uri(key)}: invalid sidecar: {describe(exc)}"
        if not since <= sidecar.captured_at < until:
            return None
        size = images.get(sidecar.image.key)
        if size is None:
            return f"{url.uri(sidecar.image.key)}: image not uploaded (yet)"
        if size > MAX_PAYLOAD_MB << 20:
            mib = size / 2**20
            return (
                f"{url.uri(sidecar.image.key)}: {mib:.1f} MiB, over a request's {MAX_PAYLOAD_MB} MB"
            )
        return _line(url, key, sidecar)

    lines: list[ManifestLine] = []
    skipped: list[str] = []
    with ThreadPoolExecutor(16) as pool:  # one GET per sidecar: parallel, as boto3 allows
        for result in pool.map(examine, sidecars):
            if isinstance(result, str):
                skipped.append(result)
            elif result is not None:
                lines.append(result)
    lines.sort(key=lambda line: (line.captured_at, line.frame_id))
    return lines, skipped


def write_inputs(
    s3: Any, work: RegistryUrl, job: str, captures: RegistryUrl, lines: list[ManifestLine]
) -> tuple[str, str]:
    """Upload the job's ManifestFile and the captures' JSON Lines; their s3:// URIs."""
    base = captures.uri(captures_prefix(captures.prefix))
    manifest = [{"prefix": base}, *(line.source_ref.removeprefix(base) for line in lines)]
    jsonl = "".join(line.model_dump_json(by_alias=True) + "\n" for line in lines)
    uris = []
    for name, body, kind in (
        ("input.manifest", json.dumps(manifest, indent=1), "application/json"),
        ("captures.jsonl", jsonl, "application/jsonl"),
    ):
        key = _work_key(work, job, name)
        with aws_errors(work.uri(key)):
            s3.put_object(
                Bucket=work.bucket,
                Key=key,
                Body=body.encode(),
                ContentType=kind,
                ChecksumAlgorithm="SHA256",
            )
        uris.append(work.uri(key))
    return uris[0], uris[1]


def _work_key(work: RegistryUrl, *parts: str) -> str:
    return "/".join(p for p in (work.prefix, WORK, *parts) if p)


# --------------------------------------------------------------------------- model


def fetch_model(
    s3: Any, url: RegistryUrl, dest: Path, name: str, *, version: str | None, channel: str
) -> ModelManifest:
    """Download a published version (by default, the one `channel` serves) into `dest`,
    checking the manifest against the channel pointer and every file against the manifest."""
    pin = None
    if version is None:
        ckey = channel_key(url.prefix, name, channel)
        found = get_object(s3, url, ckey)
        if found is None:
            raise RegistryError(f"{url.uri(ckey)}: no {channel} channel for {name}; pass --version")
        pointer = ChannelPointer.parse(found[0], url.uri(ckey))
        version, pin = pointer.version, pointer.manifest_sha256
    manifest, data = registry.read_manifest(s3, url, name, version)
    if pin is not None and hashlib.sha256(data).hexdigest() != pin:
        raise RegistryError(f"{name} {version}: manifest does not match the {channel} pointer")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST_FILE).write_bytes(data)
    for ref in manifest.files():
        fkey = file_key(url.prefix, name, version, ref.file)
        with aws_errors(url.uri(fkey)):
            s3.download_file(url.bucket, fkey, str(dest / ref.file), Config=TRANSFER)
        verify_file(dest / ref.file, ref.size, ref.sha256, url.uri(fkey))
    return manifest


def upload_model(
    s3: Any, work: RegistryUrl, manifest: ModelManifest, tarball: Path, digest: str
) -> str:
    """s3:// URI of the tarball, named by its hash and uploaded only if not there yet."""
    key = _work_key(work, "models", manifest.name, manifest.version, f"model-{digest[:16]}.tar.gz")
    if head_object(s3, work, key) is None:
        with aws_errors(work.uri(key)):
            s3.upload_file(
                str(tarball),
                work.bucket,
                key,
                ExtraArgs={"ContentType": "application/gzip", "ChecksumAlgorithm": "SHA256"},
                Config=TRANSFER,
            )
    return work.uri(key)


@dataclass(frozen=True)
class Transform:
    """What CreateModel and CreateTransformJob need."""

    job: str
    model: str  # NAME-VERSION, readable in the SageMaker console
    role_arn: str
    image: str
    model_data: str  # s3:// URI of model.tar.gz
    region: str
    manifest: str  # s3:// URI of the ManifestFile
    output: str  # s3:// prefix for the `.out` objects
    instance_type: str = "ml.c5.xlarge"
    instance_count: int = 1

    @property
    def model_name(self) -> str:
        """Same image, artifact and role give the same name, so CreateModel runs once."""
        digest = hashlib.sha256(f"{self.image}\n{self.model_data}\n{self.role_arn}".encode())
        readable = re.sub(r"[^A-Za-z0-9]+", "-", self.model).strip("-")[:43].strip("-")
        return f"corrosion-{readable}-{digest.hexdigest()[:8]}"

    def model_request(self) -> dict[str, Any]:
        size = str(MAX_PAYLOAD_MB << 20)
        return {
            "ModelName": self.model_name,
            "ExecutionRoleArn": self.role_arn,
            "PrimaryContainer": {
                "Image": self.image,
                "ModelDataUrl": self.model_data,
                "Environment": {
                    "SAGEMAKER_PROGRAM": inference.ENTRY,
                    "SAGEMAKER_SUBMIT_DIRECTORY": inference.CODE_DIR,
                    "SAGEMAKER_REGION": self.region,
                    # TorchServe (the PyTorch image) refuses requests over 6.5 MB otherwise.
                    "TS_MAX_REQUEST_SIZE": size,
                    "TS_MAX_RESPONSE_SIZE": size,
                },
            },
        }

    def job_request(self) -> dict[str, Any]:
        return {
            "TransformJobName": self.job,
            "ModelName": self.model_name,
            "BatchStrategy": "SingleRecord",
            "MaxConcurrentTransforms": MAX_CONCURRENT,
            "MaxPayloadInMB": MAX_PAYLOAD_MB,
            "TransformInput": {
                "DataSource": {
                    "S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": self.manifest}
                },
                "ContentType": "image/jpeg",  # what devices upload; a PNG is decoded by signature
                "SplitType": "None",
                "CompressionType": "None",
            },
            "TransformOutput": {
                "S3OutputPath": self.output,
                "Accept": inference.JSON,
                "AssembleWith": "None",
            },
            "TransformResources": {
                "InstanceType": self.instance_type,
                "InstanceCount": self.instance_count,
            },
        }


def submit(sm: Any, transform: Transform) -> str:
    """CreateModel unless a model of that name exists, then CreateTransformJob; the job ARN."""
    with aws_errors(f"model {transform.model_name}"):
        try:
            sm.describe_model(ModelName=transform.model_name)
        except ClientError as exc:
            if "Could not find model" not in str(exc):
                raise
            sm.create_model(**transform.model_request())
    with aws_errors(f"transform job {transform.job}"):
        return str(sm.create_transform_job(**transform.job_request())["TransformJobArn"])


def wait(aws: sagemaker.Clients, job: str, output: str, total: int, poll: float) -> None:
    """Poll the job until it ends; the bar counts the `.out` results written so far."""
    out = RegistryUrl.parse(output)
    with tqdm(total=total, desc=job, unit="image", dynamic_ncols=True) as bar:
        while True:
            with aws_errors(f"transform job {job}"):
                described = aws.sagemaker.describe_transform_job(TransformJobName=job)
            status = described["TransformJobStatus"]
            pages = _keys(aws.s3, out, out.prefix + "/" if out.prefix else "")
            done = sum(o["Key"].endswith(".out") for p in pages for o in p.get("Contents", []))
            bar.update(done - bar.n)
            bar.set_postfix_str(status)
            if status in sagemaker.DONE:
                break
            time.sleep(poll)
    if status != "Completed":
        reason = described.get("FailureReason") or "no reason given"
        raise ReanalysisError(f"transform job {job} {status.lower()}: {reason}")


# --------------------------------------------------------------------------- command


def cmd_reanalyze(args: argparse.Namespace) -> int:
    if args.since >= args.until:
        raise ReanalysisError("--since must be before --until")
    aws = sagemaker.clients(args.region)
    work = RegistryUrl.parse(args.registry)
    captures = RegistryUrl.parse(args.captures or args.registry)
    lines, skipped = list_captures(aws.s3, captures, args.since, args.until, args.device)
    for message in skipped:
        print(f"warning: {message}", file=sys.stderr)
    if not lines:
        raise ReanalysisError(f"no captures in {captures} from {args.since} to {args.until}")
    job = args.job_name or f"corrosion-reanalyze-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    manifest_uri, jsonl_uri = write_inputs(aws.s3, work, job, captures, lines)
    print(f"{len(lines)} captures: {manifest_uri} (labelling: {jsonl_uri})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="corrosion-reanalyze-") as tmp:
        manifest = fetch_model(
            aws.s3, work, Path(tmp), args.model, version=args.version, channel=args.channel
        )
        tarball = Path(tmp) / "model.tar.gz"
        digest = inference.package(Path(tmp), tarball)
        model_data = upload_model(aws.s3, work, manifest, tarball, digest)
    transform = Transform(
        job=job,
        model=f"{manifest.name}-{manifest.version}",
        role_arn=args.role,
        image=args.image_uri or image_uri(aws.region),
        model_data=model_data,
        region=aws.region,
        manifest=manifest_uri,
        output=args.output or work.uri(_work_key(work, job, "output")) + "/",
        instance_type=args.instance_type,
        instance_count=args.instance_count,
    )
    print(f"started {submit(aws.sagemaker, transform)}", file=sys.stderr)
    if args.wait:
        try:
            wait(aws, job, transform.output, len(lines), args.poll)
        except KeyboardInterrupt:
            stop = f"aws sagemaker stop-transform-job --transform-job-name {job}"
            print(f"\ninterrupted: {job} keeps running on SageMaker; stop: {stop}", file=sys.stderr)
            return 130
    print(job)
    print(transform.output)
    return 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reanalyze", help="Batch Transform of the captures of a time window with a registry model"
    )
    p.add_argument("--registry", required=True, metavar="s3://BUCKET/PREFIX")
    p.add_argument("--captures", metavar="s3://BUCKET/PREFIX", help="default: the registry's")
    p.add_argument("--since", type=utc_time, required=True, help="ISO 8601, inclusive (UTC)")
    p.add_argument("--until", type=utc_time, required=True, help="ISO 8601, exclusive (UTC)")
    p.add_argument("--device", help="only this device's captures")
    p.add_argument("--model", required=True, metavar="NAME", help="registry model name")
    p.add_argument("--version", help="published version (default: the channel's)")
    p.add_argument("--channel", default="stable")
    p.add_argument("--role", required=True, metavar="ARN", help="SageMaker execution role")
    p.add_argument("--region", help="default: the AWS configuration's")
    p.add_argument("--image-uri", help=f"serving image (default: {IMAGE_REPOSITORY}:{IMAGE_TAG})")
    p.add_argument("--instance-type", default="ml.c5.xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--output", metavar="s3://...", help="default: reanalysis/JOB/output/")
    p.add_argument("--job-name", help="default: corrosion-reanalyze-YYYYMMDD-HHMMSS")
    p.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(func=cmd_reanalyze)
