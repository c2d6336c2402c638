"""The daemon as a process against a real Mosquitto: outages, SIGKILL, LWT, mTLS, fuzzing."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract import DetectionMessage
from agent.contract.messages import CommandResult, MetricsMessage, StatusMessage
from tests.agentproc import AgentProcess, Subscriber, agent_settings, write_config, write_frames
from tests.broker import Broker, Pki

PREFIX = "corrosion/dev-1/"


def ids(sub: Subscriber) -> set[str]:
    return {p["message_id"] for p in sub.payloads("/detections")}


def sources(sub: Subscriber) -> set[str]:
    return {Path(p["source"]).name for p in sub.payloads("/detections")}


def statuses(sub: Subscriber) -> list[str]:
    return [p["state"] for p in sub.payloads("/status")]


def outbox_rows(state: Path) -> list[dict[str, Any]]:
    try:
        with sqlite3.connect(state / "outbox.sqlite") as db:
            rows = db.execute("SELECT topic, payload FROM messages ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the daemon is still creating it
        return []
    return [json.loads(p) for t, p in rows if t.endswith("/detections")]


def test_run_publishes_detections_status_and_metrics(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    names = write_frames(tmp_path / "frames", 20)
    sub = Subscriber(broker.port, [PREFIX + "#"], client_id="smoke")
    cfg = write_config(
        tmp_path / "a.toml",
        agent_settings(tmp_path, logistic_model, broker.port, tmp_path / "frames"),
    )
    agent = AgentProcess(cfg, "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    assert sub.wait_for(lambda: "stopped" in statuses(sub))
    sub.close()
    detections = [DetectionMessage.model_validate(p) for p in sub.payloads("/detections")]
    assert sorted(Path(d.source).name for d in detections) == names
    assert all(d.device_id == "dev-1" and d.model.name == "test-rgb" for d in detections)
    assert [d.frame_index for d in detections] == list(range(20))  # in order
    states = [StatusMessage.model_validate(p).state for p in sub.payloads("/status")]
    assert states[0] == "online" and states[-1] == "stopped"
    assert sub.payloads("/model")[0]["serving"]["name"] == "test-rgb"
    for m in sub.payloads("/metrics"):
        MetricsMessage.model_validate(m)
    assert outbox_rows(tmp_path / "state") == []


def test_broker_restarted_three_times_nothing_missing(
    tmp_path: Path, logistic_model: Path, own_broker: Broker
) -> None:
    names = write_frames(tmp_path / "frames", 300)
    own_broker.start()
    sub = Subscriber(own_broker.port, [PREFIX + "detections"], client_id="restart-sub")
    settings = agent_settings(
        tmp_path, logistic_model, own_broker.port, tmp_path / "frames", source={"max_fps": 60.0}
    )
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    seen_during_outage = []
    for _ in range(3):
        time.sleep(1.0)
        own_broker.kill()
        time.sleep(0.5)
        seen_during_outage.append(len(ids(sub)))
        own_broker.start()
    assert agent.wait(60) == 0, agent.text()
    assert sub.wait_for(lambda: sources(sub) == set(names), 30), (
        f"{len(set(names) - sources(sub))} frames missing",
        agent.text()[-3000:],
    )
    sub.close()
    assert len(ids(sub)) == 300
    assert seen_during_outage[-1] < 300  # the outages did happen mid-run
    assert outbox_rows(tmp_path / "state") == []


def test_sigkill_mid_run_then_restart_replays_the_outbox(
    tmp_path: Path, logistic_model: Path, own_broker: Broker
) -> None:
    names = write_frames(tmp_path / "frames", 120)
    settings = agent_settings(
        tmp_path, logistic_model, own_broker.port, tmp_path / "frames", source={"max_fps": 80.0}
    )
    cfg = write_config(tmp_path / "a.toml", settings)
    agent = AgentProcess(cfg)  # no broker yet: everything queues in the outbox
    state = tmp_path / "state"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (state / "outbox.sqlite").exists() and len(outbox_rows(state)) >= 40:
            break
        time.sleep(0.05)
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    queued = {p["message_id"] for p in outbox_rows(state)}
    assert 40 <= len(queued) < 120, "kill must land mid-run"

    own_broker.start()
    sub = Subscriber(own_broker.port, [PREFIX + "detections"], client_id="kill-sub")
    again = AgentProcess(cfg, "--exit-when-done")
    assert again.wait(60) == 0, again.text()
    assert sub.wait_for(lambda: queued <= ids(sub) and sources(sub) == set(names), 20), (
        f"{len(queued - ids(sub))} queued missing; {len(set(names) - sources(sub))} frames missing"
    )
    sub.close()
    assert "to replay" in again.text()
    assert outbox_rows(state) == []


def test_retained_status_online_offline_online_then_stopped(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    write_frames(tmp_path / "frames", 3)
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="lwt-dev"
    )
    cfg = write_config(tmp_path / "a.toml", settings)
    sub = Subscriber(broker.port, ["corrosion/lwt-dev/status"], client_id="lwt-sub")

    def last() -> str | None:
        s = statuses(sub)
        return s[-1] if s else None

    agent = AgentProcess(cfg)
    assert sub.wait_for(lambda: last() == "online"), agent.text()
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    assert sub.wait_for(lambda: last() == "offline"), "no Last Will after SIGKILL"
    agent = AgentProcess(cfg)
    assert sub.wait_for(lambda: last() == "online"), agent.text()
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - started < 10
    assert sub.wait_for(lambda: last() == "stopped")
    sub.close()
    # The retained value is what a dashboard that connects later sees.
    late = Subscriber(broker.port, ["corrosion/lwt-dev/status"], client_id="late-sub")
    assert late.wait_for(lambda: statuses(late) == ["stopped"], 5)
    late.close()


def _tls_refused(pki: Pki, port: int, cert: Path | None, key: Path | None) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # TLS 1.3 reports a refused client certificate at the first read.
            tls.sendall(bytes([0x10, 0x0C, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
            return tls.recv(4) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_mutual_tls(tmp_path: Path, logistic_model: Path, broker: Broker, pki: Pki) -> None:
    assert broker.tls_port is not None
    assert _tls_refused(pki, broker.tls_port, None, None)
    assert _tls_refused(pki, broker.tls_port, pki.rogue_cert, pki.rogue_key)
    assert not _tls_refused(pki, broker.tls_port, pki.client_cert, pki.client_key)

    write_frames(tmp_path / "frames", 5)
    tls = {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(pki.client_cert)}
    tls["key_file"] = str(pki.client_key)
    settings = agent_settings(
        tmp_path, logistic_model, broker.tls_port, tmp_path / "frames", device="tls-dev"
    )
    settings["mqtt"]["tls"] = tls
    sub = Subscriber(broker.port, ["corrosion/tls-dev/detections"], client_id="tls-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 5), agent.text()
    sub.close()


def _garbage(rng: random.Random, i: int) -> tuple[str, bytes]:
    """Eight kinds of bad payload: binary, broken JSON, wrong shape, wrong types, huge..."""
    name = rng.choice(["ping", "status", "snapshot", "set-threshold", "reboot", "x" * 40])
    bad_pct = rng.choice(["x", -1, 1e9, [], {}])
    kinds = [
        (name, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) + b"\xff"),
        (name, b"{" + rng.randbytes(20).hex().encode()),
        (name, json.dumps([1, 2, {"flag_pct": 5}]).encode()),
        ("set-threshold", json.dumps({"flag_pct": bad_pct}).encode()),
        (name, b'{"request_id": "' + b"a" * 200_000 + b'"}'),
        (name, json.dumps({"unknown_field": rng.random()}).encode()),
        ("snapshot", json.dumps({"note": 12345}).encode()),
        ("reboot", b"{}"),
    ]
    return kinds[i % len(kinds)]


def test_fuzzed_commands_all_answered_agent_keeps_classifying(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    frames = tmp_path / "frames"
    write_frames(frames, 2)
    settings = agent_settings(tmp_path, logistic_model, broker.port, frames, device="fuzz-dev")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    sub = Subscriber(broker.port, ["corrosion/fuzz-dev/#", "replies/#"], client_id="fuzz-sub")
    try:
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 2), agent.text()
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=paho.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        rng = random.Random(7)
        for i in range(1000):
            name, payload = _garbage(rng, i)
            props = None
            if i % 2:  # half use MQTT v5 request/response
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = f"replies/{i}"
                props.CorrelationData = i.to_bytes(4, "big")
            pub.publish(f"corrosion/fuzz-dev/cmd/{name}", payload, qos=1, properties=props)
        # and one good request among them, answered on its response topic
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/good"
        props.CorrelationData = b"good"
        pub.publish(
            "corrosion/fuzz-dev/cmd/ping", b"{}", qos=1, properties=props
        ).wait_for_publish()

        def results() -> list[tuple[str, CommandResult, Properties | None]]:
            return [
                (t, CommandResult.model_validate_json(p), pr)
                for t, p, pr in list(sub.messages)
                if t.endswith("/result") or t.startswith("replies/")
            ]

        assert sub.wait_for(lambda: len(results()) == 1001, 60), len(results())
        bad = [r for t, r, _ in results() if t != "replies/good"]
        assert all(not r.ok and r.error for r in bad)
        good = [(r, pr) for t, r, pr in results() if t == "replies/good"]
        assert good[0][0].ok and good[0][1] is not None
        assert good[0][1].CorrelationData == b"good"
        replies = [
            (t, pr) for t, _, pr in results() if t.startswith("replies/") and t[8:].isdigit()
        ]
        assert len(replies) == 500
        assert all(
            pr is not None and int.from_bytes(pr.CorrelationData, "big") == int(t[8:])
            for t, pr in replies
        )
        pub.loop_stop()
        pub.disconnect()

        write_frames(frames, 3, start=100)  # still alive and classifying
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 5), agent.text()
        assert agent.proc.poll() is None
    finally:
        agent.stop()
        sub.close()


def test_set_threshold_command_changes_flags(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    frames = tmp_path / "frames"
    write_frames(frames, 1)
    settings = agent_settings(tmp_path, logistic_model, broker.port, frames, device="thr-dev")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    sub = Subscriber(broker.port, ["corrosion/thr-dev/#"], client_id="thr-sub")
    try:
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 1), agent.text()
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="thr-pub", protocol=paho.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish("corrosion/thr-dev/cmd/set-threshold", b'{"flag_pct": 0.0}', qos=1)
        assert sub.wait_for(lambda: len(sub.payloads("/cmd/set-threshold/result")) == 1)
        assert sub.payloads("/cmd/set-threshold/result")[0]["result"]["flag_pct"] == 0.0
        assert sub.wait_for(lambda: sub.payloads("/model")[-1]["flag_pct"] == 0.0)
        write_frames(frames, 1, start=50)
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 2)
        last = sub.payloads("/detections")[-1]
        assert last["threshold"] == 0.0 and last["flagged"] is True
        pub.publish("corrosion/thr-dev/cmd/status", b'{"request_id": "s1"}', qos=1)
        assert sub.wait_for(lambda: len(sub.payloads("/cmd/status/result")) == 1)
        status = sub.payloads("/cmd/status/result")[0]
        assert status["request_id"] == "s1" and status["result"]["frames_total"] == 2
        pub.loop_stop()
        pub.disconnect()
    finally:
        agent.stop()
        sub.close()


def test_mqtt_311(tmp_path: Path, logistic_model: Path, broker: Broker) -> None:
    write_frames(tmp_path / "frames", 4)
    settings = agent_settings(
        tmp_path, logistic_model, broker.port, tmp_path / "frames", device="old-dev"
    )
    settings["mqtt"]["protocol"] = "3.1.1"
    sub = Subscriber(broker.port, ["corrosion/old-dev/detections"], client_id="old-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 4)
    sub.close()


def test_username_and_password(
    tmp_path: Path, logistic_model: Path, password_broker: Broker
) -> None:
    write_frames(tmp_path / "frames", 2)
    settings = agent_settings(
        tmp_path, logistic_model, password_broker.port, tmp_path / "frames", device="pw-dev"
    )
    settings["mqtt"].update(username="device-1", password="wrong-pass")
    agent = AgentProcess(write_config(tmp_path / "bad.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0
    assert "refused the connection: Not authorized" in agent.text()
    assert "wrong-pass" not in agent.text()
    assert re.search(r"\d+ message\(s\) .* kept in the outbox", agent.text())  # for next start
    watch = subprocess.run(
        [sys.executable, "-m", "agent.cli", "watch", "--broker", password_broker.url,
         "--username", "device-1", "--password", "wrong-pass"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert watch.returncode == 2 and "refused: Not authorized" in watch.stderr, watch.stderr

    settings["mqtt"]["password"] = "s3cret-pass"
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="pw-sub", protocol=paho.MQTTv5)
    sub.username_pw_set("device-1", "s3cret-pass")
    got: list[bytes] = []
    sub.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    sub.connect("127.0.0.1", password_broker.port)
    sub.subscribe("corrosion/pw-dev/detections", qos=1)
    sub.loop_start()
    time.sleep(0.5)
    agent = AgentProcess(write_config(tmp_path / "good.toml", settings), "--exit-when-done")
    assert agent.wait(60) == 0, agent.text()
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.loop_stop()
    assert len(got) == 2  # the two from the refused run, replayed from the outbox
    assert "s3cret-pass" not in agent.text()


def test_glob_source_done_agent_idles_until_stopped(
    tmp_path: Path, logistic_model: Path, broker: Broker
) -> None:
    """Without exit_when_done a finished glob leaves the agent up (commands, metrics,
    updates); exiting would have systemd or Docker start it over the same images."""
    write_frames(tmp_path / "frames", 3)
    settings = agent_settings(tmp_path, logistic_model, broker.port, tmp_path / "frames")
    settings["source"] = {"kind": "glob", "uri": str(tmp_path / "frames" / "*.jpg")}
    sub = Subscriber(broker.port, [PREFIX + "#"], client_id="idle-sub")
    agent = AgentProcess(write_config(tmp_path / "a.toml", settings))
    try:
        assert sub.wait_for(lambda: len(sub.payloads("/detections")) == 3), agent.text()
        seen = len(sub.payloads("/metrics"))
        assert sub.wait_for(lambda: len(sub.payloads("/metrics")) >= seen + 2), agent.text()
        assert agent.proc.poll() is None, agent.text()
        assert "idle until stopped" in agent.text()
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0, agent.text()
    finally:
        agent.stop()
    assert sub.wait_for(lambda: "stopped" in statuses(sub))
    sub.close()
    assert len(sub.payloads("/detections")) == 3
