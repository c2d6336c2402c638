"""The contract the device and the cloud share: model manifest and MQTT payloads.

Both `agent` and `export` import this module; nothing else defines these shapes. Every
model is strict (`extra="forbid"`) so a producer that drifts is caught at the first message,
and JSON Schemas generated from these models (docs/schemas/) let subscribers in other
languages validate the same payloads. Bump CONTRACT_VERSION on any incompatible change.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

CONTRACT_VERSION = "1.0"
"""Major.minor of every payload below; a reader refuses a different major."""

SemVer = Annotated[
    str,
    Field(
        pattern=r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$",
        description="Semantic version, e.g. 1.4.0",
    ),
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256")]
ModelName = Annotated[
    str,
    Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Model name, safe in S3 keys"),
]
FileName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Bare file name")
]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
SchemaVersion = Annotated[
    str, Field(pattern=r"^1\.\d+$", description="Contract version of the writer (major 1)")
]


def describe(exc: ValidationError) -> str:
    """One line per error, each starting with the dotted path of the field at fault."""
    parts = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{path}: {err['msg']}")
    return "; ".join(parts)


class Strict(BaseModel):
    """Base of every contract model: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- manifest


class FileRef(Strict):
    """A file shipped beside the manifest, pinned by hash and size so a device can verify it."""

    file: FileName = Field(description="File name, relative to the manifest")
    sha256: Sha256 = Field(description="SHA-256 of the file's bytes")
    size: int = Field(gt=0, le=512 * 1024 * 1024, description="Size in bytes")


class InputSpec(Strict):
    """What the ONNX model expects: one float tensor of per-pixel features."""

    name: str = Field(default="input", description="ONNX input name")
    colour_order: Literal["RGB"] = Field(default="RGB", description="Channel order of features")
    dtype: Literal["float32"] = Field(default="float32", description="Tensor element type")
    shape: tuple[None, int] = Field(default=(None, 3), description="[N, features]; N is dynamic")
    features: tuple[str, ...] = Field(
        default=("R", "G", "B"), description="Feature names, in column order"
    )

    @model_validator(mode="after")
    def _shape_matches_features(self) -> InputSpec:
        if self.shape[1] != len(self.features):
            raise ValueError(
                f"shape[1]={self.shape[1]} but {len(self.features)} features are named"
            )
        return self


class OutputSpec(Strict):
    """Which outputs the model has and what its scores mean."""

    kind: Literal["probabilities", "labels"] = Field(
        default="probabilities",
        description="probabilities (binary:logistic, multi:softprob) or labels (multi:softmax)",
    )
    objective: Literal["binary:logistic", "multi:softprob", "multi:softmax"] = Field(
        default="binary:logistic", description="XGBoost objective the model was trained with"
    )
    label: str = Field(default="label", description="ONNX output holding int64 labels")
    scores: str = Field(
        default="probabilities",
        description="ONNX output holding [N, 2] scores (probabilities, or margins for labels)",
    )


class GoldenSample(Strict):
    """A colour with the answer the model must give: the device's smoke test after a load."""

    rgb: tuple[int, int, int] = Field(description="Colour, R, G, B in 0..255")
    label: Literal[0, 1] = Field(description="Expected label at the manifest threshold")
    probability: Unit | None = Field(
        default=None, description="Expected P(corroded); None for labels-only models"
    )

    @model_validator(mode="after")
    def _in_range(self) -> GoldenSample:
        if any(not 0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"rgb {self.rgb} outside 0..255")
        return self


class Decision(Strict):
    """How pixel scores become a pixel label and pixel labels become an image flag."""

    pixel_threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="A pixel is corroded when P(corroded) >= this"
    )
    flag_pct: Percent = Field(
        default=5.0, description="An image is flagged when its corrosion % >= this"
    )


class Provenance(Strict):
    """Where a model came from, so a result can be traced back to its training run."""

    training_data_sha256: Sha256 | None = Field(default=None, description="SHA-256 of the CSV")
    hyperparameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Training hyperparameters as passed to the trainer"
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics")
    trainer: str = Field(default="", description="Tool and version that trained the model")
    notes: str = Field(default="", description="Free text: data, recipe, caveats")


class Signature(Strict):
    """Detached signature over the manifest's canonical JSON without this block."""

    algorithm: Literal["ed25519"] = Field(default="ed25519", description="Signature scheme")
    key_id: str = Field(description="Identifier of the signing key (hash of the public key)")
    value: str = Field(description="Base64 signature")


def _class_names() -> dict[Literal["0", "1"], str]:
    return {"0": "clean", "1": "corroded"}


