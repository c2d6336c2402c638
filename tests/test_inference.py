"""The SageMaker handler, called the way the serving toolkit calls it.

One test unpacks the model.tar.gz `reanalyze` uploads and runs its `code/inference.py` in a
fresh interpreter with only `code/` ahead of site-packages, as the container does: the
tarball must carry every module the handler imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.engine.detector import Detector
from agent.imageio import ImageError, decode
from export import inference
from export.synthetic import make_scene


@pytest.fixture(scope="module")
def model_dir(logistic_model: Path) -> Path:
    return logistic_model.parent


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Detector:
    return inference.model_fn(str(model_dir))


@pytest.fixture(scope="module")
def scene_bgr() -> np.ndarray:
    return make_scene(np.random.default_rng(3), 320, 240).image


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def serve(model: Detector, body: Any, content_type: str, accept: str = "application/json") -> Any:
    """One request through the four handler functions, as the toolkit chains them."""
    data = inference.input_fn(body, content_type)
    payload, kind = inference.output_fn(inference.predict_fn(data, model), accept)
    assert kind == "application/json"
    return json.loads(payload)


@pytest.mark.parametrize(("ext", "content_type"), [(".jpg", "image/jpeg"), (".png", "image/png")])
def test_answers_like_the_device(
    model: Detector, model_dir: Path, scene_bgr: np.ndarray, ext: str, content_type: str
) -> None:
    data = encode(scene_bgr, ext)
    result = serve(model, data, content_type)
    device = Detector.load(model_dir / "manifest.json").analyse(decode(data, "frame").image)
    assert device.corrosion_pct > 1 and device.regions  # a rusty scene: nothing trivially equal
    assert result["corrosion_pct"] == round(device.corrosion_pct, 4)
    assert result["flagged"] == device.flagged
    assert result["threshold"] == device.threshold == 2.0  # the manifest's flag_pct
    assert result["regions"] == [r.model_dump(mode="json") for r in device.regions]
    assert result["frame_size"] == {"width": 320, "height": 240}
    assert result["model"] == device.model.model_dump(mode="json")
    assert set(result) == {
        "model",
        "corrosion_pct",
        "flagged",
        "threshold",
        "regions",
        "frame_size",
        "analysis_size",
        "elapsed_ms",
    }


def test_body_types_parameters_and_signature_win(model: Detector, scene_bgr: np.ndarray) -> None:
    png = encode(scene_bgr, ".png")
    expected = serve(model, png, "image/png")["corrosion_pct"]
    # TorchServe hands over a bytearray; one Batch Transform ContentType covers a PNG too
    assert serve(model, bytearray(png), "image/jpeg")["corrosion_pct"] == expected
    assert (
        serve(model, memoryview(png), "Image/PNG; charset=binary", accept="*/*")["corrosion_pct"]
        == expected
    )


@pytest.mark.parametrize("content_type", ["application/json", "image/gif", "text/csv", None])
def test_refuses_other_content_types(content_type: str | None, scene_bgr: np.ndarray) -> None:
    with pytest.raises(inference.UnsupportedTypeError, match=r"not supported; send image/jpeg"):
        inference.input_fn(encode(scene_bgr, ".png"), content_type)


def test_refuses_other_accept_types(model: Detector, scene_bgr: np.ndarray) -> None:
    analysis = inference.predict_fn(
        inference.input_fn(encode(scene_bgr, ".png"), "image/png"), model
    )
    with pytest.raises(inference.UnsupportedTypeError, match=r"'text/csv'.*application/json"):
        inference.output_fn(analysis, "text/csv")


def test_refuses_corrupt_and_foreign_bytes(scene_bgr: np.ndarray) -> None:
    jpeg = encode(scene_bgr, ".jpg")
    cases = {
        jpeg[: len(jpeg) // 2]: r"truncated|corrupt",
        b"\xff\xd8" + bytes(64): r"JPEG",
        b"not an image at all": r"not a supported image \(looks like text\)",
        b"": r"empty file",
        encode(scene_bgr, ".bmp"): r"is BMP, not JPEG or PNG",
    }
    for body, message in cases.items():
        with pytest.raises(ImageError, match=message):
            inference.input_fn(body, "image/jpeg")


def test_package_is_reproducible_and_pins_requirements(model_dir: Path, tmp_path: Path) -> None:
    first = inference.package(model_dir, tmp_path / "a.tar.gz")
    assert inference.package(model_dir, tmp_path / "b.tar.gz") == first
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("code/requirements.txt").read().decode()  # type: ignore[union-attr]
    assert {"manifest.json", "model.onnx", "table.npy", "code/inference.py"} <= names
    assert {"code/export/inference.py", "code/agent/engine/detector.py"} <= names
    assert not any("__pycache__" in n or n.startswith("code/export/cli") for n in names)
    assert sorted(r.split("<")[0].split(">")[0] for r in requirements.split()) == sorted(
        inference.INFERENCE_DEPS.split()
    )


DRIVER = """
import json, sys
code, model_dir, image = sys.argv[1:]
sys.path.insert(0, code)  # what the toolkit does with /opt/ml/model/code
import inference, agent, export.inference
assert agent.__file__.startswith(code) and export.inference.__file__.startswith(code)
model = inference.model_fn(model_dir)
body = open(image, "rb").read()
data = inference.input_fn(body, "image/jpeg")
out, kind = inference.output_fn(inference.predict_fn(data, model), "application/json")
try:
    inference.input_fn(body, "application/x-npy")
except ValueError as exc:
    refused = str(exc)
print(json.dumps({"out": json.loads(out), "kind": kind, "refused": refused}))
"""


def test_unpacked_model_tarball_serves_in_a_fresh_interpreter(
    model: Detector, model_dir: Path, scene_bgr: np.ndarray, tmp_path: Path
) -> None:
    inference.package(model_dir, tmp_path / "model.tar.gz")
    opt_ml_model = tmp_path / "opt" / "ml" / "model"
    with tarfile.open(tmp_path / "model.tar.gz") as tar:
        tar.extractall(opt_ml_model, filter="data")
    image = tmp_path / "frame.jpg"
    image.write_bytes(encode(scene_bgr, ".jpg"))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(opt_ml_model / "code"), str(opt_ml_model), str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kind"] == "application/json"
    assert (
        result["out"]["corrosion_pct"]
        == serve(model, image.read_bytes(), "image/jpeg")["corrosion_pct"]
    )
    assert "'application/x-npy' is not supported" in result["refused"]
