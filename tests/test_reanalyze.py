"""`reanalyze` against moto over HTTP: the window's captures, the manifests, the SageMaker calls.

moto's SageMaker accepts any image and role, marks a transform job Completed at once and
writes no results, and CreateModel silently replaces a model of the same name (AWS refuses
it), so the test reads the model's CreationTime to see that the second run reused it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import cv2
import numpy as np
import pytest

from agent.contract import DetectionMessage, ModelRef, RegistryUrl, Size
from agent.contract.captures import (
    IMAGE_SUFFIX,
    SIDECAR_SUFFIX,
    CapturedImage,
    CaptureSidecar,
    ManifestLine,
    capture_stem,
)
from export import reanalyze, registry, sagemaker
from export.cli import main
from tests.s3_server import REGION

ROLE = "arn:aws:iam::123456789012:role/sagemaker"
PREFIX = "fleet"
WINDOW = ("--since", "2024-05-02", "--until", "2024-05-03T00:00:00+00:00")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def put_capture(
    s3: Any, bucket: str, device: str, when: datetime, *, image: bool = True
) -> tuple[str, str]:
    """A capture as the device uploads it (contract keys); (image key, sidecar key)."""
    frame_id = uuid.uuid4().hex
    stem = capture_stem(PREFIX, device, when, frame_id)
    ok, jpeg = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))
    assert ok
    data = jpeg.tobytes()
    ref = ModelRef(name="test-rgb", version="1.0.0", sha256="0" * 64)
    detection = DetectionMessage(
        message_id=frame_id,
        device_id=device,
        source="file:frame.jpg",
        frame_index=0,
        captured_at=when,
        model=ref,
        corrosion_pct=7.5,
        flagged=True,
        threshold=5.0,
        frame_size=Size(width=32, height=24),
        analysis_size=Size(width=32, height=24),
        latency_ms=1.0,
    )
    sidecar = CaptureSidecar(
        frame_id=frame_id,
        category="flagged",
        reasons=("flagged",),
        detection=detection,
        model=ref,
        image=CapturedImage(
            key=stem + IMAGE_SUFFIX,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            content_type="image/jpeg",
            original=True,
        ),
        captured_at=when,
    )
    if image:
        s3.put_object(Bucket=bucket, Key=stem + IMAGE_SUFFIX, Body=data)
    s3.put_object(Bucket=bucket, Key=stem + SIDECAR_SUFFIX, Body=sidecar.model_dump_json())
    return stem + IMAGE_SUFFIX, stem + SIDECAR_SUFFIX


@dataclass
class Fleet:
    bucket: str
    inside: list[tuple[str, str]]  # (image key, sidecar key), oldest first


@pytest.fixture
def fleet(
    aws_endpoint: str, s3: Any, s3_bucket: str, logistic_model: Path, tmp_path: Path
) -> Fleet:
    """test-rgb 1.0.0 published and on stable; captures in, around and outside the window."""
    registry.keygen(tmp_path / "keys")
    key = registry.load_private_key(tmp_path / "keys" / registry.PRIVATE_KEY_FILE)
    url = RegistryUrl(s3_bucket, PREFIX)
    client = registry.s3_client()
    registry.publish(client, url, logistic_model.parent, key)
    registry.promote(client, url, "test-rgb", "1.0.0", "stable", public_keys=None, promoted_by="t")
    put_capture(s3, s3_bucket, "dev-a", at("2024-05-01T23:59:59"))  # just before
    first = put_capture(s3, s3_bucket, "dev-a", at("2024-05-02T00:00:00"))  # since: inclusive
    second = put_capture(s3, s3_bucket, "dev-b", at("2024-05-02T06:30:00"))
    third = put_capture(s3, s3_bucket, "dev-a", at("2024-05-02T23:59:59.999"))
    put_capture(s3, s3_bucket, "dev-a", at("2024-05-03T00:00:00"))  # until: exclusive
    put_capture(s3, s3_bucket, "dev-b", at("2024-05-02T08:00:00"), image=False)  # uploading
    bad = capture_stem(PREFIX, "dev-b", at("2024-05-02T09:00:00"), uuid.uuid4().hex)
    s3.put_object(Bucket=s3_bucket, Key=bad + SIDECAR_SUFFIX, Body=b'{"frame_id": 1}')
    stray = f"{PREFIX}/captures/old copy/2024/05/02/x.json"  # someone's copy: no device id
    s3.put_object(Bucket=s3_bucket, Key=stray, Body=b"{}")
    return Fleet(s3_bucket, [first, second, third])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_lists_exactly_the_window_and_submits_the_job(
    fleet: Fleet, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_url = f"s3://{fleet.bucket}/{PREFIX}"
    argv = ("reanalyze", "--registry", registry_url, *WINDOW, "--model", "test-rgb")
    code, out, err = run(capsys, *argv, "--role", ROLE, "--job-name", "job-1", "--wait")
    assert code == 0, err
    output = f"{registry_url}/reanalysis/job-1/output/"
    assert out == ["job-1", output]
    assert "3 captures" in err
    assert re.search(r"warning: .*\.jpg: image not uploaded", err)
    assert re.search(r"warning: .*\.json: invalid sidecar: .*frame_id", err)
    assert f"warning: {registry_url}/captures/old copy/: not a device's folder; skipped" in err

    # the ManifestFile: a prefix and one relative key per image, oldest first
    base = f"s3://{fleet.bucket}/{PREFIX}/captures/"
    key = f"{PREFIX}/reanalysis/job-1/input.manifest"
    manifest = json.loads(s3.get_object(Bucket=fleet.bucket, Key=key)["Body"].read())
    assert manifest == [{"prefix": base}] + [
        image.removeprefix(f"{PREFIX}/captures/") for image, _ in fleet.inside
    ]
    # the JSON Lines: the contract's ManifestLine, source-ref first
    key = f"{PREFIX}/reanalysis/job-1/captures.jsonl"
    text = s3.get_object(Bucket=fleet.bucket, Key=key)["Body"].read().decode()
    assert all(line.startswith('{"source-ref":') for line in text.splitlines())
    lines = [ManifestLine.model_validate_json(line) for line in text.splitlines()]
    assert [(m.source_ref, m.sidecar_ref) for m in lines] == [
        (f"s3://{fleet.bucket}/{image}", f"s3://{fleet.bucket}/{sidecar}")
        for image, sidecar in fleet.inside
    ]
    assert [m.device_id for m in lines] == ["dev-a", "dev-b", "dev-a"]

    sm = boto3.client("sagemaker", region_name=REGION)
    job = sm.describe_transform_job(TransformJobName="job-1")
    assert job["TransformInput"] == {
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "ManifestFile",
                "S3Uri": f"{registry_url}/reanalysis/job-1/input.manifest",
            }
        },
        "ContentType": "image/jpeg",
        "SplitType": "None",
        "CompressionType": "None",
    }
    assert job["TransformOutput"] == {
        "S3OutputPath": output,
        "Accept": "application/json",
        "AssembleWith": "None",
    }
    assert job["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1}
    assert (job["BatchStrategy"], job["MaxPayloadInMB"]) == ("SingleRecord", 25)

    model = sm.describe_model(ModelName=job["ModelName"])
    container = model["PrimaryContainer"]
    assert container["Image"] == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5.1-cpu-py311"
    )
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert model["ExecutionRoleArn"] == ROLE
    # the artifact is the stable version, byte for byte, plus the handler's code
    data = RegistryUrl.parse(container["ModelDataUrl"])
    body = s3.get_object(Bucket=data.bucket, Key=data.prefix)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert "code/inference.py" in tar.getnames()
        packed = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
    published = f"{PREFIX}/models/test-rgb/1.0.0/manifest.json"
    assert packed == s3.get_object(Bucket=fleet.bucket, Key=published)["Body"].read()

    # a second job of one device reuses the model (AWS would refuse to create it twice)
    code, out, err = run(capsys, *argv, "--role", ROLE, "--job-name", "job-2", "--device", "dev-a")
    assert code == 0, err
    assert "2 captures" in err
    again = sm.describe_transform_job(TransformJobName="job-2")
    assert again["ModelName"] == job["ModelName"]
    assert sm.describe_model(ModelName=job["ModelName"])["CreationTime"] == model["CreationTime"]


def test_empty_window_and_missing_channel_submit_nothing(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_url = f"s3://{fleet.bucket}/{PREFIX}"
    base = ("reanalyze", "--registry", registry_url, "--role", ROLE, "--job-name", "none")
    code, _, err = run(
        capsys, *base, "--since", "2023-01-01", "--until", "2023-01-02", "--model", "test-rgb"
    )
    assert (code, err.strip().splitlines()[-1]) == (
        2,
        f"error: no captures in {registry_url} from "
        "2023-01-01 00:00:00+00:00 to 2023-01-02 00:00:00+00:00",
    )
    code, _, err = run(capsys, *base, *WINDOW, "--model", "test-rgb", "--channel", "beta")
    assert code == 2
    assert "channels/test-rgb/beta.json: no beta channel for test-rgb; pass --version" in err
    sm = boto3.client("sagemaker", region_name=REGION)
    names = [j["TransformJobName"] for j in sm.list_transform_jobs()["TransformJobSummaries"]]
    assert "none" not in names


def test_images_over_a_transform_request_are_skipped_by_name(
    fleet: Fleet, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SingleRecord sends a whole image per request: one over MaxPayloadInMB would fail the
    job after it ran; it is left out and named before anything is submitted."""
    url = RegistryUrl(fleet.bucket, PREFIX)
    since, until = at("2024-05-02T00:00:00"), at("2024-05-03T00:00:00")
    lines, _ = reanalyze.list_captures(s3, url, since, until)
    assert len(lines) == 3
    monkeypatch.setattr(reanalyze, "MAX_PAYLOAD_MB", 0)  # every test image is over it
    lines, skipped = reanalyze.list_captures(s3, url, since, until)
    assert lines == []
    over = [s for s in skipped if "MiB, over a request's 0 MB" in s]
    assert sorted(s.split(":", 2)[1] for s in over) == sorted(
        f"//{fleet.bucket}/{image}" for image, _ in fleet.inside
    )


