"""Agent configuration: one strict pydantic model per area.

`extra="forbid"` everywhere, so a misspelt key fails at start with the path of the field
instead of being silently ignored on a device nobody can reach.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
