"""Agent configuration: one strict pydantic model per area, TOML file plus environment.

`extra="forbid"` everywhere, so a misspelt key fails at start with the path of the field
instead of being silently ignored on a device nobody can reach. Environment variables
override the file: `CORROSION_MQTT__PORT=8883` sets `mqtt.port`.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Area(BaseModel):
    """Base of every config area."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassifierConfig(Area):
    """How frames are analysed."""

    analysis_long_side: int | None = Field(
        default=None,
        ge=32,
        le=16384,
        description="Downscale the long side to this before classifying; None = full size",
    )
    threads: int = Field(default=1, ge=1, le=64, description="Threads for the per-pixel lookup")
    region_long_side: int | None = Field(
        default=640,
        ge=32,
        le=16384,
        description="Group regions on the mask scaled to this long side; None = full size",
    )
    open_px: int = Field(
        default=3,
        ge=0,
        le=51,
        description="Opening kernel (px) that drops specks before grouping regions; 0 = off",
    )
    close_px: int = Field(
        default=5,
        ge=0,
        le=101,
        description="Closing kernel (px) that joins nearby rust into one region; 0 = off",
    )
    min_region_pct: float = Field(
        default=0.05, ge=0.0, le=100.0, description="Smallest region reported, % of the frame"
    )
    max_regions: int = Field(
        default=50, ge=0, le=10000, description="Most regions reported per frame, largest first"
    )
    flag_pct: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Flag threshold %, None = the model manifest's"
    )


SourceKind = Literal["camera", "stream", "video", "folder", "glob"]


class SourceConfig(Area):
    """Where frames come from."""

    kind: SourceKind = Field(
        default="folder",
        description="camera (index or /dev/video*), stream (rtsp/http), video file, "
        "folder (watched), glob (image list)",
    )
    uri: str = Field(
        default="frames",
        min_length=1,
        description="Camera index or device, stream URL, video path, folder, or glob pattern",
    )
    max_fps: float | None = Field(
        default=None, gt=0.0, le=1000.0, description="Most frames per second taken; None = all"
    )
    poll_s: float = Field(
        default=0.5, gt=0.0, le=60.0, description="How often a watched folder is scanned"
    )
    settle_s: float = Field(
        default=1.0,
        ge=0.0,
        le=600.0,
        description="A new file is read once its size has not changed for this long",
    )
    recursive: bool = Field(default=False, description="Watch sub-folders too")
    extensions: tuple[str, ...] = Field(
        default=(".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"),
        description="Image file suffixes a folder or glob source takes (case-insensitive)",
    )
    reopen_min_s: float = Field(
        default=0.5, gt=0.0, le=60.0, description="First wait before reopening a lost source"
    )
    reopen_max_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="Longest wait between reopen attempts"
    )
    stale_after_s: float = Field(
        default=10.0,
        gt=0.0,
        le=86400.0,
        description="A live source with no frame for this long is reported stale",
    )
    exit_when_done: bool = Field(
        default=False,
        description="Stop the agent when a file source is exhausted (folder: nothing new left)",
    )


class ModelConfig(Area):
    """The model in service and the registry channel that updates it."""

    path: Path = Field(
        default=Path("model"),
        description="Bundled model (manifest or its folder): served until the registry gives one",
    )
    registry: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix of the model registry; None = no updates",
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Model name to follow; None = the bundled model's name",
    )
    channel: str = Field(
        default="stable", pattern=r"^[a-z][a-z0-9-]{0,31}$", description="Channel to follow"
    )
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


class RateLimit(Area):
    """Most captures of one category per window; None = no limit for that window."""

    per_minute: int | None = Field(default=None, ge=0, description="Per rolling minute")
    per_hour: int | None = Field(default=None, ge=0, description="Per rolling hour")
    per_day: int | None = Field(default=None, ge=0, description="Per rolling day")


class CategoryLimits(Area):
    """Rate limits per capture category."""

    snapshot: RateLimit = Field(
        default_factory=lambda: RateLimit(per_minute=10, per_hour=100, per_day=1000),
        description="Frames marked by the snapshot command",
    )
    flagged: RateLimit = Field(
        default_factory=lambda: RateLimit(per_minute=30, per_hour=600, per_day=5000),
        description="Frames at or above the flag threshold",
    )
    near_threshold: RateLimit = Field(
        default_factory=lambda: RateLimit(per_minute=6, per_hour=60, per_day=500),
        description="Frames near the decision boundary",
    )
    sample: RateLimit = Field(
        default_factory=lambda: RateLimit(per_minute=2, per_hour=20, per_day=200),
        description="Random unflagged frames (the negatives a retrain needs)",
    )


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
    upload_mask: bool = Field(default=True, description="Upload the corroded mask as PNG")
    jpeg_quality: int = Field(
        default=92, ge=50, le=100, description="JPEG quality of camera frames (encoded once)"
    )
    spool_max_bytes: int = Field(
        default=2 * 1024**3, ge=64 * 1024, description="Disk budget of captures waiting"
    )
    sample_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Share of unflagged frames sampled"
    )
    near_pct: float = Field(
        default=1.0, ge=0.0, le=100.0, description="Near threshold: image % within this of it"
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


class TlsConfig(Area):
    """TLS to the broker; a client certificate makes it mutual TLS (AWS IoT Core)."""

    enabled: bool = Field(default=False, description="Connect over TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle; None = system store")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS)")
    check_hostname: bool = Field(default=True, description="Verify the broker's host name")


