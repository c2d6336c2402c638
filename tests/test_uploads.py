"""Captures to S3 over real HTTP (moto's server) from the real daemon: outages, a full
disk budget, a SIGKILL in the middle of a multipart upload."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent import uploader as uploader_module
from agent.capture import Capturer
from agent.config import UploadConfig
from agent.contract.captures import CaptureSidecar, ManifestLine, UploadNotice
from agent.contract.messages import Topics
from agent.engine.classifier import ColourModel
from agent.engine.detector import Detector
from agent.outbox import Outbox
from agent.policy import Policy
from agent.sources import Frame
from agent.spool import Spool
from agent.uploader import Uploader
from tests.agentproc import AgentProcess, Subscriber, agent_settings, write_config, write_frames
from tests.broker import Broker
from tests.netproxy import Proxy

FREE = {"per_minute": 100000, "per_hour": 100000, "per_day": 100000}


def upload_settings(bucket: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "bucket": bucket,
        "prefix": "fleet",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "retry_max_s": 0.5,
        "dedupe_diff": 0.0,
        "sample_fraction": 1.0,
        "limits": {c: dict(FREE) for c in ("snapshot", "flagged", "near_threshold", "sample")},
        "spool_keep_free_bytes": 0,  # a CI disk may be nearly full; test_spool tests the reserve
        **extra,
    }


@dataclass(frozen=True)
class S3:
    client: Any
    bucket: str
    port: int


@pytest.fixture
def target(s3: Any, s3_bucket: str, moto_server: str) -> S3:
    return S3(s3, s3_bucket, int(moto_server.rsplit(":", 1)[1]))


def keys(s3: Any, bucket: str, suffix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(suffix)]


def wait(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def spool_files(spool: Path) -> int:
    total = 0
    for path in spool.glob("*"):
        if path.suffix in (".jpg", ".png", ".json", ".tmp"):
            with contextlib.suppress(FileNotFoundError):  # uploaded or evicted meanwhile
                total += path.stat().st_size
    return total


def spooled_offline(
    tmp: Path, model: Path, broker: Broker, target: S3, *, device: str, frames: int
) -> Spool:
    """A finished run whose S3 was unreachable throughout: every capture waits in the spool."""
    write_frames(tmp / "frames", frames)
    proxy = Proxy(target.port)
    proxy.cut()
    settings = agent_settings(
        tmp, model, broker.port, tmp / "frames", device=device,
        upload=upload_settings(target.bucket, proxy.url),
    )  # fmt: skip
    try:
        first = AgentProcess(write_config(tmp / "a.toml", settings), "--exit-when-done")
        assert first.wait(60) == 0, first.text()
    finally:
        proxy.close()
    return Spool(tmp / "state" / "spool", 1 << 30)


def direct_uploader(
    state: Path, spool: Spool, target: S3, device: str, **extra: Any
) -> tuple[Uploader, Outbox]:
    """An uploader in this process (so a test can wrap its methods) on S3 direct."""
    endpoint = f"http://127.0.0.1:{target.port}"
    config = UploadConfig(**upload_settings(target.bucket, endpoint, **extra))
    outbox = Outbox(state / "outbox.sqlite")
    topics = Topics(f"corrosion/{device}/")
    return Uploader(config, device_id=device, spool=spool, outbox=outbox, topics=topics), outbox


def manifest_line(bucket: str, device: str, frame_id: str, at: datetime) -> str:
    """An hourly manifest's line for a capture uploaded earlier."""
    stem = f"s3://{bucket}/fleet/captures/{device}/{frame_id}"
    return ManifestLine(
        source_ref=f"{stem}.jpg",
        frame_id=frame_id,
        device_id=device,
        category="flagged",
        corrosion_pct=3.0,
        model_version="test-rgb@1.0.0",
        captured_at=at,
        sidecar_ref=f"{stem}.json",
    ).model_dump_json(by_alias=True)


