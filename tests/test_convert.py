"""`corrosion-export convert`: where it stages its output, and what it reads of an archive."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from export.cli import main as export_main
from export.convert import ConvertError, load_booster
from tests.test_cli import model_bytes


def convert(model: Path, out: Path, *options: str) -> int:
    args = ["convert", str(model), "--out", str(out), "--name", "m", "--version", "1.0.0"]
    return export_main([*args, *options])


def test_a_new_out_is_made_first_staged_in_and_taken_back_on_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new --out was staged beside itself (its parent's business, and debris there after a
    crash), and a failed convert left the parents it had made."""
    model = tmp_path / "model" / "logistic.json"
    model.parent.mkdir()
    model.write_bytes(model_bytes(model.parent))
    out = tmp_path / "deep" / "er" / "m"
    seen: list[list[str]] = []

    def failing(*_: object) -> int:
        seen.extend(sorted(p.name for p in folder.iterdir()) for folder in (out.parent, out))
        raise ConvertError("ONNX and xgboost disagree on 1 colours")

    monkeypatch.setattr("export.convert.check_parity", failing)
    assert convert(model, out) == 2
    assert "disagree on 1 colours" in capsys.readouterr().err
    beside, inside = seen
    assert beside == ["m"] and len(inside) == 1 and inside[0].startswith(".convert-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # deep/er/m taken back
    assert convert(model, out, "--skip-parity") == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "table.npy"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: (t / "file").write_text("x"), "{t}/file: exists and is not a directory"),
        (
            lambda t: (t / "file").symlink_to(t / "absent"),
            "{t}/file: a link to {t}/absent, which is not a directory",
        ),
    ],
)
def test_what_stands_in_the_way_of_out_is_named_and_left_alone(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], object],
    message: str,
) -> None:
    """Both failed with an OSError's bare words: `[Errno 17] File exists` for a file where a
    parent should be, a failed rename of the staging folder for a link to a missing one."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for out in (tmp_path / "file", tmp_path / "file" / "m"):
        assert convert(tmp_path / "logistic.json", out, "--skip-parity") == 2
        assert message.format(t=tmp_path) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").is_symlink() or (tmp_path / "file").read_text() == "x"


def test_an_oversized_archive_member_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive's only file was read whole whatever its size: a dataset tarball passed by
    mistake went into memory before anything could say it is no model."""
    monkeypatch.setattr("export.convert.MAX_MEMBER_BYTES", 1 << 20)
    size = 32 << 20
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("data/pixels.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    tracemalloc.start()
    try:
        with pytest.raises(ConvertError) as caught:
            load_booster(archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value).startswith(
        f"{archive}!data/pixels.bin: {size} bytes, over the 1 MiB a model member may have: "
        "is this the right archive?"
    )
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB"


def test_an_out_that_cannot_be_written_is_named_not_the_staging_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only or immutable --out failed naming its random staging folder inside it."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    out = tmp_path / "out"
    out.mkdir()

    def refused(**kw: object) -> str:
        raise PermissionError(1, "Operation not permitted", f"{kw['dir']}/.convert-x.partial")

    monkeypatch.setattr("export.convert.tempfile.mkdtemp", refused)
    assert convert(tmp_path / "logistic.json", out, "--skip-parity") == 2
    assert f"error: {out}: cannot write (Operation not permitted)" in capsys.readouterr().err
    assert list(out.iterdir()) == []
