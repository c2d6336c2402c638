"""The model registry on S3: sign and publish versions, promote them to channels, list them.

The layout and the pointer format are the device's contract (agent.contract.registry). Every
write here is conditional, so the registry's two promises hold even against a concurrent
operator: a published version never changes, and a promotion reports the pointer it replaced.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from pydantic import ValidationError

from agent.contract import (
    ChannelPointer,
    ModelManifest,
    RegistryUrl,
    Signature,
    channel_key,
    channels_prefix,
    describe,
    file_key,
    iso,
    manifest_key,
    models_prefix,
)
from agent.engine.model import ModelError, verify_file
from agent.s3 import describe_error, error_code
from agent.s3 import s3_client as agent_s3_client
from agent.signing import key_id, verify_manifest

PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"
TRANSFER = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
NOT_FOUND = ("404", "NoSuchKey")


class RegistryError(ValueError):
    """An expected registry failure; the message is one line naming the object at fault."""


class InvalidObjectError(RegistryError):
    """An object of the layout whose content is not what the contract says: `list` shows it
    as invalid and goes on, where anything else (access, network) stops it."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


def s3_client(endpoint_url: str | None = None) -> Any:
    """Credentials from boto3's chain; endpoint from the flag, else AWS_ENDPOINT_URL(_S3)."""
    return agent_s3_client(endpoint_url, None)


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """AWS and credential failures become one line naming `what` (an s3:// URI, a job)."""
    try:
        yield
    except S3UploadFailedError as exc:
        cause = exc.__context__
        if isinstance(cause, ClientError):
            raise RegistryError(f"{what}: {describe_error(cause)}") from exc
        raise RegistryError(f"{what}: {exc}") from exc
    except ClientError as exc:
        raise RegistryError(f"{what}: {describe_error(exc)}") from exc
    except BotoCoreError as exc:
        raise RegistryError(f"{what}: {exc}") from exc


