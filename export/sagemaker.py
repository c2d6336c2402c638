"""Train on SageMaker's built-in XGBoost container, wait, and fetch its model.tar.gz.

The job gets the same payload as local training (export/train.py AWS_PAYLOAD) and a CSV in
the same label-first format, so `corrosion-export convert` reads its model.tar.gz like a
local model. Everything the job touches lives under s3://BUCKET/PREFIX/jobs/JOB/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError
from tqdm import tqdm

from agent.contract import RegistryUrl
from agent.engine.model import sha256_file
from agent.s3 import RETRIES, error_code
from export.registry import TRANSFER, aws_errors
from export.train import metrics_path

DEFAULT_VERSION = "1.7-1"
VERSIONS = ("1.0-1", "1.2-1", "1.2-2", "1.3-1", "1.5-1", "1.7-1", "2.1-0")
# ECR account of the sagemaker-xgboost image per region; the same for every version above.
# Source: sagemaker-python-sdk, src/sagemaker/image_uri_config/xgboost.json.
ACCOUNTS = {
    "af-south-1": "510948584623",
    "ap-east-1": "651117190479",
    "ap-northeast-1": "354813040037",
    "ap-northeast-2": "366743142698",
    "ap-northeast-3": "867004704886",
    "ap-south-1": "720646828776",
    "ap-south-2": "628508329040",
    "ap-southeast-1": "121021644041",
    "ap-southeast-2": "783357654285",
    "ap-southeast-3": "951798379941",
    "ap-southeast-4": "106583098589",
    "ca-central-1": "341280168497",
    "ca-west-1": "190319476487",
    "cn-north-1": "450853457545",
    "cn-northwest-1": "451049120500",
    "eu-central-1": "492215442770",
    "eu-central-2": "680994064768",
    "eu-north-1": "662702820516",
    "eu-south-1": "978288397137",
    "eu-south-2": "104374241257",
    "eu-west-1": "141502667606",
    "eu-west-2": "764974769150",
    "eu-west-3": "659782779980",
    "il-central-1": "898809789911",
    "me-central-1": "272398656194",
    "me-south-1": "801668240914",
    "sa-east-1": "737474898029",
    "us-east-1": "683313688378",
    "us-east-2": "257758044811",
    "us-gov-east-1": "237065988967",
    "us-gov-west-1": "414596584902",
    "us-west-1": "746614075791",
    "us-west-2": "246618743249",
}
DONE = ("Completed", "Failed", "Stopped")


class SageMakerError(ValueError):
    """A training job that cannot be started or did not produce a model; the message says why."""


def image_uri(region: str, version: str = DEFAULT_VERSION) -> str:
    """URI of AWS's built-in XGBoost training image for a region and container version."""
    if version not in VERSIONS:
        raise SageMakerError(
            f"XGBoost container version {version!r}: known are {', '.join(VERSIONS)}; "
            "or pass --image-uri"
        )
    account = ACCOUNTS.get(region)
    if account is None:
        raise SageMakerError(
            f"region {region!r}: no built-in XGBoost image known here; pass --image-uri "
            "(SageMaker docs: Docker registry paths)"
        )
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/sagemaker-xgboost:{version}"


def job_name(now: datetime | None = None) -> str:
    return f"corrosion-xgb-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


