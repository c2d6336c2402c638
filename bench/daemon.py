"""The whole daemon: 300 1080p JPEGs from a watched folder to PUBACKs from a real Mosquitto.

Run as `make bench-daemon`. Frames are real rust photos (DATA/corrosion-detector/rustnorust/
train/rust) resized to 1920x1080, or synthetic scenes when the data folder is absent (said
on stderr). The model is the demo model (`make demo`). Latency is from the moment the
source read the file to the broker's PUBACK of its DetectionMessage. The floor is what any
agent must spend on these frames: read and decode each JPEG (as the source does) and
encode one DetectionMessage, with no classification and no network. One core for the
lookup (classifier.threads = 1). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from agent import imageio
from agent.config import AgentConfig, OutboxConfig
from agent.contract import DetectionMessage
from agent.daemon import Agent
from agent.outbox import Outbox
from tests.agentproc import write_config
from tests.broker import Broker

N_FRAMES = 300
SIZE = (1920, 1080)


def warn(msg: str) -> None:
    print(f"bench/daemon: {msg}", file=sys.stderr, flush=True)


def photos(data: Path) -> list[np.ndarray]:
    folder = data / "corrosion-detector" / "rustnorust" / "train" / "rust"
    files = sorted(folder.glob("*.jpg"))
    if files:
        warn(f"frames: {len(files)} real rust photos from {folder}, resized to 1920x1080")
        return [cv2.resize(cv2.imread(str(f)), SIZE, interpolation=cv2.INTER_CUBIC) for f in files]
    warn(f"{folder} not found: synthetic scenes instead of real photos")
    from export.synthetic import make_scene

    rng = np.random.default_rng(3)
    return [make_scene(rng, SIZE[0], SIZE[1]).image for _ in range(12)]


def write_jpegs(folder: Path, images: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(N_FRAMES):
        path = folder / f"frame-{i:04d}.jpg"
        cv2.imwrite(str(path), images[i % len(images)], [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def floor_fps(paths: list[Path], sample: DetectionMessage) -> float:
    start = time.perf_counter()
    for path in paths:
        imageio.decode(path.read_bytes(), str(path))
        sample.model_dump_json().encode()
    return len(paths) / (time.perf_counter() - start)


def outbox_rates(tmp: Path) -> dict[str, float]:
    """Commits per second of put + ack (one PUBACK each), by SQLite synchronous mode."""
    payload = b"x" * 900  # a typical DetectionMessage
    rates = {}
    for mode in ("normal", "full"):
        box = Outbox(tmp / f"outbox-{mode}.sqlite", OutboxConfig(synchronous=mode))
        start = time.perf_counter()
        for _ in range(2000):
            row = box.put("t", payload)
            assert row is not None
            box.ack([row])
        rates[mode] = 2000 / (time.perf_counter() - start)
        box.close()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", type=Path, default=Path("demo/model"))
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        sys.exit(f"bench/daemon: no model at {args.model}: run `make demo` first")

    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        rates = outbox_rates(tmp)
        paths = write_jpegs(tmp / "frames", photos(args.data))
        broker = Broker(tmp / "mosquitto", persistence=False).start()
        try:
            config_path = write_config(
                tmp / "agent.toml",
                {
                    "device_id": "bench",
                    "state_dir": str(tmp / "state"),
                    "log_level": "WARNING",
                    "model": {"path": str(args.model.resolve())},
                    "source": {
                        "kind": "folder",
                        "uri": str(tmp / "frames"),
                        "settle_s": 0.0,
                        "exit_when_done": True,
                    },
                    "mqtt": {"port": broker.port},
                    "health": {"metrics_interval_s": 60.0},
                },
            )
            agent = Agent(AgentConfig.load(config_path))
            read_at: dict[int, float] = {}
            latencies: list[float] = []
            samples: list[DetectionMessage] = []
            put = agent.outbox.put

            def timed_put(topic: str, payload: bytes, **kw: object) -> int | None:
                now = time.monotonic()
                row = put(topic, payload, **kw)  # type: ignore[arg-type]
                if row is not None and topic.endswith("/detections"):
                    message = DetectionMessage.model_validate_json(payload)
                    read_at[row] = now - message.latency_ms / 1000.0  # when the file was read
                    samples[:] = [message]
                return row

            def on_ack(row: int) -> None:
                if row in read_at:
                    latencies.append(1000.0 * (time.monotonic() - read_at.pop(row)))

            agent.outbox.put = timed_put  # type: ignore[method-assign]
            assert agent.link is not None
            agent.link.on_ack = on_ack
            start = time.perf_counter()
            agent.run()
            elapsed = time.perf_counter() - start
        finally:
            broker.kill()
        floor = floor_fps(paths, samples[0])

    if len(latencies) != N_FRAMES:
        sys.exit(f"bench/daemon: {len(latencies)} of {N_FRAMES} detections acknowledged")
    fps = N_FRAMES / elapsed
    cuts = statistics.quantiles(latencies, n=20, method="inclusive")
    p50, p95 = statistics.median(latencies), cuts[18]
    print(f"frames                 {N_FRAMES} x 1920x1080 JPEG, watched folder, QoS 1 to Mosquitto")
    print(f"daemon                 {fps:7.1f} frames/s  ({elapsed:.2f} s incl. the final drain)")
    slowest = max(latencies)
    print(f"latency read->PUBACK   p50 {p50:6.1f} ms   p95 {p95:6.1f} ms   max {slowest:.1f} ms")
    print(
        f"outbox put+ack        synchronous=normal {rates['normal']:7.0f}/s   "
        f"synchronous=full {rates['full']:7.0f}/s"
    )
    print(f"floor (decode+encode)  {floor:7.1f} frames/s   daemon/floor = {fps / floor:.2f}")
    print(f"daemon_fps={fps:.1f} p95_ms={p95:.1f} floor_fps={floor:.1f}")


if __name__ == "__main__":
    main()
