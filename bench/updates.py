"""Model swaps and capture uploads against a local S3 (moto's server in its own process).

Run as `make bench-updates`. swap_s: from `promote` (the channel pointer written) to the
first frame classified by the new model, with the poll interval excluded (the bench
asks for a check right after promoting, as the `pull-model` command does); it covers
fetching the pointer, manifest, ONNX and 16 MB table, every hash, the signature, the
load checks and the swap, while a frame loop keeps classifying 1080p frames. Median of
five promotions. uploads_per_s: 1080p JPEG captures (image, mask, sidecar, checksums)
drained from the spool by the uploader. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
import cv2
import numpy as np

from agent.capture import Capturer
from agent.config import CategoryLimits, ModelConfig, RateLimit, UploadConfig
from agent.contract.messages import Topics
from agent.contract.registry import RegistryUrl
from agent.engine.classifier import load_model
from agent.engine.detector import Detector
from agent.outbox import Outbox
from agent.policy import Policy
from agent.signing import trusted_keys
from agent.sources import Frame
from agent.spool import Spool
from agent.updater import ModelStore, Updater
from agent.uploader import Uploader
from export.registry import keygen, load_private_key, promote, publish
from tests.broker import free_port

N_UPLOADS = 60
SWAPS = 5


def warn(msg: str) -> None:
    print(f"bench/updates: {msg}", file=sys.stderr, flush=True)


def start_s3(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for _ in range(100):
        try:
            s3.list_buckets()
            return proc, url
        except Exception:  # not up yet
            time.sleep(0.1)
    sys.exit("bench/updates: moto server did not start")


def frames_1080p(data: Path) -> list[bytes]:
    folder = data / "corrosion-detector" / "rustnorust" / "train" / "rust"
    files = sorted(folder.glob("*.jpg"))[:12]
    if files:
        warn(f"frames: real rust photos from {folder}, resized to 1920x1080")
        images = [cv2.resize(cv2.imread(str(f)), (1920, 1080)) for f in files]
    else:
        warn(f"{folder} not found: synthetic frames")
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8) for _ in range(4)]
    return [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in images]


def bench_swaps(tmp: Path, endpoint: str, model: Path, frame: np.ndarray) -> list[float]:
    """Promote alternate versions of the demo model; time until a frame uses each."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="registry")
    url = RegistryUrl("registry", "reg")
    keygen(tmp / "keys")
    key = load_private_key(tmp / "keys" / "signing-key.pem")
    manifest = load_model(model / "manifest.json").manifest
    versions = []
    for i in range(SWAPS):
        version = f"{i + 2}.0.0"
        copy = tmp / f"model-{version}"
        copy.mkdir()
        for f in model.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        m = manifest.model_copy(update={"version": version})
        m.write(copy / "manifest.json")
        publish(s3, url, copy, key)
        versions.append(version)
    detector = Detector(load_model(model / "manifest.json"))
    config = ModelConfig(
        registry=url.uri(),
        endpoint_url=endpoint,
        region="us-east-1",
        public_keys=(tmp / "keys" / "signing-key.pub.pem",),
        poll_s=3600.0,
    )
    updater = Updater(
        config,
        keys=trusted_keys(config),
        store=ModelStore(tmp / "models"),
        detector=detector,
        load=load_model,
        serving=lambda: detector.model.ref,
        report=lambda _o: None,
    )
    seen: dict[str, float] = {}
    stop = threading.Event()

    def frame_loop() -> None:
        while not stop.is_set():
            version = detector.analyse(frame).model.version
            seen.setdefault(version, time.perf_counter())

    loop = threading.Thread(target=frame_loop)
    loop.start()
    updater.start()
    times = []
    try:
        for version in versions:
            start = time.perf_counter()
            promote(
                s3, url, manifest.name, version, "stable", public_keys=None, promoted_by="bench"
            )
            updater.pull()
            while version not in seen:
                time.sleep(0.002)
            times.append(seen[version] - start)
    finally:
        stop.set()
        loop.join()
        updater.stop()
    return times


def bench_uploads(tmp: Path, endpoint: str, model: Path, jpegs: list[bytes]) -> float:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="captures")
    free = RateLimit()
    config = UploadConfig(
        enabled=True,
        bucket="captures",
        endpoint_url=endpoint,
        region="us-east-1",
        sample_fraction=1.0,
        dedupe_diff=0.0,
        limits=CategoryLimits(snapshot=free, flagged=free, near_threshold=free, sample=free),
    )
    spool = Spool(tmp / "spool", 8 * 1024**3)
    outbox = Outbox(tmp / "outbox.sqlite")
    topics = Topics("corrosion/bench/")
    capturer = Capturer(
        config, device_id="bench", policy=Policy(config), spool=spool, on_stored=lambda: None
    )
    detector = Detector(load_model(model / "manifest.json"))
    for i in range(N_UPLOADS):
        data = jpegs[i % len(jpegs)]
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        frame = Frame(image, (1920, 1080), i, "bench", datetime.now(UTC), None, data, 0.0, "f")
        analysis = detector.analyse(image)
        message = analysis.message(
            device_id="bench", source="bench", frame_index=i, captured_at=frame.captured_at
        )
        capturer.release(capturer.consider(frame, analysis, message))  # as the frame loop does
    mb = spool.used / 1e6
    uploader = Uploader(config, device_id="bench", spool=spool, outbox=outbox, topics=topics)
    start = time.perf_counter()
    uploader.start()
    while spool.depth:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    uploader.stop()
    warn(f"uploaded {N_UPLOADS} captures, {mb:.1f} MB, in {elapsed:.2f} s")
    return N_UPLOADS / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", type=Path, default=Path("demo/model"))
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        sys.exit(f"bench/updates: no model at {args.model}: run `make demo` first")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    with tempfile.TemporaryDirectory(prefix="bench-updates-") as name:
        tmp = Path(name)
        proc, endpoint = start_s3(tmp)
        try:
            jpegs = frames_1080p(args.data)
            frame = cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)
            swaps = bench_swaps(tmp, endpoint, args.model, frame)
            rate = bench_uploads(tmp, endpoint, args.model, jpegs)
        finally:
            proc.terminate()
            proc.wait(10)
    swap = statistics.median(swaps)
    print(f"swaps                 {', '.join(f'{s:.3f}' for s in swaps)} s (median {swap:.3f})")
    print(f"uploads               {rate:.1f} captures/s (1080p JPEG + mask + sidecar)")
    print(f"swap_s={swap:.3f} uploads_per_s={rate:.1f}")


if __name__ == "__main__":
    main()
