"""EXIF written by hand: a big-endian TIFF with an Exif and a GPS sub-IFD, in a JPEG's APP1."""

from __future__ import annotations

import struct
from collections.abc import Sequence


def ascii_tag(tag: int, text: str) -> tuple[int, int, int, bytes]:
    raw = text.encode() + b"\0"
    return tag, 2, len(raw), raw


def rationals(tag: int, *values: tuple[int, int]) -> tuple[int, int, int, bytes]:
    return tag, 5, len(values), b"".join(struct.pack(">II", n, d) for n, d in values)


def ifd(entries: list[tuple[int, int, int, bytes]], at: int) -> bytes:
    """An IFD at offset `at`, with values over 4 bytes placed right after it."""
    data_at = at + 2 + 12 * len(entries) + 4
    head, tail = struct.pack(">H", len(entries)), b""
    for tag, kind, count, value in sorted(entries):
        if len(value) <= 4:
            head += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            head += struct.pack(">HHII", tag, kind, count, data_at + len(tail))
            tail += value + b"\0" * (len(value) % 2)
    return head + struct.pack(">I", 0) + tail


def app1(image: bytes, tiff: bytes) -> bytes:
    body = b"Exif\0\0" + tiff
    return image[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + image[2:]


def with_exif(
    image: bytes,
    exif: list[tuple[int, int, int, bytes]],
    gps: Sequence[tuple[int, int, int, bytes]] = (),
    ifd0: Sequence[tuple[int, int, int, bytes]] = (),
) -> bytes:
    def pointers(exif_at: int, gps_at: int) -> list[tuple[int, int, int, bytes]]:
        found = [*ifd0, (0x8769, 4, 1, struct.pack(">I", exif_at))]
        return found + ([(0x8825, 4, 1, struct.pack(">I", gps_at))] if gps else [])

    exif_at = 8 + len(ifd(pointers(0, 0), 8))
    exif_ifd = ifd(exif, exif_at)
    gps_at = exif_at + len(exif_ifd)
    tiff = b"MM\0*" + struct.pack(">I", 8) + ifd(pointers(exif_at, gps_at), 8) + exif_ifd
    return app1(image, tiff + (ifd(list(gps), gps_at) if gps else b""))


TAKEN = ascii_tag(0x9003, "2024:05:06 07:08:09")
SYDNEY = [  # 33 deg 51' 54.5" S, 151 deg 12' 36" E, 58.5 m below sea level
    ascii_tag(1, "S"),
    rationals(2, (33, 1), (51, 1), (545, 10)),
    ascii_tag(3, "E"),
    rationals(4, (151, 1), (12, 1), (36, 1)),
    (5, 1, 1, b"\x01"),
    rationals(6, (117, 2)),
]
