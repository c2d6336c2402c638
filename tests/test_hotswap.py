"""Hot swap under load: a 30 fps stream for 60 s, three promotions and one bad model, over
real MQTT and real HTTP; then the same device boots with the registry unreachable."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.contract import DetectionMessage
from agent.engine.classifier import ColourModel
from agent.engine.detector import Detector
from agent.signing import keyring, load_public_key
from export.registry import promote
from tests.agentproc import AgentProcess, Subscriber, agent_settings, write_config
from tests.broker import Broker
from tests.registry_helpers import NAME, Registry, bad_versions, train

FPS, SECONDS = 30, 60


def write_video(path: Path, frames: int) -> None:
    """Colours around the rust boundary, so models with other margins disagree."""
    rng = np.random.default_rng(5)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    for _ in range(frames):
        img = np.empty((48, 64, 3), np.uint8)
        img[..., 2] = rng.integers(60, 200, (48, 64))  # R
        img[..., 1] = rng.integers(40, 160, (48, 64))  # G
        img[..., 0] = rng.integers(20, 120, (48, 64))  # B
        writer.write(img)
    writer.release()


def decoded(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        out.append(img)


def test_hot_swap_under_load_then_offline_boot(
    tmp_path: Path, registry: Registry, logistic_model: Path, broker: Broker
) -> None:
    video = tmp_path / "stream.avi"
    write_video(video, FPS * SECONDS)
    dirs = {"1.0.0": logistic_model.parent}
    for version, margin in (("2.0.0", 45), ("3.0.0", 5), ("4.0.0", 30)):
        dirs[version] = train(tmp_path / version, version, margin).parent
        registry.publish(dirs[version])
    bad_files, bad_manifest, _ = bad_versions(logistic_model.parent, registry)["9.0.4"]
    registry.put("9.0.4", bad_files, bad_manifest)  # unsigned

    model = {
        "path": str(logistic_model),
        "registry": registry.url.uri(),
        "endpoint_url": registry.endpoint,
        "region": "us-east-1",
        "public_keys": [str(registry.public)],
        "poll_s": 0.5,
    }
    settings = agent_settings(tmp_path, logistic_model, broker.port, video, device="swap-dev")
    settings["model"] = model
    settings["source"] = {"kind": "video", "uri": str(video), "max_fps": float(FPS)}
    cfg = write_config(tmp_path / "a.toml", settings)
    sub = Subscriber(broker.port, ["corrosion/swap-dev/#"], client_id="swap-sub")
    keys = keyring([load_public_key(registry.public)])

    def serving() -> str:
        models = sub.payloads("/model")
        return str(models[-1]["serving"]["version"]) if models else ""

    agent = AgentProcess(cfg, "--exit-when-done")
    started = time.monotonic()
    try:
        for at, version in ((10, "2.0.0"), (25, "3.0.0"), (40, "4.0.0"), (50, "9.0.4")):
            time.sleep(max(0.0, started + at - time.monotonic()))
            if version == "9.0.4":
                registry.point(version)  # promote refuses unsigned: a rogue pointer
            else:
                promote(
                    registry.s3,
                    registry.url,
                    NAME,
                    version,
                    "stable",
                    public_keys=keys,
                    promoted_by="test",
                )
                assert sub.wait_for(lambda v=version: serving() == v, 10), agent.text()[-2000:]
        assert sub.wait_for(lambda: "unsigned" in str(sub.payloads("/model")[-1]["refused"]), 10)
        assert agent.wait(SECONDS + 30) == 0, agent.text()[-3000:]
    finally:
        agent.stop()
    detections = {
        m.message_id: m for m in map(DetectionMessage.model_validate, sub.payloads("/detections"))
    }
    by_frame = sorted(detections.values(), key=lambda m: m.frame_index)
    assert [m.frame_index for m in by_frame] == list(range(FPS * SECONDS))  # none dropped
    versions = [m.model.version for m in by_frame]
    assert versions == sorted(versions)  # each swap happened once, between two frames
    assert set(versions) == {"1.0.0", "2.0.0", "3.0.0", "4.0.0"}
    detectors = {v: Detector(ColourModel.load(d / "manifest.json")) for v, d in dirs.items()}
    images = decoded(video)
    for m in by_frame:  # every frame is classified wholly by the model it names
        expected = detectors[m.model.version].analyse(images[m.frame_index]).corrosion_pct
        assert m.corrosion_pct == round(expected, 4), (m.frame_index, m.model.version)
    differs = sum(
        detectors["2.0.0"].analyse(images[i]).corrosion_pct
        != detectors["3.0.0"].analyse(images[i]).corrosion_pct
        for i in range(20)
    )
    assert differs == 20  # the check above would catch a frame classified by the wrong model

    # Boot with the registry unreachable: the last good model on disk serves.
    offline: dict[str, Any] = dict(settings)
    offline["model"] = {**model, "endpoint_url": "http://127.0.0.1:9"}
    offline["source"] = {"kind": "video", "uri": str(video), "max_fps": 200.0}
    again = AgentProcess(write_config(tmp_path / "b.toml", offline))
    try:
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) > FPS * SECONDS + 5, 30)
        again.signal(signal.SIGTERM)
        assert again.wait(15) == 0
    finally:
        again.stop()
        sub.close()
    late = [DetectionMessage.model_validate(p) for p in sub.payloads("/detections")]
    assert {m.model.version for m in late[FPS * SECONDS :]} == {"4.0.0"}
