"""Shared pieces of the contract: its version, field types and the strict base model."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)
from pydantic_core import ErrorDetails

CONTRACT_VERSION = "1.7"
"""Major.minor of every payload below; a reader refuses a different major."""

_WORDS: dict[str, str] = {}


def worded(pattern: str, meaning: str) -> str:
    """`pattern`, with what it asks for in words: errors show those, not the regex."""
    _WORDS[pattern] = meaning
    return pattern


def error_text(err: ErrorDetails) -> str:
    """pydantic's message for one error; for a pattern the value missed, what it should be."""
    if err["type"] == "string_pattern_mismatch":
        words = _WORDS.get(str(err.get("ctx", {}).get("pattern")))
        if words is not None:
            return f"should be {words}"
    return err["msg"]


SemVer = Annotated[
    str,
    Field(
        pattern=worded(
            r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$",
            "a semantic version MAJOR.MINOR.PATCH, e.g. 1.0.0 or 2.1.0-rc.1",
        ),
        description="Semantic version, e.g. 1.4.0",
    ),
]
Sha256 = Annotated[
    str,
    Field(
        pattern=worded(r"^[0-9a-f]{64}$", "64 lower-case hex digits (a SHA-256)"),
        description="Lower-case hex SHA-256",
    ),
]
MODEL_NAME = worded(
    r"^[a-z0-9][a-z0-9._-]{0,63}$",
    "a model name: 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit",
)
ModelName = Annotated[str, Field(pattern=MODEL_NAME, description="Model name, safe in S3 keys")]
FileName = Annotated[
    str,
    Field(
        pattern=worded(
            r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
            "a bare file name: 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        ),
        description="Bare file name",
    ),
]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
SchemaVersion = Annotated[
    str, Field(pattern=r"^1\.\d+$", description="Contract version of the writer (major 1)")
]


_SEMVER_CORE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?")


def semver_order(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sort key of a SemVer by semver.org's precedence: 1.0.0-rc.1 < 1.0.0 < 1.0.1, and
    build metadata (+...) is ignored. ValueError for anything else."""
    found = _SEMVER_CORE.match(version)
    if found is None:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = found.groups()
    ids = tuple((0, int(i)) if i.isdigit() else (1, i) for i in (pre or "").split(".") if i)
    return int(major), int(minor), int(patch), 0 if pre else 1, ids


def canonical_json(model: BaseModel, exclude: set[str]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, `exclude` (the signature) left out."""
    data = model.model_dump(mode="json", exclude=exclude)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def describe(exc: ValidationError) -> str:
    """One line per error, each starting with the dotted path of the field at fault."""
    parts = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{path}: {error_text(err)}")
    return "; ".join(parts)


class Strict(BaseModel):
    """Base of every contract model: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def utc_now() -> datetime:
    """Default of every timestamp field: aware UTC, so readers never guess a zone."""
    return datetime.now(UTC)


_WHEN = TypeAdapter(datetime)


def iso(at: datetime) -> str:
    """`at` as the contract's JSON writes it (UTC as `Z`), so a time in a CSV, a GeoJSON
    or a command's result compares as text with the same time in a message."""
    return str(_WHEN.dump_python(at, mode="json"))


class OmitsUnset(Strict):
    """Leaves fields added in a minor version out of the JSON while they are unset.

    A colour model written by this version then reads exactly as a 1.0 manifest (an unsigned
    pointer as a 1.5 one), so devices that predate the field (and refuse unknown fields) still
    load it and verify its signature.
    """

    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in self._omit_when_none:
            if key in data and data[key] is None:
                del data[key]
        return data
