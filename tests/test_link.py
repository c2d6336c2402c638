"""The broker link against a real Mosquitto: hostile commands and failing disks must not stop
delivery, and a stopped agent must not read as online."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.commands import Commands
from agent.config import MqttConfig
from agent.contract.messages import PingCommand, Topics
from agent.mqtt import MqttLink, Retained
from agent.outbox import Outbox
from tests.agentproc import Subscriber
from tests.broker import Broker, broker_dir


class Device:
    """An MqttLink with a ping command; `runs` counts pings run."""

    def __init__(self, broker: Broker, state: Path, name: str) -> None:
        self.prefix = f"corrosion/{name}/"
        config = MqttConfig(
            host="127.0.0.1", port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.3
        )
        self.outbox = Outbox(state / "outbox.sqlite")
        self.runs = 0
        commands = Commands(name, config.max_command_bytes)
        commands.register("ping", PingCommand, self._ping)
        retained = Retained(status=lambda s: json.dumps({"state": s}).encode(), model=lambda: None)
        self.link = MqttLink(
            config,
            client_id=name,
            topics=Topics(self.prefix),
            outbox=self.outbox,
            retained=retained,
            commands=commands,
        )
        self.sub = Subscriber(broker.port, [self.prefix + "#"], client_id=f"{name}-sub")

    def _ping(self, _: PingCommand) -> dict[str, Any]:
        self.runs += 1
        return {"pong": True}

    def send(self, n: int) -> None:
        for i in range(n):
            self.outbox.put(self.prefix + "detections", json.dumps({"i": i}).encode())

    def command(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> None:
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.prefix}pub")
        pub.connect("127.0.0.1", self.sub.client._port)
        pub.loop_start()
        pub.publish(self.prefix + topic, payload, qos=1, retain=retain).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()

    def close(self) -> None:
        self.link.stop()
        self.command("cmd/ping", b"", retain=True)  # clears a retained command, runs nothing
        self.sub.client.loop_stop()
        self.sub.client.disconnect()

    def delivered(self, n: int) -> bool:
        return self.sub.wait_for(lambda: len(self.sub.payloads("/detections")) >= n)


@pytest.fixture
def device(broker: Broker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Device]:
    d = Device(broker, tmp_path, request.node.name[5:40].replace("_", "-"))
    d.link.start()
    assert d.sub.wait_for(lambda: d.link.connected, 10)
    yield d
    d.close()


def test_a_long_command_name_does_not_block_publishing(device: Device) -> None:
    """Its 64 KB result topic made paho raise at every try: nothing behind it was ever sent,
    not even after a restart."""
    device.command("cmd/" + "x" * 60_000)
    device.send(5)
    assert device.delivered(5)
    results = [t for t, _, _ in device.sub.messages if t.endswith("/result")]
    assert results == [f"{device.prefix}cmd/{'x' * 64}/result"]
    assert device.sub.wait_for(lambda: device.outbox.depth == 0, 10)


def test_a_retained_command_is_answered_and_never_run(broker: Broker, tmp_path: Path) -> None:
    """The broker hands a retained command to every (re)connecting subscriber: a retained
    `rollback` would have run again at each reconnect."""
    device = Device(broker, tmp_path, "retained-cmd")
    device.command("cmd/ping", b'{"request_id": "r"}', retain=True)
    device.link.start()
    try:
        assert device.sub.wait_for(lambda: device.sub.payloads("cmd/ping/result"))
        (answer,) = device.sub.payloads("cmd/ping/result")
        assert not answer["ok"] and answer["request_id"] == "r"
        assert answer["error"].startswith("retained commands are not run")
        device.command("cmd/ping")
        assert device.sub.wait_for(lambda: len(device.sub.payloads("cmd/ping/result")) == 2)
        assert device.runs == 1  # the plain one
        device.command("cmd/ping", b"", retain=True)  # clearing it as the error advises
        device.command("cmd/ping", b'{"request_id": "after"}')
        assert device.sub.wait_for(lambda: len(device.sub.payloads("cmd/ping/result")) == 3)
        assert device.runs == 2  # the zero-byte clear was no command
        # retained while we are connected: the broker forwards it with the flag cleared
        # unless asked to keep it (MQTT 5's retain-as-published); it ran, and again later
        device.command("cmd/ping", b'{"request_id": "live"}', retain=True)
        assert device.sub.wait_for(lambda: len(device.sub.payloads("cmd/ping/result")) == 4)
        live = device.sub.payloads("cmd/ping/result")[-1]
        assert live["request_id"] == "live" and not live["ok"] and device.runs == 2
        device.command("cmd/ping", b"", retain=True)
    finally:
        device.close()


def test_an_outbox_error_on_a_command_leaves_the_link_working(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in paho's on_message ended the network thread: no reconnect, no PUBACK
    read, `connected` stuck at True."""
    real = device.outbox.put

    def locked(*args: Any, **kwargs: Any) -> int | None:
        if "/result" in args[0]:
            raise OSError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(device.outbox, "put", locked)
    device.command("cmd/ping")
    assert device.sub.wait_for(lambda: device.runs == 1)
    device.send(3)
    assert device.delivered(3)
    assert device.sub.wait_for(lambda: device.outbox.depth == 0)  # PUBACKs are read
    assert device.link._threads[0].name == "mqtt-network" and device.link._threads[0].is_alive()


