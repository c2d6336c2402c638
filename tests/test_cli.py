"""The command lines as a user runs them (in-process, real files)."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import xgboost as xgb

from agent.archive import iter_inputs
from agent.batch import run_batch
from agent.cli import main as agent_main
from agent.contract import DetectionMessage, ModelManifest, Provenance
from agent.engine.detector import Detector
from agent.engine.model import sha256_file, verify_file
from export.cli import main as export_main
from export.convert import ConvertError, load_booster
from export.synthetic import make_scene
from tests.conftest import rust_pixels
from tests.exifdata import SYDNEY, TAKEN, ascii_tag, with_exif
from tests.imagedata import bomb_png


def scene_jpeg(seed: int, w: int = 320, h: int = 240) -> bytes:
    scene = make_scene(np.random.default_rng(seed), w, h)
    ok, buf = cv2.imencode(".jpg", scene.image)
    assert ok
    return buf.tobytes()


def test_batch_zip_refuses_each_unsafe_entry_and_processes_the_rest(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "inspection.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.jpg", scene_jpeg(1))
        zf.writestr("deck/good2.jpg", scene_jpeg(2))
        zf.writestr("../evil.jpg", scene_jpeg(3))
        zf.writestr("/abs/evil.jpg", scene_jpeg(4))
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("notes.txt", "inspection notes")
        zf.writestr("bomb.png", bomb_png(30000), compress_type=zipfile.ZIP_STORED)
    out = tmp_path / "out"
    code = agent_main(["batch", str(archive), "--model", str(logistic_model), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # something was refused
    refused = [line for line in captured.err.splitlines() if line.startswith("refused: ")]
    assert len(refused) == 5, captured.err
    for name in ("../evil.jpg", "/abs/evil.jpg", "link.jpg", "notes.txt", "bomb.png"):
        assert sum(name in line for line in refused) == 1, (name, refused)
    assert any("30000x30000" in line for line in refused)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["file"] for r in rows) == ["deck/good2.jpg", "good.jpg"]
    assert all(0.0 <= float(r["corrosion_pct"]) <= 100.0 for r in rows)
    assert (out / "overlays" / "deck" / "good2.jpg.overlay.jpg").is_file()
    assert not (tmp_path / "evil.jpg").exists()
    assert "2 analysed" in captured.err


def test_batch_folder_all_good_exits_zero(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"f{i}.jpg").write_bytes(scene_jpeg(10 + i))
    code = agent_main(
        ["batch", str(frames), "--model", str(logistic_model), "--out", str(tmp_path / "o")]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("% corroded" in line for line in lines)


def test_batch_overlays_never_collide_and_one_unwritable_costs_only_itself(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames, out = tmp_path / "frames", tmp_path / "o"
    frames.mkdir()
    (frames / "a.jpg").write_bytes(scene_jpeg(30))
    _, png = cv2.imencode(".png", make_scene(np.random.default_rng(31), 96, 64).image)
    (frames / "a.png").write_bytes(png.tobytes())
    (frames / "b.jpg").write_bytes(scene_jpeg(32))
    (out / "overlays" / "b.jpg.overlay.jpg").mkdir(parents=True)  # in the way
    code = agent_main(["batch", str(frames), "--model", str(logistic_model), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "not written: " in err and "b.jpg.overlay.jpg" in err
    assert "3 analysed" in err and "1 output file(s) not written" in err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["file"] for r in rows) == ["a.jpg", "a.png", "b.jpg"]
    jpg, from_png = out / "overlays" / "a.jpg.overlay.jpg", out / "overlays" / "a.png.overlay.jpg"
    assert cv2.imread(str(jpg)).shape[:2] == (240, 320)
    assert cv2.imread(str(from_png)).shape[:2] == (64, 96)


def test_detect_same_name_from_two_folders_keeps_both_overlays(
    logistic_model: Path, tmp_path: Path
) -> None:
    images = []
    for folder, name, seed in (
        ("deck", "p.jpg", 40),
        ("hull", "p.jpg", 41),
        ("top", "p-1.jpg", 42),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(scene_jpeg(seed))
        images.append(str(tmp_path / folder / name))
    out = tmp_path / "ov"
    assert agent_main(["detect", *images, "--model", str(logistic_model), "--out", str(out)]) == 0
    written = sorted(p.name for p in (out / "overlays").iterdir())
    assert written == ["p-1-1.jpg.overlay.jpg", "p-1.jpg.overlay.jpg", "p.jpg.overlay.jpg"]


def test_detect_json_lines_are_detection_messages(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "hull.jpg"
    image.write_bytes(scene_jpeg(20, 1600, 1200))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(scene_jpeg(21)[:500])
    model = str(logistic_model.parent / "model.onnx")
    code = agent_main(
        ["detect", str(image), str(broken), "--model", model, "--json",
         "--analysis-long-side", "400", "--out", str(tmp_path / "ov"), "--device-id", "d1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err
    (line,) = captured.out.splitlines()
    msg = DetectionMessage.model_validate_json(line)
    assert msg.device_id == "d1" and msg.source == str(image)
    assert (msg.frame_size.width, msg.analysis_size.width) == (1600, 400)
    assert (tmp_path / "ov" / "overlays" / "hull.jpg.overlay.jpg").is_file()


def test_detect_and_batch_date_and_place_photos_by_their_exif(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "card"
    photos.mkdir()
    tagged = photos / "DJI_0001.jpg"
    tagged.write_bytes(with_exif(scene_jpeg(22), [TAKEN, ascii_tag(0x9011, "+02:00")], SYDNEY))
    plain = photos / "plain.jpg"
    plain.write_bytes(scene_jpeg(23))
    os.utime(plain, (1_700_000_000, 1_700_000_000))

    code = agent_main(["detect", str(tagged), str(plain), "--model", str(logistic_model), "--json"])
    assert code == 0
    lines = capsys.readouterr().out.split()
    first, second = (DetectionMessage.model_validate_json(x) for x in lines)
    assert first.captured_at == datetime(2024, 5, 6, 5, 8, 9, tzinfo=UTC)
    assert first.gps is not None and first.gps.lat == pytest.approx(-33.865, abs=1e-3)
    assert second.captured_at == datetime.fromtimestamp(1_700_000_000, UTC) and second.gps is None

    out = tmp_path / "out"
    assert (
        agent_main(["batch", str(photos), "--model", str(logistic_model), "--out", str(out)]) == 0
    )
    rows = {r["file"]: r for r in csv.DictReader((out / "results.csv").open())}
    taken = rows["DJI_0001.jpg"]["taken_at"]  # written as the message writes it
    assert taken == json.loads(lines[0])["captured_at"] == "2024-05-06T05:08:09Z"
    assert float(rows["DJI_0001.jpg"]["lon"]) == pytest.approx(151.21, abs=1e-2)
    assert float(rows["DJI_0001.jpg"]["alt"]) == pytest.approx(-58.5)
    assert [rows["plain.jpg"][k] for k in ("taken_at", "lat", "lon", "alt")] == ["", "", "", ""]

    (place,) = json.loads((out / "results.geojson").read_text())["features"]  # GPS only
    lon, lat = place["geometry"]["coordinates"]  # RFC 7946's order; altitude is above sea level:
    assert (lon, lat) == pytest.approx((151.21, -33.865), abs=1e-3)  # not the ellipsoid's
    assert place["properties"]["altitude_msl_m"] == pytest.approx(-58.5)
    assert place["properties"]["file"] == "DJI_0001.jpg"
    assert place["properties"]["corrosion_pct"] == float(rows["DJI_0001.jpg"]["corrosion_pct"])
    assert place["properties"]["taken_at"] == "2024-05-06T05:08:09Z"

    # A camera kept Sydney time without writing its offset; the workstation is elsewhere.
    (photos / "DJI_0002.jpg").write_bytes(with_exif(scene_jpeg(24), [TAKEN]))
    argv = ["batch", str(photos), "--model", str(logistic_model), "--out", str(out)]
    assert agent_main([*argv, "--camera-tz", "Australia/Sydney"]) == 0
    rows = {r["file"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["DJI_0002.jpg"]["taken_at"] == "2024-05-05T21:08:09Z"
    assert rows["DJI_0001.jpg"]["taken_at"] == "2024-05-06T05:08:09Z"  # its offset wins
    for zone, utc in (("+10:00", datetime(2024, 5, 5, 21, 8, 9, tzinfo=UTC)),
                      ("-04:00", datetime(2024, 5, 6, 11, 8, 9, tzinfo=UTC))):  # fmt: skip
        code = agent_main(["detect", str(photos / "DJI_0002.jpg"), "--model",
                           str(logistic_model), "--json", "--camera-tz", zone])  # fmt: skip
        out_json = capsys.readouterr().out.splitlines()[-1]
        assert code == 0  # a negative offset is the option's value, not another option
        assert DetectionMessage.model_validate_json(out_json).captured_at == utc
    with pytest.raises(SystemExit) as bad:
        agent_main([*argv, "--camera-tz", "Sydney"])
    assert bad.value.code == 2
    assert "--camera-tz: unknown time zone 'Sydney'" in capsys.readouterr().err
    (photos / "DJI_0002.jpg").unlink()

    def interrupt(name: str, _: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the next run

    with pytest.raises(KeyboardInterrupt):
        run_batch(Detector.load(logistic_model), iter_inputs(photos), out, on_result=interrupt)
    assert not (out / "results.geojson").exists(), "the last run's map beside this run's rows"


def test_a_map_that_cannot_be_written_costs_only_itself(
    logistic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames, out = tmp_path / "frames", tmp_path / "o"
    frames.mkdir()
    (frames / "a.jpg").write_bytes(with_exif(scene_jpeg(24), [TAKEN], SYDNEY))
    (out / "results.geojson").mkdir(parents=True)  # in the way
    code = agent_main(["batch", str(frames), "--model", str(logistic_model), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"not written: {out}/results.geojson: cannot write the map" in err
    assert [r["file"] for r in csv.DictReader((out / "results.csv").open())] == ["a.jpg"]


def test_bad_model_path_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = agent_main(["detect", "x.jpg", "--model", str(tmp_path / "nothing")])
    assert code == 2
    assert "no model manifest" in capsys.readouterr().err
    # The trained model is a .json too: it got a schema dump ("name: Field required; ...").
    (tmp_path / "model.json").write_bytes(model_bytes(tmp_path))
    code = agent_main(["detect", "x.jpg", "--model", str(tmp_path / "model.json")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'model.json'}: an XGBoost model, not a model manifest: export it "
        "with `corrosion-export convert` and give the folder it writes\n"
    )


def test_batch_of_a_path_that_is_not_there_is_a_usage_error(
    tmp_path: Path, logistic_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["batch", str(tmp_path / "absent"), "--model", str(logistic_model)]
    assert agent_main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "absent: cannot read (No such file or directory)" in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "taken" / "results.csv").mkdir(parents=True)  # in the way: one line, exit 2
    args = ["batch", str(images), "--model", str(logistic_model), "--out", str(tmp_path / "taken")]
    assert agent_main(args) == 2
    assert "results.csv: cannot write the results: Is a directory" in capsys.readouterr().err


def test_train_then_convert_softmax_with_full_parity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The AWS payload's objective: parity over all 2^24 colours proves the class fold, and
    convert says so (it printed only the manifest's path)."""
    x, y = rust_pixels(5000)
    csv_path = tmp_path / "train.csv"
    np.savetxt(csv_path, np.column_stack((y, x)).astype(int), fmt="%d", delimiter=",")
    assert (
        export_main(["train", str(csv_path), "--out", str(tmp_path / "t"), "--num-round", "15"])
        == 0
    )
    record = json.loads((tmp_path / "t" / "model.metrics.json").read_text())
    assert record["metrics"]["accuracy"] > 0.8
    capsys.readouterr()
    code = export_main(
        ["convert", str(tmp_path / "t" / "model.json"), "--out", str(tmp_path / "m"),
         "--name", "payload", "--version", "1.2.3"]
    )  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'm' / 'manifest.json'}\n"
    assert (
        "parity proven: onnxruntime gives xgboost's label for every one of the 16777216 colours"
    ) in err
    manifest = ModelManifest.read(tmp_path / "m" / "manifest.json")
    assert manifest.output.kind == "labels" and manifest.table is not None
    assert manifest.provenance.hyperparameters["max_depth"] == 3
    assert "parity not proven" not in manifest.provenance.notes