def get_object(s3: Any, url: RegistryUrl, key: str) -> tuple[bytes, str] | None:
    """(bytes, ETag) of an object, None when it does not exist."""
    with aws_errors(url.uri(key)):
        try:
            response = s3.get_object(Bucket=url.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return None
            raise
        return response["Body"].read(), response["ETag"]


def head_object(s3: Any, url: RegistryUrl, key: str, **params: Any) -> dict[str, Any] | None:
    with aws_errors(url.uri(key)):
        try:
            return dict(s3.head_object(Bucket=url.bucket, Key=key, **params))
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return None
            raise


@contextmanager
def create_only(s3: Any) -> Iterator[None]:
    """Make every PutObject and CompleteMultipartUpload of `s3` conditional on If-None-Match: *.

    boto3's managed transfer does not pass IfNoneMatch through, so the condition is added
    where botocore builds the request.
    """

    def condition(params: dict[str, Any], **_: Any) -> None:
        params["IfNoneMatch"] = "*"

    events = [f"before-parameter-build.s3.{op}" for op in ("PutObject", "CompleteMultipartUpload")]
    for event in events:
        s3.meta.events.register(event, condition, unique_id=f"create-only:{event}")
    try:
        yield
    finally:
        for event in events:
            s3.meta.events.unregister(event, unique_id=f"create-only:{event}")


def keygen(out: Path) -> str:
    """A new Ed25519 key pair in `out` (private key mode 0600, never overwritten); its key id."""
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private, public):
        if path.exists():
            raise RegistryError(f"{path}: already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read signing key: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(f"{path}: {type(key).__name__} is not an Ed25519 private key")
    return key


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> ModelManifest:
    """The manifest with `signature` over its signing payload (any old signature replaced)."""
    return manifest.model_copy(update={"signature": _signature(manifest, key)})


def sign_pointer(pointer: ChannelPointer, key: Ed25519PrivateKey) -> ChannelPointer:
    """The channel pointer with `signature` over its signing payload."""
    return pointer.model_copy(update={"signature": _signature(pointer, key)})


def _signature(signed: ModelManifest | ChannelPointer, key: Ed25519PrivateKey) -> Signature:
    value = base64.b64encode(key.sign(signed.signing_payload())).decode()
    return Signature(key_id=key_id(key.public_key()), value=value)


def publish(s3: Any, url: RegistryUrl, directory: Path, key: Ed25519PrivateKey) -> ModelManifest:
    """Verify an export directory, sign its manifest and upload it as an immutable version.

    Files go first, the manifest last and only if absent: a half-finished publish is not a
    version, and running it again resumes it (files already uploaded with the same hash are
    kept, different ones refused). Returns the signed manifest.
    """
    manifest = ModelManifest.read(directory / "manifest.json")
    for ref in manifest.files():
        verify_file(directory / ref.file, ref.size, ref.sha256, ref.file)
    name, version = manifest.name, manifest.version
    mkey = manifest_key(url.prefix, name, version)
    if head_object(s3, url, mkey) is not None:
        raise RegistryError(
            f"{url.uri(mkey)}: {name} {version} is already published; versions are immutable, "
            "export a new version"
        )
    signed = sign_manifest(manifest, key)
    with create_only(s3):
        for ref in manifest.files():
            fkey = file_key(url.prefix, name, version, ref.file)
            existing = head_object(s3, url, fkey)
            if existing is not None:
                if existing.get("Metadata", {}).get("sha256") != ref.sha256:
                    raise RegistryError(
                        f"{url.uri(fkey)}: exists with other content (an unfinished publish of "
                        "another build?); delete it or publish a new version"
                    )
                continue
            with aws_errors(url.uri(fkey)):
                s3.upload_file(
                    str(directory / ref.file),
                    url.bucket,
                    fkey,
                    ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": ref.sha256}},
                    Config=TRANSFER,
                )
        with aws_errors(url.uri(mkey)):
            try:
                s3.put_object(
                    Bucket=url.bucket,
                    Key=mkey,
                    Body=(signed.model_dump_json(indent=2) + "\n").encode(),
                    ContentType="application/json",
                    ChecksumAlgorithm="SHA256",
                )
            except ClientError as exc:
                if error_code(exc) == "PreconditionFailed":
                    raise RegistryError(
                        f"{url.uri(mkey)}: a concurrent publish of {name} {version} won; "
                        "this one was not published"
                    ) from exc
                raise
    return signed


def read_manifest(
    s3: Any, url: RegistryUrl, name: str, version: str
) -> tuple[ModelManifest, bytes]:
    """A published version's manifest and its exact bytes (the pointer pins their hash)."""
    mkey = manifest_key(url.prefix, name, version)
    found = get_object(s3, url, mkey)
    if found is None:
        raise RegistryError(f"{url.uri(mkey)}: {name} {version} is not published")
    try:
        manifest = ModelManifest.model_validate_json(found[0])
    except ValidationError as exc:
        raise InvalidObjectError(url.uri(mkey), f"invalid manifest: {describe(exc)}") from exc
    if (manifest.name, manifest.version) != (name, version):
        raise InvalidObjectError(
            url.uri(mkey), f"holds {manifest.name} {manifest.version}, not {name} {version}"
        )
    return manifest, found[0]


def verify_published(s3: Any, url: RegistryUrl, manifest: ModelManifest) -> None:
    """Every file the manifest pins is in the registry with its size and sha256.

    publish uploads with S3's SHA-256 checksum: for a file sent in one request it is the
    file's own, checked by S3 on arrival, so a match proves the content without a download.
    A file sent in parts (the 16 MB table) has a checksum of its parts' checksums, and is
    downloaded and hashed. The `sha256` metadata publish writes is only what the uploader
    claimed, so it proves nothing here.
    """
    for ref in manifest.files():
        fkey = file_key(url.prefix, manifest.name, manifest.version, ref.file)
        head = head_object(s3, url, fkey, ChecksumMode="ENABLED")
        if head is None or head["ContentLength"] != ref.size:
            raise RegistryError(f"{url.uri(fkey)}: missing or not {ref.size} bytes")
        if head.get("ChecksumSHA256") == base64.b64encode(bytes.fromhex(ref.sha256)).decode():
            continue
        digest = hashlib.sha256()
        with aws_errors(url.uri(fkey)):
            body = s3.get_object(Bucket=url.bucket, Key=fkey)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != ref.sha256:
            raise RegistryError(
                f"{url.uri(fkey)}: sha256 {digest.hexdigest()}, the manifest pins {ref.sha256}"
            )


def promote(
    s3: Any,
    url: RegistryUrl,
    name: str,
    version: str,
    channel: str,
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None,
    promoted_by: str,
    key: Ed25519PrivateKey | None = None,
) -> tuple[ChannelPointer, ChannelPointer | None]:
    """Point a channel at a published version; returns the new pointer and the one replaced.

    With `public_keys` the manifest's signature must verify; every file it pins must be
    there, whole (`verify_published`); with `key` the pointer is signed (devices then refuse
    it replayed later, and take it back to an older version only so). Without `key` on a
    channel whose pointer is signed it is refused: devices that require signatures refuse
    an unsigned pointer there, so it would read as done and move no device.
    The pointer is written only if the channel still holds what we read (If-Match), so the
    replaced pointer reported is the true one.
    """
    manifest, data = read_manifest(s3, url, name, version)
    mkey = manifest_key(url.prefix, name, version)
    if public_keys is not None:
        try:
            verify_manifest(manifest, public_keys, required=True)
        except ModelError as exc:
            raise RegistryError(f"{url.uri(mkey)}: {exc}") from exc
    verify_published(s3, url, manifest)
    ckey = channel_key(url.prefix, name, channel)
    found = get_object(s3, url, ckey)
    previous = None if found is None else _pointer(found[0], url.uri(ckey))
    if key is None and previous is not None and previous.signature is not None:
        raise RegistryError(
            f"{url.uri(ckey)}: {channel} is signed (key {previous.signature.key_id}); devices "
            "that require signatures refuse an unsigned pointer there and keep what they "
            "serve: promote with --key"
        )
    at = datetime.now(UTC)
    if previous is not None:  # never before the pointer replaced: a promoter whose clock is
        at = max(at, previous.promoted_at + timedelta(microseconds=1))  # behind reads as a replay
    pointer = ChannelPointer(
        name=name,
        version=version,
        channel=channel,
        manifest_key=mkey,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        promoted_at=at,
        promoted_by=promoted_by,
    )
    if key is not None:
        pointer = sign_pointer(pointer, key)
    condition = {"IfNoneMatch": "*"} if found is None else {"IfMatch": found[1]}
    with aws_errors(url.uri(ckey)):
        try:
            s3.put_object(
                Bucket=url.bucket,
                Key=ckey,
                Body=pointer.to_json(),
                ContentType="application/json",
                CacheControl="no-cache",
                ChecksumAlgorithm="SHA256",
                **condition,
            )
        except ClientError as exc:
            if error_code(exc) == "PreconditionFailed":
                raise RegistryError(f"{url.uri(ckey)}: changed while promoting; run again") from exc
            raise
    return pointer, previous


def _pointer(data: bytes, where: str) -> ChannelPointer:
    try:
        return ChannelPointer.parse(data, where)
    except ValueError as exc:
        raise InvalidObjectError(where, str(exc).removeprefix(f"{where}: ")) from exc


@dataclass(frozen=True)
class Listing:
    manifests: list[ModelManifest]
    pointers: list[ChannelPointer]
    invalid: list[InvalidObjectError]


def _semver(version: str) -> tuple[tuple[int, ...], bool, str]:
    core, _, pre = version.partition("+")[0].partition("-")
    return tuple(int(p) for p in core.split(".")), not pre, pre


def _keys(s3: Any, url: RegistryUrl, prefix: str, suffix: str) -> Iterator[str]:
    with aws_errors(url.uri(prefix)):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix):
                    yield obj["Key"]


