"""Safe decoding: header probes, bomb refusal before decoding, reduced JPEG decodes."""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent import imageio
from agent.imageio import Decoded, ImageError, ImageInfo, decode, probe, read
from tests.imagedata import (
    BLUE,
    RED,
    bomb_png,
    encode,
    mpf_jpeg,
    png_chunk,
    png_header,
    scanned_jpeg,
    split_image,
)


def exif_rotated(jpeg: bytes, orientation: int = 6) -> bytes:
    """Insert an APP1/Exif segment carrying only an Orientation tag right after SOI."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:]


@pytest.fixture
def imdecode_flags(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the flags of every cv2.imdecode call, to see which decode path ran."""
    calls: list[int] = []
    real: Callable[..., Any] = cv2.imdecode

    def spy(buf: Any, flags: int) -> Any:
        calls.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


@pytest.fixture
def no_imdecode(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(buf: Any, flags: int) -> Any:
        raise AssertionError("cv2.imdecode must not be called")

    monkeypatch.setattr(cv2, "imdecode", forbidden)


def assert_split(img: np.ndarray) -> None:
    """Left quarter red, right quarter blue: the right pixels, the right way round."""
    w = img.shape[1]
    left = img[:, : w // 4].reshape(-1, 3).mean(axis=0)
    right = img[:, -w // 4 :].reshape(-1, 3).mean(axis=0)
    assert np.allclose(left, RED, atol=12), left
    assert np.allclose(right, BLUE, atol=12), right


# --- probe ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "params", "channels", "fmt"),
    [
        (".png", (), 3, "png"),
        (".png", (), 1, "png"),
        (".jpg", (), 3, "jpeg"),
        (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), 3, "jpeg"),
        (".bmp", (), 3, "bmp"),
        (".bmp", (), 1, "bmp"),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80), 3, "webp"),  # VP8
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101), 3, "webp"),  # VP8L (lossless)
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80), 4, "webp"),  # VP8X (alpha)
        (".tiff", (), 3, "tiff"),
    ],
)
def test_probe_reads_size_from_header(
    ext: str, params: tuple[int, ...], channels: int, fmt: str
) -> None:
    data = encode(ext, split_image(37, 23, channels), params)
    assert probe(data, f"x{ext}") == ImageInfo(fmt, 37, 23)


def test_probe_distinguishes_webp_chunks() -> None:
    chunks = {
        encode(".webp", split_image(8, 8, c), (cv2.IMWRITE_WEBP_QUALITY, q))[12:16]
        for c, q in ((3, 80), (3, 101), (4, 80))
    }
    assert chunks == {b"VP8 ", b"VP8L", b"VP8X"}


def test_probe_skips_exif_to_find_the_frame_header() -> None:
    data = exif_rotated(encode(".jpg", split_image(40, 20)))
    assert probe(data, "r.jpg") == ImageInfo("jpeg", 40, 20)


def test_probe_reads_big_endian_tiff() -> None:
    ifd = struct.pack(">H", 2) + struct.pack(">HHII", 256, 4, 1, 70000)
    ifd += struct.pack(">HHIHH", 257, 3, 1, 300, 0) + struct.pack(">I", 0)
    assert probe(b"MM\x00*" + struct.pack(">I", 8) + ifd, "mm.tif") == ImageInfo("tiff", 70000, 300)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"hello, this is not a picture\n", "looks like text"),
        (b"BM is also how text can start\n", "looks like text"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "GIF is not supported"),
        (b"", "empty file"),
        (b"\x00\x01\x02\x03\xfe\xfe\xfe\xfe", "unrecognised signature 00 01 02 03 fe fe fe fe"),
    ],
)
def test_probe_refuses_what_is_not_an_image(data: bytes, detail: str) -> None:
    with pytest.raises(ImageError) as exc:
        probe(data, "fake.jpg")
    assert str(exc.value) == f"fake.jpg: not a supported image ({detail})"


