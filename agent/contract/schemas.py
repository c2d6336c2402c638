"""JSON Schemas of the contract, for subscribers in other languages (docs/schemas/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.contract.captures import CaptureSidecar, ManifestLine, UploadNotice
from agent.contract.common import CONTRACT_VERSION
from agent.contract.manifest import ModelManifest
from agent.contract.messages import (
    COMMAND_REQUESTS,
    CommandResult,
    DetectionMessage,
    MetricsMessage,
    ModelStatus,
    StatusMessage,
)
from agent.contract.registry import ChannelPointer

CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "model-manifest": ModelManifest,
    "detection-message": DetectionMessage,
    "status-message": StatusMessage,
    "model-status": ModelStatus,
    "metrics-message": MetricsMessage,
    "command-result": CommandResult,
    **{f"command-{name}": request for name, request in COMMAND_REQUESTS.items()},
    "channel-pointer": ChannelPointer,
    "capture-sidecar": CaptureSidecar,
    "upload-notice": UploadNotice,
    "capture-manifest-line": ManifestLine,
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
