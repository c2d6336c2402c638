"""The model registry: its S3 layout and the channel pointer a device polls.

Under s3://BUCKET/PREFIX:

    models/{name}/{version}/manifest.json   signed manifest; written last, so its presence
                                            is what publishes a version
    models/{name}/{version}/{file}          the files the manifest pins (model, table)
    channels/{name}/{channel}.json          ChannelPointer: the version a channel serves

A published version is never rewritten; promoting only rewrites a pointer. A device polls
one small object (If-None-Match on its ETag) and everything it then fetches is immutable:
it checks the manifest's bytes against `manifest_sha256`, verifies the signature
(agent.signing), then fetches each file beside the manifest and checks its size and hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AwareDatetime, Field, TypeAdapter, ValidationError, model_validator

from agent.contract.common import (
    CONTRACT_VERSION,
    FileName,
    ModelName,
    OmitsUnset,
    SchemaVersion,
    SemVer,
    Sha256,
    canonical_json,
    describe,
    error_text,
    worded,
)
from agent.contract.manifest import MANIFEST_FILE, Signature

CHANNEL_NAME = worded(
    r"^[a-z][a-z0-9-]{0,31}$",
    "a channel name: 1 to 32 of a-z 0-9 -, starting with a letter (e.g. stable, beta)",
)
ChannelName = Annotated[
    str, Field(pattern=CHANNEL_NAME, description="Channel name, e.g. stable, beta")
]

_PARTS: dict[str, TypeAdapter[str]] = {
    "model name": TypeAdapter(ModelName),
    "version": TypeAdapter(SemVer),
    "channel": TypeAdapter(ChannelName),
    "file name": TypeAdapter(FileName),
}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def key_part(kind: str, value: str) -> str:
    """A key segment (`kind`: model name, version, channel or file name), validated so no
    caller can build a key outside the layout; ValueError names the kind and the value."""
    try:
        return _PARTS[kind].validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{kind} {value!r}: {error_text(exc.errors()[0])}") from None


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), *parts) if p)


def models_prefix(prefix: str, name: str | None = None) -> str:
    """Where to list versions: of every model, or of one model (ends with '/')."""
    return _key(prefix, "models", key_part("model name", name) if name else "") + "/"


def version_prefix(prefix: str, name: str, version: str) -> str:
    """Folder of one version (ends with '/')."""
    return _key(prefix, "models", key_part("model name", name), key_part("version", version)) + "/"


def manifest_key(prefix: str, name: str, version: str) -> str:
    return version_prefix(prefix, name, version) + MANIFEST_FILE


def file_key(prefix: str, name: str, version: str, file: str) -> str:
    """Key of a file the manifest names (model.file, table.file): beside the manifest."""
    return version_prefix(prefix, name, version) + key_part("file name", file)


def channels_prefix(prefix: str, name: str | None = None) -> str:
    """Where to list channel pointers: of every model, or of one model (ends with '/')."""
    return _key(prefix, "channels", key_part("model name", name) if name else "") + "/"


def channel_key(prefix: str, name: str, channel: str) -> str:
    return channels_prefix(prefix, name) + key_part("channel", channel) + ".json"


@dataclass(frozen=True)
class RegistryUrl:
    """s3://BUCKET[/PREFIX], normalised: prefix without leading or trailing slashes."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> RegistryUrl:
        scheme, sep, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        segments = prefix.split("/") if prefix else []
        if scheme != "s3" or not sep:
            reason = "expected s3://BUCKET[/PREFIX]"
        elif not _BUCKET.match(bucket):
            reason = f"bucket {bucket!r} is not a valid S3 bucket name"
        elif any(s in ("", ".", "..") for s in segments) or any(c in prefix for c in "?#"):
            reason = "prefix has empty, '.' or '..' segments, or a query"
        else:
            return cls(bucket, prefix)
        raise ValueError(f"S3 URL {url!r}: {reason}")

    def uri(self, key: str = "") -> str:
        """s3:// URI of a key in this bucket, for messages; the registry itself by default."""
        return f"s3://{self.bucket}/{key or self.prefix}"

    def __str__(self) -> str:
        return self.uri()


class ChannelPointer(OmitsUnset):
    """What a channel serves: one published version, pinned by its manifest's hash.

    Signed (contract 1.6) by the key that promoted it, a device can refuse a pointer replayed
    from the past or forged by anyone who can write `channels/`: without a signature only the
    manifest proves anything, and any older signed version could be pointed to.
    """

    _omit_when_none = ("signature",)

    schema_version: SchemaVersion = Field(default=CONTRACT_VERSION, description="Contract version")
    name: ModelName = Field(description="Model name")
    version: SemVer = Field(description="Model version the channel serves")
    channel: ChannelName = Field(description="Channel name")
    manifest_key: str = Field(
        min_length=1, max_length=1024, description="S3 key of the version's manifest (same bucket)"
    )
    manifest_sha256: Sha256 = Field(
        description="SHA-256 of the manifest object's bytes; check it before parsing the manifest"
    )
    promoted_at: AwareDatetime = Field(description="When the channel was pointed here (UTC)")
    promoted_by: str = Field(max_length=256, description="Who promoted it, free text (user@host)")
    signature: Signature | None = Field(
        default=None,
        description="Ed25519 signature of the promoter (contract 1.6; absent: unsigned)",
    )

    @model_validator(mode="after")
    def _key_matches_version(self) -> ChannelPointer:
        tail = manifest_key("", self.name, self.version)
        if self.manifest_key != tail and not self.manifest_key.endswith("/" + tail):
            raise ValueError(
                f"manifest_key {self.manifest_key!r} is not the manifest of "
                f"{self.name} {self.version} (.../{tail})"
            )
        return self

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> ChannelPointer:
        """Parse a pointer object; errors name where it came from (its s3:// URI)."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"{where}: invalid channel pointer: {describe(exc)}") from exc

    def signing_payload(self) -> bytes:
        """Canonical bytes that a signature covers: the pointer without its signature."""
        return canonical_json(self, {"signature"})

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()