class ModelManifest(Strict):
    """Everything a device needs to verify, load and smoke-test a pixel model."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    name: ModelName = Field(description="Model name")
    version: SemVer = Field(description="Model version")
    created_at: AwareDatetime = Field(description="When the model was exported (UTC)")
    model: FileRef = Field(description="The ONNX file")
    table: FileRef | None = Field(
        default=None, description="Precompiled colour table (.npy), lets a device skip compiling"
    )
    input: InputSpec = Field(default_factory=InputSpec, description="Model input")
    classes: dict[Literal["0", "1"], str] = Field(
        default_factory=_class_names,
        description="Class id (as a JSON key) to name",
    )
    positive_class: Literal[1] = Field(default=1, description="Class id counted as corrosion")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Model outputs")
    decision: Decision = Field(default_factory=Decision, description="Pixel and image rules")
    golden: tuple[GoldenSample, ...] = Field(
        min_length=64, description="At least 64 colours with their expected answers"
    )
    provenance: Provenance = Field(default_factory=Provenance, description="Training record")
    signature: Signature | None = Field(default=None, description="Filled in by the registry")

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if set(self.classes) != {"0", "1"}:
            raise ValueError("classes must name exactly 0 and 1")
        labels_only = self.output.objective == "multi:softmax"
        if labels_only != (self.output.kind == "labels"):
            raise ValueError(
                f"output.kind {self.output.kind!r} does not fit objective {self.output.objective!r}"
            )
        if self.output.kind == "labels" and self.decision.pixel_threshold != 0.5:
            raise ValueError(
                "a labels-only model has no probabilities: pixel_threshold must be 0.5"
            )
        if self.output.kind == "probabilities" and any(g.probability is None for g in self.golden):
            raise ValueError("golden samples of a probability model must carry probabilities")
        return self

    def signing_payload(self) -> bytes:
        """Canonical bytes that a signature covers: the manifest without its signature."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        """Parse a manifest file; errors name the file."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read manifest: {exc.strerror}") from exc
        except ValidationError as exc:
            raise ValueError(f"{path}: invalid manifest: {describe(exc)}") from exc

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


# --------------------------------------------------------------------------- detections


class Region(Strict):
    """One corroded region, in frame pixels (not analysis pixels)."""

    x: int = Field(ge=0, description="Left edge")
    y: int = Field(ge=0, description="Top edge")
    w: int = Field(gt=0, description="Width")
    h: int = Field(gt=0, description="Height")
    area_pct: Percent = Field(description="Corroded pixels of the region, % of the frame")


class Size(Strict):
    width: int = Field(gt=0, description="Pixels across")
    height: int = Field(gt=0, description="Pixels down")


class Gps(Strict):
    """Position from the photo's EXIF (drones write it), WGS84."""

    lat: float = Field(ge=-90, le=90, description="Latitude, degrees")
    lon: float = Field(ge=-180, le=180, description="Longitude, degrees")
    alt: float | None = Field(default=None, description="Altitude, metres")


class ModelRef(Strict):
    """Which model classified a frame."""

    name: ModelName = Field(description="Model name")
    version: SemVer = Field(description="Model version")
    sha256: Sha256 = Field(description="SHA-256 of the ONNX file")


def _now() -> datetime:
    return datetime.now(UTC)


class DetectionMessage(Strict):
    """One per frame: the `detections` MQTT payload and the capture sidecar's core."""

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    message_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        pattern=r"^[0-9a-f]{32}$",
        description="Unique id; subscribers deduplicate on it",
    )
    device_id: str = Field(min_length=1, max_length=128, description="Device that saw the frame")
    source: str = Field(max_length=1024, description="Source URI or file the frame came from")
    frame_index: int = Field(ge=0, description="Index of the frame within its source")
    captured_at: AwareDatetime = Field(description="When the frame was taken (EXIF or clock)")
    processed_at: AwareDatetime = Field(default_factory=_now, description="When it was classified")
    model: ModelRef = Field(description="Model that classified the frame")
    corrosion_pct: Percent = Field(description="Corroded pixels, % of the analysed frame")
    flagged: bool = Field(description="corrosion_pct >= threshold")
    threshold: Percent = Field(description="Flag threshold in force, %")
    regions: tuple[Region, ...] = Field(default=(), description="Corroded regions, largest first")
    frame_size: Size = Field(description="Size of the frame as captured")
    analysis_size: Size = Field(description="Size at which it was classified")
    latency_ms: float = Field(ge=0, description="Read-to-result time, ms")
    gps: Gps | None = Field(default=None, description="Position, when the frame carries one")
    upload_key: str | None = Field(default=None, description="S3 key of the uploaded image")


CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "model-manifest": ModelManifest,
    "detection-message": DetectionMessage,
}
"""Every payload with a published JSON Schema, by schema file stem."""


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each contract model, tagged with the contract version."""
    out: dict[str, dict[str, Any]] = {}
    for stem, model in CONTRACT_MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$id"] = f"https://corrosion-edge.dev/schemas/{CONTRACT_VERSION}/{stem}.json"
        schema["$comment"] = f"Generated from agent.contract {CONTRACT_VERSION}; do not edit."
        out[stem] = schema
    return out


def write_schemas(directory: Path) -> list[Path]:
    """Write docs/schemas/*.schema.json; the drift test compares against these files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, schema in json_schemas().items():
        path = directory / f"{stem}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths
