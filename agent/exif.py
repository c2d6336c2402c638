"""Capture time and position from a photo's EXIF, tolerant of whatever devices write there.

A drone photo may be copied off its SD card hours after it was taken, so its own clock and
GPS beat the gateway's. EXIF from cheap cameras is often truncated or nonsensical; nothing
here is ever fatal: a tag that cannot be trusted is simply None.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import exifread

from agent.contract.messages import Gps

__all__ = ["PhotoMeta", "camera_zone", "read_exif"]

log = logging.getLogger(__name__)

# exifread warns once per photo without EXIF ("File format not recognized"): pure noise here.
logging.getLogger("exifread").setLevel(logging.ERROR)

_OFFSET: Final = re.compile(r"^([+-])(\d\d):(\d\d)$")


@dataclass(frozen=True)
class PhotoMeta:
    """What the photo says about itself; None where it says nothing usable."""

    taken_at: datetime | None  # aware, UTC
    gps: Gps | None


# exifread reads a tag's values one at a time, and follows offsets anywhere in the file: a
# 32 KB photo with a few thousand crafted entries kept it busy for seconds, a zip of them
# for hours. Camera EXIF takes at most ~100 reads (measured on ../shared/data's photos), a
# one-page TIFF with 999 strips ~2,100 (multispectral drone cameras write TIFF); this many
# cost ~40 ms at worst.
MAX_READS: Final = 20000


class _Budget(io.BytesIO):
    """The photo's bytes, readable MAX_READS times: past that, the EXIF is not worth it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._left = MAX_READS

    def read(self, size: int | None = -1, /) -> bytes:
        self._left -= 1
        if self._left < 0:
            raise OverflowError(f"EXIF takes over {MAX_READS} reads")
        return super().read(size)


def camera_zone(text: str) -> tzinfo | None:
    """The zone of a camera's clock: "" (None: this device's local time), an offset such as
    "+10:00", "UTC", or an IANA name such as "Australia/Sydney" (with its daylight saving).
    A gateway often runs in UTC while the camera beside it keeps local time."""
    text = text.strip()
    if not text:
        return None
    if text.upper() in ("UTC", "Z"):
        return UTC
    if (fixed := _offset(text)) is not None:
        return fixed
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: "../etc", an absolute path
        pass
    known = "" if available_timezones() else " (this system has no tz database: install tzdata)"
    raise ValueError(
        f"unknown time zone {text!r}{known}: an IANA name such as Australia/Sydney, an offset "
        "such as +10:00, or UTC"
    )


def read_exif(data: bytes, zone: tzinfo | None = None) -> PhotoMeta:
    """Parse EXIF from encoded image bytes (JPEG, TIFF, PNG, WebP). `zone`: the camera's
    clock, for a time without an offset tag (None: this device's local time)."""
    try:
        tags = exifread.process_file(_Budget(data), details=False)
    # exifread raises anything from struct.error to IndexError on hostile EXIF.
    except Exception as exc:
        log.debug("unreadable EXIF ignored: %r", exc)
        return PhotoMeta(None, None)
    return PhotoMeta(_taken_at(tags, zone), _gps(tags))


def _text(tags: dict[str, Any], key: str) -> str | None:
    values = getattr(tags.get(key), "values", None)
    return values.strip().strip("\x00").strip() if isinstance(values, str) else None


def _taken_at(tags: dict[str, Any], zone: tzinfo | None) -> datetime | None:
    """DateTimeOriginal with its sub-seconds, else DateTimeDigitized (the same moment on a
    digital camera; some write only it), never DateTime (when the file was last edited).
    Without its offset tag it is in `zone`, or this device's local time, which is what a
    camera set up on site usually writes."""
    which = "Original" if _text(tags, "EXIF DateTimeOriginal") else "Digitized"
    raw = _text(tags, f"EXIF DateTime{which}")
    if not raw:
        return None
    try:
        taken = datetime.strptime(raw[:19], "%Y:%m:%d %H:%M:%S")
        subsec = _text(tags, f"EXIF SubSecTime{which}") or ""
        if subsec.isdigit():
            taken = taken.replace(microsecond=int(subsec[:6].ljust(6, "0")))
        tz = _offset(_text(tags, f"EXIF OffsetTime{which}"))
        if tz is not None:
            return taken.replace(tzinfo=tz).astimezone(UTC)
        if zone is not None:
            return taken.replace(tzinfo=zone).astimezone(UTC)
        return taken.astimezone().astimezone(UTC)  # naive: interpreted as local time
    except (ValueError, OverflowError, OSError):  # "0000:00:00 00:00:00" and friends
        return None


def _offset(text: str | None) -> timezone | None:
    """ "+02:00" as a timezone; None when absent or impossible, so local time applies."""
    match = _OFFSET.match(text or "")
    if not match or int(match[2]) > 23 or int(match[3]) > 59:
        return None
    delta = timedelta(hours=int(match[2]), minutes=int(match[3]))
    return timezone(-delta if match[1] == "-" else delta)


def _degrees(tags: dict[str, Any], axis: str, refs: str) -> float:
    """Signed decimal degrees from degrees/minutes/seconds; a missing or unknown hemisphere
    is an error rather than a guess, since a wrong sign puts the asset on another continent."""
    values = tags[f"GPS GPS{axis}"].values
    ref = _text(tags, f"GPS GPS{axis}Ref")
    if not 1 <= len(values) <= 3 or not ref or ref[0] not in refs:
        raise ValueError(f"bad GPS {axis}")
    degrees = sum(float(v) / 60.0**i for i, v in enumerate(values))
    return -degrees if ref[0] == refs[1] else degrees


def _altitude(tags: dict[str, Any]) -> float | None:
    try:
        value = float(tags["GPS GPSAltitude"].values[0])
        below = getattr(tags.get("GPS GPSAltitudeRef"), "values", [0])[0] == 1
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(value):
        return None
    return -value if below else value


def _gps(tags: dict[str, Any]) -> Gps | None:
    try:
        lat = _degrees(tags, "Latitude", "NS")
        lon = _degrees(tags, "Longitude", "EW")
        if lat == 0.0 and lon == 0.0:
            return None  # what receivers without a fix write
        return Gps(lat=lat, lon=lon, alt=_altitude(tags))
    except (KeyError, AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None  # ValidationError (NaN, out of range) is a ValueError too
