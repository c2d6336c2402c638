"""The command lines as a user runs them (in-process, real files)."""

from __future__ import annotations

import csv
import json
import stat
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import xgboost as xgb

from agent.cli import main as agent_main
from agent.contract import DetectionMessage, ModelManifest
from export.cli import main as export_main
from export.convert import ConvertError, load_booster
from export.synthetic import make_scene
from tests.conftest import rust_pixels
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
    assert (out / "overlays" / "deck" / "good2.overlay.jpg").is_file()
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
    assert (tmp_path / "ov" / "overlays" / "hull.overlay.jpg").is_file()


def test_bad_model_path_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = agent_main(["detect", "x.jpg", "--model", str(tmp_path / "nothing")])
    assert code == 2
    assert "no model manifest" in capsys.readouterr().err


def test_train_then_convert_softmax_with_full_parity(tmp_path: Path) -> None:
    """The AWS payload's objective: parity over all 2^24 colours proves the class fold."""
    x, y = rust_pixels(5000)
    csv_path = tmp_path / "train.csv"
    np.savetxt(csv_path, np.column_stack((y, x)).astype(int), fmt="%d", delimiter=",")
    assert (
        export_main(["train", str(csv_path), "--out", str(tmp_path / "t"), "--num-round", "15"])
        == 0
    )
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["metrics"]["accuracy"] > 0.8
    code = export_main(
        ["convert", str(tmp_path / "t" / "model.json"), "--out", str(tmp_path / "m"),
         "--name", "payload", "--version", "1.2.3"]
    )  # fmt: skip
    assert code == 0
    manifest = ModelManifest.read(tmp_path / "m" / "manifest.json")
    assert manifest.output.kind == "labels" and manifest.table is not None
    assert manifest.provenance.hyperparameters["max_depth"] == 3


def test_bad_csv_names_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("0,1,2,3\n7,1,2,3\n")
    assert export_main(["train", str(csv_path), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: row 2 has class 7" in err


def test_unreadable_booster_says_how_to_migrate(tmp_path: Path) -> None:
    bogus = tmp_path / "xgboost-model"
    bogus.write_bytes(b"\x00binf legacy format")
    with pytest.raises(ConvertError, match="save_model"):
        load_booster(bogus)


def test_sagemaker_tarball_is_read(tmp_path: Path) -> None:
    import tarfile

    x, y = rust_pixels(2000)
    booster = xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(x, label=y), 3)
    booster.save_model(str(tmp_path / "xgboost-model.json"))
    (tmp_path / "xgboost-model.json").rename(tmp_path / "xgboost-model")
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "xgboost-model", arcname="xgboost-model")
    loaded = load_booster(tmp_path / "model.tar.gz")
    assert loaded.num_boosted_rounds() == 3
