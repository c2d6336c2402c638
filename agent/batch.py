"""On-demand and batch detection, the AWS solution's two use cases, run on the device.

One image's failure never stops the others: unsafe or unreadable inputs are refused with
one line each, every other image is analysed, and the caller learns from the summary
whether anything was refused.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path, PurePosixPath
from typing import Any

import cv2

from agent import imageio
from agent.archive import Entry, Refused
from agent.contract import DetectionMessage, Gps, iso
from agent.durable import replace_file
from agent.engine.detector import Analysis, Detector
from agent.engine.overlay import render
from agent.exif import PhotoMeta, read_exif

MAP_FILE = "results.geojson"  # the geotagged photos, beside results.csv
CSV_FIELDS = (
    "file",
    "corrosion_pct",
    "flagged",
    "rust_probability",  # empty unless the model's image rule decided
    "regions",
    "width",
    "height",
    "model",
    "version",
    "taken_at",  # the photo's EXIF clock (UTC); empty when it has none
    "lat",  # the photo's EXIF GPS; empty without a fix
    "lon",
    "alt",
)


@dataclass
class Summary:
    """What a run did; `refused` holds one line per input that was not analysed,
    `unwritten` one per overlay that could not be written (its result row stands)."""

    analysed: int = 0
    flagged: int = 0
    refused: list[str] = field(default_factory=list)
    unwritten: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.unwritten


def overlay_path(out_dir: Path, name: str) -> Path:
    """Overlays mirror the input's relative path (names were checked safe by archive) and
    keep its suffix, so a.jpg and a.png get one each."""
    rel = PurePosixPath(name)
    return out_dir / "overlays" / rel.parent / f"{rel.name}.overlay.jpg"


def analyse_bytes(detector: Detector, data: bytes, name: str) -> tuple[Analysis, imageio.Decoded]:
    """Decode (at reduced size straight from JPEG when configured) and classify."""
    decoded = imageio.decode(data, name, max_long_side=detector.config.analysis_long_side)
    return detector.analyse(decoded.image, decoded.full_size), decoded


def write_overlay(path: Path, decoded: imageio.Decoded, analysis: Analysis) -> None:
    """OSError naming the path if it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{path}: cannot write overlay ({exc.strerror or exc})") from exc
    image = render(
        decoded.image,
        analysis.mask,
        analysis.corrosion_pct,
        analysis.regions,
        flagged=analysis.flagged,
        frame_size=decoded.full_size,
    )
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"{path}: cannot write overlay")


def run_batch(
    detector: Detector,
    inputs: Iterable[Entry | Refused],
    out_dir: Path,
    *,
    on_result: Callable[[str, Analysis], None] | None = None,
    on_refused: Callable[[str], None] | None = None,
    on_unwritten: Callable[[str], None] | None = None,
    zone: tzinfo | None = None,
) -> Summary:
    """Analyse every entry; results.csv and overlays go to out_dir. An overlay that cannot
    be written (a full disk, a name the file system refuses) costs only that overlay.
    `zone`: the camera's clock, for EXIF times without an offset (None: local time)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        results = (out_dir / "results.csv").open("w", newline="")
    except OSError as exc:  # one line naming what is in the way, as for any bad argument
        where = exc.filename or out_dir
        raise ValueError(f"{where}: cannot write the results: {exc.strerror or exc}") from None
    with suppress(OSError):  # an earlier run's map beside this run's rows; in the way: below
        (out_dir / MAP_FILE).unlink(missing_ok=True)
    summary = Summary()
    places: list[dict[str, Any]] = []
    with results as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for item in inputs:
            if isinstance(item, Refused):
                reason = item.reason
            else:
                try:
                    analysis, decoded = analyse_bytes(detector, item.data, item.name)
                except imageio.ImageError as exc:
                    reason = str(exc)
                else:
                    try:
                        write_overlay(overlay_path(out_dir, item.name), decoded, analysis)
                    except OSError as exc:
                        summary.unwritten.append(str(exc))
                        if on_unwritten:
                            on_unwritten(str(exc))
                    meta = read_exif(item.data, zone)
                    writer.writerow(_row(item.name, analysis, meta))
                    if meta.gps is not None:
                        places.append(_feature(item.name, analysis, meta, meta.gps))
                    summary.analysed += 1
                    summary.flagged += analysis.flagged
                    if on_result:
                        on_result(item.name, analysis)
                    continue
            summary.refused.append(reason)
            if on_refused:
                on_refused(reason)
    try:
        _write_map(out_dir / MAP_FILE, places)
    except OSError as exc:  # as an overlay: results.csv holds every row either way
        summary.unwritten.append(f"{out_dir / MAP_FILE}: cannot write the map ({exc.strerror})")
        if on_unwritten:
            on_unwritten(summary.unwritten[-1])
    return summary


def _feature(name: str, a: Analysis, meta: PhotoMeta, gps: Gps) -> dict[str, Any]:
    """A GeoJSON point (RFC 7946: longitude first). EXIF altitude is above sea level, where a
    third coordinate would be above the WGS 84 ellipsoid (up to ~100 m apart): a property."""
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [gps.lon, gps.lat]},
        "properties": {
            "altitude_msl_m": gps.alt,
            "file": name,
            "corrosion_pct": round(a.corrosion_pct, 4),
            "flagged": a.flagged,
            "rust_probability": a.rust_probability,
            "regions": len(a.regions),
            "taken_at": iso(meta.taken_at) if meta.taken_at else None,
        },
    }


def _write_map(path: Path, features: list[dict[str, Any]]) -> None:
    """The geotagged photos as GeoJSON, for a GIS or a web map of where the rust is; whole or
    not at all."""
    collection = {"type": "FeatureCollection", "features": features}
    replace_file(path, json.dumps(collection, indent=1).encode())


def _row(name: str, a: Analysis, meta: PhotoMeta) -> list[str]:
    place = (None, None, None) if meta.gps is None else (meta.gps.lat, meta.gps.lon, meta.gps.alt)
    return [
        name,
        f"{a.corrosion_pct:.4f}",
        str(a.flagged).lower(),
        "" if a.rust_probability is None else f"{a.rust_probability:.4f}",
        str(len(a.regions)),
        str(a.frame_size.width),
        str(a.frame_size.height),
        a.model.name,
        a.model.version,
        iso(meta.taken_at) if meta.taken_at else "",
        *("" if v is None else repr(v) for v in place),
    ]


def detect_file(
    detector: Detector, path: Path, *, device_id: str, index: int = 0, zone: tzinfo | None = None
) -> tuple[DetectionMessage, Analysis, imageio.Decoded]:
    """One image from disk to a DetectionMessage: captured_at and gps from the photo's EXIF
    (a drone's card is copied off hours later), else captured_at is the file's mtime."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise imageio.ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    analysis, decoded = analyse_bytes(detector, data, str(path))
    meta = read_exif(data, zone)
    captured = meta.taken_at or datetime.fromtimestamp(path.stat().st_mtime, UTC)
    message = analysis.message(
        device_id=device_id, source=str(path), frame_index=index, captured_at=captured, gps=meta.gps
    )
    return message, analysis, decoded
