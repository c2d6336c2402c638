"""Drains the spool to S3 on its own thread; a dead S3 slows nothing and loses nothing.

Per capture: the image, then the mask, then the sidecar (its presence marks a complete
capture), each with an S3 checksum and metadata, through boto3's managed transfer
(multipart above `multipart_mb`, botocore's standard retry mode underneath). Then a
notice on `uploads` and a line in the hour's JSON Lines manifest, re-uploaded whole every
`manifest_every_s` while the hour's captures come in (re-uploaded after each capture, an
hour's manifests grew with the square of its captures: 529 MB for 1,500, bench/soak.py).
When S3 cannot be reached the uploader waits with full-jitter backoff up to `retry_max_s`
and the captures wait on disk. Multipart uploads left unfinished by a killed agent are
aborted at start (or once S3 answers, for a device that starts offline); the capture is then
sent again whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from agent.backoff import full_jitter
from agent.config import UploadConfig
from agent.contract.captures import (
    IMAGE_SUFFIX,
    MASK_SUFFIX,
    SIDECAR_SUFFIX,
    TRANSFORM_SUFFIX,
    CaptureSidecar,
    ManifestLine,
    UploadNotice,
    capture_manifest_key,
    capture_stem,
    captures_prefix,
)
from agent.contract.messages import Topics
from agent.durable import replace_file
from agent.outbox import Outbox
from agent.s3 import describe_error, error_code, s3_client
from agent.spool import Spool, Spooled

log = logging.getLogger(__name__)

# What S3 or the link can answer an upload with: boto3 wraps an error reply to upload_file
# in S3UploadFailedError, which is neither a ClientError nor a BotoCoreError.
S3_ERRORS = (BotoCoreError, ClientError, S3UploadFailedError, OSError)
ABORT_RETRY_S = 300.0  # unfinished uploads not listed (S3 not there): try again this much later


# Error replies that speak for the whole bucket or link, not the one object: S3 in trouble,
# or credentials and the clock (a device without NTP) wrong. Captures wait these out.
_BUCKET_WIDE = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed", "ExpiredToken",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "RequestTimeout",
})  # fmt: skip


def _outage(exc: Exception) -> bool:
    """No answer at all, or an answer about the bucket or the link rather than one object."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(exc) in _BUCKET_WIDE or int(status) >= 500
    if isinstance(exc, S3UploadFailedError):  # an error reply, its code only in the text
        return any(code in str(exc) for code in _BUCKET_WIDE)
    return True


def _field(path: Path, name: str) -> list[str]:
    """Field `name` of each JSON object of a local hourly manifest, read a line at a time
    (an hour's dicts at once: a 33 MB peak for a 19,000-capture hour, 2 MB now). A line a
    power cut tore (not a JSON object) is dropped and the file replaced without it, so it
    neither blocks the upload nor spoils the next line; a line this version cannot validate
    (a newer agent's) stays."""
    values: list[str] = []
    torn = 0
    with path.open(errors="replace") as fh:
        for text in fh:
            record = _object(text)
            if record is None:
                torn += bool(text.strip())
            elif isinstance(value := record.get(name), str):
                values.append(value)
    if torn:
        log.warning("%s: %d unreadable line(s) dropped", path, torn)
        with path.open(errors="replace") as fh:
            kept = b"".join(line.encode() for line in fh if _object(line) is not None)
        replace_file(path, kept)
    return values


