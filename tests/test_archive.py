"""Batch inputs: every unsafe zip or folder entry is refused on its own line, the rest flow."""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.archive import Entry, Limits, Refused, iter_inputs
from tests.imagedata import bomb_png, encode, split_image

JPG = encode(".jpg", split_image(40, 30))
PNG = encode(".png", split_image(20, 10))
TEXT = b"inspection notes: tower 7, flange rusty\n"


@pytest.fixture(autouse=True)
def no_imdecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing inputs only reads headers; a decode here would defeat the bomb guard."""

    def forbidden(buf: Any, flags: int) -> Any:
        raise AssertionError("cv2.imdecode must not be called")

    monkeypatch.setattr(cv2, "imdecode", forbidden)


def make_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def split(items: list[Entry | Refused]) -> tuple[dict[str, bytes], dict[str, str]]:
    entries = {i.name: i.data for i in items if isinstance(i, Entry)}
    refused = {i.name: i.reason for i in items if isinstance(i, Refused)}
    assert len(entries) + len(refused) == len(items)
    for reason in refused.values():
        assert "\n" not in reason
    return entries, refused


def data_offset(path: Path, name: str) -> int:
    """Where a member's stored bytes start: after its local header, name and extra field."""
    with zipfile.ZipFile(path) as zf:
        header: int = zf.getinfo(name).header_offset
    name_len, extra_len = struct.unpack_from("<HH", path.read_bytes(), header + 26)
    return header + 30 + int(name_len) + int(extra_len)


# --- zip ------------------------------------------------------------------------------------


def test_zip_yields_good_images_and_refuses_each_bad_one(tmp_path: Path) -> None:
    bomb = bomb_png()
    path = make_zip(
        tmp_path / "batch.zip",
        [
            ("good.jpg", JPG),
            ("sub/good2.png", PNG),
            ("../evil.jpg", JPG),
            ("/abs/evil.jpg", JPG),
            (symlink_info("link.jpg"), b"../../etc/passwd"),
            ("notes.txt", TEXT),
            ("fake.jpg", TEXT),
            ("bomb.png", bomb),
        ],
    )
    items = list(iter_inputs(path))
    assert [i.name for i in items] == sorted(i.name for i in items)
    entries, refused = split(items)
    assert entries == {"good.jpg": JPG, "sub/good2.png": PNG}
    assert refused == {
        "../evil.jpg": "../evil.jpg: path escapes the archive",
        "/abs/evil.jpg": "/abs/evil.jpg: absolute path",
        "link.jpg": "link.jpg: symbolic link (not followed)",
        "notes.txt": "notes.txt: not an image (.txt file)",
        "fake.jpg": "fake.jpg: not a supported image (looks like text)",
        "bomb.png": "bomb.png: 30000x30000 = 900,000,000 pixels exceeds the limit of 100,000,000",
    }


def test_refused_prints_as_its_reason() -> None:
    assert str(Refused("a.txt", "a.txt: not an image (.txt file)")) == (
        "a.txt: not an image (.txt file)"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("..\\evil.jpg", "path escapes the archive"),
        ("ok\\..\\..\\evil.jpg", "path escapes the archive"),
        ("\\abs\\evil.jpg", "absolute path"),
        ("C:/Windows/evil.jpg", "absolute path"),
        ("c:evil.jpg", "absolute path"),
        ("a/../../evil.jpg", "path escapes the archive"),
        ("new\nline.jpg", "name contains control characters"),
    ],
)
def test_zip_refuses_unsafe_names(tmp_path: Path, name: str, reason: str) -> None:
    items = list(iter_inputs(make_zip(tmp_path / "n.zip", [(name, JPG), ("z.jpg", JPG)])))
    entries, refused = split(items)
    assert list(entries) == ["z.jpg"]
    assert list(refused) == [name]
    assert refused[name].endswith(f": {reason}")


def test_zip_normalises_harmless_names(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "n.zip", [("./a//b.jpg", JPG), ("win\\c.PNG", PNG)])
    entries, refused = split(list(iter_inputs(path)))
    assert (list(entries), refused) == (["a/b.jpg", "win/c.PNG"], {})


