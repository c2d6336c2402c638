"""MQTT payloads the device publishes."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, Field

from agent.contract.common import (
    CONTRACT_VERSION,
    ModelName,
    OmitsUnset,
    Percent,
    SchemaVersion,
    SemVer,
    Sha256,
    Strict,
    Unit,
    utc_now,
)


class Region(Strict):
    """One corroded region, in frame pixels (not analysis pixels)."""

    x: int = Field(ge=0, description="Left edge")
    y: int = Field(ge=0, description="Top edge")
    w: int = Field(gt=0, description="Width")
    h: int = Field(gt=0, description="Height")
    area_pct: Percent = Field(description="Corroded pixels of the region, % of the frame")


class Size(Strict):
    width: int = Field(gt=0, description="Pixels across")
    height: int = Field(gt=0, description="Pixels down")


class Gps(Strict):
    """Position from the photo's EXIF (drones write it), WGS84."""

    lat: float = Field(ge=-90, le=90, description="Latitude, degrees")
    lon: float = Field(ge=-180, le=180, description="Longitude, degrees")
    alt: float | None = Field(default=None, description="Altitude, metres")


class ModelRef(Strict):
    """Which model classified a frame."""

    name: ModelName = Field(description="Model name")
    version: SemVer = Field(description="Model version")
    sha256: Sha256 = Field(description="SHA-256 of the ONNX file")


class DetectionMessage(Strict):
    """One per frame: the `detections` MQTT payload and the capture sidecar's core."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    message_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        pattern=r"^[0-9a-f]{32}$",
        description="Unique id; subscribers deduplicate on it",
    )
    device_id: str = Field(min_length=1, max_length=128, description="Device that saw the frame")
    source: str = Field(max_length=1024, description="Source URI or file the frame came from")
    frame_index: int = Field(ge=0, description="Index of the frame within its source")
    captured_at: AwareDatetime = Field(description="When the frame was taken (EXIF or clock)")
    processed_at: AwareDatetime = Field(
        default_factory=utc_now, description="When it was classified"
    )
    model: ModelRef = Field(description="Model that classified the frame")
    corrosion_pct: Percent = Field(description="Corroded pixels, % of the analysed frame")
    flagged: bool = Field(
        description="rust_probability >= the model's image rule threshold when there is a "
        "rust_probability, else corrosion_pct >= threshold"
    )
    rust_probability: Unit | None = Field(
        default=None,
        description="P(the frame shows rust) from the model's image rule (contract 1.2); "
        "None when the corrosion % decides",
    )
    threshold: Percent = Field(description="Flag % in force (decides when no rust_probability)")
    regions: tuple[Region, ...] = Field(default=(), description="Corroded regions, largest first")
    frame_size: Size = Field(description="Size of the frame as captured")
    analysis_size: Size = Field(description="Size at which it was classified")
    latency_ms: float = Field(ge=0, description="Read-to-result time, ms")
    gps: Gps | None = Field(default=None, description="Position, when the frame carries one")
    upload_key: str | None = Field(default=None, description="S3 key of the uploaded image")


# --------------------------------------------------------------------------- topics


class Topics:
    """Every MQTT topic of one device, under its prefix (default `corrosion/{device_id}/`)."""

    def __init__(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"topic prefix {prefix!r} must end with /")
        self.prefix = prefix
        self.detections = prefix + "detections"
        self.status = prefix + "status"
        self.model = prefix + "model"
        self.metrics = prefix + "metrics"
        self.uploads = prefix + "uploads"
        self.commands = prefix + "cmd/+"

    def command_name(self, topic: str) -> str | None:
        """`cmd/<name>` → name; None for anything else (results, deeper levels)."""
        head = self.prefix + "cmd/"
        if not topic.startswith(head):
            return None
        name = topic[len(head) :]
        return name if "/" not in name else None  # "" too: answered as an unknown command

    def command_result(self, name: str) -> str:
        return f"{self.prefix}cmd/{name}/result"


# --------------------------------------------------------------------------- daemon state

SourceState = Literal["starting", "open", "reopening", "stale", "done", "closed"]
AgentState = Literal["online", "offline", "stopped"]


class SourceStatus(Strict):
    """The frame source as the daemon sees it."""

    kind: str = Field(description="camera, stream, video, folder or glob")
    uri: str = Field(description="Source URI, credentials masked")
    state: SourceState = Field(description="open, reopening (lost, retrying), stale (silent)...")
    delivered: int = Field(ge=0, description="Frames delivered since start")
    dropped: int = Field(ge=0, description="Live frames replaced by a newer one before use")
    failed: int = Field(ge=0, description="Corrupt or unreadable frames")
    reopens: int = Field(ge=0, description="Times the source was reopened")


class StatusMessage(Strict):
    """Retained on `status`: online on connect, offline as the Last Will, stopped on exit."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    device_id: str = Field(min_length=1, max_length=128, description="Device")
    state: AgentState = Field(description="Agent state")
    at: AwareDatetime = Field(
        default_factory=utc_now,
        description="When this state was set; in `offline`, the Last Will the broker stored at "
        "connect, when that connection was made (the broker's delivery time is when it ended)",
    )
    agent_version: str = Field(description="corrosion-edge version")
    started_at: AwareDatetime = Field(description="When the agent process started")
    uptime_s: float = Field(ge=0, description="Seconds since start, at `at`")
    model: ModelRef | None = Field(default=None, description="Model in service")
    source: SourceStatus | None = Field(default=None, description="Frame source")


