"""A model registry on moto's S3 for tests: signed versions, raw (broken) ones, pointers,
and ten kinds of bad model a device must refuse."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxmltools
import pytest
import xgboost as xgb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnxmltools.convert.common.data_types import FloatTensorType

from agent.contract import Decision, ModelManifest
from agent.contract.registry import ChannelPointer, RegistryUrl, channel_key, file_key, manifest_key
from export.convert import export_model
from export.registry import keygen, load_private_key, publish, sign_manifest, sign_pointer
from tests.conftest import rust_pixels

NAME = "test-rgb"


def train(
    out: Path, version: str, margin: int, objective: str = "binary:logistic", name: str = NAME
) -> Path:
    """A model whose idea of rust differs with `margin`, so versions classify differently."""
    x, _ = rust_pixels(8000, seed=margin)
    r, g, b = x.T
    y = ((r > g + margin) & (g > b) & (r > 70)).astype(np.int64)
    params: dict[str, Any] = {"objective": objective, "max_depth": 3, "eta": 0.3, "nthread": 1}
    if objective.startswith("multi:"):
        params["num_class"] = 2
    booster = xgb.train(params, xgb.DMatrix(x, label=y), 10)
    return export_model(
        booster, out, name=name, version=version, decision=Decision(flag_pct=2.0), parity=False
    )


@dataclass
class Registry:
    s3: Any
    url: RegistryUrl
    key: Ed25519PrivateKey
    public: Path
    endpoint: str

    def publish(self, model_dir: Path) -> ModelManifest:
        return publish(self.s3, self.url, model_dir, self.key)

    def put(self, version: str, files: dict[str, bytes], manifest: bytes) -> None:
        """Objects straight into the layout: how a broken or malicious publisher would."""
        for name, data in files.items():
            key = file_key(self.url.prefix, NAME, version, name)
            self.s3.put_object(Bucket=self.url.bucket, Key=key, Body=data)
        mkey = manifest_key(self.url.prefix, NAME, version)
        self.s3.put_object(Bucket=self.url.bucket, Key=mkey, Body=manifest)

    def point(
        self,
        version: str,
        *,
        signed: bool = False,
        name: str = NAME,
        channel: str = "stable",
        promoted_at: datetime | None = None,
        at: tuple[str, str] = (NAME, "stable"),
        key: Ed25519PrivateKey | None = None,
    ) -> ChannelPointer:
        """Write the pointer of channel `at` (model, channel), naming `name` `version` on
        `channel`: a forger may write any of them; `signed` with `key` (this registry's)."""
        mkey = manifest_key(self.url.prefix, name, version)
        body = self.s3.get_object(Bucket=self.url.bucket, Key=mkey)["Body"].read()
        pointer = ChannelPointer(
            name=name,
            version=version,
            channel=channel,
            manifest_key=mkey,
            manifest_sha256=hashlib.sha256(body).hexdigest(),
            promoted_at=promoted_at or datetime.now(UTC),
            promoted_by="test",
        )
        if signed:
            pointer = sign_pointer(pointer, key or self.key)
        self.put_pointer(pointer, at)
        return pointer

    def put_pointer(self, pointer: ChannelPointer, at: tuple[str, str] = (NAME, "stable")) -> None:
        """A pointer object as it is, where channel `at` (model, channel) is read from."""
        key = channel_key(self.url.prefix, *at)
        self.s3.put_object(Bucket=self.url.bucket, Key=key, Body=pointer.to_json())


@pytest.fixture
def registry(s3: Any, s3_bucket: str, moto_server: str, tmp_path: Path) -> Registry:
    keygen(tmp_path / "keys")
    return Registry(
        s3,
        RegistryUrl(s3_bucket, "models-registry"),
        load_private_key(tmp_path / "keys" / "signing-key.pem"),
        tmp_path / "keys" / "signing-key.pub.pem",
        moto_server,
    )


def _three_class_onnx() -> bytes:
    x, _ = rust_pixels(3000)
    y = (x[:, 0] // 86).astype(np.int64)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 2}, xgb.DMatrix(x, label=y), 3
    )
    proto = onnxmltools.convert_xgboost(
        booster, initial_types=[("input", FloatTensorType([None, 3]))]
    )
    return bytes(proto.SerializeToString())


def _four_feature_onnx() -> bytes:
    x, y = rust_pixels(3000)
    x4 = np.column_stack([x, x[:, :1]])
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 2}, xgb.DMatrix(x4, label=y), 3
    )
    proto = onnxmltools.convert_xgboost(
        booster, initial_types=[("input", FloatTensorType([None, 4]))]
    )
    return bytes(proto.SerializeToString())


def bad_versions(good: Path, reg: Registry) -> dict[str, tuple[dict[str, bytes], bytes, str]]:
    """version -> (files, manifest bytes, the reason the device must give)."""
    manifest = ModelManifest.read(good / "manifest.json")
    onnx = (good / manifest.model.file).read_bytes()
    table = (good / manifest.table.file).read_bytes() if manifest.table else b""
    files = {manifest.model.file: onnx, "table.npy": table}

    def signed(version: str, **changes: Any) -> ModelManifest:
        m = manifest.model_copy(update={"version": version, **changes})
        return sign_manifest(m, reg.key)

    def body(m: ModelManifest) -> bytes:
        return m.model_dump_json().encode()

    def with_model(version: str, data: bytes, **changes: Any) -> tuple[dict[str, bytes], bytes]:
        ref = manifest.model.model_copy(
            update={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        )
        m = signed(version, model=ref, table=None, **changes)
        return {manifest.model.file: data}, body(m)

    altered = bytearray(onnx)
    altered[len(altered) // 2] ^= 0xFF
    tampered = signed("9.0.3").model_copy(update={"decision": Decision(flag_pct=0.1)})
    huge = json.loads(body(signed("9.0.9")))
    huge["model"]["size"] = 2 * 1024**3
    extra = json.loads(body(signed("9.0.10")))
    extra["surprise"] = True
    softmax = ModelManifest.read(train(good.parent / "sm", "1.0.0", 30, "multi:softmax"))
    softmax_onnx = (good.parent / "sm" / softmax.model.file).read_bytes()
    return {
        "9.0.1": ({**files, manifest.model.file: onnx[:-100]}, body(signed("9.0.1")), "size"),
        "9.0.2": ({**files, manifest.model.file: bytes(altered)}, body(signed("9.0.2")), "sha256"),
        "9.0.3": (files, body(tampered), "bad signature"),
        "9.0.4": (files, body(manifest.model_copy(update={"version": "9.0.4"})), "unsigned"),
        "9.0.5": (*with_model("9.0.5", b"not an onnx model at all" * 40), "model"),
        "9.0.6": (*with_model("9.0.6", _four_feature_onnx()), "expected [N, 3]"),
        "9.0.7": (*with_model("9.0.7", _three_class_onnx()), "expected exactly [0, 1]"),
        "9.0.8": (*with_model("9.0.8", softmax_onnx), "gives labels only"),
        "9.0.9": (files, json.dumps(huge).encode(), "model.size"),
        "9.0.10": (files, json.dumps(extra).encode(), "surprise: Extra inputs"),
    }
