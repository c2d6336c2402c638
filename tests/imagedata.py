"""Image bytes for tests: split-colour images, encoders, PNG chunks and a real PNG bomb."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

RED, BLUE = (0, 0, 200), (200, 0, 0)  # BGR


def split_image(w: int, h: int, channels: int = 3) -> np.ndarray:
    """Red left half, blue right half: survives scaling, shows a swapped or mirrored axis."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = RED
    img[:, w // 2 :] = BLUE
    if channels == 1:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    if channels == 4:
        bgra = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
        bgra[: h // 2, :, 3] = 128  # real transparency, or encoders drop the alpha channel
        return bgra
    return img


def encode(ext: str, img: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(w: int, h: int) -> bytes:
    """Signature + a valid IHDR for an 8-bit greyscale image."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))


def bomb_png(side: int = 30000) -> bytes:
    """A real, fully valid greyscale PNG of zeros (~870 KB for 30000x30000), built in ms.

    A raw deflate block flushed with Z_FULL_FLUSH resets the dictionary, so one compressed MiB
    of zeros can be repeated verbatim; the zlib trailer is adler32 of n zeros, which is
    (n mod 65521) << 16 | 1. Every row is filter byte 0 followed by zero pixels, i.e. zeros.
    """
    raw_len = side * (side + 1)
    block = 1 << 20
    piece = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeat = piece.compress(bytes(block)) + piece.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(raw_len, block)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = tail.compress(bytes(rest)) + tail.flush()
    adler = ((raw_len % 65521) << 16) | 1
    idat = b"\x78\xda" + repeat * full + end + struct.pack(">I", adler)
    return png_header(side, side) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def mpf_jpeg(main: bytes, preview: bytes) -> bytes:
    """A camera's MPF photo (CIPA DC-007, as DJI writes them): `main` with an APP2 index
    naming itself and `preview`, which follows its end-of-image marker."""
    entries = 3
    ifd_size = 2 + 12 * entries + 4
    tiff_len = 8 + ifd_size + 32  # header, IFD, two 16-byte MP entries
    segment_len = 2 + 4 + tiff_len
    tiff_at = 2 + 2 + 2 + 4  # SOI, APP2 marker, length, "MPF\0"
    total_main = len(main) + 2 + segment_len
    ifd = struct.pack("<H", entries)
    ifd += struct.pack("<HHI4s", 0xB000, 7, 4, b"0100")  # MPFVersion
    ifd += struct.pack("<HHII", 0xB001, 4, 1, 2)  # NumberOfImages
    ifd += struct.pack("<HHII", 0xB002, 7, 32, 8 + ifd_size)  # MPEntry, after the IFD
    ifd += struct.pack("<I", 0)
    mp = struct.pack("<IIIHH", 0x030000, total_main, 0, 0, 0)
    mp += struct.pack("<IIIHH", 0x010001, len(preview), total_main - tiff_at, 0, 0)
    tiff = b"II" + struct.pack("<HI", 42, 8) + ifd + mp
    app2 = b"\xff\xe2" + struct.pack(">H", segment_len) + b"MPF\x00" + tiff
    return main[:2] + app2 + main[2:] + preview


def scanned_jpeg(w: int, h: int, *, interleaved: bool) -> bytes:
    """A hand-made baseline (SOF0) JPEG of grey blocks: its three components in one scan, or
    one scan each (which libjpeg decodes holding every coefficient at full size)."""

    def seg(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    out = b"\xff\xd8" + seg(0xDB, b"\x00" + bytes([1] * 64))
    components = b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))
    out += seg(0xC0, struct.pack(">BHHB", 8, h, w, 3) + components)
    one = bytes([1] + [0] * 15) + b"\x00"  # one symbol (0x00), code "0"
    out += seg(0xC4, b"\x00" + one) + seg(0xC4, b"\x10" + one)  # DC: category 0; AC: EOB
    blocks = -(-w // 8) * -(-h // 8)
    if interleaved:
        out += seg(0xDA, bytes([3, 1, 0, 2, 0, 3, 0, 0, 63, 0])) + bytes(-(-blocks * 6 // 8))
    else:
        for c in (1, 2, 3):
            out += seg(0xDA, bytes([1, c, 0, 0, 63, 0])) + bytes(-(-blocks * 2 // 8))
    return out + b"\xff\xd9"
