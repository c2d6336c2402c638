"""Model registry: layout, signatures, and keygen/publish/promote/list against moto over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.contract import (
    ChannelPointer,
    ModelManifest,
    RegistryUrl,
    Signature,
    channel_key,
    file_key,
    manifest_key,
    models_prefix,
)
from agent.engine.model import ModelError
from agent.signing import key_id, keyring, load_public_key, verify_manifest, verify_pointer
from export import registry
from export.cli import main
from tests.conftest import train_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logistic model with its 16 MB table (the table upload goes multipart)."""
    return train_export(tmp_path_factory.mktemp("export"), "binary:logistic", rounds=5).parent


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    registry.keygen(out)
    return out


def as_version(src: Path, dest: Path, version: str) -> Path:
    shutil.copytree(src, dest)
    manifest = ModelManifest.read(dest / "manifest.json")
    manifest.model_copy(update={"version": version}).write(dest / "manifest.json")
    return dest


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- layout and pointer -------------------------------------------------------------------


def test_keys_follow_the_layout_with_or_without_prefix() -> None:
    assert manifest_key("", "rgb", "1.0.0") == "models/rgb/1.0.0/manifest.json"
    assert file_key("a/b", "rgb", "1.0.0", "table.npy") == "a/b/models/rgb/1.0.0/table.npy"
    assert channel_key("/reg/", "rgb", "stable") == "reg/channels/rgb/stable.json"
    assert models_prefix("") == "models/"
    with pytest.raises(ValueError, match="channel 'Stable/x'"):
        channel_key("", "rgb", "Stable/x")


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://bkt", "bkt", ""), ("s3://bkt/", "bkt", ""), ("s3://bkt/a/b/", "bkt", "a/b")],
)
def test_registry_url_parses(url: str, bucket: str, prefix: str) -> None:
    assert RegistryUrl.parse(url) == RegistryUrl(bucket, prefix)


@pytest.mark.parametrize("url", ["bkt/models", "https://bkt/x", "s3://B_ad/x", "s3://bkt/a//b"])
def test_registry_url_refuses_malformed(url: str) -> None:
    with pytest.raises(ValueError, match=f"S3 URL '{url}'"):
        RegistryUrl.parse(url)


def test_pointer_must_name_its_own_manifest() -> None:
    fields: dict[str, Any] = {
        "name": "rgb",
        "version": "1.1.0",
        "channel": "stable",
        "manifest_sha256": "0" * 64,
        "promoted_at": datetime.now(UTC),
        "promoted_by": "ci@host",
    }
    ChannelPointer(manifest_key="reg/models/rgb/1.1.0/manifest.json", **fields)
    with pytest.raises(ValueError, match=r"not the manifest of rgb 1\.1\.0"):
        ChannelPointer(manifest_key="reg/models/rgb/1.0.0/manifest.json", **fields)


# --- signatures (device side) -------------------------------------------------------------


def test_signature_verifies_and_refuses(export_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()
    trusted = keyring([key.public_key()])
    manifest = ModelManifest.read(export_dir / "manifest.json")
    signed = registry.sign_manifest(manifest, key)
    verify_manifest(signed, trusted, required=True)

    with pytest.raises(ModelError, match="is unsigned"):
        verify_manifest(manifest, trusted, required=True)
    verify_manifest(manifest, trusted, required=False)

    altered = signed.model_copy(
        update={"decision": signed.decision.model_copy(update={"flag_pct": 50.0})}
    )
    for required in (True, False):
        with pytest.raises(ModelError, match="bad signature"):
            verify_manifest(altered, trusted, required=required)

    stranger = registry.sign_manifest(manifest, Ed25519PrivateKey.generate())
    with pytest.raises(
        ModelError, match=r"unknown key [0-9a-f]{16} \(trusted: " + key_id(key.public_key())
    ):
        verify_manifest(stranger, trusted, required=True)
    verify_manifest(stranger, trusted, required=False)

    assert signed.signature is not None
    rsa = Signature.model_construct(algorithm="rsa", key_id=signed.signature.key_id, value="")
    with pytest.raises(ModelError, match="algorithm 'rsa'"):
        verify_manifest(signed.model_copy(update={"signature": rsa}), trusted, required=False)


def test_public_key_from_pem_or_base64(tmp_path: Path) -> None:
    public = Ed25519PrivateKey.generate().public_key()
    pem = tmp_path / "k.pem"
    pem.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    raw = base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    assert key_id(load_public_key(pem)) == key_id(load_public_key(raw)) == key_id(public)
    assert len(key_id(public)) == 16
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="is not an Ed25519"):
        load_public_key(ec_pem.decode())
    with pytest.raises(ValueError, match="neither PEM nor base64"):
        load_public_key("not a key!")
    with pytest.raises(ValueError, match="16 bytes"):
        load_public_key(base64.b64encode(bytes(16)).decode())