class FailingJob:
    """DescribeTransformJob of a job that fails on its second poll (moto's never do)."""

    def __init__(self) -> None:
        self.polls = 0

    def describe_transform_job(self, TransformJobName: str) -> dict[str, Any]:  # noqa: N803
        self.polls += 1
        if self.polls == 1:
            return {"TransformJobStatus": "InProgress"}
        return {"TransformJobStatus": "Failed", "FailureReason": "ClientError: see the logs"}


def test_wait_counts_results_and_reports_failure(
    aws_endpoint: str, s3: Any, s3_bucket: str
) -> None:
    for name in ("a.jpg.out", "b.jpg.out", "c.jpg"):
        s3.put_object(Bucket=s3_bucket, Key=f"out/dev/{name}", Body=b"{}")
    aws = sagemaker.Clients(REGION, s3, FailingJob())
    with pytest.raises(reanalyze.ReanalysisError, match="job-x failed: ClientError: see the logs"):
        reanalyze.wait(aws, "job-x", f"s3://{s3_bucket}/out/", total=3, poll=0)


def test_times_images_and_model_names() -> None:
    assert reanalyze.utc_time("2024-05-02") == at("2024-05-02T00:00:00")
    assert reanalyze.utc_time("2024-05-02T02:00:00+02:00") == at("2024-05-02T00:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO 8601"):
        reanalyze.utc_time("yesterday")
    assert reanalyze.image_uri("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.")
    assert reanalyze.image_uri("cn-north-1").split("/")[0].endswith(".amazonaws.com.cn")
    with pytest.raises(sagemaker.SageMakerError, match=r"'mars-1'.*--image-uri"):
        reanalyze.image_uri("mars-1")
    transform = reanalyze.Transform(
        job="j",
        model="a-very-long-model.name-" * 4 + "-1.0.0-rc.1",
        role_arn=ROLE,
        image="img",
        model_data="s3://b/m.tar.gz",
        region=REGION,
        manifest="s3://b/in.manifest",
        output="s3://b/out/",
    )
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", transform.model_name)