def test_zip_skips_directories_and_macos_junk_silently(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "mac.zip",
        [
            ("photos/", b""),
            ("photos/a.jpg", JPG),
            ("__MACOSX/photos/._a.jpg", b"\x00\x05\x16\x07junk"),
            ("photos/._a.jpg", b"\x00\x05\x16\x07junk"),
            ("photos/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ],
    )
    assert list(iter_inputs(path)) == [Entry("photos/a.jpg", JPG)]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_corrupt_member_is_refused_and_later_entries_still_come(
    tmp_path: Path, method: int
) -> None:
    noisy = encode(".png", np.random.default_rng(3).integers(0, 255, (40, 40, 3), np.uint8))
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("a.jpg", JPG)
        zf.writestr("b.png", noisy)
        zf.writestr("c.png", PNG)
    raw = bytearray(path.read_bytes())
    start = data_offset(path, "b.png")
    for k in range(start + 100, start + 110):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))

    items = list(iter_inputs(path))
    assert [i.name for i in items] == ["a.jpg", "b.png", "c.png"]
    assert items[0] == Entry("a.jpg", JPG)
    assert isinstance(items[1], Refused)
    assert items[1].reason.startswith("b.png: corrupt archive member (")
    assert items[2] == Entry("c.png", PNG)


def test_zip_refuses_encrypted_member(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "enc.zip", [("a.jpg", JPG), ("secret.jpg", JPG)])
    raw = bytearray(path.read_bytes())
    # Set the "encrypted" flag in both the local header and the central directory record.
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        for match in re.finditer(re.escape(sig), bytes(raw)):
            raw[match.start() + flag_at] |= 0x1
    path.write_bytes(bytes(raw))
    _, refused = split(list(iter_inputs(path)))
    assert refused == {"a.jpg": "a.jpg: encrypted", "secret.jpg": "secret.jpg: encrypted"}


def test_zip_refuses_high_compression_ratio(tmp_path: Path) -> None:
    flat = encode(".bmp", np.zeros((1024, 1024, 3), np.uint8))  # 3 MiB of zeros
    path = make_zip(tmp_path / "ratio.zip", [("flat.bmp", flat), ("a.jpg", JPG)])
    entries, refused = split(list(iter_inputs(path)))
    assert list(entries) == ["a.jpg"]
    assert re.fullmatch(
        r"flat\.bmp: suspicious compression ratio [\d,]+:1 \(possible zip bomb\)",
        refused["flat.bmp"],
    )
    # The same file is fine when the ratio limit allows it.
    entries, _ = split(list(iter_inputs(path, Limits(max_ratio=10_000))))
    assert list(entries) == ["a.jpg", "flat.bmp"]


def test_zip_refuses_member_over_size_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "big.zip", [("a.jpg", JPG), ("b.png", PNG)])
    limits = Limits(max_entry_bytes=len(JPG) - 1)
    _, refused = split(list(iter_inputs(path, limits)))
    assert list(refused) == ["a.jpg"]
    assert "exceeds the per-file limit" in refused["a.jpg"]


def test_zip_total_limit_refuses_the_rest(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "t.zip", [("a.jpg", JPG), ("b.jpg", JPG), ("c.png", PNG)])
    items = list(iter_inputs(path, Limits(max_total_bytes=2 * len(JPG))))
    entries, refused = split(items)
    assert list(entries) == ["a.jpg", "b.jpg"]
    assert list(refused) == ["c.png"]
    assert re.fullmatch(
        r"c\.png: total size limit of [\d.]+ KiB reached; not processed", refused["c.png"]
    )


def test_zip_entry_count_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "n.zip", [(f"{k}.png", PNG) for k in range(4)])
    entries, refused = split(list(iter_inputs(path, Limits(max_entries=3))))
    assert list(entries) == ["0.png", "1.png", "2.png"]
    assert refused == {"3.png": "3.png: more than 3 entries; not processed"}


def test_zip_pixel_limit_comes_from_limits(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "p.zip", [("a.jpg", JPG), ("b.png", PNG)])
    _, refused = split(list(iter_inputs(path, Limits(max_pixels=40 * 30 - 1))))
    assert refused == {"a.jpg": "a.jpg: 40x30 = 1,200 pixels exceeds the limit of 1,199"}


