"""Config areas of the cloud loop: the model registry and captures to S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.config.areas import Area
from agent.contract.common import MODEL_NAME, worded
from agent.contract.registry import CHANNEL_NAME


class ModelConfig(Area):
    """The model in service and the registry channel that updates it."""

    path: Path = Field(
        default=Path("model"),
        description="Bundled model (manifest or its folder): served until the registry gives one",
    )
    registry: str | None = Field(
        default=None,
        pattern=worded(
            r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
            "s3://BUCKET or s3://BUCKET/PREFIX, the bucket 3 to 63 of a-z 0-9 . -",
        ),
        description="s3://bucket/prefix of the model registry; None = no updates",
    )
    name: str | None = Field(
        default=None,
        pattern=MODEL_NAME,
        description="Model name to follow; None = the bundled model's name",
    )
    channel: str = Field(default="stable", pattern=CHANNEL_NAME, description="Channel to follow")
    poll_s: float = Field(
        default=300.0, ge=0.2, le=86400.0, description="Seconds between channel checks"
    )
    public_keys: tuple[Path, ...] = Field(
        default=(), description="Ed25519 public keys (PEM) whose signatures are trusted"
    )
    require_signature: bool = Field(
        default=True, description="Refuse registry models not signed by a trusted key"
    )
    keep_versions: int = Field(
        default=3, ge=1, le=100, description="Model versions kept on disk for rollback"
    )
    max_model_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Refuse models claiming more bytes"
    )
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; None = AWS (or AWS_ENDPOINT_URL)"
    )
    region: str | None = Field(default=None, description="AWS region; None = boto3's chain")

    @model_validator(mode="after")
    def _keys_for_signatures(self) -> ModelConfig:
        # Else it starts, and every version the registry offers is refused, forever.
        if self.registry is not None and self.require_signature and not self.public_keys:
            raise ValueError(
                "registry is set and require_signature is true, but public_keys is empty: "
                "no model could ever be accepted (name the registry's public key)"
            )
        return self


class RateLimit(Area):
    """Most captures of one category per window; None = no limit for that window."""

    per_minute: int | None = Field(default=None, ge=0, description="Per rolling minute")
    per_hour: int | None = Field(default=None, ge=0, description="Per rolling hour")
    per_day: int | None = Field(default=None, ge=0, description="Per rolling day")


_LIMITS = {  # per minute, hour, day
    "snapshot": (10, 100, 1000),
    "flagged": (30, 600, 5000),
    "near_threshold": (6, 60, 500),
    "sample": (2, 20, 200),
}


def _default_limit(category: str) -> dict[str, int]:
    return dict(zip(("per_minute", "per_hour", "per_day"), _LIMITS[category], strict=True))


class CategoryLimits(Area):
    """Rate limits per capture category."""

    snapshot: RateLimit = Field(
        default_factory=lambda: RateLimit(**_default_limit("snapshot")),
        description="Frames marked by the snapshot command",
    )
    flagged: RateLimit = Field(
        default_factory=lambda: RateLimit(**_default_limit("flagged")),
        description="Frames at or above the flag threshold",
    )
    near_threshold: RateLimit = Field(
        default_factory=lambda: RateLimit(**_default_limit("near_threshold")),
        description="Frames near the decision boundary",
    )
    sample: RateLimit = Field(
        default_factory=lambda: RateLimit(**_default_limit("sample")),
        description="Random unflagged frames (the negatives a retrain needs)",
    )

    @model_validator(mode="before")
    @classmethod
    def _keep_other_windows(cls, data: Any) -> Any:
        """A table that sets one window keeps the category's defaults for the others: a
        drone's `per_minute = 5` took away its hourly and daily caps."""
        if not isinstance(data, dict):
            return data
        return {
            name: {**_default_limit(name), **value}
            if name in _LIMITS and isinstance(value, dict)
            else value
            for name, value in data.items()
        }


class UploadConfig(Area):
    """Captures to S3: which frames (policy), the local spool, and the upload itself."""

    enabled: bool = Field(default=False, description="Capture and upload frames")
    bucket: str = Field(default="", description="S3 bucket (required when enabled)")
    prefix: str = Field(default="corrosion", description="Key prefix inside the bucket")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; None = AWS (or AWS_ENDPOINT_URL)"
    )
    region: str | None = Field(default=None, description="AWS region; None = boto3's chain")
    checksum: Literal["CRC32", "CRC32C", "SHA256"] = Field(
        default="CRC32", description="S3 checksum on every object"
    )
    multipart_mb: int = Field(
        default=8, ge=5, le=5120, description="Files larger than this go up in parts of this size"
    )
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="botocore attempts per request (standard retry mode)"
    )
    retry_max_s: float = Field(
        default=300.0, gt=0.0, le=86400.0, description="Longest wait before retrying S3"
    )
    manifest_every_s: float = Field(
        default=300.0,
        ge=1.0,
        le=3600.0,
        description="The hour's capture manifests go up whole at most this often (and at stop)",
    )
    upload_mask: bool = Field(default=True, description="Upload the corroded mask as PNG")
    jpeg_quality: int = Field(
        default=92, ge=50, le=100, description="JPEG quality of camera frames (encoded once)"
    )
    spool_max_bytes: int = Field(
        default=2 * 1024**3, ge=64 * 1024, description="Disk budget of captures waiting"
    )
    spool_keep_free_bytes: int = Field(
        default=512 * 1024**2,
        ge=0,
        description="Free disk captures never take (model updates, the outbox); 0 = off",
    )
    sample_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Share of unflagged frames sampled"
    )
    near_pct: float = Field(
        default=1.0, ge=0.0, le=100.0, description="Near threshold: image % within this of it"
    )
    near_probability: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Near threshold, for a model with an image rule: P(rust) within this of it",
    )
    uncertain_pct: float = Field(
        default=5.0,
        ge=0.0,
        le=100.0,
        description="Near threshold: this % of the frame's pixels are borderline for the model",
    )
    dedupe_diff: float = Field(
        default=3.0,
        ge=0.0,
        le=255.0,
        description="Skip a frame whose grey thumbnail differs less than this from the last "
        "capture (a hovering drone); 0 = off",
    )
    limits: CategoryLimits = Field(default_factory=CategoryLimits, description="Rate limits")

    @model_validator(mode="after")
    def _bucket_when_enabled(self) -> UploadConfig:
        if self.enabled and not self.bucket:
            raise ValueError("bucket is required when uploads are enabled")
        return self
