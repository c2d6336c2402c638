"""corrosion-agent watch: every kind of message readable, invalid payloads named."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.captures import UploadNotice
from agent.contract.messages import ModelRef, ModelStatus
from agent.watch import describe_message
from tests.agentproc import AgentProcess, agent_settings, write_config, write_frames
from tests.broker import Broker


def watcher(broker: Broker, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "agent.cli", "watch", "--broker", broker.url, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_prints_what_a_device_publishes(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    write_frames(tmp_path / "frames", 3)
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="watched"
    )
    human = watcher(broker, "--device", "watched", "--count", "6")
    as_json = watcher(broker, "--device", "watched", "--count", "6", "--json")
    time.sleep(1.0)  # both subscribed
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    out, err = human.communicate(timeout=30)
    lines = out.splitlines()
    assert any(line.startswith("watched status ONLINE") for line in lines), (out, err)
    assert any(line.startswith("watched model test-rgb 1.0.0") for line in lines), out
    assert sum(line.startswith("watched detection #") for line in lines) >= 3, out
    records = [json.loads(line) for line in as_json.communicate(timeout=30)[0].splitlines()]
    topics = {r["topic"] for r in records}
    assert "corrosion/watched/detections" in topics
    assert all(isinstance(r["payload"], dict) for r in records)


def test_watch_shows_an_upload_notice(broker: Broker) -> None:
    proc = watcher(broker, "--device", "up", "--count", "1")
    time.sleep(1.0)
    notice = UploadNotice(
        device_id="up",
        frame_id="a" * 32,
        category="flagged",
        bucket="b",
        image_key="k.jpg",
        sidecar_key="k.json",
        corrosion_pct=7.5,
    )
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="up-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    pub.publish("corrosion/up/uploads", notice.model_dump_json(), qos=1).wait_for_publish()
    pub.loop_stop()
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "up upload flagged 7.50%  s3://b/k.jpg"


def test_watch_names_an_invalid_payload(broker: Broker) -> None:
    proc = watcher(broker, "--device", "rogue", "--count", "1")
    time.sleep(1.0)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="rogue-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    pub.publish("corrosion/rogue/detections", b'{"corrosion_pct": 250}', qos=1).wait_for_publish()
    pub.loop_stop()
    out, _ = proc.communicate(timeout=30)
    assert out.startswith("rogue detections INVALID detections: ")
    assert "corrosion_pct: Input should be less than or equal to 100" in out


def test_watch_unreachable_broker_is_one_line() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "watch", "--broker", "mqtt://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: broker 127.0.0.1:9")
    assert "Traceback" not in res.stderr


def test_a_model_whose_image_rule_decides_shows_its_rule_not_the_fallback_percent() -> None:
    ref = ModelRef(name="texture", version="1.2.0", sha256="0" * 64)
    since = datetime(2026, 1, 1, tzinfo=UTC)
    by_rule = ModelStatus(
        device_id="d", serving=ref, since=since, flag_pct=5.0, rule_threshold=0.4213
    )
    assert describe_message("model", "d", by_rule) == (
        "d model texture 1.2.0  flag P(rust) >= 0.421 (image rule)"
    )
    by_pct = by_rule.model_copy(update={"rule_threshold": None})
    assert describe_message("model", "d", by_pct) == "d model texture 1.2.0  flag >= 5%"