def test_the_pixel_limit_counts_a_reduced_decode_as_detect_does(tmp_path: Path) -> None:
    """`detect --analysis-long-side` read a 100 MP camera's JPEG at 1/8 while `batch`
    refused the same file on its full size."""
    big = encode(".jpg", split_image(200, 100))  # 20,000 pixels, read at 1/4 for 50 px
    progressive = encode(".jpg", split_image(200, 100), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    path = make_zip(tmp_path / "r.zip", [("big.jpg", big), ("prog.jpg", progressive)])
    entries, refused = split(list(iter_inputs(path, Limits(max_pixels=5000, max_long_side=50))))
    assert list(entries) == ["big.jpg"]
    assert refused == {"prog.jpg": "prog.jpg: 200x100 = 20,000 pixels exceeds the limit of 5,000"}
    _, refused = split(list(iter_inputs(path, Limits(max_pixels=5000))))  # full size: both
    assert sorted(refused) == ["big.jpg", "prog.jpg"]


def test_zip_duplicate_names(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = make_zip(tmp_path / "d.zip", [("a.jpg", JPG), ("a.jpg", PNG)])
    items = list(iter_inputs(path))
    assert items[0] == Entry("a.jpg", JPG)
    assert items[1] == Refused("a.jpg", "a.jpg: duplicate name in the archive (first one used)")


@pytest.mark.parametrize("content", [b"just some text\n", JPG, b""])
def test_not_a_zip_raises_value_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "photos.zip"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a zip file"):
        iter_inputs(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere\.zip: cannot read \(No such file"):
        iter_inputs(tmp_path / "nowhere.zip")


# --- folder ---------------------------------------------------------------------------------


def test_folder_walk(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "b.jpg").write_bytes(JPG)
    (root / "sub" / "a.png").write_bytes(PNG)
    (root / "sub" / "deeper" / "c.JPEG").write_bytes(JPG)
    (root / "notes.txt").write_bytes(TEXT)
    (root / "fake.jpg").write_bytes(TEXT)
    (root / ".hidden.jpg").write_bytes(JPG)
    (root / ".cache" / "x.jpg").write_bytes(JPG)
    (root / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "outside.jpg").write_bytes(JPG)
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "escape_dir").symlink_to(tmp_path)
    (root / "inside.jpg").symlink_to(root / "b.jpg")
    (root / "alias").symlink_to(root / "sub")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    os.mkfifo(root / "pipe.jpg")

    items = list(iter_inputs(root))
    assert [i.name for i in items] == sorted(i.name for i in items)
    entries, refused = split(items)
    assert entries == {"b.jpg": JPG, "inside.jpg": JPG, "sub/a.png": PNG, "sub/deeper/c.JPEG": JPG}
    assert refused == {
        "alias": "alias: symbolic link to a folder (not followed)",
        "bomb.png": "bomb.png: 30000x30000 = 900,000,000 pixels exceeds the limit of 100,000,000",
        "dangling.jpg": "dangling.jpg: broken symbolic link",
        "escape.jpg": "escape.jpg: symbolic link points outside the folder",
        "escape_dir": "escape_dir: symbolic link points outside the folder",
        "fake.jpg": "fake.jpg: not a supported image (looks like text)",
        "notes.txt": "notes.txt: not an image (.txt file)",
        "pipe.jpg": "pipe.jpg: not a regular file",
    }


def test_folder_undecodable_name_is_reported_printably(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_bytes(TEXT)
    (refused,) = iter_inputs(tmp_path)
    assert isinstance(refused, Refused)
    assert refused.reason == "caf\\udce9.txt: not an image (.txt file)"
    refused.reason.encode("utf-8")  # printable as-is


def test_folder_total_limit(tmp_path: Path) -> None:
    for name, data in (("a.jpg", JPG), ("b.jpg", JPG), ("c.png", PNG)):
        (tmp_path / name).write_bytes(data)
    entries, refused = split(list(iter_inputs(tmp_path, Limits(max_total_bytes=len(JPG) + 1))))
    assert list(entries) == ["a.jpg"]
    assert list(refused) == ["b.jpg", "c.png"]
    assert all("total size limit" in r for r in refused.values())


def test_folder_size_limit(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(JPG)
    (tmp_path / "b.png").write_bytes(PNG)
    _, refused = split(list(iter_inputs(tmp_path, Limits(max_entry_bytes=len(PNG)))))
    assert list(refused) == ["a.jpg"]
    assert "exceeds the per-file limit" in refused["a.jpg"]