def _object(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@contextmanager
def _on_disk(path: Path) -> Iterator[None]:
    """Names `path` in an OSError that names no file (a write or fsync failing: EIO, ENOSPC):
    the uploader tells our disk from S3 by the name, and the log says which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _append(path: Path, line: str) -> None:
    """One line at the end of `path`, durable before the spool forgets its capture; a last
    line cut before its newline gets one first, so the two never run together."""
    with path.open("ab+") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(line.encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def transform_manifest(refs: list[str]) -> list[Any]:
    """The same captures (their source refs) as a Batch Transform ManifestFile:
    [{"prefix": ...}, key, ...].

    Transform jobs refuse augmented (JSON Lines) manifests, Ground Truth wants them: one
    list, two files. Keys are relative to the bucket root, which is the prefix.
    """
    if not refs:
        return []
    bucket = refs[0].split("/", 3)[2]
    keys = dict.fromkeys(ref.split("/", 3)[3] for ref in refs)
    return [{"prefix": f"s3://{bucket}/"}, *keys]


class Uploader:
    """Owns the upload thread; `stop` finishes the file in flight or gives up at its timeout."""

    def __init__(
        self,
        config: UploadConfig,
        *,
        device_id: str,
        spool: Spool,
        outbox: Outbox,
        topics: Topics,
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.spool = spool
        self.outbox = outbox
        self.topics = topics
        self.s3 = s3_client(config.endpoint_url, config.region, config.max_attempts)
        mib = config.multipart_mb * 1024 * 1024
        # Parts go up one after another in this (daemon) thread: s3transfer's worker threads
        # are not daemons, and one stuck on a slow uplink held the process past SIGTERM's 10 s.
        self.transfer = TransferConfig(
            multipart_threshold=mib, multipart_chunksize=mib, use_threads=False
        )
        self.manifests = spool.dir / "manifests"
        self.manifests.mkdir(exist_ok=True)
        self._dirty: set[Path] = set(self.manifests.glob("*.jsonl"))
        self._frame_ids: dict[Path, set[str]] = {}  # of each hour's file, once read
        self._unsynced: set[Path] = set()  # a write or fsync failed: rewritten before use
        self._manifest_at = -math.inf  # a start uploads what an earlier run left dirty
        self.reachable = True
        self._outage = False  # no answer, or one about the bucket, since the last it took
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def start(self) -> None:
        self._all_due(held=True)  # a new start is a new chance: put-back captures go first
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 3.0) -> bool:
        """True if the thread ended; if not (a slow upload), the next start sends it again."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        attempt = 0
        abort_at: float | None = time.monotonic()  # when to abort unfinished uploads; None: done
        abort_tries = 0
        while not self._stop.is_set():
            if abort_at is not None and time.monotonic() >= abort_at:
                abort_at = self._abort_stale_multipart(first=abort_tries == 0)
                abort_tries += 1
            capture = None
            try:
                capture = self.spool.next()
                talked = capture is not None and self._upload(capture)  # did S3 answer?
                if time.monotonic() - self._manifest_at >= self.config.manifest_every_s:
                    talked = self._flush_manifests() or talked
            except S3_ERRORS as exc:
                if capture is not None and self._gone(capture, exc):  # evicted, cleaned away:
                    log.warning("capture file gone during upload: %s", exc)  # the next look
                    continue  # finds the capture incomplete and counts it lost
                delay = full_jitter(attempt, 1.0, self.config.retry_max_s)
                if capture is not None:  # past the back-off, the next capture goes first:
                    later = delay + full_jitter(capture.attempts, 1.0, self.config.retry_max_s)
                    self._put_back(capture, later)  # one S3 refuses every time blocks no other
                self._failed(exc, delay, first=attempt == 0)
                attempt = self._back_off(attempt, delay)
                continue
            except Exception:  # a bug or an outbox error must not end uploads for good
                log.exception("upload failed; retrying")
                attempt = self._back_off(attempt)
                continue
            if talked:  # nothing due and nothing to flush proves nothing about S3
                self._answered()
                attempt = 0
            if capture is None:
                self._wake.wait(1.0)
                self._wake.clear()

    def _gone(self, capture: Spooled, exc: Exception) -> bool:
        """A file of the capture itself is missing: nothing to retry. Any other file missing
        (a manifest, the folder cleaned away under us) is our disk's fault and waits."""
        own = {str(p) for p in self.spool.paths(capture.frame_id)}
        return isinstance(exc, FileNotFoundError) and exc.filename in own

    def _failed(self, exc: Exception, delay: float, *, first: bool) -> None:
        if isinstance(exc, OSError) and exc.filename is not None:  # our disk, not S3
            log.error("capture upload: %s: %s; retrying in %.0f s",
                      exc.filename, exc.strerror or exc, delay)  # fmt: skip
            return
        if self.reachable or first:
            log.warning(
                "S3 %s: %s; %d capture(s) wait in the spool, retrying in %.0f s",
                self.config.bucket,
                describe_error(exc),
                self.spool.depth,
                delay,
            )
        self.reachable = False
        self._outage = self._outage or _outage(exc)

    def _answered(self) -> None:
        """S3 took a request: after an outage, what waited it out goes now."""
        if self._outage:
            log.info("S3 %s reachable again", self.config.bucket)
            self._all_due()
            self._outage = False
        self.reachable = True

    def _all_due(self, *, held: bool = False) -> None:
        try:
            self.spool.due_now(held=held)
        except sqlite3.Error as exc:  # a full disk: they come as their own retries fall due
            log.error("spool: cannot make waiting captures due: %s", exc)

    def _put_back(self, capture: Spooled, delay_s: float) -> None:
        try:
            self.spool.retry_later(capture.frame_id, delay_s)
        except sqlite3.Error as exc:  # a full disk must not end uploads: it is tried next
            log.error("spool: cannot put capture %s back: %s", capture.frame_id, exc)

    @property
    def draining(self) -> bool:
        """A finished run may wait for uploads: a capture is due and S3 is not in an outage."""
        return not self._outage and self.spool.due() > 0

    def _back_off(self, attempt: int, delay: float | None = None) -> int:
        """Wait before the next try (a stop cuts it short); the next attempt number."""
        if delay is None:
            delay = full_jitter(attempt, 1.0, self.config.retry_max_s)
        self._wake.clear()
        self._stop.wait(delay)
        return attempt + 1

    def _abort_stale_multipart(self, *, first: bool) -> float | None:
        """Best effort: without s3:ListBucketMultipartUploads, uploads must still go on. When
        to try again: S3 not there (a device that starts offline) is no reason to leave the
        parts billed for good; None once done, or refused."""
        try:
            self._abort_multipart()
        except (BotoCoreError, ClientError) as exc:
            if not _outage(exc):  # an answer about this request (AccessDenied): for good
                log.warning("cannot list unfinished uploads (%s); skipped", describe_error(exc))
                return None
            if first:
                log.warning("cannot list unfinished uploads (%s); trying again in %.0f s",
                            describe_error(exc), ABORT_RETRY_S)  # fmt: skip
            return time.monotonic() + ABORT_RETRY_S
        return None

    def _abort_multipart(self) -> None:
        """A killed agent leaves parts nobody will complete (and S3 bills for)."""
        prefix = captures_prefix(self.config.prefix, self.device_id)
        paginator = self.s3.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.config.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.s3.abort_multipart_upload(
                    Bucket=self.config.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                log.info("aborted an unfinished upload of %s", upload["Key"])

    def _upload(self, capture: Spooled) -> bool:
        """Upload one capture; False if it was dropped without asking S3 anything."""
        image, sidecar_path, mask = self.spool.paths(capture.frame_id)
        needed = [image, sidecar_path] + ([mask] if capture.has_mask else [])
        if not all(path.is_file() for path in needed):
            self.spool.lost(capture.frame_id, capture.category)
            return False
        try:
            sidecar = CaptureSidecar.model_validate_json(sidecar_path.read_bytes())
        except ValueError as exc:  # a sidecar this version cannot read: never retried
            log.error("capture %s unusable: %s", capture.frame_id, exc)
            self.spool.lost(capture.frame_id, capture.category)
            return False
        stem = capture_stem(
            self.config.prefix, self.device_id, capture.captured_at, capture.frame_id
        )
        detection = sidecar.detection
        metadata = {
            "device": self.device_id,
            "model-version": f"{sidecar.model.name}@{sidecar.model.version}",
            "corrosion-pct": f"{detection.corrosion_pct:.4f}",
            "category": capture.category,
            "frame-id": capture.frame_id,
        }
        self._put(image, stem + IMAGE_SUFFIX, sidecar.image.content_type, metadata)
        mask_key = None
        if capture.has_mask:
            mask_key = stem + MASK_SUFFIX
            self._put(mask, mask_key, "image/png", metadata)
        self._put(sidecar_path, stem + SIDECAR_SUFFIX, "application/json", metadata)
        # The manifest line and the notice go before the spool forgets the capture: a crash
        # in between repeats them (subscribers and the manifest deduplicate on frame_id).
        self._add_to_manifest(sidecar, stem)
        notice = UploadNotice(
            device_id=self.device_id,
            frame_id=capture.frame_id,
            category=capture.category,
            bucket=self.config.bucket,
            image_key=stem + IMAGE_SUFFIX,
            sidecar_key=stem + SIDECAR_SUFFIX,
            mask_key=mask_key,
            corrosion_pct=detection.corrosion_pct,
        )
        self.outbox.put(self.topics.uploads, notice.model_dump_json().encode())
        self.spool.done(capture.frame_id, capture.category)
        return True

    def _put(self, path: Path, key: str, content_type: str, metadata: dict[str, str]) -> None:
        self.s3.upload_file(
            str(path),
            self.config.bucket,
            key,
            ExtraArgs={
                "ContentType": content_type,
                "Metadata": metadata,
                "ChecksumAlgorithm": self.config.checksum,
            },
            Config=self.transfer,
        )

    def _add_to_manifest(self, sidecar: CaptureSidecar, stem: str) -> None:
        bucket = self.config.bucket
        line = ManifestLine(
            source_ref=f"s3://{bucket}/{stem}{IMAGE_SUFFIX}",
            frame_id=sidecar.frame_id,
            device_id=self.device_id,
            category=sidecar.category,
            corrosion_pct=sidecar.detection.corrosion_pct,
            model_version=f"{sidecar.model.name}@{sidecar.model.version}",
            captured_at=sidecar.captured_at,
            sidecar_ref=f"s3://{bucket}/{stem}{SIDECAR_SUFFIX}",
        )
        hour = sidecar.captured_at.astimezone(UTC)
        path = self.manifests / f"{hour:%Y%m%d%H}.jsonl"
        body = None
        if not path.exists():  # a late capture of an hour already flushed: extend, not replace
            key = capture_manifest_key(self.config.prefix, self.device_id, hour)
            try:
                body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if error_code(exc) not in ("NoSuchKey", "404"):
                    raise
                body = b""
        if body is not None:
            self._frame_ids.pop(path, None)  # the ids of a file that is gone
        try:
            with _on_disk(path):
                if body is not None:  # the folder may be gone too (rm -rf spool/*)
                    self.manifests.mkdir(exist_ok=True)
                    path.write_bytes(body)
                ids = self._frame_ids.get(path)
                if ids is None:  # read once per hour's file, not once per capture
                    ids = self._frame_ids[path] = set(_field(path, "frame-id"))
                if path in self._unsynced:  # after an EIO the kernel may have marked the pages
                    replace_file(path, path.read_bytes())  # clean: a second fsync proves nothing
                    self._unsynced.discard(path)
                if sidecar.frame_id not in ids:  # else a repeat after a crash or a failed fsync
                    _append(path, line.model_dump_json(by_alias=True))
        except OSError:  # the line may be in the file or not: the retry reads it again
            self._frame_ids.pop(path, None)
            self._unsynced.add(path)
            raise
        ids.add(sidecar.frame_id)
        self._dirty.add(path)

    def _flush_manifests(self) -> bool:
        """Upload each changed hour's manifest whole; drop local files of finished hours.
        True if S3 took one (it answered)."""
        self._manifest_at = time.monotonic()
        flushed = bool(self._dirty)
        current = f"{datetime.now(UTC):%Y%m%d%H}"
        for path in sorted(self._dirty):
            hour = datetime.strptime(path.stem, "%Y%m%d%H").replace(tzinfo=UTC)
            key = capture_manifest_key(self.config.prefix, self.device_id, hour)
            meta = {"device": self.device_id}
            try:
                with _on_disk(path):
                    refs = _field(path, "source-ref")  # first: it drops a line a power cut tore
            except FileNotFoundError:  # cleaned away: it must not hold up the other hours
                log.warning("%s gone before its upload: the hour's manifest in S3 stays as "
                            "last uploaded", path)  # fmt: skip
                self._dirty.discard(path)
                self._frame_ids.pop(path, None)
                continue
            self._put(path, key, "application/x-ndjson", meta)
            transform = path.with_suffix(TRANSFORM_SUFFIX)
            with _on_disk(transform):
                transform.write_text(json.dumps(transform_manifest(refs)))
            self._put(
                transform, key.removesuffix(".jsonl") + TRANSFORM_SUFFIX, "application/json", meta
            )
            transform.unlink()
            self._dirty.discard(path)
        for path in self.manifests.glob("*.jsonl"):  # finished hours, all uploaded
            if path.stem < current and path not in self._dirty:
                path.unlink(missing_ok=True)
                self._frame_ids.pop(path, None)
        return flushed

    def flush(self) -> None:
        """At shutdown: the manifests of what was uploaded, if S3 is there."""
        if self._dirty and self.reachable:
            try:
                self._flush_manifests()
            except S3_ERRORS as exc:
                log.warning("could not upload capture manifests: %s", describe_error(exc))
