"""The S3 client the uploader and the model updater share: boto3's credential chain only.

Credentials come from the environment, a profile, an instance role or credential_process
(AWS IoT credential-provider setups plug in there); nothing here reads or logs a secret.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

RETRIES = Config(
    retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60
)
"""Standard retry mode (backoff with jitter, retry quotas) for every AWS request."""


def s3_client(endpoint_url: str | None, region: str | None, max_attempts: int = 5) -> Any:
    """Endpoint None: AWS, or AWS_ENDPOINT_URL(_S3) as boto3 reads it."""
    config = RETRIES.merge(Config(retries={"mode": "standard", "max_attempts": max_attempts}))
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def describe_error(exc: Exception) -> str:
    """One line for a log: the S3 error code and message, or the connection problem."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
