"""SageMaker inference handler: the device's engine behind model_fn/input_fn/predict_fn/output_fn.

The serving toolkits (PyTorch, scikit-learn, XGBoost framework containers) import the module
named by SAGEMAKER_PROGRAM and call `model_fn(model_dir)` once, then per request
`input_fn(body, content_type)`, `predict_fn(data, model)` and `output_fn(prediction, accept)`.
`package` packs this module and the `agent` package into `code/` of model.tar.gz, beside the
registry's manifest, ONNX file and table, so the cloud classifies a capture with exactly the
code and table the device used: same decode, same lookup, same regions.

The answer is a JSON object whose keys are DetectionMessage's image-only fields (`model`,
`corrosion_pct`, `flagged`, `threshold`, `regions`, `frame_size`, `analysis_size`) plus
`elapsed_ms`; a consumer joins it to the capture's sidecar by the output object's name.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import re
import tarfile
from pathlib import Path

import agent
from agent.config import ClassifierConfig
from agent.contract import MANIFEST_FILE, ModelManifest
from agent.engine.detector import Analysis, Detector
from agent.imageio import Decoded, ImageError, decode, probe

CONTENT_TYPES = {"image/jpeg": "jpeg", "image/png": "png"}
JSON = "application/json"
_ANY = ("", "*/*", "application/*")
CODE_DIR = "/opt/ml/model/code"  # where the toolkits look for the handler and requirements
ENTRY = "inference.py"  # SAGEMAKER_PROGRAM
# The engine's third-party imports; their version bounds come from pyproject.toml through the
# installed distribution's metadata, so there is one list of versions.
INFERENCE_DEPS = "numpy onnxruntime opencv-python-headless protobuf pydantic"


class UnsupportedTypeError(ValueError):
    """A request or accept type this handler does not speak; the message lists what it does."""


def _media_type(header: str | None) -> str:
    """`image/jpeg; q=1` -> `image/jpeg`: parameters never change what the bytes are."""
    return (header or "").split(";", 1)[0].strip().lower()


def model_fn(model_dir: str) -> Detector:
    """Load and verify (sizes, hashes, golden samples) the model unpacked in `model_dir`."""
    return Detector.load(Path(model_dir) / MANIFEST_FILE, ClassifierConfig())


def input_fn(request_body: bytes | bytearray | memoryview, content_type: str | None) -> Decoded:
    """Decode a JPEG or PNG body; anything else is refused before a pixel is decoded.

    The image's own signature decides how it is decoded, as long as it is one of the two
    accepted formats: a Batch Transform job declares one ContentType for every object, and
    the capture contract allows a PNG under its `.jpg` keys.
    """
    media = _media_type(content_type)
    if media not in CONTENT_TYPES:
        raise UnsupportedTypeError(
            f"content type {content_type!r} is not supported; send {' or '.join(CONTENT_TYPES)}"
        )
    data = bytes(request_body)
    name = f"request body ({media})"
    actual = probe(data, name).format
    if actual not in CONTENT_TYPES.values():
        raise ImageError(f"{name}: is {actual.upper()}, not JPEG or PNG")
    return decode(data, name)


def predict_fn(input_data: Decoded, model: Detector) -> Analysis:
    """Classify at the configured analysis size; regions are in the original's pixels."""
    return model.analyse(input_data.image, input_data.full_size)


def output_fn(prediction: Analysis, accept: str | None) -> tuple[str, str]:
    """(body, content type): the corrosion JSON, for `application/json` or any type."""
    media = _media_type(accept)
    if media not in (JSON, *_ANY):
        raise UnsupportedTypeError(f"accept type {accept!r} is not supported; ask for {JSON}")
    result = {
        "model": prediction.model.model_dump(mode="json"),
        "corrosion_pct": round(prediction.corrosion_pct, 4),
        "flagged": prediction.flagged,
        "threshold": prediction.threshold,
        "regions": [r.model_dump(mode="json") for r in prediction.regions],
        "frame_size": prediction.frame_size.model_dump(mode="json"),
        "analysis_size": prediction.analysis_size.model_dump(mode="json"),
        "elapsed_ms": round(prediction.elapsed_ms, 3),
    }
    return json.dumps(result), JSON


# --------------------------------------------------------------------------- packing


def requirements() -> str:
    """requirements.txt for `code/`: the engine's dependencies as pyproject.toml bounds them."""
    wanted = INFERENCE_DEPS.split()
    found = []
    for req in importlib.metadata.requires("corrosion-edge") or []:
        match = re.match(r"[A-Za-z0-9._-]+", req)
        if match and match.group() in wanted and ";" not in req:
            found.append(req)
    return "\n".join(sorted(found)) + "\n"


def code_files() -> dict[str, bytes]:
    """`code/` of model.tar.gz: the SAGEMAKER_PROGRAM entry, this module, the `agent`
    package and the requirements the toolkit installs before importing the entry."""
    entry = (
        b"# The serving toolkit looks these four handlers up in the SAGEMAKER_PROGRAM module.\n"
        b"from export.inference import input_fn, model_fn, output_fn, predict_fn\n"
    )
    files = {f"code/{ENTRY}": entry, "code/requirements.txt": requirements().encode()}
    root = Path(agent.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.suffix == ".py" or path.name == "py.typed":
            files[f"code/agent/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    for path in (Path(__file__).with_name("__init__.py"), Path(__file__)):
        files[f"code/export/{path.name}"] = path.read_bytes()
    return files


def package(model_dir: Path, out: Path) -> str:
    """Write model.tar.gz (model files at the root, `code/` beside them); its SHA-256.

    Byte-for-byte reproducible (sorted, zero times and owners), so the same model and code
    give the same object, and so the same SageMaker model.
    """
    manifest = ModelManifest.read(model_dir / MANIFEST_FILE)
    names = [MANIFEST_FILE] + [r.file for r in manifest.files()]
    files = {name: (model_dir / name).read_bytes() for name in names} | code_files()
    with (
        out.open("wb") as fh,
        gzip.GzipFile(filename="", fileobj=fh, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for arcname in sorted(files):
            info = tarfile.TarInfo(arcname)
            info.size, info.mode = len(files[arcname]), 0o644
            tar.addfile(info, io.BytesIO(files[arcname]))
    return hashlib.sha256(out.read_bytes()).hexdigest()
