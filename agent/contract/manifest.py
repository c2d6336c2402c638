"""The model manifest: what a device needs to verify, load and smoke-test a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    Field,
    ValidationError,
    model_validator,
)

from agent.contract.common import (
    CONTRACT_VERSION,
    FileName,
    ModelName,
    OmitsUnset,
    Percent,
    SchemaVersion,
    SemVer,
    Sha256,
    Strict,
    Unit,
    canonical_json,
    describe,
)


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
        default=("R", "G", "B"),
        description="Feature names, in column order: R, G, B for a colour model; for a feature "
        "model, names that agent.engine.features computes (e.g. `std7:a*`, `grad:L*`)",
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


class FeatureSpec(Strict):
    """How a feature model's rows are computed from a frame (contract 1.1).

    The features themselves are named in `input.features`; these settings fix the scale the
    names' windows refer to and how densely the frame is classified.
    """

    long_side: int = Field(
        ge=16,
        le=4096,
        description="Working resolution: a frame is downscaled (INTER_AREA) to at most this "
        "long side before its features are computed",
    )
    stride: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Classify every stride-th working pixel each way; scores in between are "
        "interpolated (1 = every pixel)",
    )


class GoldenSample(OmitsUnset):
    """A pixel with the answer the model must give: the device's smoke test after a load."""

    _omit_when_none = ("features",)

    rgb: tuple[int, int, int] = Field(description="Colour, R, G, B in 0..255")
    features: tuple[float, ...] | None = Field(
        default=None,
        description="The model's input row (feature models; rgb is then the pixel's colour)",
    )
    label: Literal[0, 1] = Field(description="Expected label at the manifest threshold")
    probability: Unit | None = Field(
        default=None, description="Expected P(corroded); None for labels-only models"
    )

    @model_validator(mode="after")
    def _in_range(self) -> GoldenSample:
        if any(not 0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"rgb {self.rgb} outside 0..255")
        return self


IMAGE_QUANTILES = (10, 50, 90)
IMAGE_OVERALL = ("log1p_pct", "mean_p")
"""Statistics of the probabilities alone: log(1 + % of classified points with P >= the
pixel threshold) and the mean P."""


def statistic_names(features: Sequence[str], scene: Sequence[str] = ()) -> tuple[str, ...]:
    """The statistics an image rule reads of a frame classified on `features`, in order.

    `q{N}:{feature}` is the N-th percentile of the feature over the frame's classified
    points; `pmean:{feature}` its mean weighted by each point's P(corroded). The numbers
    are computed by agent.engine.imagerule. A model with a scene embedder appends its
    outputs (`scene`, contract 1.4), computed by agent.engine.scene.
    """
    quantiles = tuple(f"q{q}:{f}" for q in IMAGE_QUANTILES for f in features)
    return quantiles + IMAGE_OVERALL + tuple(f"pmean:{f}" for f in features) + tuple(scene)


class ImageRule(Strict):
    """A logistic regression over frame statistics that flags a frame (contract 1.2).

    The statistics are those agent.engine.imagerule computes from a feature model's rows
    and pixel probabilities, named in its order; each is centred and scaled, then weighted.
    """

    statistics: tuple[str, ...] = Field(
        min_length=1, description="Names of the statistics, in agent.engine.imagerule's order"
    )
    center: tuple[float, ...] = Field(description="Subtracted from each statistic")
    scale: tuple[Annotated[float, Field(gt=0.0)], ...] = Field(
        description="Each centred statistic is divided by this"
    )
    weights: tuple[float, ...] = Field(description="Logistic weight of each scaled statistic")
    intercept: float = Field(description="Logistic intercept")
    threshold: Unit = Field(description="A frame is flagged when P(rust) >= this")

    @model_validator(mode="after")
    def _aligned(self) -> ImageRule:
        n = len(self.statistics)
        if not len(self.center) == len(self.scale) == len(self.weights) == n:
            raise ValueError(
                f"{n} statistics but {len(self.center)} centres, {len(self.scale)} scales "
                f"and {len(self.weights)} weights"
            )
        if not all(math.isfinite(v) for v in (*self.center, *self.weights, self.intercept)):
            raise ValueError("centres, weights and intercept must be finite")
        return self


class RegionGolden(Strict):
    """A feature row of a candidate box and the box scorer's answer: the load-time smoke test."""

    features: tuple[float, ...] = Field(description="The candidate's features, in order")
    score: Unit = Field(description="The scorer's answer for them")


