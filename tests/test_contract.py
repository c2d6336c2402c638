"""The contract: schemas on disk match the code; bad payloads name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.contract import CONTRACT_VERSION, DetectionMessage, ModelManifest, json_schemas

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def test_published_schemas_match_the_code() -> None:
    """Fails when a contract model changes without `make schemas`."""
    for stem, schema in json_schemas().items():
        path = SCHEMAS / f"{stem}.schema.json"
        assert path.is_file(), f"{path} missing: run `make schemas`"
        on_disk = json.loads(path.read_text())
        assert on_disk == schema, f"{path} is stale: run `make schemas` and review the diff"
    assert {p.name for p in SCHEMAS.glob("*.schema.json")} == {
        f"{s}.schema.json" for s in json_schemas()
    }


def test_manifest_round_trips(logistic_model: Path) -> None:
    manifest = ModelManifest.read(logistic_model)
    assert manifest.schema_version == CONTRACT_VERSION
    assert ModelManifest.model_validate_json(manifest.model_dump_json()) == manifest
    unsigned = manifest.signing_payload()
    assert b"signature" not in unsigned and json.loads(unsigned)["name"] == "test-rgb"


def test_manifest_errors_name_the_field(logistic_model: Path) -> None:
    data = json.loads(logistic_model.read_text())
    data["decision"]["pixel_threshold"] = 1.5
    with pytest.raises(ValidationError, match=r"decision\.pixel_threshold"):
        ModelManifest.model_validate(data)
    data = json.loads(logistic_model.read_text())
    data["golden"] = data["golden"][:10]
    with pytest.raises(ValidationError, match="golden"):
        ModelManifest.model_validate(data)
    data = json.loads(logistic_model.read_text())
    data["version"] = "v1"
    with pytest.raises(ValidationError, match="version"):
        ModelManifest.model_validate(data)


def test_detection_message_rejects_unknown_and_out_of_range() -> None:
    base = {
        "device_id": "d",
        "source": "s",
        "frame_index": 0,
        "captured_at": "2026-01-01T00:00:00Z",
        "model": {"name": "m", "version": "1.0.0", "sha256": "a" * 64},
        "corrosion_pct": 12.5,
        "flagged": True,
        "threshold": 5,
        "frame_size": {"width": 10, "height": 10},
        "analysis_size": {"width": 10, "height": 10},
        "latency_ms": 1.0,
    }
    msg = DetectionMessage.model_validate(base)
    assert len(msg.message_id) == 32
    with pytest.raises(ValidationError, match="corrosion_pct"):
        DetectionMessage.model_validate({**base, "corrosion_pct": 101})
    with pytest.raises(ValidationError, match="extra"):
        DetectionMessage.model_validate({**base, "colour": "red"})
    with pytest.raises(ValidationError, match="captured_at"):
        DetectionMessage.model_validate({**base, "captured_at": "2026-01-01T00:00:00"})


def test_upload_stats_failed_and_lost_appear_only_when_counted() -> None:
    """Contract 1.7 added them; a spool that lost nothing reads exactly as a 1.6 one."""
    from agent.contract.messages import UploadStats

    base = {
        "spool_depth": 1,
        "spool_bytes": 10,
        "uploaded": {},
        "evicted": {},
        "refused": {},
        "rate_limited": {},
        "duplicates": 0,
        "s3_reachable": True,
    }
    assert json.loads(UploadStats(**base).model_dump_json()) == base
    counted = UploadStats(**base, failed={"flagged": 2}, lost={"sample": 1})
    dumped = json.loads(counted.model_dump_json())
    assert (dumped["failed"], dumped["lost"]) == ({"flagged": 2}, {"sample": 1})
    assert UploadStats.model_validate(dumped) == counted
