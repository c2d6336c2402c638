"""Ed25519 verification of model manifests: a device serves only models its keys signed.

The registry signs `ModelManifest.signing_payload()`. The manifest pins every file by size and
SHA-256, so one signature covers the model, its table and its decision rules. Since contract
1.6 `promote` signs the channel pointer too, so a device can tell a promotion from a replay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from agent.config import ConfigError, ModelConfig
from agent.contract import ModelManifest
from agent.contract.manifest import Signature
from agent.contract.registry import ChannelPointer
from agent.engine.model import ModelError

ALGORITHM = "ed25519"
RAW_KEY_BYTES = 32


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw key: names a key in manifests and logs."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(source: Path | str) -> Ed25519PublicKey:
    """A PEM public key or the raw 32-byte key in base64: read from a Path, or given as text."""
    where = str(source) if isinstance(source, Path) else "public key text"
    try:
        text = (source.read_text() if isinstance(source, Path) else source).strip()
    except OSError as exc:  # strerror: the OSError's own text repeats the path
        raise ValueError(f"{where}: cannot read public key: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: cannot read public key: {exc}") from exc
    if text.startswith("-----BEGIN"):
        try:
            key = load_pem_public_key(text.encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{where}: not a readable PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{where}: {type(key).__name__} is not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{where}: neither PEM nor base64") from exc
    if len(raw) != RAW_KEY_BYTES:
        raise ValueError(f"{where}: {len(raw)} bytes, an Ed25519 public key has {RAW_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def keyring(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id, the mapping verify_manifest takes."""
    return {key_id(key): key for key in keys}


def trusted_keys(config: ModelConfig) -> dict[str, Ed25519PublicKey]:
    """The keyring of `model.public_keys`. Key files are read here, at start and by
    check-config, not at config load (a shipped config names a key only the device has), so
    the error names the setting beside the key."""
    keys = []
    for path in config.public_keys:
        try:
            keys.append(load_public_key(path))
        except ValueError as exc:
            raise ConfigError(f"model.public_keys: {exc}") from None
    return keyring(keys)


def verify_manifest(
    manifest: ModelManifest, public_keys: Mapping[str, Ed25519PublicKey], *, required: bool
) -> None:
    """Refuse a manifest whose signature fails; with `required`, also one nobody we trust signed.

    Without `required`, a manifest that cannot be checked (unsigned, or signed by a key not in
    `public_keys`) is accepted, as unsigned ones would be; a signature that a trusted key
    rejects is always refused, since it means the manifest was altered.
    """
    what = f"manifest {manifest.name} {manifest.version}"
    signature = manifest.signature
    if _verify(what, signature, manifest.signing_payload(), public_keys) or not required:
        return
    if signature is None:
        raise ModelError(f"{what} is unsigned, and signed models are required")
    trusted = ", ".join(sorted(public_keys)) or "none"
    raise ModelError(f"{what}: signed by unknown key {signature.key_id} (trusted: {trusted})")


def verify_pointer(pointer: ChannelPointer, public_keys: Mapping[str, Ed25519PublicKey]) -> bool:
    """Whether a trusted key signed the channel pointer (contract 1.6); refuse one whose
    signature a trusted key rejects. An unsigned pointer is no error: what it may do is the
    updater's call."""
    what = f"channel pointer {pointer.name} {pointer.channel}"
    return _verify(what, pointer.signature, pointer.signing_payload(), public_keys)


def _verify(
    what: str,
    signature: Signature | None,
    payload: bytes,
    public_keys: Mapping[str, Ed25519PublicKey],
) -> bool:
    """True when a trusted key verifies `signature`; False when unsigned or signed by a key we
    do not know; ModelError when it is wrong (altered after signing, or a foreign scheme)."""
    if signature is None:
        return False
    if signature.algorithm != ALGORITHM:
        raise ModelError(f"{what}: signature algorithm {signature.algorithm!r}, not {ALGORITHM}")
    key = public_keys.get(signature.key_id)
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(signature.value, validate=True), payload)
    except (binascii.Error, InvalidSignature) as exc:
        raise ModelError(
            f"{what}: bad signature for key {signature.key_id}: altered after signing"
        ) from exc
    return True