def test_acks_that_cannot_be_committed_are_committed_later(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They were forgotten: the rows stayed for the whole run and went out again at restart."""
    real = device.outbox.ack
    failures = [2]

    def flaky(rows: list[int]) -> None:
        if rows and failures[0]:
            failures[0] -= 1
            raise OSError("disk I/O error")
        real(rows)

    monkeypatch.setattr(device.outbox, "ack", flaky)
    device.send(3)
    assert device.delivered(3)
    assert device.sub.wait_for(lambda: device.outbox.depth == 0, 10)


def test_stopped_stays_the_last_word(device: Device) -> None:
    """A command answered while the final status waited for its PUBACK republished `online`,
    and the clean disconnect then suppressed the Last Will: a stopped agent read as online."""
    client = device.link._client
    real = client.publish

    def publish(topic: str, payload: bytes, *args: Any, **kwargs: Any) -> Any:
        info = real(topic, payload, *args, **kwargs)
        if b"stopped" in payload:  # as set-threshold does, in the network thread, meanwhile
            threading.Thread(target=device.link.publish_state).start()
        return info

    client.publish = publish  # type: ignore[method-assign]
    device.link.stop()
    assert device.sub.wait_for(lambda: device.sub.payloads("/status"))
    assert [p["state"] for p in device.sub.payloads("/status")][-1] == "stopped"


def test_oversized_response_topic_and_correlation_are_not_stored(device: Device) -> None:
    """A caller's 64 KB response topic and correlation data went into the outbox with each
    answer, uncounted against max_bytes; beyond 256 the answer goes to the default topic."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = device.prefix + "r/" + "y" * 1000
    props.CorrelationData = b"c" * 5000
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="big-props", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", device.sub.client._port)
    pub.loop_start()
    pub.publish(device.prefix + "cmd/ping", b"{}", qos=1, properties=props).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    assert device.sub.wait_for(lambda: device.sub.payloads("cmd/ping/result"))
    (answered,) = [p for t, _, p in device.sub.messages if t.endswith("cmd/ping/result")]
    assert getattr(answered, "CorrelationData", None) is None


def test_an_mqtt5_brokers_receive_maximum_bounds_what_is_in_flight(tmp_path: Path) -> None:
    """paho ignores the Receive Maximum in the CONNACK: we kept 64 QoS 1 messages in flight
    against a broker that takes 7, a protocol error strict brokers disconnect for."""
    with broker_dir("mosquitto") as directory:
        broker = Broker(directory, extra=["max_inflight_messages 7"]).start()
        device = Device(broker, tmp_path, "receive-maximum")
        link, peak = device.link, 0
        publish = link._client.publish

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal peak
            peak = max(peak, len(link._handed) + 1)
            return publish(*args, **kwargs)

        link._client.publish = counted  # type: ignore[method-assign]
        try:
            link.start()
            device.send(300)
            assert device.delivered(300)
            assert peak == 5  # 7, less two kept for the retained status and model
        finally:
            device.close()
            broker.kill()


def test_a_refused_command_subscription_is_logged(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker policy refusing `cmd/+` left commands silently unanswered."""
    refused = ReasonCode(PacketTypes.SUBACK, "Not authorized")
    device.link._on_subscribe(device.link._client, None, 1, [refused], None)
    assert "refused the command subscription" in caplog.text
    assert f"{device.prefix}cmd/+" in caplog.text


def test_a_write_that_breaks_the_connection_keeps_the_message(
    broker: Broker, tmp_path: Path
) -> None:
    """publish() writes on the publisher's thread; when that write finds the connection
    broken, paho says CONN_LOST but keeps the message and sends it after reconnecting. The
    row was deleted as refused: lost for good if the agent restarted before reconnecting."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    retained = Retained(status=lambda s: json.dumps({"state": s}).encode(), model=lambda: None)
    link = MqttLink(
        MqttConfig(host="127.0.0.1", port=broker.port),
        client_id="conn-lost",
        topics=Topics("corrosion/conn-lost/"),
        outbox=outbox,
        retained=retained,
        commands=Commands("conn-lost", 65536),
    )
    sub = Subscriber(broker.port, ["corrosion/conn-lost/detections"], client_id="conn-lost-sub")
    client = link._client  # the network thread's work, done here so the break is exact
    client.connect("127.0.0.1", broker.port, 30)
    while not link.connected:
        client.loop(0.1)
    client.socket().shutdown(socket.SHUT_WR)  # the connection breaks under the next write
    outbox.put("corrosion/conn-lost/detections", b'{"frame": 1}')
    link._publish_some()
    assert (outbox.depth, outbox.dropped_total) == (1, 0)  # kept, not refused
    client.reconnect()
    deadline = time.monotonic() + 10
    while outbox.acked < 1 or not sub.payloads("/detections"):
        assert time.monotonic() < deadline, "not delivered after the reconnect"
        client.loop(0.05)
        link._publish_some()  # settles the PUBACK
    assert (outbox.depth, outbox.acked, outbox.dropped_total) == (0, 1, 0)
    assert len(sub.payloads("/detections")) == 1
    client.disconnect()
    sub.close()


class _Recording:
    """paho's publish, recorded: every call succeeds with a new mid."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes, **_: Any) -> paho.MQTTMessageInfo:
        self.sent.append(payload)
        info = paho.MQTTMessageInfo(len(self.sent))
        info.rc = paho.MQTT_ERR_SUCCESS
        return info


def test_a_throttled_message_is_sent_again_after_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PUBACK 0x97 (quota exceeded: AWS IoT Core's publish rate, when a backlog replays
    after an outage) deleted the detection as refused. It is a pause, not a refusal."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    link = MqttLink(
        MqttConfig(host="127.0.0.1", port=1),
        client_id="quota",
        topics=Topics("corrosion/quota/"),
        outbox=outbox,
        retained=Retained(status=lambda s: b"{}", model=lambda: None),
        commands=Commands("quota", 65536),
    )
    client = _Recording()
    link._client = client  # type: ignore[assignment]
    link._connected.set()
    for i in range(3):
        outbox.put("corrosion/quota/detections", b"%d" % i)
    link._publish_some()
    assert client.sent == [b"0", b"1", b"2"]
    ok, quota = ReasonCode(PacketTypes.PUBACK), ReasonCode(PacketTypes.PUBACK, identifier=0x97)
    for mid, reason in ((1, ok), (2, quota), (3, ok)):
        link._acks.put((mid, reason))
    outbox.put("corrosion/quota/detections", b"3")
    link._publish_some()
    assert client.sent == [b"0", b"1", b"2"]  # paused
    assert (outbox.depth, outbox.acked, outbox.dropped_total) == (2, 2, 0)
    later = time.monotonic() + 2
    monkeypatch.setattr("agent.mqtt.time", SimpleNamespace(monotonic=lambda: later))
    link._publish_some()
    assert client.sent[3:] == [b"1", b"3"]  # the throttled one first
    link._acks.put((4, ok))
    link._acks.put((5, ok))
    link._publish_some()
    assert (outbox.depth, outbox.acked, outbox.dropped_total) == (0, 4, 0)
