"""Captures: what a device uploads for reanalysis and retraining, and where it goes.

Under s3://BUCKET/PREFIX:

    captures/{device}/{yyyy}/{mm}/{dd}/{frame_id}.jpg        the image (a JPEG from a file
                                                             source, byte for byte)
    captures/{device}/{yyyy}/{mm}/{dd}/{frame_id}.json       CaptureSidecar
    captures/{device}/{yyyy}/{mm}/{dd}/{frame_id}.mask.png   the corroded mask (optional)
    manifests/{device}/{yyyy}/{mm}/{dd}/{hh}.jsonl           one ManifestLine per capture
    manifests/{device}/{yyyy}/{mm}/{dd}/{hh}.manifest        the same images as a list

The date is the frame's capture time in UTC; `frame_id` is the DetectionMessage's
message_id, so a detection on MQTT, its sidecar and its image share one id. The `.jsonl`
lines carry `source-ref`: a Ground Truth labelling input. Batch Transform refuses
augmented manifests, so the `.manifest` beside it holds the same images as a SageMaker
ManifestFile ([{"prefix": "s3://bucket/"}, key, ...]): one list of captures, two formats.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, ConfigDict, Field

from agent.contract.common import (
    CONTRACT_VERSION,
    Percent,
    SchemaVersion,
    Sha256,
    Strict,
    utc_now,
)
from agent.contract.messages import DetectionMessage, ModelRef

Category = Literal["snapshot", "flagged", "near_threshold", "sample"]
"""Why a frame was captured, most important first."""

CATEGORY_PRIORITY: dict[Category, int] = {
    "snapshot": 3,
    "flagged": 2,
    "near_threshold": 1,
    "sample": 0,
}
"""Higher is kept longer when the spool is full and uploaded first."""

FrameId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="DetectionMessage id")]
_DEVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
IMAGE_SUFFIX = ".jpg"
SIDECAR_SUFFIX = ".json"
MASK_SUFFIX = ".mask.png"
TRANSFORM_SUFFIX = ".manifest"


def _day(when: datetime) -> str:
    utc = when.astimezone(UTC)
    return f"{utc:%Y}/{utc:%m}/{utc:%d}"


def is_device_id(name: str) -> bool:
    """Whether `name` can be a device's folder under captures/ (others are not ours)."""
    return bool(_DEVICE.match(name))


def _device(device: str) -> str:
    if not is_device_id(device):
        raise ValueError(f"device id {device!r} cannot be part of an S3 key")
    return device


def capture_stem(prefix: str, device: str, when: datetime, frame_id: str) -> str:
    """Key of a capture without its suffix; add IMAGE_SUFFIX, SIDECAR_SUFFIX or MASK_SUFFIX."""
    if not re.fullmatch(r"[0-9a-f]{32}", frame_id):
        raise ValueError(f"frame id {frame_id!r} is not a 32-hex message id")
    parts = (prefix.strip("/"), "captures", _device(device), _day(when), frame_id)
    return "/".join(p for p in parts if p)


def captures_prefix(prefix: str, device: str | None = None) -> str:
    """Where to list captures: all devices, or one (ends with '/')."""
    parts = (prefix.strip("/"), "captures", _device(device) if device else "")
    return "/".join(p for p in parts if p) + "/"


def capture_manifest_key(prefix: str, device: str, hour: datetime) -> str:
    """The JSON Lines manifest of one device's captures made in one UTC hour."""
    utc = hour.astimezone(UTC)
    parts = (prefix.strip("/"), "manifests", _device(device), _day(utc), f"{utc:%H}.jsonl")
    return "/".join(p for p in parts if p)


class CapturedImage(Strict):
    key: str = Field(description="S3 key of the image")
    sha256: Sha256 = Field(description="SHA-256 of the image bytes")
    size: int = Field(gt=0, description="Bytes")
    content_type: Literal["image/jpeg"] = Field(description="Always JPEG (keys end in .jpg)")
    original: bool = Field(description="True: the source's own bytes; False: encoded once")


class CaptureSidecar(Strict):
    """`{frame_id}.json` beside the image: why it was captured and what the device saw."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    frame_id: FrameId = Field(description="= detection.message_id")
    category: Category = Field(description="The highest-priority reason it was captured")
    reasons: tuple[Category, ...] = Field(description="Every reason it qualified for")
    note: str | None = Field(default=None, max_length=512, description="From the snapshot command")
    detection: DetectionMessage = Field(description="What the device published for this frame")
    model: ModelRef = Field(description="Model manifest name, version and ONNX sha256")
    image: CapturedImage = Field(description="The uploaded image")
    mask_key: str | None = Field(default=None, description="S3 key of the mask PNG, if any")
    captured_at: AwareDatetime = Field(description="When the frame was taken (UTC)")


class UploadNotice(Strict):
    """On `uploads`, after a capture is in S3: lets subscribers link a detection to its image."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    device_id: str = Field(min_length=1, max_length=128, description="Device")
    frame_id: FrameId = Field(description="The DetectionMessage's message_id")
    category: Category = Field(description="Why it was captured")
    bucket: str = Field(description="S3 bucket")
    image_key: str = Field(description="Key of the image")
    sidecar_key: str = Field(description="Key of the CaptureSidecar")
    mask_key: str | None = Field(default=None, description="Key of the mask PNG")
    corrosion_pct: Percent = Field(description="As in the detection")
    uploaded_at: AwareDatetime = Field(default_factory=utc_now, description="When S3 confirmed it")


class ManifestLine(Strict):
    """One line of an hourly manifest (Ground Truth / Batch Transform augmented manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source_ref: str = Field(alias="source-ref", description="s3://bucket/key of the image")
    frame_id: FrameId = Field(alias="frame-id", description="The detection's message_id")
    device_id: str = Field(alias="device-id", description="Device")
    category: Category = Field(description="Why it was captured")
    corrosion_pct: Percent = Field(alias="corrosion-pct", description="Device's corrosion %")
    model_version: str = Field(alias="model-version", description="name@version on the device")
    captured_at: AwareDatetime = Field(alias="captured-at", description="When the frame was taken")
    sidecar_ref: str = Field(alias="sidecar-ref", description="s3://bucket/key of the sidecar")