# --- the CLI against S3 -------------------------------------------------------------------


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keygen", "--out", str(tmp_path))
    assert code == 0
    private = tmp_path / registry.PRIVATE_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = load_public_key(tmp_path / registry.PUBLIC_KEY_FILE)
    assert out.strip() == key_id(public) == key_id(registry.load_private_key(private).public_key())
    before = private.read_bytes()
    code, _, err = run(capsys, "keygen", "--out", str(tmp_path))
    assert code == 2
    assert "refusing to overwrite" in err
    assert private.read_bytes() == before


@dataclass
class Registry:
    """An empty registry in a fresh bucket on the moto server, driven through the CLI."""

    s3: Any
    bucket: str
    endpoint: str
    keys: Path
    export_dir: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def url(self) -> RegistryUrl:
        return RegistryUrl(self.bucket)

    def cli(self, command: str, *args: str) -> tuple[int, str, str]:
        where = ["--registry", f"s3://{self.bucket}", "--endpoint-url", self.endpoint]
        return run(self.capsys, command, *args, *where)

    def publish(self, directory: Path) -> tuple[int, str, str]:
        return self.cli(
            "publish", str(directory), "--key", str(self.keys / registry.PRIVATE_KEY_FILE)
        )

    def objects(self, prefix: str = "") -> dict[str, str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["ETag"] for o in listed.get("Contents", [])}


