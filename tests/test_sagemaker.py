"""SageMaker training: image URIs, the job request, and the whole command against moto.

moto's SageMaker marks a job Completed at once and names a ModelArtifacts URI without
writing anything there, so the test puts a real model.tar.gz where the container would.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from agent.contract import ModelManifest, RegistryUrl
from export import sagemaker
from export.cli import main
from export.train import AWS_PAYLOAD
from tests.conftest import LEGACY_MODELS, rust_pixels

ROLE = "arn:aws:iam::123456789012:role/sagemaker"


def test_image_uri_per_region() -> None:
    assert sagemaker.image_uri("us-east-1") == (
        "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-xgboost:1.7-1"
    )
    assert sagemaker.image_uri("eu-west-1", "1.5-1").startswith("141502667606.dkr.ecr.eu-west-1.")
    assert sagemaker.image_uri("cn-north-1").endswith(".amazonaws.com.cn/sagemaker-xgboost:1.7-1")
    with pytest.raises(sagemaker.SageMakerError, match=r"region 'mars-1'.*--image-uri"):
        sagemaker.image_uri("mars-1")
    with pytest.raises(sagemaker.SageMakerError, match=r"version '0\.72'"):
        sagemaker.image_uri("us-west-2", "0.72")


def test_request_sends_strings_and_csv_channels() -> None:
    job = sagemaker.Job(
        name="j",
        role_arn=ROLE,
        image="img",
        channels={"train": "s3://b/t.csv", "validation": "s3://b/v.csv"},
        output="s3://b/jobs/",
        hyperparameters=AWS_PAYLOAD,
    )
    request = job.request()
    assert request["HyperParameters"] == {
        "objective": "multi:softmax",
        "num_class": "2",
        "num_round": "100",
        "max_depth": "3",
        "eta": "0.2",
        "gamma": "0.8",
        "min_child_weight": "10",
        "subsample": "0.8",
        "colsample_bytree": "0.9",
    }
    assert [c["ContentType"] for c in request["InputDataConfig"]] == ["text/csv"] * 2
    assert request["ResourceConfig"]["InstanceType"] == "ml.c5.2xlarge"


def test_failed_job_is_reported() -> None:
    described = {"TrainingJobName": "j", "TrainingJobStatus": "Failed", "FailureReason": "OOM"}
    with pytest.raises(sagemaker.SageMakerError, match="training job j failed: OOM"):
        sagemaker.fetch_model(None, described, Path("unused"))


def test_a_job_out_of_time_says_so() -> None:
    """A job stopped at --max-runtime has no FailureReason: it read `no reason given`."""
    described = {
        "TrainingJobName": "j",
        "TrainingJobStatus": "Stopped",
        "SecondaryStatus": "MaxRuntimeExceeded",
        "SecondaryStatusTransitions": [
            {"Status": "Training", "StatusMessage": "Training image download completed."},
            {"Status": "MaxRuntimeExceeded", "StatusMessage": "Training job runtime exceeded"},
        ],
    }
    with pytest.raises(sagemaker.SageMakerError) as info:
        sagemaker.fetch_model(None, described, Path("unused"))
    assert str(info.value) == (
        "training job j stopped: MaxRuntimeExceeded - Training job runtime exceeded; "
        "allow it longer with --max-runtime SECONDS"
    )


def test_an_s3_channel_is_passed_as_given(aws_endpoint: str, s3: Any, s3_bucket: str) -> None:
    """SageMaker reads a channel as a raw key prefix: `csv/train/` cut to `csv/train` also
    trained on csv/train-2021/."""
    work = RegistryUrl.parse(f"s3://{s3_bucket}/work")
    folder = f"s3://{s3_bucket}/csv/train/"
    assert sagemaker.stage_inputs(s3, work, "j", {"train": folder}) == {"train": folder}
    with pytest.raises(ValueError, match="s3://"):
        sagemaker.stage_inputs(s3, work, "j", {"train": "s3://"})


def model_tarball() -> bytes:
    """What the built-in container writes: model.tar.gz holding `xgboost-model`, the Booster
    its algorithm mode pickles, here by xgboost 1.7 (the default container's version), which
    today's xgboost cannot load (export.legacy reads it)."""
    raw = (LEGACY_MODELS / "xgboost-1.7.6" / "softmax.pkl").read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("xgboost-model")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


def write_csv(path: Path, n: int) -> Path:
    x, y = rust_pixels(n)
    np.savetxt(path, np.column_stack([y, x]), fmt="%d", delimiter=",")
    return path


def test_train_uploads_waits_downloads_and_converts(
    aws_endpoint: str, s3: Any, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = "corrosion-test-1"
    tarball = model_tarball()
    s3.put_object(Bucket=s3_bucket, Key=f"work/jobs/{job}/output/model.tar.gz", Body=tarball)
    train = write_csv(tmp_path / "train.csv", 200)
    out = tmp_path / "out"
    code = main(
        [
            "sagemaker",
            "train",
            str(train),
            "--validation",
            str(write_csv(tmp_path / "v.csv", 50)),
            "--s3",
            f"s3://{s3_bucket}/work",
            "--role",
            ROLE,
            "--out",
            str(out),
            "--job-name",
            job,
            "--num-round",
            "5",
            "--poll",
            "0",
        ]
    )
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert printed.strip() == str(out / "model.tar.gz")
    assert (out / "model.tar.gz").read_bytes() == tarball

    uploaded = s3.get_object(Bucket=s3_bucket, Key=f"work/jobs/{job}/train.csv")["Body"].read()
    assert uploaded == train.read_bytes()
    described = boto3.client("sagemaker").describe_training_job(TrainingJobName=job)
    assert described["AlgorithmSpecification"]["TrainingImage"] == sagemaker.image_uri("us-east-1")
    assert described["HyperParameters"]["num_round"] == "5"
    assert described["OutputDataConfig"]["S3OutputPath"] == f"s3://{s3_bucket}/work/jobs/"
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in described["InputDataConfig"]
    }
    assert channels == {
        "train": f"s3://{s3_bucket}/work/jobs/{job}/train.csv",
        "validation": f"s3://{s3_bucket}/work/jobs/{job}/validation.csv",
    }
    record = json.loads((out / "model.tar.gz.metrics.json").read_text())
    assert record["hyperparameters"]["num_round"] == 5
    assert record["training_job"].endswith(f"training-job/{job}")

    exported = tmp_path / "exported"
    code = main(
        [
            "convert",
            str(out / "model.tar.gz"),
            "--out",
            str(exported),
            "--name",
            "sm-rgb",
            "--version",
            "1.0.0",
            "--skip-parity",
            "--no-table",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = ModelManifest.read(exported / "manifest.json")
    assert manifest.output.objective == "multi:softmax"
    assert manifest.provenance.metrics == record["metrics"]  # moto reports train:progress=100

    # The name again: refused before the upload could overwrite that job's recorded input.
    again = write_csv(tmp_path / "again.csv", 20)
    argv = ["sagemaker", "train", str(again), "--s3", f"s3://{s3_bucket}/work", "--role", ROLE]
    assert main([*argv, "--out", str(tmp_path / "o2"), "--job-name", job]) == 2
    assert f"training job {job} exists already" in capsys.readouterr().err
    assert s3.get_object(Bucket=s3_bucket, Key=f"work/jobs/{job}/train.csv")["Body"].read() == (
        train.read_bytes()
    )


def test_ctrl_c_leaves_the_job_running(
    aws_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(*_: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(sagemaker, "wait", interrupted)
    code = main(
        [
            "sagemaker",
            "train",
            f"s3://{s3_bucket}/data/train.csv",
            "--s3",
            f"s3://{s3_bucket}",
            "--role",
            ROLE,
            "--out",
            str(tmp_path),
            "--job-name",
            "corrosion-test-2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 130
    assert "training job corrosion-test-2 keeps running" in err
    assert (
        "aws sagemaker stop-training-job --region us-east-1 --training-job-name corrosion-test-2"
        in err
    )