@pytest.mark.parametrize(("ext", "cut"), [(".png", 20), (".jpg", 10), (".bmp", 20), (".webp", 25)])
def test_probe_refuses_truncated_header(ext: str, cut: int) -> None:
    data = encode(ext, split_image(16, 16))[:cut]
    with pytest.raises(ImageError, match=r"^cut\.img: truncated \w+ header$"):
        probe(data, "cut.img")


def test_probe_refuses_zero_size() -> None:
    with pytest.raises(ImageError, match=r"^z\.png: corrupt PNG header \(size 0x5\)$"):
        probe(png_header(0, 5), "z.png")


# --- decode ---------------------------------------------------------------------------------


def test_decode_full_size() -> None:
    d = decode(encode(".png", split_image(64, 48)), "a.png")
    assert isinstance(d, Decoded)
    assert d.image.shape == (48, 64, 3)
    assert d.image.dtype == np.uint8
    assert (d.full_size, d.scale) == ((64, 48), 1.0)
    assert_split(d.image)


def test_decode_never_upscales(imdecode_flags: list[int]) -> None:
    d = decode(encode(".jpg", split_image(64, 48)), "a.jpg", max_long_side=500)
    assert d.image.shape == (48, 64, 3)
    assert d.scale == 1.0
    assert imdecode_flags == [cv2.IMREAD_COLOR]


@pytest.mark.parametrize("channels", [1, 4])
def test_decode_gives_three_channel_bgr(channels: int) -> None:
    d = decode(encode(".png", split_image(32, 16, channels)), "g.png")
    assert d.image.shape == (16, 32, 3)


@pytest.mark.parametrize(
    ("max_long_side", "flag", "shape"),
    [
        (250, cv2.IMREAD_REDUCED_COLOR_8, (125, 250, 3)),  # exactly 1/8: no resize needed
        (300, cv2.IMREAD_REDUCED_COLOR_4, (150, 300, 3)),  # 1/8 would be too small
        (999, cv2.IMREAD_REDUCED_COLOR_2, (500, 999, 3)),  # round(1000 * 999 / 2000) = 500
        (1999, cv2.IMREAD_COLOR, (1000, 1999, 3)),  # 1/2 would be too small
    ],
)
def test_decode_jpeg_at_reduced_size(
    imdecode_flags: list[int], max_long_side: int, flag: int, shape: tuple[int, int, int]
) -> None:
    data = encode(".jpg", split_image(2000, 1000), (cv2.IMWRITE_JPEG_QUALITY, 95))
    d = decode(data, "big.jpg", max_long_side=max_long_side)
    assert imdecode_flags == [flag]
    assert d.image.shape == shape
    assert d.full_size == (2000, 1000)
    assert d.scale == pytest.approx(shape[1] / 2000)
    assert_split(d.image)


def test_decode_reduced_portrait_odd_sizes() -> None:
    d = decode(encode(".jpg", split_image(999, 1999)), "tall.jpg", max_long_side=250)
    assert d.image.shape == (250, 125, 3)  # 1/4 gives 500x250, round(999 * 250 / 1999) = 125
    assert d.full_size == (999, 1999)
    assert_split(d.image)


def test_decode_other_formats_decode_fully_then_resize(imdecode_flags: list[int]) -> None:
    d = decode(encode(".png", split_image(400, 100)), "wide.png", max_long_side=100)
    assert imdecode_flags == [cv2.IMREAD_COLOR]
    assert d.image.shape == (25, 100, 3)
    assert (d.full_size, d.scale) == ((400, 100), 0.25)
    assert_split(d.image)


