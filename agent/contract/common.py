"""Shared pieces of the contract: its version, field types and the strict base model."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTRACT_VERSION = "1.5"
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


def utc_now() -> datetime:
    """Default of every timestamp field: aware UTC, so readers never guess a zone."""
    return datetime.now(UTC)