@pytest.fixture
def reg(
    s3: Any, s3_bucket: str, keys: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> Registry:
    return Registry(s3, s3_bucket, s3.meta.endpoint_url, keys, export_dir, capsys)


def test_publish_list_promote(reg: Registry, tmp_path: Path) -> None:
    public = ["--public-key", str(reg.keys / registry.PUBLIC_KEY_FILE)]
    code, out, err = reg.publish(reg.export_dir)
    assert code == 0, err
    assert f"s3://{reg.bucket}/models/test-rgb/1.0.0/manifest.json" in out
    assert reg.publish(as_version(reg.export_dir, tmp_path / "v2", "1.1.0"))[0] == 0

    code, out, err = reg.cli("promote", "test-rgb", "1.0.0", *public, "--by", "ci@host")
    assert code == 0
    assert out.strip() == "test-rgb stable: now 1.0.0, was nothing"
    body = reg.s3.get_object(Bucket=reg.bucket, Key="channels/test-rgb/stable.json")["Body"]
    assert ChannelPointer.parse(body.read(), "stable.json").signature is None  # no --key
    assert "--key, the pointer is unsigned" in err
    private = str(reg.keys / registry.PRIVATE_KEY_FILE)
    code, out, err = reg.cli("promote", "test-rgb", "1.1.0", *public, "--key", private)
    assert code == 0
    assert "now 1.1.0, was 1.0.0" in out
    assert "by ci@host" in out
    assert "unsigned" not in err
    # Unsigned over a signed pointer: exit 0 once, while every device refused it.
    code, _, err = reg.cli("promote", "test-rgb", "1.0.0", *public)
    assert code == 2 and "stable is signed (key " in err and "promote with --key" in err

    body = reg.s3.get_object(Bucket=reg.bucket, Key="channels/test-rgb/stable.json")["Body"]
    pointer = ChannelPointer.parse(body.read(), "stable.json")
    assert (pointer.name, pointer.version, pointer.channel) == ("test-rgb", "1.1.0", "stable")
    assert pointer.manifest_key == "models/test-rgb/1.1.0/manifest.json"
    manifest_bytes = reg.s3.get_object(Bucket=reg.bucket, Key=pointer.manifest_key)["Body"].read()
    assert pointer.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    manifest = ModelManifest.model_validate_json(manifest_bytes)
    trusted = keyring([load_public_key(reg.keys / registry.PUBLIC_KEY_FILE)])
    verify_manifest(manifest, trusted, required=True)
    assert verify_pointer(pointer, trusted)
    assert manifest.table is not None
    table_key = file_key("", "test-rgb", "1.1.0", manifest.table.file)
    table = reg.s3.head_object(Bucket=reg.bucket, Key=table_key)
    assert table["ContentLength"] == manifest.table.size
    assert table["Metadata"]["sha256"] == manifest.table.sha256

    code, out, _ = reg.cli("list", "--json")
    listing = json.loads(out)
    assert [(v["version"], v["channels"]) for v in listing["versions"]] == [
        ("1.0.0", []),
        ("1.1.0", ["stable"]),
    ]
    assert listing["channels"][0]["manifest_sha256"] == pointer.manifest_sha256
    code, out, _ = reg.cli("list", "test-rgb")
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split() == ["NAME", "VERSION", "CREATED", "KEY", "ID", "CHANNELS", "METRICS"]
    assert rows[2].split()[:2] == ["test-rgb", "1.1.0"]
    assert rows[2].split()[4] == "stable"
    created = rows[2].split()[2]
    promoted = next(r for r in rows if r.startswith("test-rgb  stable")).split()[3]
    for when in (created, promoted):  # alike, as the JSON writes them (once +00:00 and +0000)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when), when
    code, out, err = reg.cli("list", "no-such-model")
    assert code == 0 and err == f"nothing no-such-model published under s3://{reg.bucket}/\n"


def test_a_version_is_immutable(reg: Registry) -> None:
    assert reg.publish(reg.export_dir)[0] == 0
    before = reg.objects()
    code, out, err = reg.publish(reg.export_dir)
    assert code == 2
    assert not out
    assert err == (
        f"error: s3://{reg.bucket}/models/test-rgb/1.0.0/manifest.json: test-rgb 1.0.0 is already "
        "published; versions are immutable, export a new version\n"
    )
    assert reg.objects() == before


def test_tampered_file_is_refused_before_upload(reg: Registry, tmp_path: Path) -> None:
    tampered = as_version(reg.export_dir, tmp_path / "x", "1.0.0")
    with (tampered / "model.onnx").open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    code, _, err = reg.publish(tampered)
    assert code == 2
    assert "model.onnx: sha256" in err
    assert "does not match manifest" in err
    assert reg.objects() == {}


def test_unfinished_publish_resumes_but_other_content_is_refused(reg: Registry) -> None:
    manifest = ModelManifest.read(reg.export_dir / "manifest.json")
    key = file_key("", manifest.name, manifest.version, manifest.model.file)
    private = registry.load_private_key(reg.keys / registry.PRIVATE_KEY_FILE)
    reg.s3.put_object(Bucket=reg.bucket, Key=key, Body=b"other", Metadata={"sha256": "0" * 64})
    with pytest.raises(registry.RegistryError, match="exists with other content"):
        registry.publish(reg.s3, reg.url, reg.export_dir, private)
    body = (reg.export_dir / manifest.model.file).read_bytes()
    metadata = {"sha256": manifest.model.sha256}
    reg.s3.put_object(Bucket=reg.bucket, Key=key, Body=body, Metadata=metadata)
    registry.publish(reg.s3, reg.url, reg.export_dir, private)  # the model survived a crash
    assert manifest_key("", manifest.name, manifest.version) in reg.objects()


def test_concurrent_publish_is_reported(reg: Registry) -> None:
    """Another publisher writes the manifest between our check and our conditional write."""
    mkey = manifest_key("", "test-rgb", "1.0.0")
    rival = boto3.client("s3", endpoint_url=reg.endpoint)

    def race(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] == mkey:
            rival.put_object(Bucket=reg.bucket, Key=mkey, Body=b"{}")

    reg.s3.meta.events.register("before-parameter-build.s3.PutObject", race)
    private = registry.load_private_key(reg.keys / registry.PRIVATE_KEY_FILE)
    with pytest.raises(
        registry.RegistryError, match=r"a concurrent publish of test-rgb 1\.0\.0 won"
    ):
        registry.publish(reg.s3, reg.url, reg.export_dir, private)
    assert reg.s3.get_object(Bucket=reg.bucket, Key=mkey)["Body"].read() == b"{}"


def test_promote_refuses_missing_versions_and_strangers_keys(reg: Registry, tmp_path: Path) -> None:
    code, _, err = reg.cli("promote", "test-rgb", "1.0")
    assert code == 2 and err == (
        "error: version '1.0': should be a semantic version MAJOR.MINOR.PATCH, e.g. 1.0.0 or "
        "2.1.0-rc.1\n"
    )
    code, _, err = reg.cli("promote", "test-rgb", "9.9.9")
    assert code == 2
    assert err == (
        f"error: s3://{reg.bucket}/models/test-rgb/9.9.9/manifest.json: "
        "test-rgb 9.9.9 is not published\n"
    )
    reg.publish(reg.export_dir)
    registry.keygen(tmp_path)
    stranger = str(tmp_path / registry.PUBLIC_KEY_FILE)
    code, _, err = reg.cli("promote", "test-rgb", "1.0.0", "--public-key", stranger)
    assert code == 2
    assert "signed by unknown key" in err
    assert reg.objects("channels/") == {}


def test_missing_bucket_is_one_line(
    moto_server: str, aws_credentials: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["list", "--registry", "s3://no-such-bucket/x", "--endpoint-url", moto_server]
    assert run(capsys, *argv)[::2] == (
        2,
        "error: s3://no-such-bucket/x/models/: NoSuchBucket: The specified bucket does not exist\n",
    )


def test_endpoint_from_environment(
    moto_server: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    code, out, _ = run(capsys, "list", "--registry", f"s3://{s3_bucket}", "--json")
    assert code == 0
    assert json.loads(out) == {"versions": [], "channels": [], "invalid": []}


def test_promote_never_dates_a_pointer_before_the_one_it_replaces(reg: Registry) -> None:
    """A promoter whose clock is behind the last promoter's wrote an older promoted_at, which
    every device that saw the last pointer refuses as a replay."""
    assert reg.publish(reg.export_dir)[0] == 0
    assert reg.cli("promote", "test-rgb", "1.0.0")[0] == 0
    key = "channels/test-rgb/stable.json"
    pointer = ChannelPointer.parse(
        reg.s3.get_object(Bucket=reg.bucket, Key=key)["Body"].read(), key
    )
    ahead = pointer.model_copy(update={"promoted_at": datetime(2100, 1, 1, tzinfo=UTC)})
    reg.s3.put_object(Bucket=reg.bucket, Key=key, Body=ahead.to_json())
    assert reg.cli("promote", "test-rgb", "1.0.0")[0] == 0
    again = ChannelPointer.parse(reg.s3.get_object(Bucket=reg.bucket, Key=key)["Body"].read(), key)
    assert again.promoted_at > ahead.promoted_at


def test_list_shows_invalid_objects_beside_the_rest(reg: Registry) -> None:
    """One bad manifest anywhere made `list` fail as a whole, showing nothing."""
    assert reg.publish(reg.export_dir)[0] == 0
    assert reg.cli("promote", "test-rgb", "1.0.0")[0] == 0
    good = reg.s3.get_object(Bucket=reg.bucket, Key=manifest_key("", "test-rgb", "1.0.0"))
    bad = {
        manifest_key("", "test-rgb", "2.0.0"): b"{not json",
        manifest_key("", "other", "1.0.0"): good["Body"].read(),  # another version's manifest
        channel_key("", "test-rgb", "beta"): b"{}",
    }
    for key, body in bad.items():
        reg.s3.put_object(Bucket=reg.bucket, Key=key, Body=body)
    code, out, err = reg.cli("list")
    assert code == 1
    assert "warning: 3 invalid objects in the registry, listed as such" in err
    versions, channels, invalid = (table.splitlines() for table in out.strip().split("\n\n"))
    assert [row.split()[:2] for row in versions[1:]] == [["test-rgb", "1.0.0"]]
    assert [row.split()[:3] for row in channels[1:]] == [["test-rgb", "stable", "1.0.0"]]
    assert invalid[0].split() == ["INVALID", "REASON"]
    rows = {row.split(maxsplit=1)[0]: row.split(maxsplit=1)[1] for row in invalid[1:]}
    assert rows[f"s3://{reg.bucket}/models/other/1.0.0/manifest.json"] == (
        "holds test-rgb 1.0.0, not other 1.0.0"
    )
    code, out, _ = reg.cli("list", "--json")
    assert code == 1
    listing = json.loads(out)
    assert [v["version"] for v in listing["versions"]] == ["1.0.0"]
    reasons = {
        i["object"].removeprefix(f"s3://{reg.bucket}/"): i["reason"] for i in listing["invalid"]
    }
    assert sorted(reasons) == sorted(bad)
    assert reasons[channel_key("", "test-rgb", "beta")].startswith("invalid channel pointer: ")
    assert reasons[manifest_key("", "test-rgb", "2.0.0")].startswith("invalid manifest: ")


def test_promote_checks_every_file_hash_and_downloads_only_multipart_ones(
    reg: Registry, tmp_path: Path
) -> None:
    """promote compared sizes only: a file replaced by other bytes of the same size (even
    with the `sha256` metadata copied) was promoted, and every device then refused it."""
    assert reg.publish(reg.export_dir)[0] == 0
    manifest = ModelManifest.read(reg.export_dir / "manifest.json")
    assert manifest.table is not None
    private = registry.load_private_key(reg.keys / registry.PRIVATE_KEY_FILE)
    for ref in (manifest.model, manifest.table):
        key = file_key("", "test-rgb", "1.0.0", ref.file)
        data = bytearray((reg.export_dir / ref.file).read_bytes())
        data[len(data) // 2] ^= 1
        for body, checksum in ((bytes(data), {"ChecksumAlgorithm": "SHA256"}), (bytes(data), {})):
            reg.s3.put_object(
                Bucket=reg.bucket, Key=key, Body=body, Metadata={"sha256": ref.sha256}, **checksum
            )
            with pytest.raises(registry.RegistryError) as info:
                registry.promote(reg.s3, reg.url, "test-rgb", "1.0.0", "stable",
                                 public_keys=None, promoted_by="t", key=private)  # fmt: skip
            assert str(info.value) == (
                f"s3://{reg.bucket}/{key}: sha256 {hashlib.sha256(data).hexdigest()}, "
                f"the manifest pins {ref.sha256}"
            )
        whole = {"ChecksumAlgorithm": "SHA256"}  # as publish sends it
        reg.s3.upload_file(
            str(reg.export_dir / ref.file), reg.bucket, key, whole, Config=registry.TRANSFER
        )
    assert reg.objects("channels/") == {}

    fetched: list[str] = []
    reg.s3.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: fetched.append(params["Key"])
    )
    registry.promote(reg.s3, reg.url, "test-rgb", "1.0.0", "stable",
                     public_keys=None, promoted_by="t", key=private)  # fmt: skip
    assert file_key("", "test-rgb", "1.0.0", manifest.table.file) in fetched  # sent in parts
    assert file_key("", "test-rgb", "1.0.0", manifest.model.file) not in fetched  # S3's hash


def test_promote_with_a_key_checks_the_signature_with_its_public_half(
    reg: Registry, tmp_path: Path
) -> None:
    """With --key and no --public-key the manifest's signature was not checked at all."""
    assert reg.publish(reg.export_dir)[0] == 0
    registry.keygen(tmp_path / "other")
    other = str(tmp_path / "other" / registry.PRIVATE_KEY_FILE)
    code, _, err = reg.cli("promote", "test-rgb", "1.0.0", "--key", other)
    assert code == 2
    assert "signed by unknown key" in err
    assert reg.objects("channels/") == {}
    code, _, err = reg.cli(
        "promote", "test-rgb", "1.0.0", "--key", str(reg.keys / registry.PRIVATE_KEY_FILE)
    )
    assert code == 0, err
    assert "checking the signature with the public half of" in err
    assert "not checked" not in err


def test_list_into_a_closed_pipe_exits_quietly(reg: Registry) -> None:
    """`corrosion-export list ... | head` ended with `error: [Errno 32] Broken pipe`."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone: the first write fails
    where = ["--registry", f"s3://{reg.bucket}", "--endpoint-url", reg.endpoint]
    try:
        run = subprocess.run(
            [sys.executable, "-m", "export.cli", "list", *where],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (run.returncode, run.stderr) == (141, "")