class RegionScorerSpec(OmitsUnset):
    """A trained scorer of candidate boxes (contract 1.3): how regions are chosen.

    agent.engine.proposals computes the candidates and their named features from the frame's
    scores at `long_side`; the ONNX trees answer each candidate's expected IoU with a box an
    annotator would draw; NMS at `overlap` keeps the best, and those scored below `min_score`
    (contract 1.5) are not reported: without a floor a frame reports dozens of boxes that
    match nothing.
    """

    _omit_when_none = ("min_score",)

    model: FileRef = Field(description="The scorer's ONNX file")
    features: tuple[str, ...] = Field(
        min_length=1,
        description="Names of the candidate features, in agent.engine.proposals' order",
    )
    long_side: int = Field(ge=16, le=4096, description="Long side of the map candidates come from")
    overlap: Unit = Field(description="IoU above which the lower-scored of two boxes is dropped")
    output: str = Field(default="probabilities", description="ONNX output holding the scores")
    golden: tuple[RegionGolden, ...] = Field(
        min_length=8, description="Feature rows with the scorer's answers, checked at load"
    )
    min_score: Unit | None = Field(
        default=None,
        description="Score below which a region is not reported (contract 1.5), chosen by "
        "cross-validation; absent: every region NMS keeps",
    )

    @model_validator(mode="after")
    def _aligned(self) -> RegionScorerSpec:
        width = len(self.features)
        for i, sample in enumerate(self.golden):
            if len(sample.features) != width:
                raise ValueError(
                    f"golden[{i}] carries {len(sample.features)} features, not the {width} named"
                )
        return self


class SceneGolden(Strict):
    """A test card's expected embedding: the load-time smoke test of a scene embedder."""

    frame: int = Field(ge=0, le=1000, description="Index of agent.engine.scene.golden_frame")
    outputs: tuple[float, ...] = Field(description="The embedder's outputs for it, in order")


class SceneSpec(Strict):
    """A pretrained image embedder (contract 1.4): what the whole frame shows.

    agent.engine.scene squeezes the frame to `size` x `size` (OpenCV INTER_AREA), converts it
    to RGB, subtracts `mean` and divides by `std` (NCHW); the ONNX network answers the
    numbers `names`, which the image rule reads after its pixel statistics.
    """

    model: FileRef = Field(description="The embedder's ONNX file")
    backbone: str = Field(default="", description="Network and weights it was built from")
    size: int = Field(default=224, ge=32, le=1024, description="Side of the square input")
    mean: float = Field(
        default=127.0, allow_inf_nan=False, description="Subtracted from each 0..255 channel value"
    )
    std: float = Field(
        default=128.0, gt=0.0, allow_inf_nan=False, description="Centred values are divided by it"
    )
    output: str = Field(default="scene", description="ONNX output holding the numbers")
    names: tuple[str, ...] = Field(min_length=1, description="Names of the outputs, in order")
    golden: tuple[SceneGolden, ...] = Field(
        min_length=2, description="Test cards with the embedder's answers, checked at load"
    )

    @model_validator(mode="after")
    def _aligned(self) -> SceneSpec:
        for sample in self.golden:
            if len(sample.outputs) != len(self.names):
                raise ValueError(
                    f"golden frame {sample.frame} carries {len(sample.outputs)} outputs, "
                    f"not the {len(self.names)} named"
                )
        if not all(math.isfinite(v) for g in self.golden for v in g.outputs):
            raise ValueError("golden outputs must be finite")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be distinct, got {list(self.names)}")
        frames = [g.frame for g in self.golden]
        if len(set(frames)) != len(frames):
            raise ValueError(f"golden frames must be distinct test cards, got {frames}")
        return self


PIXEL_THRESHOLD_RANGE = (0.001, 0.999)
"""The pixel thresholds export proves its table exact for; readers accept all of (0, 1),
as manifests written before this range was set may hold any."""


