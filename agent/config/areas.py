"""Config areas of the device itself: how frames are read and classified, and health."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.exif import camera_zone


class Area(BaseModel):
    """Base of every config area."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassifierConfig(Area):
    """How frames are analysed."""

    analysis_long_side: int | None = Field(
        default=None,
        ge=32,
        le=16384,
        description="Downscale the long side to this before classifying; None = full size "
        "(feature models scale frames themselves: set, it costs their exact parity)",
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Threads for the per-pixel lookup and a model's scene embedder",
    )
    region_long_side: int | None = Field(
        default=640,
        ge=32,
        le=16384,
        description="Ring-contrast grouping (models without a box scorer) runs on the mask "
        "scaled to this long side; None = full size",
    )
    open_px: int = Field(
        default=3,
        ge=0,
        le=51,
        description="Opening kernel (px) that drops specks before ring-contrast grouping; 0 = off",
    )
    close_px: int = Field(
        default=5,
        ge=0,
        le=101,
        description="Closing kernel (px) joining nearby rust for ring-contrast grouping; 0 = off",
    )
    min_region_pct: float = Field(
        default=0.05, ge=0.0, le=100.0, description="Smallest region reported, % of the frame"
    )
    max_regions: int = Field(
        default=50,
        ge=0,
        le=10000,
        description="Most regions reported per frame (the best-scored ones)",
    )
    min_region_score: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Lowest box-scorer score a reported region needs; unset: the model's "
        "cross-validated floor; 0: every region (as box AP ranks them)",
    )
    region_grid: tuple[int, ...] = Field(
        default=(16, 32, 64),
        description="Ring-contrast grouping: long sides of the coarse grids whose dense cells "
        "become candidate boxes",
    )
    region_densities: tuple[float, ...] = Field(
        default=(0.2, 0.4, 0.6),
        description="Corroded share a grid cell needs, one per grid, finest first",
    )
    region_overlap: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Ring-contrast grouping: IoU above which the lower-scored of two boxes is "
        "dropped (a box scorer brings its own)",
    )

    @model_validator(mode="after")
    def _one_density_per_grid(self) -> ClassifierConfig:
        if len(self.region_grid) != len(self.region_densities):
            raise ValueError(
                f"region_densities has {len(self.region_densities)} values for "
                f"{len(self.region_grid)} region_grid sizes"
            )
        return self

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
        description="Stop the agent when a file source is exhausted (folder: nothing new left); "
        "otherwise it idles, answering commands, until stopped",
    )
    camera_tz: str = Field(
        default="",
        max_length=64,
        description="Zone of the camera's clock for EXIF times without an offset: an IANA name "
        '("Australia/Sydney"), "+10:00" or "UTC"; empty: this device\'s local time',
    )

    @field_validator("camera_tz")
    @classmethod
    def _zone_known(cls, value: str) -> str:
        camera_zone(value)
        return value


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