@dataclass(frozen=True)
class Job:
    """What CreateTrainingJob needs; S3 URIs for every channel."""

    name: str
    role_arn: str
    image: str
    channels: Mapping[str, str]  # channel name -> s3:// URI of its CSV
    output: str  # s3://.../jobs/ ; the model lands at output + NAME/output/model.tar.gz
    hyperparameters: Mapping[str, Any]
    instance_type: str = "ml.c5.2xlarge"
    volume_gb: int = 10
    max_runtime: int = 7200

    def request(self) -> dict[str, Any]:
        """CreateTrainingJob arguments; SageMaker takes every hyperparameter as a string."""
        return {
            "TrainingJobName": self.name,
            "RoleArn": self.role_arn,
            "AlgorithmSpecification": {"TrainingImage": self.image, "TrainingInputMode": "File"},
            "HyperParameters": {k: str(v) for k, v in self.hyperparameters.items()},
            "InputDataConfig": [
                {
                    "ChannelName": channel,
                    "ContentType": "text/csv",
                    "DataSource": {
                        "S3DataSource": {
                            "S3DataType": "S3Prefix",
                            "S3Uri": uri,
                            "S3DataDistributionType": "FullyReplicated",
                        }
                    },
                }
                for channel, uri in self.channels.items()
            ],
            "OutputDataConfig": {"S3OutputPath": self.output},
            "ResourceConfig": {
                "InstanceType": self.instance_type,
                "InstanceCount": 1,
                "VolumeSizeInGB": self.volume_gb,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": self.max_runtime},
        }


def jobs_key(work: RegistryUrl, *parts: str) -> str:
    """Key under the work location's jobs/ folder, where a job's inputs and outputs live."""
    return "/".join(p for p in (work.prefix, "jobs", *parts) if p)


def stage_inputs(
    s3: Any, work: RegistryUrl, job: str, sources: Mapping[str, str]
) -> dict[str, str]:
    """S3 URI per channel: s3:// sources as they are, local CSVs uploaded to jobs/JOB/."""
    staged = {}
    for channel, source in sources.items():
        if source.startswith("s3://"):
            RegistryUrl.parse(source)  # validated, but passed as given: SageMaker reads a raw
            staged[channel] = source  # key prefix, and `csv/train` would read csv/train-2021/
            continue
        path = Path(source)
        if not path.is_file():
            raise SageMakerError(f"{path}: no such CSV for the {channel} channel")
        key = jobs_key(work, job, f"{channel}.csv")
        with aws_errors(work.uri(key)):
            s3.upload_file(
                str(path),
                work.bucket,
                key,
                ExtraArgs={"ContentType": "text/csv", "ChecksumAlgorithm": "SHA256"},
                Config=TRANSFER,
            )
        staged[channel] = work.uri(key)
    return staged


def ensure_new(sm: Clients, job: str) -> None:
    """Refuse a job name already used, before staging overwrites that job's recorded input
    (SageMaker refuses the name only at CreateTrainingJob, after the upload)."""
    with aws_errors(f"training job {job}"):
        try:
            sm.sagemaker.describe_training_job(TrainingJobName=job)
        except ClientError as exc:
            if error_code(exc) == "ValidationException":  # SageMaker's "not found": it is free
                return
            raise
    raise SageMakerError(f"training job {job} exists already: choose another --job-name")


def wait(sagemaker: Any, job: str, poll: float) -> dict[str, Any]:
    """Poll DescribeTrainingJob until the job ends, showing its status and elapsed time."""
    with tqdm(desc=job, bar_format="{desc} [{elapsed}]", dynamic_ncols=True) as bar:
        while True:
            with aws_errors(f"training job {job}"):
                described: dict[str, Any] = sagemaker.describe_training_job(TrainingJobName=job)
            transitions = described.get("SecondaryStatusTransitions") or [{}]
            status = described.get("SecondaryStatus", described["TrainingJobStatus"])
            message = transitions[-1].get("StatusMessage", "")
            bar.set_description_str(f"{job}: {status}" + (f" - {message}" if message else ""))
            if described["TrainingJobStatus"] in DONE:
                return described
            time.sleep(poll)


def fetch_model(s3: Any, described: Mapping[str, Any], out: Path) -> Path:
    """Download the job's model.tar.gz into `out`; refuse a job that did not complete."""
    job, status = described["TrainingJobName"], described["TrainingJobStatus"]
    if status != "Completed":
        raise SageMakerError(f"training job {job} {status.lower()}: {_why(described)}")
    artifact = described["ModelArtifacts"]["S3ModelArtifacts"]
    location = RegistryUrl.parse(artifact)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.tar.gz"
    with aws_errors(artifact):
        s3.download_file(location.bucket, location.prefix, str(target), Config=TRANSFER)
    return target


def _why(described: Mapping[str, Any]) -> str:
    """FailureReason, else the last status transition: a job stopped by its time limit says
    so only there (SecondaryStatus MaxRuntimeExceeded, no FailureReason)."""
    if described.get("FailureReason"):
        return str(described["FailureReason"])
    secondary = described.get("SecondaryStatus")
    message = (described.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage")
    why = " - ".join(str(x) for x in (secondary, message) if x) or "no reason given"
    if secondary == "MaxRuntimeExceeded":
        why += "; allow it longer with --max-runtime SECONDS"
    return why


def write_record(
    described: Mapping[str, Any], params: Mapping[str, Any], train: str, model: Path
) -> None:
    """The model's metrics_path (model.tar.gz.metrics.json), the record `convert` copies into
    the manifest."""
    metrics = {m["MetricName"]: m["Value"] for m in described.get("FinalMetricDataList", [])}
    record = {
        "model": model.name,
        "metrics": metrics,
        "hyperparameters": dict(params),
        "training_data_sha256": None if train.startswith("s3://") else sha256_file(Path(train)),
        "training_job": described.get("TrainingJobArn"),
    }
    metrics_path(model).write_text(json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class Clients:
    region: str
    s3: Any
    sagemaker: Any


def clients(region: str | None) -> Clients:
    """S3 and SageMaker clients of one session (endpoints: AWS_ENDPOINT_URL[_S3/_SAGEMAKER])."""
    session = boto3.session.Session(region_name=region)
    if session.region_name is None:
        raise SageMakerError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    return Clients(
        session.region_name,
        session.client("s3", config=RETRIES),
        session.client("sagemaker", config=RETRIES),
    )


def start(sm: Clients, job: Job) -> str:
    """CreateTrainingJob; its ARN."""
    with aws_errors(f"training job {job.name}"):
        return str(sm.sagemaker.create_training_job(**job.request())["TrainingJobArn"])