class ModelStatus(Strict):
    """Retained on `model`: which model serves, and the last one refused (and why)."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    device_id: str = Field(min_length=1, max_length=128, description="Device")
    serving: ModelRef = Field(description="Model classifying frames now")
    since: AwareDatetime = Field(description="When it started serving")
    flag_pct: Percent = Field(description="Flag threshold in force, %")
    rule_threshold: Unit | None = Field(
        default=None,
        description="When the model's image rule decides (contract 1.2): frames are flagged "
        "at P(rust) >= this, and flag_pct is the fallback an operator may set",
    )
    refused: str | None = Field(default=None, description="Last model refused, and why")


class Latency(Strict):
    p50_ms: float = Field(ge=0, description="Median read-to-result latency")
    p95_ms: float = Field(ge=0, description="95th percentile")
    max_ms: float = Field(ge=0, description="Slowest frame")


class OutboxStats(Strict):
    depth: int = Field(ge=0, description="Messages waiting for a PUBACK")
    bytes: int = Field(ge=0, description="Payload bytes waiting")
    dropped_total: int = Field(
        ge=0, description="Messages discarded because the outbox was full, ever (policy)"
    )
    published: int = Field(ge=0, description="Messages acknowledged by the broker since start")


class UploadStats(OmitsUnset):
    """The capture spool and the uploader; counters are since the spool was created."""

    _omit_when_none = ("failed", "lost")

    spool_depth: int = Field(ge=0, description="Captures waiting for upload")
    spool_bytes: int = Field(ge=0, description="Bytes they take on disk")
    uploaded: dict[str, int] = Field(description="Captures uploaded, per category")
    evicted: dict[str, int] = Field(description="Captures evicted by the disk budget, per category")
    refused: dict[str, int] = Field(description="Captures refused by the disk budget, per category")
    rate_limited: dict[str, int] = Field(description="Frames over a rate limit since start")
    duplicates: int = Field(ge=0, description="Near-identical frames skipped since start")
    s3_reachable: bool = Field(description="The last S3 request succeeded")
    failed: dict[str, int] | None = Field(
        default=None,
        description="Captures the disk could not take, per category (contract 1.7; absent: none)",
    )
    lost: dict[str, int] | None = Field(
        default=None,
        description="Spooled captures whose files vanished before upload, per category "
        "(contract 1.7; absent: none)",
    )


class MetricsMessage(Strict):
    """Every `health.metrics_interval_s` on `metrics`: counters over the last interval."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    device_id: str = Field(min_length=1, max_length=128, description="Device")
    at: AwareDatetime = Field(default_factory=utc_now, description="End of the interval")
    interval_s: float = Field(gt=0, description="Length of the interval")
    fps: float = Field(ge=0, description="Frames classified per second over the interval")
    frames: int = Field(ge=0, description="Frames classified in the interval")
    frames_total: int = Field(ge=0, description="Frames classified since start")
    frames_dropped: int = Field(ge=0, description="Live frames dropped since start (newest wins)")
    frames_failed: int = Field(ge=0, description="Corrupt or unreadable frames since start")
    flagged_total: int = Field(ge=0, description="Frames flagged since start")
    latency: Latency | None = Field(default=None, description="Over the interval; None if idle")
    outbox: OutboxStats = Field(description="Durable outbox")
    source: SourceStatus | None = Field(default=None, description="Frame source")
    connected: bool = Field(description="Connected to the broker now")
    uploads: UploadStats | None = Field(default=None, description="None when uploads are off")


class CommandResult(Strict):
    """On `cmd/<name>/result` (or the MQTT v5 response topic): the answer to one command."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    device_id: str = Field(min_length=1, max_length=128, description="Device")
    command: str = Field(max_length=128, description="Command name as received")
    request_id: str | None = Field(
        default=None, max_length=128, description="The request's request_id, echoed (MQTT 3.1.1)"
    )
    ok: bool = Field(description="True when the command was carried out")
    error: str | None = Field(default=None, description="Why not, naming the field at fault")
    result: dict[str, Any] | None = Field(default=None, description="Command-specific answer")
    at: AwareDatetime = Field(default_factory=utc_now, description="When it was answered")


# --------------------------------------------------------------------------- commands


class CommandRequest(Strict):
    """Payload of `cmd/<name>`: a JSON object (a zero-byte message is no command: it clears a
    retained one)."""

    request_id: str | None = Field(
        default=None,
        max_length=128,
        description="Echoed in the result; a rollback or snapshot sent again under the same id "
        "within 10 minutes gets the first answer, not a second run (MQTT v5: correlation data)",
    )


class PingCommand(CommandRequest):
    """Answered at once with the agent's clock: is it alive and reachable?"""


class StatusCommand(CommandRequest):
    """Answered with the current StatusMessage and MetricsMessage counters."""


class SnapshotCommand(CommandRequest):
    """Mark the next classified frame for upload, whatever the policy says."""

    note: str | None = Field(default=None, max_length=512, description="Kept with the capture")


class SetThresholdCommand(CommandRequest):
    """Change the flag threshold until restart (or the next model, which brings its own)."""

    flag_pct: Percent | None = Field(
        description="New flag threshold %; null goes back to the configured one, else the model's"
    )


class PullModelCommand(CommandRequest):
    """Check the registry channel now instead of at the next poll."""


class RollbackCommand(CommandRequest):
    """Serve the previous model version on disk; the channel's version is skipped until it
    moves on."""


COMMAND_REQUESTS: dict[str, type[CommandRequest]] = {
    "ping": PingCommand,
    "status": StatusCommand,
    "snapshot": SnapshotCommand,
    "set-threshold": SetThresholdCommand,
    "pull-model": PullModelCommand,
    "rollback": RollbackCommand,
}
"""Commands of this contract version, by the name in `cmd/<name>`."""
