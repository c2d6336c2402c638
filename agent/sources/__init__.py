"""Frame sources: cameras, streams, video files, a watched folder and image lists.

Each source yields `Frame`s until it is exhausted or the caller's stop event is set; one
unusable file yields `Failed` and costs only itself. Live sources keep just the newest frame:
an analysis slower than the camera must see what is in front of it now, not a backlog, and a
lost camera is reopened with backoff for as long as the agent runs. A watched folder records
what it has processed in SQLite, so a restart neither repeats nor skips work, and takes a file
only once its size has settled, because drones and sync tools write photos in pieces.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import SourceConfig
from agent.redact import mask_uri
from agent.sources.base import Failed, Frame, Source, SourceError, SourceStats
from agent.sources.files import FolderSource, GlobSource
from agent.sources.video import LiveSource, VideoSource

__all__ = [
    "Failed",
    "FolderSource",
    "Frame",
    "GlobSource",
    "LiveSource",
    "Source",
    "SourceError",
    "SourceStats",
    "VideoSource",
    "mask_uri",
    "open_source",
]


def open_source(
    config: SourceConfig, *, state_dir: Path, decode_long_side: int | None = None
) -> Source:
    """The source `config` describes; SourceError if it can never work (a camera or stream
    that is merely not up yet is no error: it is reopened with backoff)."""
    if config.kind == "folder":
        return FolderSource(config, state_dir=state_dir, decode_long_side=decode_long_side)
    if config.kind == "glob":
        return GlobSource(config, decode_long_side=decode_long_side)
    if config.kind == "video":
        return VideoSource(config, decode_long_side=decode_long_side)
    return LiveSource(config, decode_long_side=decode_long_side)