class MqttConfig(Area):
    """The broker and how we talk to it."""

    enabled: bool = Field(default=True, description="False: messages only go to the outbox")
    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 for TLS)")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive")
    username: str | None = Field(default=None, description="User name, if the broker wants one")
    password: SecretStr | None = Field(default=None, description="Password (never logged)")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings")
    topic_prefix: str = Field(
        default="corrosion/{device_id}/",
        pattern=r"^[^#+]*/$",
        description="Prefix of every topic; {device_id} is replaced; ends with /",
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0.0, le=60.0, description="First reconnect wait (full jitter)"
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="Longest reconnect wait"
    )
    inflight: int = Field(
        default=64, ge=1, le=65535, description="QoS 1 messages awaiting PUBACK at once"
    )
    max_command_bytes: int = Field(
        default=65536, ge=64, le=1 << 24, description="Larger command payloads are refused"
    )


class OutboxConfig(Area):
    """The durable queue every outgoing message passes through."""

    max_messages: int = Field(
        default=200_000, ge=10, description="Most messages kept waiting for the broker"
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=64 * 1024, description="Most payload bytes kept waiting"
    )
    when_full: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="Which message goes when a bound is hit (counted in metrics, never silent)",
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite synchronous: normal survives crashes, full also power loss",
    )


class HealthConfig(Area):
    """Metrics and liveness."""

    metrics_interval_s: float = Field(
        default=10.0, ge=0.5, le=3600.0, description="Seconds between metrics messages"
    )
    hung_after_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="A frame loop silent this long stops the systemd watchdog pings",
    )


class AgentConfig(BaseSettings):
    """The whole agent; `load` reads TOML, then environment overrides on top."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix="CORROSION_",
        env_nested_delimiter="__",
        validate_assignment=True,
    )

    device_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Device id: MQTT client id and topic part; default the host name",
    )
    state_dir: Path = Field(
        default=Path("state"), description="Outbox, seen-files record and models live here"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level"
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="Frame source")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model")
    classifier: ClassifierConfig = Field(
        default_factory=ClassifierConfig, description="Classification"
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable outbox")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health")
    upload: UploadConfig = Field(default_factory=UploadConfig, description="Uploads to S3")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # environment beats the file

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> AgentConfig:
        """Read `path` (TOML); errors name the file and the field's dotted path."""
        data: dict[str, Any] = {}
        where = str(path) if path else "configuration"
        if path is not None:
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        _merge(data, overrides)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_describe(exc)}") from exc

    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix.replace("{device_id}", self.device_id)

    def effective(self) -> str:
        """The config as the agent will use it, secrets masked (SecretStr dumps as ***)."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


class ConfigError(ValueError):
    """A configuration that must not start the agent; the message names file and field."""


def _describe(exc: ValidationError) -> str:
    """Like contract.describe, but says when the bad value came from the environment."""
    env = os.environ
    parts = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        var = "CORROSION_" + "__".join(str(p) for p in err["loc"]).upper()
        origin = f" (from {var})" if var in env else ""
        parts.append(f"{path}{origin}: {err['msg']}")
    return "; ".join(parts)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    """Deep-merge `extra` (command-line overrides) into `base`."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _render(area: BaseModel, table: str, out: list[str]) -> None:
    """Values come from a default instance: a sub-area's defaults may differ per parent."""
    nested: list[tuple[str, BaseModel]] = []
    if table:
        out += ["", f"[{table}]"]
    for name, field in type(area).model_fields.items():
        value = getattr(area, name)
        if isinstance(value, BaseModel):
            nested.append((f"{table}.{name}" if table else name, value))
            continue
        out.append(f"# {field.description}")
        if name == "device_id":  # the host name: differs per machine
            out.append(f"# {name} =  # default: computed at start")
        elif value is None:
            out.append(f"# {name} =  # default: unset")
        else:
            out.append(f"{name} = {_toml_value(value)}")
    for path, sub in nested:
        _render(sub, path, out)


def commented_defaults() -> str:
    """config/agent.toml: every field with its description and default (a test keeps it true)."""
    out = [
        "# corrosion-agent configuration: every setting with its default.",
        "# Generated by `make config` from agent/config.py; environment variables override",
        "# the file: CORROSION_<AREA>__<FIELD>, e.g. CORROSION_MQTT__HOST=broker.local.",
    ]
    _render(AgentConfig(device_id="unset"), "", out)
    return "\n".join(out) + "\n"
