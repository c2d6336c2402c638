"""The contract the device and the cloud share: model manifest, MQTT payloads, S3 layout.

Both `agent` and `export` import this package; nothing else defines these shapes. Every
model is strict (`extra="forbid"`) so a producer that drifts is caught at the first message,
and JSON Schemas generated from these models (docs/schemas/) let subscribers in other
languages validate the same payloads. Bump CONTRACT_VERSION on any incompatible change.

One module per part: `common` (version, field types), `manifest` (the model manifest),
`messages` (MQTT payloads and topics), `registry` (model registry and S3 key layout),
`schemas` (JSON Schema export).
"""

from agent.contract.common import CONTRACT_VERSION, Strict, describe, iso
from agent.contract.manifest import (
    MANIFEST_FILE,
    Decision,
    FileRef,
    GoldenSample,
    ImageRule,
    InputSpec,
    ModelManifest,
    OutputSpec,
    Provenance,
    RegionGolden,
    RegionScorerSpec,
    SceneGolden,
    SceneSpec,
    Signature,
    statistic_names,
)
from agent.contract.messages import DetectionMessage, Gps, ModelRef, Region, Size
from agent.contract.registry import (
    ChannelName,
    ChannelPointer,
    RegistryUrl,
    channel_key,
    channels_prefix,
    file_key,
    key_part,
    manifest_key,
    models_prefix,
    version_prefix,
)
from agent.contract.schemas import json_schemas, write_schemas

__all__ = [
    "CONTRACT_VERSION",
    "MANIFEST_FILE",
    "ChannelName",
    "ChannelPointer",
    "Decision",
    "DetectionMessage",
    "FileRef",
    "GoldenSample",
    "Gps",
    "ImageRule",
    "InputSpec",
    "ModelManifest",
    "ModelRef",
    "OutputSpec",
    "Provenance",
    "Region",
    "RegionGolden",
    "RegionScorerSpec",
    "RegistryUrl",
    "SceneGolden",
    "SceneSpec",
    "Signature",
    "Size",
    "Strict",
    "channel_key",
    "channels_prefix",
    "describe",
    "file_key",
    "iso",
    "json_schemas",
    "key_part",
    "manifest_key",
    "models_prefix",
    "statistic_names",
    "version_prefix",
    "write_schemas",
]
