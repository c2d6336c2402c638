"""Decoding images for analysis, safely.

Images arrive from drones, uploads and zip files, so any of them may be truncated, mislabelled
or a decompression bomb. `probe` reads only the header, which lets us refuse a 30000x30000 PNG
before a single pixel buffer is allocated; `decode` then decodes, at reduced size where JPEG
allows it, because analysis never needs more than `max_long_side` pixels.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

import numpy as np
import numpy.typing as npt

MAX_PIXELS: int = 100_000_000
"""Default pixel limit: a 100-megapixel frame is ~300 MB of BGR, the most a gateway can spare."""

# Backstop only: OpenCV reads this on its first decode. `probe` is the real guard.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (must come after the environment variable above)

__all__ = ["MAX_PIXELS", "Decoded", "ImageError", "ImageInfo", "decode", "probe", "read"]


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header claims, known before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True, eq=False)
class Decoded:
    """An analysis-sized image plus what is needed to map results back to the original.

    `full_size` is (width, height) of the original as displayed, i.e. after any EXIF rotation
    that OpenCV applied, so it always has the same orientation as `image`.
    """

    image: npt.NDArray[np.uint8]
    full_size: tuple[int, int]
    scale: float


_PNG_SIG: Final = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGS: Final = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# SOF0-3, 5-7, 9-11, 13-15; C4 (DHT), C8 (JPG) and CC (DAC) share the range but carry no size.
_JPEG_SOF: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_SEQUENTIAL: Final = frozenset({0xC0, 0xC1})  # baseline and extended sequential DCT
_JPEG_SOS: Final = 0xDA
_JPEG_EOI: Final = 0xD9
_JPEG_APP2: Final = 0xE2  # MPF index (and ICC profiles)
_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_REDUCED_FLAGS: Final = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def _truncated(name: str, fmt: str) -> ImageError:
    return ImageError(f"{name}: truncated {fmt} header")


def _unsupported(name: str, data: bytes) -> ImageError:
    if not data:
        detail = "empty file"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        detail = "GIF is not supported"
    elif _looks_like_text(data[:512]):
        detail = "looks like text"
    else:
        detail = f"unrecognised signature {data[:8].hex(' ')}"
    return ImageError(f"{name}: not a supported image ({detail})")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")  # our cut split a multi-byte character
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def _jpeg_segments(data: bytes, name: str) -> Iterator[tuple[int, int]]:
    """Yield (marker, offset just past the marker) up to the first SOS, skipping garbage the
    way libjpeg does so that we find the same frame header the decoder will use."""
    i, n = 2, len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0:
            raise _truncated(name, "JPEG")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise _truncated(name, "JPEG")
        marker = data[i]
        i += 1
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:
            continue  # stuffed byte, TEM, RSTn or SOI: no length field
        yield marker, i
        if marker in (_JPEG_SOS, _JPEG_EOI):
            return
        if i + 2 > n:
            raise _truncated(name, "JPEG")
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            raise ImageError(f"{name}: corrupt JPEG header (segment length {length})")
        i += length


def _probe_jpeg(data: bytes, name: str) -> ImageInfo:
    for marker, i in _jpeg_segments(data, name):
        if marker in _JPEG_SOF:
            if i + 7 > len(data):
                raise _truncated(name, "JPEG")
            height, width = struct.unpack_from(">HH", data, i + 3)
            return ImageInfo("jpeg", width, height)
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
    raise ImageError(f"{name}: corrupt JPEG header (no frame header before the image data)")


def _probe_png(data: bytes, name: str) -> ImageInfo:
    if len(data) < 24:
        raise _truncated(name, "PNG")
    if data[12:16] != b"IHDR":
        raise ImageError(f"{name}: corrupt PNG header (first chunk is not IHDR)")
    width, height = struct.unpack_from(">II", data, 16)
    return ImageInfo("png", width, height)


def _probe_bmp(data: bytes, name: str) -> ImageInfo:
    if len(data) < 18:
        raise _truncated(name, "BMP")
    header_size = int.from_bytes(data[14:18], "little")
    if header_size not in _BMP_HEADER_SIZES:
        raise _unsupported(name, data)  # "BM" alone is weak evidence: often just text
    if header_size == 12:  # OS/2 1.x: 16-bit unsigned sizes
        if len(data) < 22:
            raise _truncated(name, "BMP")
        width, height = struct.unpack_from("<HH", data, 18)
        return ImageInfo("bmp", width, height)
    if len(data) < 26:
        raise _truncated(name, "BMP")
    width, height = struct.unpack_from("<ii", data, 18)
    if width < 0:
        raise ImageError(f"{name}: corrupt BMP header (negative width)")
    return ImageInfo("bmp", width, abs(height))  # negative height means top-down rows


def _probe_webp(data: bytes, name: str) -> ImageInfo:
    if len(data) < 30:
        raise _truncated(name, "WebP")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError(f"{name}: corrupt WebP header (bad VP8 start code)")
        width, height = struct.unpack_from("<HH", data, 26)
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError(f"{name}: corrupt WebP header (bad VP8L signature)")
        bits = int.from_bytes(data[21:25], "little")
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageInfo("webp", width, height)
    raise ImageError(f"{name}: not a supported image (WebP chunk {chunk!r})")


def _probe_tiff(data: bytes, name: str) -> ImageInfo:
    """Read ImageWidth/ImageLength from the first IFD, the page OpenCV decodes."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, value_fmt = ifd + 8, 20, "Q"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, ifd)
            first, size, value_fmt = ifd + 2, 12, "I"
        found: dict[int, int] = {}
        for k in range(min(count, 4096)):
            tag, kind = struct.unpack_from(order + "HH", data, first + k * size)
            if tag not in (256, 257):
                continue
            offset = first + k * size + (12 if big else 8)
            if kind == 3:  # SHORT, left-justified in the value field
                (found[tag],) = struct.unpack_from(order + "H", data, offset)
            elif kind in (4, 16):  # LONG, LONG8
                fmt = "I" if kind == 4 else value_fmt
                (found[tag],) = struct.unpack_from(order + fmt, data, offset)
            else:
                raise ImageError(f"{name}: corrupt TIFF header (size tag of type {kind})")
    except struct.error:
        raise _truncated(name, "TIFF") from None
    if 256 not in found or 257 not in found:
        raise ImageError(f"{name}: corrupt TIFF header (no image width/length)")
    return ImageInfo("tiff", found[256], found[257])