class Decision(OmitsUnset):
    """How pixel scores become a pixel label and pixel labels become an image flag."""

    _omit_when_none = ("image_rule",)

    pixel_threshold: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="A pixel is corroded when P(corroded) >= this (export writes 0.001..0.999: "
        "nearer 1, float32 probabilities are too coarse for the colour table to be exact)",
    )
    flag_pct: Percent = Field(
        default=5.0,
        description="An image is flagged when its corrosion % >= this (when there is no "
        "image_rule, or an operator's flag % overrides it)",
    )
    image_rule: ImageRule | None = Field(
        default=None,
        description="Feature models: flags a frame by its statistics instead of its % alone",
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
    """Detached signature over a manifest's (or, since 1.6, a channel pointer's) canonical
    JSON without this block."""

    algorithm: Literal["ed25519"] = Field(default="ed25519", description="Signature scheme")
    key_id: str = Field(description="Identifier of the signing key (hash of the public key)")
    value: str = Field(description="Base64 signature")


MANIFEST_FILE = "manifest.json"
"""Name of the manifest in a model folder, on disk and in the registry."""


def _class_names() -> dict[Literal["0", "1"], str]:
    return {"0": "clean", "1": "corroded"}


class ModelManifest(OmitsUnset):
    """Everything a device needs to verify, load and smoke-test a pixel model."""

    _omit_when_none = ("features", "regions", "scene")

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    name: ModelName = Field(description="Model name")
    version: SemVer = Field(description="Model version")
    created_at: AwareDatetime = Field(description="When the model was exported (UTC)")
    model: FileRef = Field(description="The ONNX file")
    table: FileRef | None = Field(
        default=None, description="Precompiled colour table (.npy), lets a device skip compiling"
    )
    input: InputSpec = Field(default_factory=InputSpec, description="Model input")
    features: FeatureSpec | None = Field(
        default=None,
        description="Feature pipeline of a feature model; absent for a colour (R, G, B) model",
    )
    classes: dict[Literal["0", "1"], str] = Field(
        default_factory=_class_names,
        description="Class id (as a JSON key) to name",
    )
    positive_class: Literal[1] = Field(default=1, description="Class id counted as corrosion")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Model outputs")
    decision: Decision = Field(default_factory=Decision, description="Pixel and image rules")
    regions: RegionScorerSpec | None = Field(
        default=None,
        description="Learned box scorer (contract 1.3); without it regions are ranked by "
        "their rust contrast with the ring around them",
    )
    scene: SceneSpec | None = Field(
        default=None,
        description="Scene embedder (contract 1.4) whose outputs the image rule reads",
    )
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
        if self.regions is not None and self.output.kind != "probabilities":
            raise ValueError("regions: a box scorer reads probabilities; this model gives labels")
        if self.scene is not None and self.decision.image_rule is None:
            raise ValueError("scene: only an image rule reads the embedder; this model has none")
        names = [ref.file for ref in self.files()]
        if len(set(names)) != len(names):
            raise ValueError(
                f"model, table, box scorer and scene embedder must be different files, got {names}"
            )
        self._check_features()
        return self

    def _check_features(self) -> None:
        """A feature model has no colour table and its golden samples carry whole input rows."""
        width = len(self.input.features)
        if self.features is None:
            if any(g.features is not None for g in self.golden):
                raise ValueError("golden samples of a colour model carry no features")
            if self.decision.image_rule is not None:
                raise ValueError("decision.image_rule needs a feature model")
            return
        if self.table is not None:
            raise ValueError("a feature model has no colour table")
        rule = self.decision.image_rule
        if rule is not None:
            expected = statistic_names(self.input.features, self.scene.names if self.scene else ())
            if rule.statistics != expected:
                raise ValueError(
                    "decision.image_rule.statistics must be agent.engine.imagerule's "
                    f"statistics of input.features and scene.names ({len(expected)} names), "
                    f"got {len(rule.statistics)}"
                )
            if self.output.kind != "probabilities":
                raise ValueError("decision.image_rule needs a model with probabilities")
        if any(g.features is None or len(g.features) != width for g in self.golden):
            raise ValueError(f"golden samples of a feature model must carry {width} features")

    def files(self) -> list[FileRef]:
        """Every file the manifest pins: what a registry stores and a device downloads."""
        scorer = None if self.regions is None else self.regions.model
        scene = None if self.scene is None else self.scene.model
        return [ref for ref in (self.model, self.table, scorer, scene) if ref is not None]

    def signing_payload(self) -> bytes:
        """Canonical bytes that a signature covers: the manifest without its signature."""
        return canonical_json(self, {"signature"})

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        """Parse a manifest file; errors name the file."""
        try:
            data = path.read_bytes()
            return cls.model_validate_json(data)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read manifest: {exc.strerror}") from exc
        except ValidationError as exc:
            if b'"learner"' in data[:4096]:  # both are .json: an easy file to give by mistake
                raise ValueError(
                    f"{path}: an XGBoost model, not a model manifest: export it with "
                    "`corrosion-export convert` and give the folder it writes"
                ) from None
            raise ValueError(f"{path}: invalid manifest: {describe(exc)}") from exc

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")