def spool_rows(state: Path) -> int:
    db = state / "spool" / "spool.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return int(con.execute("SELECT COUNT(*) FROM captures").fetchone()[0])
    except sqlite3.OperationalError:  # the daemon is still creating it
        return 0


def test_s3_outage_spools_then_delivers_everything(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    s3, s3_bucket = target.client, target.bucket
    frames = tmp_path / "frames"
    names = write_frames(frames, 30)
    proxy = Proxy(target.port)
    proxy.cut()  # S3 unreachable from the start
    settings = agent_settings(
        tmp_path,
        logistic_model,
        broker.port,
        frames,
        device="up-dev",
        upload=upload_settings(s3_bucket, proxy.url),
    )
    sub = Subscriber(broker.port, ["corrosion/up-dev/#"], client_id="up-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    try:
        assert wait(lambda: spool_rows(tmp_path / "state") == 30), agent.text()
        assert keys(s3, s3_bucket, ".jpg") == []
        proxy.restore()
        assert wait(lambda: len(keys(s3, s3_bucket, ".json")) == 30, 60), agent.text()
        assert wait(lambda: len(sub.payloads("/uploads")) == 30)
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    finally:
        agent.stop()
        proxy.close()
        sub.close()
    assert "S3 fleet" not in agent.text()  # the bucket is named, never credentials
    assert "testing" not in agent.text()
    images = keys(s3, s3_bucket, ".jpg")
    assert len(images) == 30 and len(keys(s3, s3_bucket, ".mask.png")) == 30
    originals = {hashlib.sha256((frames / n).read_bytes()).hexdigest() for n in names}
    for key in images:
        head = s3.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        assert head["ChecksumCRC32"] == crc
        assert hashlib.sha256(body).hexdigest() in originals  # the JPEG byte for byte
        assert head["Metadata"]["device"] == "up-dev" and head["Metadata"]["category"]
        assert key.startswith("fleet/captures/up-dev/")
        sidecar = CaptureSidecar.model_validate_json(
            s3.get_object(Bucket=s3_bucket, Key=key[: -len(".jpg")] + ".json")["Body"].read()
        )
        assert sidecar.image.key == key and sidecar.image.original
        assert sidecar.detection.upload_key == key
    notices = [UploadNotice.model_validate(p) for p in sub.payloads("/uploads")]
    assert {n.image_key for n in notices} == set(images)
    detections = sub.payloads("/detections")
    assert {d["upload_key"] for d in detections} == set(images)
    lines = [
        ManifestLine.model_validate(json.loads(line))
        for key in keys(s3, s3_bucket, ".jsonl")
        for line in s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read().splitlines()
    ]
    assert sorted(line.source_ref for line in lines) == sorted(
        f"s3://{s3_bucket}/{k}" for k in images
    )
    transform = [
        json.loads(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        for key in keys(s3, s3_bucket, ".manifest")
    ]
    assert all(t[0] == {"prefix": f"s3://{s3_bucket}/"} for t in transform)
    assert sorted(k for t in transform for k in t[1:]) == sorted(images)
    assert spool_rows(tmp_path / "state") == 0


def test_flood_with_small_disk_budget(tmp_path: Path, logistic_model: Path, broker: Broker) -> None:
    frames = tmp_path / "frames"
    write_frames(frames, 80)
    budget = 100_000
    settings = agent_settings(
        tmp_path,
        logistic_model,
        broker.port,
        frames,
        device="flood-dev",
        upload=upload_settings("nowhere", "http://127.0.0.1:9", spool_max_bytes=budget),
        classifier={"flag_pct": 6.0},  # about half the frames are flagged
    )
    settings["source"]["max_fps"] = 40.0
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    spool = tmp_path / "state" / "spool"
    peak = 0
    while agent.proc.poll() is None:
        if spool.exists():
            peak = max(peak, spool_files(spool))
        time.sleep(0.02)
    assert agent.wait(5) == 0, agent.text()
    assert peak <= budget
    with sqlite3.connect(spool / "spool.sqlite") as con:
        counters = dict(con.execute("SELECT name, value FROM counters").fetchall())
        kept = dict(
            con.execute("SELECT category, COUNT(*) FROM captures GROUP BY category").fetchall()
        )
    evicted = {k.split(".")[1]: v for k, v in counters.items() if k.startswith("evicted.")}
    refused = {k.split(".")[1]: v for k, v in counters.items() if k.startswith("refused.")}
    # every frame was captured (sample_fraction 1): each one is kept, evicted or refused
    assert sum(kept.values()) + sum(evicted.values()) + sum(refused.values()) == 80
    assert evicted.get("sample", 0) > 0
    # flagged frames go last: none evicted while a sample was left to evict
    assert kept.get("flagged", 0) >= kept.get("sample", 0)
    assert "capture(s)" in agent.text() and "wait in the spool" in agent.text()


def big_jpeg(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2400, 3200, 3), dtype=np.uint8)
    noise[:, :1600] = (40, 70, 160)  # half rust-brown: flagged
    cv2.imwrite(str(path), noise, [cv2.IMWRITE_JPEG_QUALITY, 100])
    return path.read_bytes()


def test_sigkill_during_multipart_upload(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    s3, s3_bucket = target.client, target.bucket
    frames = tmp_path / "frames"
    frames.mkdir()
    original = big_jpeg(frames / "big.jpg")
    assert len(original) > 6 * 1024 * 1024  # two parts of 5 MiB
    proxy = Proxy(target.port, rate=4 * 1024 * 1024)  # a slow uplink
    settings = agent_settings(
        tmp_path,
        logistic_model,
        broker.port,
        frames,
        device="mpu-dev",
        upload=upload_settings(s3_bucket, proxy.url, multipart_mb=5),
    )
    cfg = write_config(tmp_path / "a.toml", settings)
    agent = AgentProcess(cfg)

    def parts_in_flight() -> bool:
        uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        return any(
            s3.list_parts(Bucket=s3_bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
            for u in uploads
        )

    try:
        assert wait(parts_in_flight, 60), agent.text()
        agent.signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        agent.stop()
    assert keys(s3, s3_bucket, ".jpg") == []  # nothing half-visible
    proxy.restore()  # full speed
    again = AgentProcess(cfg)
    try:
        assert wait(lambda: len(keys(s3, s3_bucket, ".json")) == 1, 60), again.text()
    finally:
        again.signal(signal.SIGTERM)
        again.wait(15)
        again.stop()
        proxy.close()
    images = keys(s3, s3_bucket, ".jpg")
    assert len(images) == 1
    body = s3.get_object(Bucket=s3_bucket, Key=images[0])["Body"].read()
    assert body == original
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert "aborted an unfinished upload" in again.text()


def test_an_s3_error_response_is_retried_not_fatal(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    """boto3 wraps an error answer to an upload (here NoSuchBucket) in S3UploadFailedError,
    which once ended the upload thread for good: captures then waited for a restart."""
    s3, bucket = target.client, f"{target.bucket}-late"
    write_frames(tmp_path / "frames", 10)
    endpoint = f"http://127.0.0.1:{target.port}"
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="late-dev",
        upload=upload_settings(bucket, endpoint),
    )  # fmt: skip
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    try:
        assert wait(lambda: spool_rows(tmp_path / "state") == 10), agent.text()
        assert wait(lambda: "NoSuchBucket" in agent.text()), agent.text()
        s3.create_bucket(Bucket=bucket)  # someone fixes the bucket: uploads resume
        assert wait(lambda: len(keys(s3, bucket, ".json")) == 10, 60), agent.text()
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    finally:
        agent.stop()
    assert "Traceback" not in agent.text()
    assert spool_rows(tmp_path / "state") == 0


def test_a_torn_manifest_line_is_dropped_and_the_rest_goes_up(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    """A power cut mid-append leaves half a line in the hour's manifest; it once made the
    uploader spin, re-uploading the file in a loop."""
    s3, bucket = target.client, target.bucket
    write_frames(tmp_path / "frames", 5)
    hour = time.strftime("%Y%m%d%H", time.gmtime())
    manifests = tmp_path / "state" / "spool" / "manifests"
    manifests.mkdir(parents=True)
    hour_start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    good = manifest_line(bucket, "torn-dev", "e" * 32, hour_start)
    (manifests / f"{hour}.jsonl").write_text(good + "\n" + good[:40])
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="torn-dev",
        upload=upload_settings(bucket, f"http://127.0.0.1:{target.port}"),
    )  # fmt: skip
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    assert "1 unreadable line(s) dropped" in agent.text()
    (key,) = keys(s3, bucket, ".jsonl")
    lines = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()
    frames = [ManifestLine.model_validate_json(line).frame_id for line in lines]
    assert frames[0] == "e" * 32 and len(frames) == 6  # the good line and the 5 new ones
    (transform,) = keys(s3, bucket, ".manifest")
    body = json.loads(s3.get_object(Bucket=bucket, Key=transform)["Body"].read())
    assert len(body) == 1 + 6


def test_sigterm_cuts_a_finished_runs_upload_drain_short(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    """A finished --exit-when-done run waits up to a minute for S3 to take its captures; a
    SIGTERM then (systemctl stop, docker stop) once killed the process on the spot, since
    the default handler was back: no `stopped` status, no log line."""
    write_frames(tmp_path / "frames", 3)
    crawl = Proxy(target.port, rate=200)  # reachable, but an upload takes minutes
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="drain-dev",
        upload=upload_settings(target.bucket, crawl.url),
    )  # fmt: skip
    sub = Subscriber(broker.port, ["corrosion/drain-dev/status"], client_id="drain-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    try:
        assert wait(lambda: "source done: up to 60 s for S3" in agent.text()), agent.text()
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0, agent.text()
        assert sub.wait_for(lambda: "stopped" in [p["state"] for p in sub.payloads("status")])
    finally:
        agent.stop()
        crawl.close()
        sub.close()
    assert "SIGTERM: stopping" in agent.text() and "stopped: 3 frames" in agent.text()


def test_the_hours_manifest_goes_up_every_manifest_every_s_not_after_each_capture(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3, *,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Whenever the spool ran empty (a device keeping up: after each capture) the whole
    hour's manifest and its Batch Transform twin went up again: 529 MB of re-uploads for an
    hour's 1,500 captures (bench/soak.py), on a drone's cellular link."""
    spool = spooled_offline(tmp_path, logistic_model, broker, target, device="hourly-dev", frames=8)
    real_next, real_put = Spool.next, Uploader._put
    turns = iter(range(1 << 20))
    puts: list[str] = []

    def keeping_up(self: Spool) -> Any:  # one capture, then an empty spool, as in the field
        return real_next(self) if next(turns) % 2 == 0 else None

    def put(self: Uploader, path: Path, key: str, *args: Any) -> None:
        puts.append(key)
        real_put(self, path, key, *args)

    monkeypatch.setattr(Spool, "next", keeping_up)
    monkeypatch.setattr(Uploader, "_put", put)
    uploader, outbox = direct_uploader(tmp_path / "state", spool, target, "hourly-dev")
    uploader.start()
    try:
        assert wait(lambda: len(keys(target.client, target.bucket, ".json")) == 8, 30)
    finally:
        assert uploader.stop(5)
    uploader.flush()  # as the daemon does at stop
    # with the first capture (so what an earlier run left waits no longer), then at stop
    assert sum(k.endswith(".jsonl") for k in puts) == 2, puts
    (key,) = keys(target.client, target.bucket, ".jsonl")
    body = target.client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
    assert len(body.splitlines()) == 8
    spool.close()
    outbox.close()


def test_manifest_lines_survive_a_missing_newline_and_a_newer_schema(tmp_path: Path) -> None:
    """A complete last line cut before its newline once merged with the next append (both
    then dropped), and a line this version cannot validate was thrown away, here and on S3."""
    from agent.uploader import _append, _field

    path = tmp_path / "2026112114.jsonl"
    newer = json.dumps({"source-ref": "s3://b/k0.jpg", "frame-id": "0" * 32, "new-field": 1})
    last = json.dumps({"source-ref": "s3://b/k1.jpg", "frame-id": "1" * 32})
    path.write_text(newer + "\n" + last)  # no newline after the last line
    _append(path, json.dumps({"source-ref": "s3://b/k2.jpg", "frame-id": "2" * 32}))
    refs = _field(path, "source-ref")
    assert refs == ["s3://b/k0.jpg", "s3://b/k1.jpg", "s3://b/k2.jpg"]
    assert path.read_text().startswith(newer + "\n")  # kept byte for byte


def test_an_unreadable_sidecar_drops_its_capture_and_uploads_go_on(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3
) -> None:
    """A sidecar this version cannot read is counted lost, never retried, and the rest of
    the spool goes up."""
    write_frames(tmp_path / "frames", 4)
    proxy = Proxy(target.port)
    proxy.cut()
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="side-dev",
        upload=upload_settings(target.bucket, proxy.url),
    )  # fmt: skip
    cfg = write_config(tmp_path / "a.toml", settings)
    try:
        first = AgentProcess(cfg, "--exit-when-done")
        assert first.wait(60) == 0, first.text()
        spool = tmp_path / "state" / "spool"
        sidecars = sorted(p for p in spool.glob("*.json") if p.stem != "spool")
        assert len(sidecars) == 4
        sidecars[0].write_text('{"schema_version": "9.0"')  # cut, and of no known version
        proxy.restore()
        again = AgentProcess(cfg, "--exit-when-done")
        assert again.wait(60) == 0, again.text()
    finally:
        proxy.close()
    assert f"capture {sidecars[0].stem} unusable" in again.text()
    assert len(keys(target.client, target.bucket, ".json")) == 3
    assert spool_rows(tmp_path / "state") == 0


def test_a_capture_that_always_fails_holds_up_no_other(
    tmp_path: Path, logistic_model: Path, broker: Broker, target: S3, *,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The spool hands out the most important, oldest capture first; one S3 refused every
    time (a key a bucket policy denies) was retried at the head of the queue forever."""
    from botocore.exceptions import ClientError

    spool = spooled_offline(tmp_path, logistic_model, broker, target, device="hol-dev", frames=4)
    state = tmp_path / "state"
    poison = spool.next()
    assert poison is not None and spool.depth == 4
    real_put = Uploader._put

    def put(self: Uploader, path: Path, key: str, *args: Any) -> None:
        if poison.frame_id in key:
            denied = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
            raise ClientError(denied, "PutObject")
        real_put(self, path, key, *args)

    monkeypatch.setattr(Uploader, "_put", put)
    uploader, outbox = direct_uploader(state, spool, target, "hol-dev")
    uploader.start()
    try:
        assert wait(lambda: len(keys(target.client, target.bucket, ".json")) >= 3, 30)
    finally:
        assert uploader.stop(5)
    assert spool.depth == 1 and spool.next() is None  # the poison waits its turn
    # S3 down with that one capture left: between its tries none is due, which is no sign of
    # S3 being back (it read as one, reset the back-off and logged it at every try).
    spool.due_now()
    for manifest in (state / "spool" / "manifests").glob("*"):  # nothing left to flush
        manifest.unlink()
    dead = UploadConfig(**upload_settings(target.bucket, "http://127.0.0.1:9", max_attempts=1))
    uploader = Uploader(
        dead, device_id="hol-dev", spool=spool, outbox=outbox, topics=Topics("corrosion/hol/")
    )
    with caplog.at_level(logging.INFO, logger="agent.uploader"):
        uploader.start()
        time.sleep(3.0)
        assert uploader.stop(5)
    assert not uploader.reachable and "reachable again" not in caplog.text
    spool.close()
    outbox.close()


def spooled_here(
    state: Path, model: Path, target: S3, *, device: str, frames: int, when: datetime
) -> Spool:
    """Captures spooled by the frame loop's own code (Capturer), in this process: quicker
    than a finished offline run when the test is about the uploader alone."""
    config = UploadConfig(**upload_settings(target.bucket, f"http://127.0.0.1:{target.port}"))
    spool = Spool(state / "spool", 1 << 30)
    capturer = Capturer(
        config, device_id=device, policy=Policy(config), spool=spool, on_stored=lambda: None
    )
    detector = Detector(ColourModel.load(model))
    for i, name in enumerate(write_frames(state / "frames", frames)):
        data = (state / "frames" / name).read_bytes()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        frame = Frame(image, (image.shape[1], image.shape[0]), i, "t", when, None, data, 0.0, name)
        analysis = detector.analyse(image)
        message = analysis.message(device_id=device, source="t", frame_index=i, captured_at=when)
        capturer.release(capturer.consider(frame, analysis, message))
    assert spool.depth == frames
    return spool


def test_a_manifest_folder_cleaned_away_is_made_again_and_nothing_goes_up_twice(
    tmp_path: Path, logistic_model: Path, target: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm -rf spool/*` while the agent runs: a missing manifest was taken for a capture file
    evicted mid-upload, so the same capture went up again and again without a pause (152
    times in 5 s)."""
    state = tmp_path / "state"
    now = datetime.now(UTC)
    spool = spooled_here(state, logistic_model, target, device="rm-dev", frames=2, when=now)
    puts: list[str] = []
    real_put = Uploader._put

    def put(self: Uploader, path: Path, key: str, *args: Any) -> None:
        puts.append(key)
        real_put(self, path, key, *args)

    monkeypatch.setattr(Uploader, "_put", put)
    uploader, outbox = direct_uploader(state, spool, target, "rm-dev")
    shutil.rmtree(state / "spool" / "manifests")
    uploader.start()
    try:
        assert wait(lambda: spool.depth == 0, 20)
    finally:
        assert uploader.stop(5)
    images = [k for k in puts if k.endswith(".jpg")]
    assert len(images) == len(set(images)) == 2
    assert (state / "spool" / "manifests" / f"{now:%Y%m%d%H}.jsonl").is_file()
    spool.close()
    outbox.close()


def test_an_hours_manifest_gone_before_its_upload_holds_up_no_other(
    tmp_path: Path, target: S3, caplog: pytest.LogCaptureFixture
) -> None:
    """A dirty manifest file cleaned away made every flush fail on it: the hours after it
    never went up, and finished hours were never cleaned up."""
    state = tmp_path / "state"
    spool = Spool(state / "spool", 1 << 30)
    manifests = state / "spool" / "manifests"
    manifests.mkdir()
    line = manifest_line(target.bucket, "gone-dev", "f" * 32, datetime(2026, 1, 1, 11, tzinfo=UTC))
    for hour in ("2026010110", "2026010111"):
        (manifests / f"{hour}.jsonl").write_text(line + "\n")
    uploader, outbox = direct_uploader(state, spool, target, "gone-dev")  # both dirty
    (manifests / "2026010110.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="agent.uploader"):
        uploader.start()
        try:
            assert wait(lambda: len(keys(target.client, target.bucket, ".jsonl")) == 1, 20)
        finally:
            assert uploader.stop(5)
    (key,) = keys(target.client, target.bucket, ".jsonl")
    assert "2026/01/01/11" in key or "2026010111" in key, key
    assert "2026010110.jsonl gone before its upload" in caplog.text
    assert not list(manifests.glob("*.jsonl"))  # the finished hour, uploaded, cleaned up
    spool.close()
    outbox.close()


def test_a_disk_fault_on_the_manifest_is_named_and_not_taken_for_s3(
    tmp_path: Path, logistic_model: Path, target: S3, *,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """An fsync of the hour's manifest failing (EIO: a dying SD card) names no file, so it
    was logged as "S3 <bucket>: [Errno 5] ...", metrics said S3 unreachable, and the
    uploader went into outage mode while S3 took every request."""
    state = tmp_path / "state"
    now = datetime.now(UTC)
    spool = spooled_here(state, logistic_model, target, device="eio-dev", frames=1, when=now)
    faults = [OSError(errno.EIO, "Input/output error")]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if faults:
            raise faults.pop()
        real_fsync(fd)

    monkeypatch.setattr("agent.uploader.os.fsync", fsync)
    rewritten: list[Path] = []
    real_replace = uploader_module.replace_file

    def replace_file(path: Path, data: bytes) -> None:
        rewritten.append(path)
        real_replace(path, data)

    monkeypatch.setattr(uploader_module, "replace_file", replace_file)
    uploader, outbox = direct_uploader(state, spool, target, "eio-dev", manifest_every_s=1.0)
    with caplog.at_level(logging.WARNING, logger="agent.uploader"):
        uploader.start()
        try:
            assert wait(lambda: spool.depth == 0, 20)  # the next try, once the disk is back
            # and the line reaches S3: the retry found it in the file and left it unflushed
            assert wait(lambda: keys(target.client, target.bucket, ".jsonl"), 20)
        finally:
            assert uploader.stop(5)
    manifest = state / "spool" / "manifests" / f"{now:%Y%m%d%H}.jsonl"
    assert f"capture upload: {manifest}: Input/output error" in caplog.text
    assert f"S3 {target.bucket}" not in caplog.text
    assert uploader.reachable
    assert len(manifest.read_text().splitlines()) == 1
    # made durable again before the capture left the spool: the retry found the line in the
    # page cache and fsynced nothing, the rule "durable before the spool forgets it" broken
    assert rewritten == [manifest]
    (key,) = keys(target.client, target.bucket, ".jsonl")
    body = target.client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
    assert body == manifest.read_bytes()
    spool.close()
    outbox.close()


def test_unfinished_uploads_are_aborted_once_s3_answers_after_an_offline_start(
    tmp_path: Path, target: S3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that starts out of coverage tried once, logged "skipped", and left the parts
    a killed agent had sent in the bucket (billed) for good."""
    s3, bucket = target.client, target.bucket
    key = "fleet/captures/off-dev/2026/01/01/" + "a" * 32 + ".jpg"
    stale = s3.create_multipart_upload(Bucket=bucket, Key=key)
    s3.upload_part(Bucket=bucket, Key=key, UploadId=stale["UploadId"], PartNumber=1, Body=b"x")
    monkeypatch.setattr("agent.uploader.ABORT_RETRY_S", 0.5)
    proxy = Proxy(target.port)
    proxy.cut()
    try:
        config = UploadConfig(**upload_settings(bucket, proxy.url, max_attempts=1))
        spool = Spool(tmp_path / "spool", 1 << 30)
        outbox = Outbox(tmp_path / "outbox.sqlite")
        uploader = Uploader(
            config, device_id="off-dev", spool=spool, outbox=outbox, topics=Topics("c/off-dev/")
        )
        with caplog.at_level(logging.WARNING, logger="agent.uploader"):
            uploader.start()
            try:
                time.sleep(2.0)  # tried, offline, a few times: said once
                assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
                proxy.restore()
                assert wait(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), 20)
            finally:
                assert uploader.stop(5)
        assert caplog.text.count("cannot list unfinished uploads") == 1
    finally:
        proxy.close()
    spool.close()
    outbox.close()
