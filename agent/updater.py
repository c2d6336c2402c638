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
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.config import ModelConfig
from agent.contract import MANIFEST_FILE, ModelManifest, ModelRef, describe
from agent.contract.common import semver_order
from agent.contract.registry import (
    ChannelPointer,
    RegistryUrl,
    channel_key,
    file_key,
    version_prefix,
)
from agent.durable import replace_file, sync_dir, write_synced
from agent.engine.model import ModelError, runtime_fault
from agent.s3 import describe_error, error_code, s3_client
from agent.signing import verify_manifest, verify_pointer

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1024 * 1024
# onnxruntime failing a model that passed every hash and signature check is most likely the
# device (memory short for a while), not the model: tried again after this, not never.
RUNTIME_RETRY_S = 900.0


class Serving(Protocol):
    """What the updater needs of a loaded model (the engine's models provide it)."""

    @property
    def ref(self) -> ModelRef: ...

    def close(self) -> None: ...


class Swappable(Protocol):
    def swap(self, model: Any) -> Any: ...


MISSING = ("NoSuchKey", "404", "AccessDenied", "403")


class MissingFileError(Exception):
    """A file a published version names cannot be read from the registry."""


class RollbackError(Exception):
    """A rollback that cannot start, as known when it is asked: the command's error."""


@dataclass(frozen=True)
class Outcome:
    """What happened at a check: a new model serving, a refusal, or nothing new."""

    served: ModelRef | None = None
    refused: str | None = None
    settled: bool = False  # the last refusal no longer holds (a rollback done at last)


