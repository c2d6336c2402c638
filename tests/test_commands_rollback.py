"""`cmd/rollback`: what is known when it is asked is the result's error; the swap goes on the
retained `model` topic. In process, then over a real Mosquitto and a registry on moto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.daemon import Agent
from tests.agentproc import AgentProcess, Subscriber, agent_settings, write_config, write_frames
from tests.broker import Broker
from tests.registry_helpers import NAME, Registry, train
from tests.test_update_faults import _agent, _close, publish


def test_a_rollback_that_cannot_start_is_an_error_result(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    agent = _agent(tmp_path, registry, logistic_model)
    try:
        r = agent.commands.handle("rollback", b'{"request_id": "r1"}')
        assert not r.ok and r.request_id == "r1" and r.result is None
        assert r.error == f"rollback: no earlier version on disk; {NAME} 1.0.0 keeps serving"
        assert agent.model_refused is None  # not a model refused: nothing on `model`
        assert agent.updater is not None
        publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0")
        r = agent.commands.handle("rollback", b"{}")
        assert r.ok and r.result is not None and r.result["serving"]["version"] == "3.0.0"
        r = agent.commands.handle("rollback", b"{}")
        assert not r.ok and r.error is not None
        assert r.error.startswith(f"rollback: one from {NAME} 3.0.0 is already pending")
    finally:
        _close(agent)

    frames = tmp_path / "frames"
    config = {
        "device_id": "dev-2",
        "state_dir": str(tmp_path / "state-2"),
        "model": {"path": str(logistic_model)},
        "source": {"kind": "folder", "uri": str(frames)},
        "mqtt": {"enabled": False},
    }
    agent = Agent(AgentConfig.model_validate(config))
    try:
        r = agent.commands.handle("rollback", b"{}")
        assert not r.ok and r.error == (
            "rollback: this device takes no model updates (model.registry is not set)"
        )
        r = agent.commands.handle("pull-model", b"{}")
        assert r.error == "no registry to pull from (model.registry is not set)"
    finally:
        _close(agent)


def test_rollback_over_mqtt_answers_what_it_knows_and_the_swap_goes_on_model(
    tmp_path: Path, registry: Registry, logistic_model: Path, broker: Broker
) -> None:
    """A user's walk: `cmd/rollback` on a device with no earlier version answered ok=true
    (`requested`), and only the retained `model` topic said `refused`."""
    frames = tmp_path / "frames"
    write_frames(frames, 1)
    for version, margin in (("2.0.0", 40), ("3.0.0", 10)):
        registry.publish(train(tmp_path / version, version, margin).parent)
    settings = agent_settings(tmp_path, logistic_model, broker.port, frames, device="rb-dev")
    settings["model"] = {
        "path": str(logistic_model),
        "registry": registry.url.uri(),
        "endpoint_url": registry.endpoint,
        "region": "us-east-1",
        "public_keys": [str(registry.public)],
        "poll_s": 0.3,
    }
    sub = Subscriber(broker.port, ["corrosion/rb-dev/#"], client_id="rb-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="rb-pub", protocol=paho.MQTTv5)

    def serving() -> str:
        models = sub.payloads("/model")
        return str(models[-1]["serving"]["version"]) if models else ""

    def rollback(request_id: str, answers: int = 1) -> dict[str, Any]:
        payload = json.dumps({"request_id": request_id}).encode()
        pub.publish("corrosion/rb-dev/cmd/rollback", payload, qos=1).wait_for_publish(5)

        def answered() -> list[dict[str, Any]]:
            results = sub.payloads("/cmd/rollback/result")
            return [r for r in results if r["request_id"] == request_id]

        assert sub.wait_for(lambda: len(answered()) == answers, 10), agent.text()[-2000:]
        return answered()[-1]

    try:
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 1), agent.text()[-2000:]
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        assert serving() == "1.0.0"

        first = rollback("bundled")  # nothing on disk: the bundled model serves
        assert first["ok"] is False and first["result"] is None
        assert first["error"] == f"rollback: no earlier version on disk; {NAME} 1.0.0 keeps serving"

        for version in ("2.0.0", "3.0.0"):
            registry.point(version)
            assert sub.wait_for(lambda v=version: serving() == v, 20), agent.text()[-2000:]
        taken = rollback("back")  # asked of 3.0.0, 2.0.0 on disk: taken, swapped in later
        assert taken["ok"] is True and taken["error"] is None
        assert taken["result"]["requested"] is True and taken["result"]["see"] == "model"
        assert taken["result"]["serving"]["version"] == "3.0.0"
        assert sub.wait_for(lambda: serving() == "2.0.0", 20), agent.text()[-2000:]
        # The sender's retry of the same request: the first answer again, no second rollback
        # (which went on to "no earlier version", or back a second version with one there).
        assert rollback("back", answers=2) == taken

        oldest = rollback("oldest")  # 3.0.0 is gone and skipped: 2.0.0 is the oldest
        assert oldest["ok"] is False and oldest["error"] == (
            f"rollback: no earlier version on disk; {NAME} 2.0.0 keeps serving"
        )
        assert all(m["refused"] is None for m in sub.payloads("/model")), sub.payloads("/model")
    finally:
        pub.loop_stop()
        pub.disconnect()
        agent.stop()
        sub.close()