def probe(data: bytes, name: str) -> ImageInfo:
    """Format and size from the header alone, so limits are enforced before decoding."""
    if data.startswith(_PNG_SIG):
        info = _probe_png(data, name)
    elif data.startswith(b"\xff\xd8"):
        info = _probe_jpeg(data, name)
    elif data.startswith(b"BM"):
        info = _probe_bmp(data, name)
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        info = _probe_webp(data, name)
    elif data[:4] in _TIFF_SIGS:
        info = _probe_tiff(data, name)
    else:
        raise _unsupported(name, data)
    if info.width == 0 or info.height == 0:
        raise ImageError(
            f"{name}: corrupt {info.format.upper()} header (size {info.width}x{info.height})"
        )
    return info


def check_pixels(info: ImageInfo, name: str, max_pixels: int = MAX_PIXELS, factor: int = 1) -> None:
    """Refuse decompression bombs; shared with `archive` so both say it the same way. A
    sequential JPEG decoded at 1/`factor` (libjpeg scales while decoding, never holding the
    full size) counts the pixels it is decoded to: a 100 MP inspection camera's frame is
    1.6 MP at 1/8."""
    width, height = -(-info.width // factor), -(-info.height // factor)
    if width * height > max_pixels:
        at = f", {width}x{height} at 1/{factor}," if factor > 1 else ""
        raise ImageError(
            f"{name}: {info.width}x{info.height} = {info.pixels:,} pixels{at} "
            f"exceeds the limit of {max_pixels:,}"
        )


def _reduction(info: ImageInfo, max_long_side: int | None) -> tuple[int, int]:
    """The factor a JPEG is decoded at to be no smaller than `max_long_side`, and the
    imdecode flags for it; (1, colour) for anything else."""
    if max_long_side is not None and info.format == "jpeg":
        long_side = max(info.width, info.height)
        for f, flag in _REDUCED_FLAGS:
            if -(-long_side // f) >= max_long_side:  # libjpeg rounds scaled sizes up
                return f, flag
    return 1, cv2.IMREAD_COLOR


def counted_factor(info: ImageInfo, data: bytes, name: str, max_long_side: int | None) -> int:
    """The reduction the pixel limit may count the image at (check_pixels' `factor`): the
    decode's, for a JPEG libjpeg streams; 1 otherwise. Shared with `archive`, so a batch
    takes what `detect` and the daemon take."""
    factor = _reduction(info, max_long_side)[0]
    return factor if factor > 1 and _streams(data, name) else 1


def _streams(data: bytes, name: str) -> bool:
    """Whether libjpeg decodes this JPEG a row band at a time, so that at 1/factor it holds
    1/factor of the memory: sequential (SOF0/SOF1) with every component in its first scan.
    A progressive one, or one whose components come in separate scans, holds the whole
    image's coefficients at full size whatever the scale (a 2.3 MB progressive 20000x20000
    took 1.2 GB at 1/8; a 1.6 MB 12000x12000 in three scans, 898 MB)."""
    components = scanned = 0
    for marker, i in _jpeg_segments(data, name):
        if marker in _JPEG_SOF:
            if marker not in _JPEG_SEQUENTIAL:
                return False
            components = data[i + 7] if i + 7 < len(data) else 0
        elif marker == _JPEG_SOS:
            scanned = data[i + 2] if i + 2 < len(data) else 0
    return components > 0 and scanned == components


def _soi(data: bytes, at: int) -> bool:
    return data[at : at + 2] == b"\xff\xd8"


def _mpf_unended(data: bytes, at: int) -> int | None:
    """Where an image an APP2 MPF index (CIPA DC-007: DJI's and most cameras' preview after
    the main image) lists starts without an end marker after it; None when each has one, or
    for another APP2 or an index that does not parse. The main image ends at its own EOI,
    so without this a copy that stalled after it passed for whole, was analysed, and was
    analysed again once the rest came. An image counts only if its start marker is where
    the index says, and ends at any end marker, not at the size the index gives: a writer's
    wrong index must not make a whole photo look cut off for good."""
    length = int.from_bytes(data[at : at + 2], "big")
    body = data[at + 2 : at + length]
    if len(body) < 16 or body[:4] != b"MPF\x00" or body[4:6] not in (b"II", b"MM"):
        return None
    tiff = at + 6  # offsets in the index count from the TIFF header after "MPF\0"
    order: Literal["little", "big"] = "little" if body[4:6] == b"II" else "big"

    def num(i: int, size: int) -> int:
        return int.from_bytes(body[4 + i : 4 + i + size], order)

    size, ifd = len(body) - 4, num(4, 4)
    entries = range(ifd + 2, ifd + 2 + 12 * min(num(ifd, 2), 64), 12) if ifd + 2 <= size else ()
    tag = next((e for e in entries if e + 12 <= size and num(e, 2) == 0xB002), None)  # MPEntry
    if tag is None:
        return None
    count, where = num(tag + 4, 4), num(tag + 8, 4)  # 16 bytes an image
    if where + count > size or count % 16:
        return None
    for j in range(16, min(count, 16 * 16), 16):  # the first image is this one
        start = tiff + num(where + j + 8, 4)
        if _soi(data, start) and data.find(b"\xff\xd9", start + 2) < 0:
            return start
    return None


def _check_complete(info: ImageInfo, data: bytes, name: str) -> None:
    """Catch truncation and bit rot that decoders would paper over (libjpeg fills the missing
    rows with grey) or report on stderr (libpng), so the caller gets one clear ImageError."""
    if info.format == "jpeg":
        segments = list(_jpeg_segments(data, name))
        sos = next((i for m, i in segments if m == _JPEG_SOS), -1)
        if sos < 0 or data.rfind(b"\xff\xd9") < sos:
            raise ImageError(
                f"{name}: corrupt or truncated image data (JPEG ends before "
                "its end-of-image marker)"
            )
        mpf = next(
            (i for m, i in segments if m == _JPEG_APP2 and data[i + 2 : i + 6] == b"MPF\x00"), None
        )
        start = None if mpf is None else _mpf_unended(data, mpf)
        if start is not None:  # a drone photo's preview still to come: its copy stalled
            raise ImageError(
                f"{name}: corrupt or truncated image data (the image its MPF index lists at "
                f"byte {start:,} has no end marker)"
            )
    elif info.format == "png":
        i, n = len(_PNG_SIG), len(data)
        while True:
            if i + 12 > n:
                raise ImageError(
                    f"{name}: corrupt or truncated image data (PNG ends before its IEND chunk)"
                )
            length = int.from_bytes(data[i : i + 4], "big")
            end = i + 8 + length
            if end + 4 > n:
                raise ImageError(
                    f"{name}: corrupt or truncated image data (PNG ends before its IEND chunk)"
                )
            kind = data[i + 4 : i + 8]
            if zlib.crc32(memoryview(data)[i + 4 : end]) != int.from_bytes(
                data[end : end + 4], "big"
            ):
                label = kind.decode("latin-1")
                raise ImageError(
                    f"{name}: corrupt or truncated image data (PNG chunk {label!r} fails its CRC)"
                )
            if kind == b"IEND":
                return
            i = end + 4


class _QuietOpenCV:
    """Silence OpenCV's logger while any decode runs: failures become ImageErrors, and the
    log level is process-wide, so overlapping decodes share one save/restore."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = cv2.utils.logging.LOG_LEVEL_WARNING

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    cv2.utils.logging.setLogLevel(self._saved)


_quiet_opencv = _QuietOpenCV()


def _target_size(width: int, height: int, max_long_side: int) -> tuple[int, int]:
    if width >= height:
        return max_long_side, max(1, round(height * max_long_side / width))
    return max(1, round(width * max_long_side / height)), max_long_side


def decode(
    data: bytes, name: str, *, max_long_side: int | None = None, max_pixels: int = MAX_PIXELS
) -> Decoded:
    """Decode to BGR uint8 at no more than `max_long_side`, refusing bombs before decoding."""
    if max_long_side is not None and max_long_side < 1:
        raise ValueError(f"max_long_side must be at least 1, not {max_long_side}")
    info = probe(data, name)
    width, height = info.width, info.height
    factor, flags = _reduction(info, max_long_side)
    check_pixels(info, name, max_pixels, counted_factor(info, data, name, max_long_side))
    _check_complete(info, data, name)

    with _quiet_opencv():
        try:
            decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
        except cv2.error as exc:  # e.g. OPENCV_IO_MAX_IMAGE_PIXELS below our max_pixels
            detail = getattr(exc, "err", "") or "OpenCV error"
            raise ImageError(f"{name}: cannot decode ({detail})") from None
    if decoded is None or decoded.size == 0:
        raise ImageError(f"{name}: corrupt or truncated image data")
    image = cast("npt.NDArray[np.uint8]", np.asarray(decoded))

    got_h, got_w = image.shape[:2]
    expected = (-(-width // factor), -(-height // factor))
    if (got_w, got_h) == expected:
        full_w, full_h = width, height
    elif (got_w, got_h) == expected[::-1]:  # EXIF orientation turned it by 90 degrees
        full_w, full_h = height, width
    else:
        raise ImageError(
            f"{name}: decoded size {got_w}x{got_h} does not match the header's {width}x{height}"
        )

    if max_long_side is not None and max(full_w, full_h) > max_long_side:
        size = _target_size(full_w, full_h, max_long_side)
        if (got_w, got_h) != size:
            image = cast(
                "npt.NDArray[np.uint8]",
                cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            )
    return Decoded(image=image, full_size=(full_w, full_h), scale=image.shape[1] / full_w)


def read(path: Path, *, max_long_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Decoded:
    """`decode` a file; every error names the path."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode(data, str(path), max_long_side=max_long_side, max_pixels=max_pixels)
