"""Safe model updates: follow a registry channel, verify everything, swap between frames.

A new version is fetched into a private folder and must pass, in order: the pointer's
manifest hash, the strict manifest schema, the Ed25519 signature, the size claims (before
any byte is downloaded), each file's size and sha256, the ONNX checks, the table check and
the golden-sample smoke test (the last three are the engine's load). Only then does it
replace the serving model, by reference, between two frames. A model that fails any
check is never served; the reason is published and the old model keeps serving. The
last `keep_versions` versions stay on disk; `rollback` goes back one; a device that boots
offline serves the last good model it has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from agent.config import ModelConfig
from agent.contract import MANIFEST_FILE, ModelManifest, ModelRef, describe
from agent.contract.registry import ChannelPointer, RegistryUrl, channel_key, file_key
from agent.engine.model import ModelError
from agent.s3 import describe_error, error_code, s3_client
from agent.signing import keyring, load_public_key, verify_manifest

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1024 * 1024


class Serving(Protocol):
    """What the updater needs of a loaded model (the engine's models provide it)."""

    @property
    def ref(self) -> ModelRef: ...

    def close(self) -> None: ...


class Swappable(Protocol):
    def swap(self, model: Any) -> Any: ...


@dataclass(frozen=True)
class Outcome:
    """What happened at a check: a new model serving, a refusal, or nothing new."""

    served: ModelRef | None = None
    refused: str | None = None


class ModelStore:
    """Versions on disk under state_dir/models/{name}/{version}/ and which one serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._state = root / "state.json"
        for leftover in root.glob(".incoming-*"):  # a download a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self._state.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._state)

    def history(self) -> list[str]:
        """Manifest paths served, oldest first (relative to the store)."""
        return [str(p) for p in self._read().get("history", [])]

    def current(self) -> Path | None:
        history = self.history()
        return self.root / history[-1] if history else None

    def skipped(self) -> str | None:
        """A version rolled back from: not reinstalled until the channel moves on."""
        value = self._read().get("skip")
        return str(value) if value else None

    def serve(self, manifest: Path, *, skip: str | None = None) -> None:
        rel = str(manifest.relative_to(self.root))
        history = [h for h in self.history() if h != rel] + [rel]
        self._write({"history": history, "skip": skip})

    def drop_current(self) -> None:
        """Forget the serving version (rolled back, or unusable at boot) and free its folder."""
        history = self.history()
        if not history:
            return
        self._write({"history": history[:-1], "skip": self.skipped()})
        if history[-1] not in history[:-1]:
            shutil.rmtree((self.root / history[-1]).parent, ignore_errors=True)

    def prune(self, keep: int) -> None:
        history = self.history()
        keep_dirs = {(self.root / h).parent for h in history[-keep:]}
        for gone in history[:-keep]:
            folder = (self.root / gone).parent
            if folder not in keep_dirs:
                shutil.rmtree(folder, ignore_errors=True)
        self._write({"history": history[-keep:], "skip": self.skipped()})

    def incoming(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))


class Updater:
    """Owns the updater thread; the frame loop never waits on it."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        store: ModelStore,
        detector: Swappable,
        load: Callable[[Path], Serving],
        serving: Callable[[], ModelRef],
        report: Callable[[Outcome], None],
    ) -> None:
        if config.registry is None:
            raise ValueError("model.registry is not set")
        self.config = config
        self.url = RegistryUrl.parse(config.registry)
        self.store = store
        self.detector = detector
        self.load = load
        self.serving = serving
        self.report = report
        self.keys = keyring(load_public_key(p) for p in config.public_keys)
        self.s3 = s3_client(config.endpoint_url, config.region)
        self._etag: str | None = None
        self._refused: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rollback = threading.Event()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def pull(self) -> None:
        """Check the channel now (the `pull-model` command), retrying refused versions."""
        self._etag = None
        self._refused.clear()
        self._wake.set()

    def rollback(self) -> None:
        self._rollback.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._rollback.is_set():
                self._rollback.clear()
                self.report(self._roll_back())
            else:
                try:
                    outcome = self.check()
                except (BotoCoreError, ClientError) as exc:
                    log.warning("registry %s unreachable: %s", self.url, describe_error(exc))
                except Exception:  # a bug or a full disk must not end updates for good
                    log.exception("model check failed; the current model keeps serving")
                else:
                    if outcome.served or outcome.refused:
                        self.report(outcome)
            self._wake.wait(self.config.poll_s)
            self._wake.clear()

    def _name(self) -> str:
        return self.config.name or self.serving().name

    def check(self) -> Outcome:
        """One poll of the channel pointer; a new version is fetched, checked and served."""
        pointer = self._poll()
        if not isinstance(pointer, ChannelPointer):
            return pointer
        serving = self.serving()
        if (pointer.name, pointer.version) == (serving.name, serving.version):
            return Outcome()
        if pointer.manifest_sha256 in self._refused or pointer.version == self.store.skipped():
            return Outcome()
        try:
            return self._update(pointer)
        except BaseException:
            self._etag = None  # read but not served (a network blip, a full disk): poll again
            raise

    def _update(self, pointer: ChannelPointer) -> Outcome:
        """Fetch, check and serve the version `pointer` names, or refuse it."""
        folder = self.store.incoming()
        try:
            model = self.load(self._fetch(pointer, folder))
        except (ModelError, ValueError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            return self._refuse(pointer.manifest_sha256, f"{pointer.name} {pointer.version}: {exc}")
        except RuntimeError as exc:  # onnxruntime failing the golden samples' inference
            shutil.rmtree(folder, ignore_errors=True)
            reason = f"{pointer.name} {pointer.version}: onnxruntime: {exc}"
            return self._refuse(pointer.manifest_sha256, reason)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        final = self.store.root / pointer.name / pointer.version
        shutil.rmtree(final, ignore_errors=True)  # a copy left by an earlier, rolled-back serve
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, final)  # only a version that passed every check enters the store
        return self._serve(model)

    def _poll(self) -> ChannelPointer | Outcome:
        """GET the pointer with If-None-Match its last ETag: unchanged costs one round trip."""
        key = channel_key(self.url.prefix, self._name(), self.config.channel)
        args: dict[str, Any] = {"Bucket": self.url.bucket, "Key": key}
        if self._etag:
            args["IfNoneMatch"] = self._etag
        try:
            response = self.s3.get_object(**args)
        except ClientError as exc:
            if error_code(exc) in ("304", "NotModified"):
                return Outcome()
            if error_code(exc) in ("NoSuchKey", "404"):
                log.debug("no channel pointer at %s yet", self.url.uri(key))
                return Outcome()
            raise
        self._etag = response.get("ETag")
        body = response["Body"].read(MAX_MANIFEST_BYTES + 1)
        try:
            return ChannelPointer.parse(body, where=self.url.uri(key))
        except ValueError as exc:
            return self._refuse(hashlib.sha256(body).hexdigest(), str(exc))

    def _refuse(self, sha: str, reason: str) -> Outcome:
        self._refused.add(sha)
        log.error("model refused, the current one keeps serving: %s", reason)
        return Outcome(refused=reason)

    def _serve(self, model: Serving, *, skip: str | None = None) -> Outcome:
        self.detector.swap(model)  # the detector closes the old one between frames
        self.store.serve(self._manifest_of(model.ref), skip=skip)
        self.store.prune(self.config.keep_versions)
        log.info("now serving %s %s", model.ref.name, model.ref.version)
        return Outcome(served=model.ref)

    def _manifest_of(self, ref: ModelRef) -> Path:
        return self.store.root / ref.name / ref.version / MANIFEST_FILE

    def _get(self, key: str, limit: int) -> bytes:
        response = self.s3.get_object(Bucket=self.url.bucket, Key=key)
        size = int(response.get("ContentLength", 0))
        if size > limit:
            raise ModelError(f"{self.url.uri(key)}: {size} bytes, more than the {limit} allowed")
        return bytes(response["Body"].read(limit + 1))

    def _fetch(self, pointer: ChannelPointer, folder: Path) -> Path:
        """Download and check one version into `folder`; returns its manifest path.

        The manifest is written last: its presence means every file arrived.
        """
        where = self.url.uri(pointer.manifest_key)
        raw = self._get(pointer.manifest_key, MAX_MANIFEST_BYTES)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != pointer.manifest_sha256:
            raise ModelError(f"{where}: sha256 {digest} does not match the channel's")
        try:
            manifest = ModelManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelError(f"{where}: invalid manifest: {describe(exc)}") from None
        if (manifest.name, manifest.version) != (pointer.name, pointer.version):
            raise ModelError(f"{where}: is {manifest.name} {manifest.version}, not the channel's")
        verify_manifest(manifest, self.keys, required=self.config.require_signature)
        refs = manifest.files()
        for ref in refs:
            if ref.size > self.config.max_model_bytes:
                raise ModelError(
                    f"{ref.file}: claims {ref.size} bytes, model.max_model_bytes is "
                    f"{self.config.max_model_bytes}"
                )
        for ref in refs:
            key = file_key(self.url.prefix, manifest.name, manifest.version, ref.file)
            (folder / ref.file).write_bytes(self._get(key, ref.size))
        (folder / MANIFEST_FILE).write_bytes(raw)
        return folder / MANIFEST_FILE

    def _roll_back(self) -> Outcome:
        history = self.store.history()
        if len(history) < 2:
            return Outcome(refused="rollback: no earlier version on disk")
        current = self.serving()
        try:
            model = self.load(self.store.root / history[-2])
        except (ModelError, ValueError) as exc:
            return Outcome(refused=f"rollback: the earlier version fails its checks: {exc}")
        self.store.drop_current()
        return self._serve(model, skip=current.version)