def list_registry(s3: Any, url: RegistryUrl, name: str | None = None) -> Listing:
    """Published versions (by name, then semantic version) and channel pointers; a manifest
    or pointer that breaks the contract is set aside as invalid, so one bad object does not
    hide the rest of the registry."""
    manifests, pointers, invalid = [], [], []
    for key in _keys(s3, url, models_prefix(url.prefix, name), "/manifest.json"):
        parts = key.removeprefix(models_prefix(url.prefix)).split("/")
        if len(parts) == 3:  # models/NAME/VERSION/manifest.json; anything else is not ours
            try:
                manifests.append(read_manifest(s3, url, parts[0], parts[1])[0])
            except InvalidObjectError as exc:
                invalid.append(exc)
    manifests.sort(key=lambda m: (m.name, _semver(m.version)))
    for key in _keys(s3, url, channels_prefix(url.prefix, name), ".json"):
        found = get_object(s3, url, key)
        if found is None:  # deleted since listed
            continue
        try:
            pointers.append(_pointer(found[0], url.uri(key)))
        except InvalidObjectError as exc:
            invalid.append(exc)
    pointers.sort(key=lambda p: (p.name, p.channel))
    return Listing(manifests, pointers, invalid)


def _metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _when(at: datetime) -> str:
    """To the second in UTC, as the contract's JSON writes it: both tables alike."""
    return iso(at.astimezone(UTC).replace(microsecond=0))


def format_listing(listing: Listing) -> str:
    """Two tables for people: versions (with the channels serving each), then channels; a
    third of invalid objects, with the reason, when there are any."""
    serving: dict[tuple[str, str], list[str]] = {}
    for p in listing.pointers:
        serving.setdefault((p.name, p.version), []).append(p.channel)
    versions = [["NAME", "VERSION", "CREATED", "KEY ID", "CHANNELS", "METRICS"]] + [
        [
            m.name,
            m.version,
            _when(m.created_at),
            m.signature.key_id if m.signature else "unsigned",
            ",".join(serving.get((m.name, m.version), [])) or "-",
            _metrics(m.provenance.metrics) or "-",
        ]
        for m in listing.manifests
    ]
    channels = [["NAME", "CHANNEL", "VERSION", "PROMOTED", "BY"]] + [
        [p.name, p.channel, p.version, _when(p.promoted_at), p.promoted_by]
        for p in listing.pointers
    ]
    tables = [_table(versions), _table(channels)]
    if listing.invalid:
        tables.append(
            _table([["INVALID", "REASON"]] + [[i.uri, i.reason] for i in listing.invalid])
        )
    return "\n\n".join(tables)


def listing_json(listing: Listing) -> dict[str, Any]:
    """The same, for machines: versions with their channels, and the pointers as written."""
    return {
        "versions": [
            {
                **m.model_dump(mode="json", include={"name", "version", "created_at"}),
                "key_id": m.signature.key_id if m.signature else None,
                "metrics": m.provenance.metrics,
                "channels": [
                    p.channel
                    for p in listing.pointers
                    if (p.name, p.version) == (m.name, m.version)
                ],
            }
            for m in listing.manifests
        ],
        "channels": [p.model_dump(mode="json") for p in listing.pointers],
        "invalid": [{"object": i.uri, "reason": i.reason} for i in listing.invalid],
    }