class ModelStore:
    """Versions on disk under state_dir/models/{name}/{version}/ and which one serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._state = root / "state.json"
        for leftover in root.glob(".incoming-*"):  # a download a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        self._sweep()

    def _sweep(self) -> None:
        """Free version folders the state does not name: a crash between moving a download
        in and recording it, or during a rollback's delete, left them (a skipped version is
        never fetched again, so nothing else would). Nothing goes if the state is unreadable."""
        try:
            state = json.loads(self._state.read_text())
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError):
            return
        if not isinstance(state, dict):
            return
        named = {(self.root / str(h)).parent for h in state.get("history", [])}
        for folder in self.root.glob("*/*"):
            if folder.is_dir() and not folder.parent.name.startswith(".") and folder not in named:
                log.info("removing model folder %s, which no record names", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, **changes: Any) -> None:
        """Change some keys of the state, keeping the rest, atomically."""
        try:
            replace_file(self._state, json.dumps({**self._read(), **changes}, indent=1).encode())
        except OSError as exc:  # a full disk's error names no file
            exc.filename = exc.filename or str(self._state)
            raise

    @staticmethod
    def rel(ref: ModelRef) -> str:
        """Where `ref`'s manifest is in the store, as the history names it."""
        return f"{ref.name}/{ref.version}/{MANIFEST_FILE}"

    def history(self) -> list[str]:
        """Manifest paths served, oldest first (relative to the store)."""
        return [str(p) for p in self._read().get("history", [])]

    def current(self) -> Path | None:
        history = self.history()
        return self.root / history[-1] if history else None

    def skipped(self) -> set[str]:
        """Versions rolled back from: not reinstalled until the channel moves on."""
        value = self._read().get("skip")
        if isinstance(value, list):
            return {str(v) for v in value}
        return {str(value)} if value else set()  # a store from before skips were a list

    def skip(self, version: str) -> None:
        """Skip `version` (rolled back from, not serving) until the channel moves on, and
        forget it in the same write: a version skipped and kept in the history is one a later
        rollback could go back to once the skip is lifted."""
        gone = [h for h in self.history() if version_of(h) == version]
        history = [h for h in self.history() if h not in gone]
        self._write(history=history, skip=sorted(self.skipped() | {version}))
        self._free(gone)

    def unskip(self) -> None:
        """The channel moved on from every version rolled back from."""
        self._write(skip=[])

    def _promotions(self) -> dict[str, str]:
        promoted = self._read().get("promoted")
        return promoted if isinstance(promoted, dict) else {}

    def promoted_at(self, channel: str) -> datetime | None:
        """When the last trusted signed pointer of `channel` (NAME/CHANNEL) this device saw was
        promoted: an older one is a replay. None: the channel's pointers were never signed."""
        try:
            return datetime.fromisoformat(str(self._promotions()[channel]))
        except (KeyError, ValueError):
            return None

    def _promoted(self, promotion: tuple[str, datetime] | None) -> dict[str, Any]:
        """The state change that remembers `promotion` (channel, time), never going back."""
        if promotion is None:
            return {}
        channel, at = promotion
        last = self.promoted_at(channel)
        if last is not None and at <= last:
            return {}
        return {"promoted": {**self._promotions(), channel: at.isoformat()}}

    def note_promotion(self, channel: str, at: datetime) -> None:
        """Remember a trusted signed pointer of `channel` promoted at `at`."""
        if change := self._promoted((channel, at)):
            self._write(**change)

    def serve(
        self,
        manifest: Path,
        *,
        skip: str | None = None,
        drop: str | None = None,
        promotion: tuple[str, datetime] | None = None,
    ) -> None:
        """Record `manifest` as serving (from a pointer of a trusted `promotion`), in one
        write with `drop` (a version rolled back from) forgotten and `skip`ped, whose folder
        then goes: a crash leaves either state, never half. Versions stored after `drop` (kept
        at boot while memory was short) go with it: left before the version rolled back to,
        the next rollback would have gone forward to them; the channel brings them again."""
        rel = str(manifest.relative_to(self.root))
        gone = self._from(drop)
        history = [h for h in self.history() if h != rel and h not in gone] + [rel]
        skips = self.skipped() | ({skip} if skip else set())
        self._write(history=history, skip=sorted(skips), **self._promoted(promotion))
        self._free(gone)

    def forget(self, rel: str, *, skip: str) -> None:
        """Forget `rel` (a version rolled back from that does not serve: kept at boot) and
        the versions after it, skip `skip`, and free their folders."""
        gone = self._from(rel)
        history = [h for h in self.history() if h not in gone]
        self._write(history=history, skip=sorted(self.skipped() | {skip}))
        self._free(gone)

    def _from(self, rel: str | None) -> list[str]:
        """`rel` and the versions stored after it."""
        history = self.history()
        return history[history.index(rel) :] if rel in history else []

    def _free(self, rels: list[str]) -> None:
        for rel in rels:
            shutil.rmtree((self.root / rel).parent, ignore_errors=True)

    def drop(self, rel: str) -> None:
        """Forget a stored version (unusable at boot) and free its folder."""
        self._write(history=[h for h in self.history() if h != rel])
        self._free([rel])

    def prune(self, keep: int) -> None:
        history = self.history()
        keep_dirs = {(self.root / h).parent for h in history[-keep:]}
        for gone in history[:-keep]:
            folder = (self.root / gone).parent
            if folder not in keep_dirs:
                shutil.rmtree(folder, ignore_errors=True)
        self._write(history=history[-keep:])

    def incoming(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))

    @property
    def pending(self) -> Path:
        """The rollback taken and not done yet. Not in state.json: it is written on MQTT's
        thread, which must not race the updater thread's writes."""
        return self.root / "rollback.json"

    def ask_rollback(self, asked: ModelRef) -> None:
        """Remember a rollback taken from `asked` until it is done: one answered ok and then
        cut off by a stop is done at the next start."""
        replace_file(self.pending, asked.model_dump_json().encode())

    def asked_rollback(self) -> ModelRef | None:
        try:
            return ModelRef.model_validate_json(self.pending.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.error("pending rollback %s unreadable, dropped: %s", self.pending, exc)
            self.rollback_done()
            return None

    def rollback_done(self) -> None:
        """Durably: a refused rollback back after a power cut would be tried again."""
        try:
            if self.pending.is_dir():  # not ours; in the way of the next record too
                shutil.rmtree(self.pending)
            self.pending.unlink(missing_ok=True)
            sync_dir(self.root)
        except OSError as exc:
            log.error("pending rollback %s not removed: %s", self.pending, exc)


class Updater:
    """Owns the updater thread; the frame loop never waits on it."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        keys: Mapping[str, Ed25519PublicKey],
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
        self.keys = keys  # the daemon's: both verify with one reading of the key files
        self.s3 = s3_client(config.endpoint_url, config.region)
        self._etag: str | None = None
        self._missing: str | None = None  # the pointer key last found missing (warned once)
        self._refused: dict[str, float] = {}  # sha256 -> monotonic time it may be tried again
        # what served when the pending one was asked; one a stop cut off is done first
        self._rollback_from: ModelRef | None = store.asked_rollback()
        self._asked = threading.Lock()  # guards _rollback_from: one rollback at a time
        self._changing = threading.Lock()  # held while the history and what serves change
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rollback = threading.Event()
        # a rollback from before this start: its version may have been dropped at boot since
        self._carried = self._rollback_from is not None
        self._retrying = False  # the pending rollback failed on the disk at least once
        if self._carried:
            self._rollback.set()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def rollback_pending(self) -> bool:
        return self._rollback_from is not None

    def pull(self) -> None:
        """Check the channel now (the `pull-model` command), retrying refused versions."""
        self._etag = None
        self._refused.clear()
        self._wake.set()

    def rollback(self) -> ModelRef:
        """Ask to go back one from the version serving now (the `rollback` command); returns
        that version. The swap is the updater thread's, reported as an Outcome; what can be
        known now raises RollbackError: the agent stopping, a rollback already pending, no
        earlier version on disk.

        Called on MQTT's network thread, so it never waits for the updater thread (which may
        be downloading for minutes). The store's state.json is replaced atomically, so it may
        be read from here; what serves and the history are read as one under `_changing`,
        which the updater holds from recording a version to swapping it in and pruning. If
        it holds it now, the request is taken unchecked and the updater thread decides, as
        `_roll_back` always has (`asked` given way to the version being swapped in)."""
        with self._asked:
            if self._stop.is_set():
                raise RollbackError("rollback: the agent is stopping")
            if self._rollback_from is not None:
                pending = self._rollback_from
                raise RollbackError(
                    f"rollback: one from {pending.name} {pending.version} is already pending; "
                    "its outcome goes to the model topic"
                )
            if self._changing.acquire(blocking=False):
                try:
                    serving = self.serving()
                    _, earlier = self._earlier(serving)
                finally:
                    self._changing.release()
                if earlier is None:
                    raise RollbackError(
                        f"rollback: no earlier version on disk; {serving.name} "
                        f"{serving.version} keeps serving"
                    )
            else:  # a version is being swapped in right now: the updater thread decides
                serving = self.serving()
            try:
                self.store.ask_rollback(serving)
            except OSError as exc:  # a full disk: still done, unless a stop comes first
                log.warning("rollback from %s not recorded in %s: %s", serving.version,
                            self.store.pending, exc)  # fmt: skip
            self._rollback_from, self._carried = serving, False
            self._rollback.set()
        self._wake.set()
        return serving

    def _run(self) -> None:
        while not self._stop.is_set():
            rollback = self._rollback.is_set()
            if rollback:  # cleared only once seen: a request landing now is not lost
                self._rollback.clear()
            try:
                outcome = self._rolled_back() if rollback else self.check()
                if outcome.served or outcome.refused:
                    self.report(outcome)
            except (BotoCoreError, ClientError) as exc:
                log.warning("registry %s unreachable: %s", self.url, describe_error(exc))
            except Exception:  # a bug or a full disk must not end updates for good
                log.exception("model update failed; the current model keeps serving")
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
        this = hashlib.sha256(pointer.to_json()).hexdigest()  # a refusal of the pointer itself
        skips = self.store.skipped()
        skipped = pointer.version in skips
        until = max(self._refused.get(h, -math.inf) for h in (this, pointer.manifest_sha256))
        if skipped or until > time.monotonic():
            if not skipped and math.isfinite(until):
                self._etag = None  # read it again at each poll until its retry is due
            return Outcome()
        refusal, signed = self._trust(pointer, serving)
        if skips and refusal is None:  # a trusted pointer moved on: a re-promotion is meant
            self.store.unskip()
        if (pointer.name, pointer.version) == (serving.name, serving.version):
            if signed and refusal is None:  # so that replaying an older one is seen for one
                self.store.note_promotion(_channel(pointer), pointer.promoted_at)
            return Outcome()
        if refusal:
            return self._refuse(this, refusal)
        try:
            return self._update(pointer, signed=signed)
        except BaseException:
            self._etag = None  # read but not served (a network blip, a full disk): poll again
            raise

    def _trust(self, pointer: ChannelPointer, serving: ModelRef) -> tuple[str | None, bool]:
        """Why the pointer must not move this device (None: it may), and whether a trusted key
        signed it. It must name the model and channel the device follows (one written
        elsewhere would switch it to following another model). A signed one must not be older
        than the last trusted one of its channel (a replay). Where signed models are required,
        an unsigned one (or one signed by a key we do not trust) is refused on a channel whose
        pointers have been signed, and elsewhere may not go back to an older version: anyone
        who can write `channels/` could otherwise send a fleet back to any version ever
        signed, or strip the signature of an old pointer to undo a signed rollback."""
        followed = (self._name(), self.config.channel)
        if (pointer.name, pointer.channel) != followed:
            where = self.url.uri(channel_key(self.url.prefix, *followed))
            return (
                f"{where}: names {pointer.name} channel {pointer.channel}, not "
                f"{followed[0]} channel {followed[1]}"
            ), False
        where = f"channel pointer {pointer.name} {pointer.channel}"
        try:
            signed = verify_pointer(pointer, self.keys)
        except ModelError as exc:
            return str(exc), False
        last = self.store.promoted_at(_channel(pointer))
        if not signed:
            return self._unsigned(pointer, serving, last), False
        if last is not None and pointer.promoted_at < last:
            return (
                f"{where}: promoted {pointer.promoted_at.isoformat()}, before the "
                f"{last.isoformat()} of a pointer this device already trusted: a replay"
            ), True
        return None, True

    def _unsigned(
        self, pointer: ChannelPointer, serving: ModelRef, last: datetime | None
    ) -> str | None:
        """Why a pointer no trusted key signed must not move this device, if it must not."""
        if not self.config.require_signature:
            return None
        where = f"channel pointer {pointer.name} {pointer.channel}"
        how = (
            "unsigned"
            if pointer.signature is None
            else f"signed by key {pointer.signature.key_id}, which is not trusted"
        )
        if last is not None:
            return f"{where}: {how}, and this channel's pointers have been signed"
        older = semver_order(pointer.version) < semver_order(serving.version)
        if pointer.name == serving.name and older:
            return (
                f"{where}: {how}, and may not take {serving.version} back to "
                f"{pointer.version}; promote with --key to roll a fleet back"
            )
        return None

    def _update(self, pointer: ChannelPointer, *, signed: bool) -> Outcome:
        """Fetch, check and serve the version `pointer` names (`signed` by a trusted key), or
        refuse it."""
        folder = self.store.incoming()
        try:
            model = self.load(self._fetch(pointer, folder))
        except MissingFileError as exc:  # a broken registry: reported, and tried at each poll
            shutil.rmtree(folder, ignore_errors=True)
            self._etag = None
            log.error("model not fetched, the current one keeps serving: %s", exc)
            return Outcome(refused=f"{pointer.name} {pointer.version}: {exc}")
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            where = self.url.uri(version_prefix(self.url.prefix, pointer.name, pointer.version))
            why = str(exc).replace(f"{folder}/", where) or type(exc).__name__  # not a temp path
            reason = f"{pointer.name} {pointer.version}: {why}"
            if runtime_fault(exc):  # onnxruntime failing a load or the golden samples' run:
                self._etag = None  # perhaps memory short for now; read again when retry is due
                return self._refuse(pointer.manifest_sha256, reason, retry_s=RUNTIME_RETRY_S)
            if isinstance(exc, ValueError):  # ModelError included: a check it failed
                return self._refuse(pointer.manifest_sha256, reason)
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if self._rollback.is_set():  # asked of the version serving now: it goes back first
            model.close()
            shutil.rmtree(folder, ignore_errors=True)
            self._etag = None  # fetched again after the rollback, if still the channel's
            return Outcome()
        final = self.store.root / pointer.name / pointer.version
        try:
            shutil.rmtree(final, ignore_errors=True)  # a copy an earlier rollback left
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, final)  # only a version that passed every check enters the store
            sync_dir(final.parent)
        except BaseException:  # a full disk: nothing of it stays, nothing leaks
            model.close()
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            raise
        return self._serve(
            model,
            promotion=(_channel(pointer), pointer.promoted_at) if signed else None,
            installed=True,
        )

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
                if self._missing != key:  # nothing promoted yet, or a wrong name or prefix
                    log.warning(
                        "no channel pointer at %s: nothing promoted to it yet, or model.name, "
                        "model.channel or model.registry is wrong",
                        self.url.uri(key),
                    )
                    self._missing = key
                return Outcome()
            raise
        self._missing = None
        body = _body(response, MAX_MANIFEST_BYTES)
        self._etag = response.get("ETag")  # only once the body is in: a cut read polls again
        try:
            return ChannelPointer.parse(body, where=self.url.uri(key))
        except ValueError as exc:
            return self._refuse(hashlib.sha256(body).hexdigest(), str(exc))

    def _refuse(self, sha: str, reason: str, *, retry_s: float = math.inf) -> Outcome:
        """Refused for good (until pull-model or a restart), or for `retry_s`."""
        self._refused[sha] = time.monotonic() + retry_s
        again = "" if math.isinf(retry_s) else f"; tried again in {retry_s:.0f} s"
        log.error("model refused, the current one keeps serving: %s%s", reason, again)
        return Outcome(refused=reason)

    def _serve(
        self,
        model: Serving,
        *,
        skip: str | None = None,
        drop: str | None = None,
        promotion: tuple[str, datetime] | None = None,
        installed: bool = False,
    ) -> Outcome:
        """Record, then swap: a state that cannot be written leaves the old model serving
        and the disk saying so; and frees the version's folder if it was just `installed`
        (no record names it: it would hold a full disk's last room until a restart)."""
        manifest = self._manifest_of(model.ref)
        with self._changing:  # `rollback` reads the history and what serves as one
            try:
                self.store.serve(manifest, skip=skip, drop=drop, promotion=promotion)
            except BaseException:
                model.close()
                if installed:
                    shutil.rmtree(manifest.parent, ignore_errors=True)
                raise
            self.detector.swap(model)  # the detector closes the old one between frames
            try:
                self.store.prune(self.config.keep_versions)
            except OSError as exc:  # serving is recorded; old versions go at the next update
                log.warning("old model versions not pruned: %s", exc)
        log.info("now serving %s %s", model.ref.name, model.ref.version)
        return Outcome(served=model.ref)

    def _manifest_of(self, ref: ModelRef) -> Path:
        return self.store.root / self.store.rel(ref)

    def _raise_if_missing(self, key: str, exc: ClientError) -> None:
        """Raise MissingFileError if `exc` says the file is not there (or not ours to read)."""
        code = error_code(exc)
        if code in MISSING:  # a HEAD's reply has no body, only its status: said in words
            why = "NoSuchKey: not in the registry" if code == "404" else describe_error(exc)
            raise MissingFileError(f"{self.url.uri(key)}: {why}") from exc

    def _get(self, key: str, limit: int) -> bytes:
        try:
            response = self.s3.get_object(Bucket=self.url.bucket, Key=key)
        except ClientError as exc:
            self._raise_if_missing(key, exc)
            raise
        size = int(response.get("ContentLength", 0))
        if size > limit:
            raise ModelError(f"{self.url.uri(key)}: {size} bytes, more than the {limit} allowed")
        return _body(response, limit)

    def _head(self, key: str, size: int) -> None:
        """A file of the version is in the registry at the size its manifest says."""
        try:
            response = self.s3.head_object(Bucket=self.url.bucket, Key=key)
        except ClientError as exc:
            self._raise_if_missing(key, exc)
            raise
        found = int(response.get("ContentLength", -1))
        if found != size:
            raise ModelError(f"{self.url.uri(key)}: size {found} bytes, the manifest says {size}")

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
        keys = {
            r.file: file_key(self.url.prefix, pointer.name, pointer.version, r.file) for r in refs
        }
        for ref in refs:  # all there before any is fetched: a broken version costs no download
            self._head(keys[ref.file], ref.size)
        for ref in refs:
            write_synced(folder / ref.file, self._get(keys[ref.file], ref.size))
        write_synced(folder / MANIFEST_FILE, raw)  # on the device before state.json names it
        sync_dir(folder)
        return folder / MANIFEST_FILE

    def _earlier(self, ref: ModelRef) -> tuple[str, str | None]:
        """The version stored before `ref` that a rollback serves (None: no earlier version on
        disk, or `ref` is not a stored version: the bundled model), and the first version
        after it, from which the rollback forgets."""
        history = self.store.history()
        rel = self.store.rel(ref)
        skipped = self.store.skipped()  # as boot does: rolled back from, never gone back to
        before = history[: max(self._at(history, ref), 0)]
        earlier = next((h for h in reversed(before) if version_of(h) not in skipped), None)
        # what a rollback to it forgets: all after it, not only `ref` (a store from before
        # skip() forgot may hold a skipped version between them)
        return (rel if earlier is None else history[history.index(earlier) + 1]), earlier

    def _at(self, history: list[str], ref: ModelRef | None) -> int:
        """Where `ref` is in the history; -1 for none or the bundled model."""
        if ref is None:
            return -1
        rel = self.store.rel(ref)
        return history.index(rel) if rel in history else -1

    def _rolled_back(self) -> Outcome:
        """The pending rollback, done (or refused): another may be asked from then on."""
        done, retried = True, self._retrying
        try:
            outcome = self._roll_back(self._rollback_from)
            return replace(outcome, settled=retried and outcome.refused is None)
        except OSError as exc:  # a full disk: still pending (no update goes in meanwhile),
            done = False  # tried again at the next turn or start
            log.log(logging.DEBUG if retried else logging.ERROR,
                    "rollback not done, tried again every %.0f s: %s", self.config.poll_s,
                    exc)  # fmt: skip
            if retried:  # said once, in the log and on `model`
                return Outcome()
            return Outcome(refused=f"rollback not done yet: {exc}; tried again until it is")
        except Exception as exc:  # answered ok ("see model"): the model topic must say
            log.exception("rollback failed")
            return Outcome(refused=f"rollback failed: {exc}")
        finally:
            self._retrying = not done
            if done:
                with self._asked:
                    self._rollback_from = None
                    self.store.rollback_done()
            else:
                self._rollback.set()

    def _given_way(self, asked: ModelRef, current: ModelRef) -> Outcome:
        """A rollback asked of `asked`, which no longer serves. Done already (a stop came
        before its record went); done by the boot since (`asked` kept while an earlier
        version serves: forgotten, or the next boot would serve it; or dropped as unusable:
        skipped, or the channel would bring it back); or replaced by an update being swapped
        in: going back from that would undo what the operator did not see, so `asked` is only
        skipped."""
        if asked.version in self.store.skipped():
            return Outcome()
        history = self.store.history()
        at = self._at(history, asked)
        if at > self._at(history, current) or (at < 0 and self._carried):
            if at >= 0:
                self.store.forget(history[at], skip=asked.version)
            else:
                self.store.skip(asked.version)
            log.info("rollback from %s: %s serves already", asked.version, current.version)
            return Outcome()
        self.store.skip(asked.version)
        _, earlier = self._earlier(current)
        then = (
            f"send rollback again to leave {current.version}"
            if earlier is not None
            else f"no version before {current.version} is on disk"
        )
        return Outcome(
            refused=f"rollback: {asked.name} {asked.version} had already given way to "
            f"{current.name} {current.version}; {asked.version} is skipped, {then}"
        )

    def _roll_back(self, asked: ModelRef | None = None) -> Outcome:
        """Serve the version stored before the serving one, which is skipped and freed.
        `asked`: what served when the rollback was asked, if it no longer does."""
        current = self.serving()
        if asked is not None and asked != current:
            return self._given_way(asked, current)
        rel, earlier = self._earlier(current)
        if earlier is None:  # gone since it was asked (checked then, unless mid-swap)
            return Outcome(refused="rollback: no earlier version on disk")
        try:
            model = self.load(self.store.root / earlier)
        except Exception as exc:
            if not (isinstance(exc, ValueError) or runtime_fault(exc)):
                raise
            return Outcome(refused=f"rollback: the earlier version fails its checks: {exc}")
        return self._serve(model, skip=current.version, drop=rel)  # an OSError: tried again


def version_of(rel: str) -> str:
    """The version of a history entry (NAME/VERSION/manifest.json)."""
    return Path(rel).parent.name


def _body(response: dict[str, Any], limit: int) -> bytes:
    """The whole body (up to `limit` + 1 bytes). botocore checks the length only when a read
    comes back empty: a server closing mid-body gives a short read and no error, which
    would be refused for good as a wrong size or hash instead of fetched again."""
    data = bytes(response["Body"].read(limit + 1))
    expected = response.get("ContentLength")
    if expected is not None and len(data) < min(int(expected), limit + 1):
        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=int(expected))
    return data


def _channel(pointer: ChannelPointer) -> str:
    """The key of a pointer's channel in the store's promotions."""
    return f"{pointer.name}/{pointer.channel}"