@pytest.mark.parametrize("max_long_side", [None, 10])
def test_decode_follows_exif_orientation(max_long_side: int | None) -> None:
    data = exif_rotated(encode(".jpg", split_image(40, 20)), orientation=6)
    d = decode(data, "r.jpg", max_long_side=max_long_side)
    side = max_long_side or 40
    assert d.image.shape == (side, side // 2, 3)
    assert d.full_size == (20, 40)  # as displayed, like the image
    assert d.scale == side / 40


def test_decode_refuses_truncated_jpeg(capfd: pytest.CaptureFixture[str]) -> None:
    data = encode(".jpg", split_image(300, 200))
    for cut in (data[: len(data) // 2], data[:-2], data[:-2] + bytes(4096)):
        with pytest.raises(ImageError, match=r"^cut\.jpg: corrupt or truncated image data"):
            decode(cut, "cut.jpg")
    assert capfd.readouterr().err == ""


def test_decode_refuses_jpeg_cut_inside_its_header() -> None:
    data = encode(".jpg", split_image(300, 200))
    sof = data.index(b"\xff\xc0")
    with pytest.raises(ImageError, match=r"^cut\.jpg: "):
        decode(data[: sof + 12], "cut.jpg")


def test_decode_refuses_corrupt_png_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    data = bytearray(
        encode(".png", np.random.default_rng(1).integers(0, 255, (50, 60, 3), np.uint8))
    )
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF
    with pytest.raises(ImageError, match=r"^bad\.png: corrupt or truncated image data"):
        decode(bytes(data), "bad.png")
    with pytest.raises(ImageError, match=r"^cut\.png: corrupt or truncated image data"):
        decode(bytes(data[: len(data) // 2]), "cut.png")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tiff"])
def test_decode_refuses_truncated_other_formats_quietly(
    ext: str, capfd: pytest.CaptureFixture[str]
) -> None:
    data = encode(ext, np.random.default_rng(2).integers(0, 255, (60, 80, 3), np.uint8))
    # libtiff writes the directory last, so a cut TIFF already fails its header probe.
    with pytest.raises(ImageError, match=r"^cut\.img: (corrupt or truncated image data$|trunc)"):
        decode(data[: len(data) // 2], "cut.img")
    assert capfd.readouterr().err == ""


def test_bomb_header_refused_before_decoding(no_imdecode: None) -> None:
    # A valid IHDR claiming 30000x30000 and a token IDAT: only the header matters.
    data = png_header(30000, 30000) + png_chunk(b"IDAT", zlib.compress(bytes(30001)))
    with pytest.raises(ImageError) as exc:
        decode(data, "bomb.png")
    assert str(exc.value) == (
        "bomb.png: 30000x30000 = 900,000,000 pixels exceeds the limit of 100,000,000"
    )


def test_real_bomb_refused_before_decoding(no_imdecode: None) -> None:
    data = bomb_png()
    assert 500_000 < len(data) < 1_100_000
    # It really is 30000 rows of zeros: the stream starts inflating as one.
    idat = data.index(b"IDAT") + 4
    head = zlib.decompressobj().decompress(data[idat : idat + 10_000], 4 * 30001)
    assert head == bytes(4 * 30001)
    assert probe(data, "bomb.png") == ImageInfo("png", 30000, 30000)
    with pytest.raises(ImageError, match=r"^bomb\.png: 30000x30000 = 900,000,000 pixels"):
        decode(data, "bomb.png", max_long_side=1000)


def test_decode_custom_pixel_limit() -> None:
    data = encode(".png", split_image(100, 50))
    with pytest.raises(
        ImageError, match=r"^s\.png: 100x50 = 5,000 pixels exceeds the limit of 4,999$"
    ):
        decode(data, "s.png", max_pixels=4999)
    assert decode(data, "s.png", max_pixels=5000).image.shape == (50, 100, 3)


def test_a_photo_whose_mpf_preview_is_still_to_come_is_truncated() -> None:
    """A drone photo (main image, then the preview its MPF index lists) whose copy stalled
    after the main image's end marker passed for whole: analysed, then analysed again under
    its full size once the rest came, two detections of one photo."""
    main = encode(".jpg", split_image(64, 48))
    preview = encode(".jpg", split_image(32, 24))
    photo = mpf_jpeg(main, preview)
    assert decode(photo, "DJI_0042.JPG").image.shape == (48, 64, 3)
    cut = photo[: len(photo) - 100]
    assert cut.rfind(b"\xff\xd9") > len(main)  # the main image's end marker is there
    with pytest.raises(
        ImageError,
        match=r"^DJI_0042\.JPG: corrupt or truncated image data \(the image its MPF index "
        rf"lists at byte {len(photo) - len(preview):,} has no end marker\)$",
    ):
        decode(cut, "DJI_0042.JPG")
    for junk in (b"MPF\x00II*\x00\xff\xff\xff\xff", b"MPF\x00XX"):  # an index that does not
        odd = main[:2] + b"\xff\xe2" + (len(junk) + 2).to_bytes(2, "big") + junk + main[2:]
        assert decode(odd, "odd.jpg").image.shape == (48, 64, 3)  # parse is no reason to refuse
    wrong = mpf_jpeg(main, b"not where the index says" + encode(".jpg", split_image(32, 24)))
    assert decode(wrong[:-100], "wrong.jpg").image.shape == (48, 64, 3)  # a writer's bad index


def test_the_pixel_limit_counts_what_a_reduced_jpeg_decode_holds() -> None:
    """A 100 MP inspection camera's JPEG read at 1/8 (libjpeg scales while decoding) holds
    1.6 MP, yet the limit was applied to the header's full size: every frame refused."""
    data = encode(".jpg", split_image(200, 100))  # 20,000 pixels
    with pytest.raises(ImageError, match=r"^s\.jpg: 200x100 = 20,000 pixels exceeds the limit"):
        decode(data, "s.jpg", max_pixels=5000)
    assert decode(data, "s.jpg", max_pixels=5000, max_long_side=50).image.shape == (25, 50, 3)
    with pytest.raises(
        ImageError,
        match=r"^s\.jpg: 200x100 = 20,000 pixels, 50x25 at 1/4, exceeds the limit of 1,000$",
    ):
        decode(data, "s.jpg", max_pixels=1000, max_long_side=50)
    # A progressive JPEG holds its coefficients at full size whatever the scale: a 2.3 MB
    # one of 20000x20000 took 1.2 GB at 1/8. It counts its full size.
    progressive = encode(".jpg", split_image(200, 100), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    with pytest.raises(ImageError, match=r"^p\.jpg: 200x100 = 20,000 pixels exceeds the limit"):
        decode(progressive, "p.jpg", max_pixels=5000, max_long_side=50)
    # Nor a baseline one whose components come one scan each (a 1.6 MB 12000x12000: 898 MB).
    one_scan = scanned_jpeg(200, 104, interleaved=True)
    assert decode(one_scan, "i.jpg", max_pixels=5000, max_long_side=50).image.shape == (26, 50, 3)
    with pytest.raises(ImageError, match=r"^n\.jpg: 200x104 = 20,800 pixels exceeds the limit"):
        decode(
            scanned_jpeg(200, 104, interleaved=False), "n.jpg", max_pixels=5000, max_long_side=50
        )


def test_opencv_exceptions_become_image_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(buf: Any, flags: int) -> Any:
        raise cv2.error("pixels <= CV_IO_MAX_IMAGE_PIXELS")

    monkeypatch.setattr(cv2, "imdecode", fails)
    with pytest.raises(ImageError, match=r"^a\.png: cannot decode \("):
        decode(encode(".png", split_image(4, 4)), "a.png")


def test_decode_rejects_nonsense_long_side() -> None:
    with pytest.raises(ValueError, match="max_long_side"):
        decode(encode(".png", split_image(4, 4)), "a.png", max_long_side=0)


def test_read_names_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(".jpg", split_image(80, 40)))
    d = read(good, max_long_side=40)
    assert d.image.shape == (20, 40, 3)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=f"^{re.escape(str(text))}: not a supported image"):
        read(text)
    missing = re.escape(str(tmp_path / "missing.jpg"))
    with pytest.raises(ImageError, match=f"^{missing}: cannot read"):
        read(tmp_path / "missing.jpg")


def test_opencv_backstop_limit_is_set() -> None:
    assert int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]) > 0
    assert imageio.MAX_PIXELS == 100_000_000