def test_bad_csv_names_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("0,1,2,3\n7,1,2,3\n")
    assert export_main(["train", str(csv_path), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: row 2 has class 7" in err


def test_a_csv_given_as_the_model_is_named_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read as a binary model's header, a CSV gave `875637808 classes of 959523888
    features: unreadable` and advice on migrating an old model."""
    data = tmp_path / "train.csv"
    data.write_text("0,12,34,56\n1,200,80,60\n" * 50)
    args = ["convert", str(data), "--out", str(tmp_path / "m"), "--name", "m"]
    assert export_main([*args, "--version", "1.0.0"]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}: not an XGBoost model (expected JSON, UBJ, the legacy binary or a "
        "pickled Booster; it starts with '0,12,34,56\\n1,200,80,60\\n0,12,34,5'...)\n"
    )
    assert not (tmp_path / "m").exists()


def tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def model_bytes(tmp_path: Path, rounds: int = 3) -> bytes:
    x, y = rust_pixels(2000)
    booster = xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(x, label=y), rounds)
    booster.save_model(str(tmp_path / "b.json"))
    return (tmp_path / "b.json").read_bytes()


def test_sagemaker_tarball_is_read(tmp_path: Path) -> None:
    model = model_bytes(tmp_path)
    archive = tarball(tmp_path / "model.tar.gz", {"notes.txt": b"x", "out/xgboost-model": model})
    assert load_booster(archive).num_boosted_rounds() == 3
    only = tarball(tmp_path / "only.tar.gz", {"model.json": model_bytes(tmp_path, 4)})
    assert load_booster(only).num_boosted_rounds() == 4  # the only file is the model


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (
            {"garbage.json": b"garbage!"},
            "model.tar.gz!garbage.json: not an XGBoost model (expected JSON, UBJ, the legacy "
            "binary or a pickled Booster; it starts with 'garbage!')",
        ),
        (
            {"a.json": b"{}", "b.json": b"{}"},
            "model.tar.gz: no xgboost-model but 2 files (a.json, b.json); extract the model",
        ),
        (
            {"a/xgboost-model": b"{}", "b/xgboost-model": b"{}"},
            "model.tar.gz: 2 xgboost-model members (a/xgboost-model, b/xgboost-model); extract",
        ),
        ({}, "model.tar.gz: archive holds no model file"),
    ],
)
def test_a_tarball_is_named_with_its_member_and_never_guessed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], members: dict[str, bytes], message: str
) -> None:
    """Errors named the temporary folder it was extracted to, and of several files without
    an `xgboost-model` the first was taken as the model."""
    archive = tarball(tmp_path / "model.tar.gz", members)
    args = ["convert", str(archive), "--out", str(tmp_path / "m"), "--name", "m"]
    assert export_main([*args, "--version", "1.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/{message}"), err
    assert "/tmp/tmp" not in err.replace(str(tmp_path), "")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_convert_leaves_an_earlier_export_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.onnx was written before the checks, so a refused convert left a manifest
    beside an ONNX model it does not pin."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    x, y = rust_pixels(2000)
    softmax = xgb.train({"objective": "multi:softmax", "num_class": 2}, xgb.DMatrix(x, label=y), 3)
    softmax.save_model(str(tmp_path / "softmax.json"))
    out = tmp_path / "m"

    def convert(model: str, *options: str) -> int:
        args = ["convert", str(tmp_path / model), "--out", str(out), "--name", "m"]
        return export_main([*args, "--version", "1.0.0", *options])

    assert convert("logistic.json", "--skip-parity") == 0
    (out / "notes.txt").write_text("the user's own")
    before = snapshot(out)
    assert convert("softmax.json", "--skip-parity", "--pixel-threshold", "0.6") == 2
    assert "multi:softmax gives labels only" in capsys.readouterr().err

    def failing(*_: object) -> int:
        raise ConvertError("ONNX and xgboost disagree on 1 colours")

    monkeypatch.setattr("export.convert.check_parity", failing)
    assert convert("softmax.json") == 2
    assert "disagree on 1 colours" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.json",
        "logistic.json",
        "m",
        "softmax.json",
    ]

    assert convert("softmax.json", "--skip-parity", "--no-table") == 0  # replaces ours only
    assert "warning: --skip-parity: nothing proves" in capsys.readouterr().err
    assert sorted(snapshot(out)) == ["manifest.json", "model.onnx", "notes.txt"]
    manifest = ModelManifest.read(out / "manifest.json")
    assert manifest.output.objective == "multi:softmax" and manifest.table is None
    assert manifest.provenance.notes.endswith("parity not proven (exported with --skip-parity)")
    verify_file(out / "model.onnx", manifest.model.size, manifest.model.sha256, "model")


def test_convert_into_a_folder_on_another_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --out that is a mount point (a volume, another disk) or a link to one: staged
    beside it, every rename crossed file systems and failed, after the old manifest went."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:  # `out` is a file system of its own
        if Path(src).absolute().is_relative_to(out) != Path(dst).absolute().is_relative_to(out):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    args = ["convert", str(tmp_path / "logistic.json"), "--out", str(out), "--name", "m"]
    for version in ("1.0.0", "1.0.1"):
        assert export_main([*args, "--version", version, "--skip-parity"]) == 0
        assert ModelManifest.read(out / "manifest.json").version == version
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "table.npy"]


def test_a_killed_converts_staging_is_swept_and_a_working_ones_is_not(tmp_path: Path) -> None:
    """A convert killed mid-way (SIGKILL, the OOM killer) runs no `finally`: its hidden
    staging folder, a model's worth of disk, stayed in --out for good."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    out = tmp_path / "out"
    dead, working, starting = (out / f".convert-{n}.partial" for n in ("a", "b", "c"))
    for folder in (dead, working, starting):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"half")
    held = os.open(working / ".lock", os.O_RDWR | os.O_CREAT)  # another convert at work
    fcntl.flock(held, fcntl.LOCK_EX)
    for folder in (dead, working):  # both old: only the lock tells them apart
        os.utime(folder, (1_700_000_000, 1_700_000_000))
    try:
        args = ["convert", str(tmp_path / "logistic.json"), "--out", str(out), "--name", "m"]
        assert export_main([*args, "--version", "1.0.0", "--skip-parity"]) == 0
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == [
        ".convert-b.partial",
        ".convert-c.partial",  # made a moment ago: never taken for one killed
        "manifest.json",
        "model.onnx",
        "table.npy",
    ]


def test_convert_where_the_file_system_has_no_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some NFS mounts answer flock with an error (EBADF on a folder opened read-only): the
    convert failed with "cannot write (Bad file descriptor)". It goes on, and sweeps nothing
    it cannot tell is abandoned."""
    (tmp_path / "logistic.json").write_bytes(model_bytes(tmp_path))
    out = tmp_path / "out"
    (out / ".convert-old.partial").mkdir(parents=True)
    (out / ".convert-old.partial" / ".lock").write_bytes(b"")
    os.utime(out / ".convert-old.partial", (1_700_000_000, 1_700_000_000))

    def no_locks(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    args = ["convert", str(tmp_path / "logistic.json"), "--out", str(out), "--name", "m"]
    assert export_main([*args, "--version", "1.0.0", "--skip-parity"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".convert-old.partial",
        "manifest.json",
        "model.onnx",
        "table.npy",
    ]


def _train(csv_path: Path, out: Path, rounds: int, seed: int) -> None:
    x, y = rust_pixels(1500, seed)
    np.savetxt(csv_path, np.column_stack((y, x)).astype(int), fmt="%d", delimiter=",")
    args = ["train", str(csv_path), "--out", str(out), "--num-round", str(rounds)]
    assert export_main([*args, "--objective", "binary:logistic"]) == 0


def _convert_record(model: Path, out: Path) -> Provenance:
    args = ["convert", str(model), "--out", str(out), "--name", "m", "--version", "1.0.0"]
    assert export_main([*args, "--skip-parity"]) == 0
    return ModelManifest.read(out / "manifest.json").provenance


def test_two_models_trained_into_one_folder_keep_their_own_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They shared one metrics.json, which described the second: the first one's metrics
    were lost at train time, and its convert warned that the manifest got none."""
    two = tmp_path / "two"
    _train(tmp_path / "a.csv", two / "model.json", 3, 1)
    _train(tmp_path / "b.csv", two / "bin.json", 4, 2)
    assert sorted(p.name for p in two.iterdir()) == [
        "bin.json", "bin.metrics.json", "model.json", "model.metrics.json"
    ]  # fmt: skip
    capsys.readouterr()
    first = _convert_record(two / "model.json", tmp_path / "ma")
    second = _convert_record(two / "bin.json", tmp_path / "mb")
    assert "describes" not in capsys.readouterr().err  # each record is its model's
    assert (first.hyperparameters["num_round"], second.hyperparameters["num_round"]) == (3, 4)
    assert first.training_data_sha256 == sha256_file(tmp_path / "a.csv")
    assert second.training_data_sha256 == sha256_file(tmp_path / "b.csv")
    (two / "bin.metrics.json").write_text("{not json")
    args = ["convert", str(two / "bin.json"), "--out", str(tmp_path / "mc")]
    assert export_main([*args, "--name", "m", "--version", "1.0.0"]) == 2
    assert f"{two / 'bin.metrics.json'}: not a training record" in capsys.readouterr().err


def test_a_folder_metrics_json_of_earlier_versions_is_still_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Earlier versions wrote one metrics.json per folder: it is the record of the model it
    names, and of no other."""
    old = tmp_path / "old"
    _train(tmp_path / "a.csv", old / "a.json", 3, 1)
    _train(tmp_path / "b.csv", old / "b.json", 4, 2)
    (old / "b.metrics.json").rename(old / "metrics.json")
    (old / "a.metrics.json").unlink()
    capsys.readouterr()
    first = _convert_record(old / "a.json", tmp_path / "ma")
    assert "describes 'b.json', not a.json: the manifest gets no" in capsys.readouterr().err
    assert first.training_data_sha256 is None and first.hyperparameters == {}
    second = _convert_record(old / "b.json", tmp_path / "mb")
    assert second.hyperparameters["num_round"] == 4


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("absent.json", None, "absent.json: cannot read the model: No such file"),
        ("model.tar.gz", b"junk", "model.tar.gz: not a readable .tar.gz archive"),
    ],
)
def test_convert_names_an_unreadable_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes | None,
    expected: str,
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    args = ["convert", str(tmp_path / name), "--out", str(tmp_path / "m")]
    assert export_main([*args, "--name", "m", "--version", "1.0.0"]) == 2
    assert expected in capsys.readouterr().err


def test_convert_checks_name_and_version_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad version fails at once, before loading or the minute-long parity proof."""
    args = ["convert", str(tmp_path / "absent.json"), "--out", str(tmp_path / "m")]
    assert export_main([*args, "--name", "m", "--version", "1.0"]) == 2
    assert "version '1.0'" in capsys.readouterr().err
    assert export_main([*args, "--name", "Bad Name", "--version", "1.0.0"]) == 2
    assert "model name 'Bad Name'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--threads", "0"], "--threads: Input should be greater than or equal to 1"),
        (["--flag-pct", "200"], "--flag-pct: Input should be less than or equal to 100"),
    ],
)
def test_bad_detector_options_are_named_as_typed(
    logistic_model: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    assert agent_main(["detect", "x.jpg", "--model", str(logistic_model), *option]) == 2
    err = capsys.readouterr().err
    assert message in err and "validation error" not in err


_LOADING_AT_EXIT = """
import sys, threading, time
import onnxruntime as ort
from agent.cli import leave
def load():
    while True:
        ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
threading.Thread(target=load, name="updater", daemon=True).start()
time.sleep(0.3)
sys.exit(leave(0))
"""


def test_run_exits_cleanly_past_a_thread_inside_onnxruntime(tmp_path: Path) -> None:
    """SIGTERM while the updater loads a model: the interpreter's teardown under that load
    aborted (exit 134, every time with this model), so systemd logged a crash and restarted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.ones((256, 256), np.float32), f"w{i}") for i in range(20)]
    nodes = [helper.make_node("MatMul", [f"y{i - 1}" if i else "x", f"w{i}"], [f"y{i}"])
             for i in range(20)]  # fmt: skip
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 256]) for n in ("x", "y19")]
    graph = helper.make_graph(nodes, "slow-to-load", io[:1], io[1:], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, "-c", _LOADING_AT_EXIT, str(tmp_path / "m.onnx")],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("count", ["0", "-3"])
def test_synth_refuses_fewer_than_one_scene(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str
) -> None:
    """`synth --count -3` wrote no scene and exited 0."""
    with pytest.raises(SystemExit) as info:
        export_main(["synth", "--out", str(tmp_path / "s"), "--count", count])
    assert info.value.code == 2
    assert f"argument --count: must be at least 1, got {count}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_corrosion_export_without_the_export_extra_is_one_line() -> None:
    """A device install has the script too; it crashed with a traceback from `import onnx`."""
    code = (
        "import sys; sys.modules['onnx'] = None\n"  # as if the extra were not installed
        "from export.entry import main; sys.exit(main(['--help']))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == (
        "error: corrosion-export needs the cloud-side packages (onnx is missing): "
        "pip install 'corrosion-edge[export]'\n"
    )
