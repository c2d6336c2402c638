"""The broker link: connection with backoff and jitter, retained status, outbox publisher,
commands in.

Three threads, all owned by `MqttLink`: the network thread (paho's loop, reconnecting with
full-jitter backoff so a fleet does not stampede a broker that comes back), the publisher
(hands the outbox to paho in order, at most `inflight` at a time, or fewer when an MQTT 5
broker's Receive Maximum says so: paho does not honour it) and paho's callbacks,
which run on the network thread and only enqueue: PUBACKs go to the publisher, which
deletes the rows. paho resends what it holds after a reconnect; what it loses with the
process is still in the outbox and is replayed at the next start.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.backoff import full_jitter
from agent.commands import Commands
from agent.config import ConfigError, MqttConfig, TlsConfig
from agent.contract.messages import AgentState, Topics
from agent.outbox import Outbox, Pending

log = logging.getLogger(__name__)

# An MQTT 5 caller's response topic and correlation data are stored with the answer: capped,
# so that a sender cannot fill the outbox with them (beyond: the default topic, no data).
MAX_RESPONSE_TOPIC = 256
MAX_CORRELATION = 256
QUOTA_EXCEEDED = 0x97  # PUBACK: over the broker's rate or quota, not a refusal of the message
QUOTA_WAIT_MIN_S = 1.0
QUOTA_WAIT_MAX_S = 60.0
# publish() results after which paho holds a QoS 1 message and sends it once (re)connected:
# not connected yet, or the socket broke during this very write (the loop runs on our
# thread, so the write and its EPIPE happen inside publish). Neither is a refusal.
_KEPT_OFFLINE = frozenset({MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST})


def make_client(config: MqttConfig, client_id: str) -> paho.Client:
    """A paho client with protocol, credentials and TLS from the config (shared with `watch`)."""
    v5 = config.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else True,
    )
    if config.username is not None:
        secret = config.password.get_secret_value() if config.password else None
        client.username_pw_set(config.username, secret)
    tls = config.tls
    if tls.enabled:
        files = tls_files(tls)
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as exc:  # a file that is not what it claims to be
            raise ConfigError(f"mqtt.tls ({files}): {exc}") from None
        client.tls_insecure_set(not tls.check_hostname)
    return client


def tls_files(tls: TlsConfig) -> str:
    """The TLS files the config names, each checked readable; ConfigError names the field
    (ssl's own errors name neither the file nor the setting)."""
    named = [(f, p) for f, p in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
             ("key_file", tls.key_file)) if p is not None]  # fmt: skip
    for field, path in named:
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"mqtt.tls.{field} ({path}): {exc.strerror or exc}") from None
    return ", ".join(f"{field} {path}" for field, path in named) or "system CA store"


@dataclass(frozen=True)
class Retained:
    """Retained state messages, rebuilt from the agent's state at every (re)connect."""

    status: Callable[[AgentState], bytes]  # StatusMessage JSON
    model: Callable[[], bytes | None]  # ModelStatus JSON


class MqttLink:
    """One device's connection to its broker; `start` and `stop` own all its threads."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        topics: Topics,
        outbox: Outbox,
        retained: Retained,
        commands: Commands,
    ) -> None:
        self.config = config
        self.topics = topics
        self.outbox = outbox
        self.retained = retained
        self.commands = commands
        self._client = make_client(config, client_id)
        self._client.max_inflight_messages_set(config.inflight)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.enable_logger(logging.getLogger("paho"))
        self._v5 = config.protocol == "5"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._stopping = False  # the final status is out: nothing may say online
        self._state_lock = threading.Lock()  # orders `_stopping` and the status publishes
        self._acks: queue.SimpleQueue[tuple[int, ReasonCode]] = queue.SimpleQueue()
        self._handed: dict[int, int] = {}  # paho mid -> outbox row id; publisher thread only
        self._owed: tuple[list[int], list[int]] = ([], [])  # acked, refused: not yet committed
        self._last_id = 0
        self._again: list[int] = []  # rows the broker throttled (0x97): sent first once due
        self._quota_until = 0.0  # monotonic; no publishing before it
        self._quota_wait = QUOTA_WAIT_MIN_S
        self._window = config.inflight  # in flight at most: ours, or the broker's lower one
        self._ever_connected = False
        self._connected_ok = False  # set by on_connect: the backoff starts over
        self._connected_once = False
        self.on_ack: Callable[[int], None] | None = None  # bench hook: row id acknowledged
        outbox.on_put(self._wake.set)
        self._threads = [
            threading.Thread(target=self._network, name="mqtt-network", daemon=True),
            threading.Thread(target=self._publisher, name="mqtt-publisher", daemon=True),
        ]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def ever_connected(self) -> bool:
        """True once a CONNACK has accepted us (a TCP connect alone is not enough)."""
        return self._connected_once

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def publish_state(self) -> None:
        """Republish the retained status and model now (they changed); a no-op offline,
        since every connect publishes them afresh."""
        with self._state_lock:
            if not self._connected.is_set() or self._stopping:
                return
            status = self.retained.status("online")
            self._client.publish(self.topics.status, status, qos=1, retain=True)
            model = self.retained.model()
            if model is not None:
                self._client.publish(self.topics.model, model, qos=1, retain=True)

    # ------------------------------------------------------------------ network thread

    def _network(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._client.will_set(
                self.topics.status, self.retained.status("offline"), qos=1, retain=True
            )
            try:
                if self._ever_connected:
                    self._client.reconnect()
                else:
                    self._client.connect(
                        self.config.host, self.config.port, self.config.keepalive_s
                    )
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._log_failure(attempt, f"cannot connect: {exc}")
            else:
                self._ever_connected = True
                self._loop()
                if self._stop.is_set():
                    return
                self._connected.clear()
                self._wake.set()
            if self._connected_ok:
                attempt = 0
                self._connected_ok = False
            cfg = self.config
            self._stop.wait(full_jitter(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s))
            attempt += 1

    def _loop(self) -> None:
        """Serve the connection until it drops or we stop. An exception out of paho (its
        callbacks are ours and guarded; this is the last line) drops the connection rather
        than the thread: reconnecting is the way back."""
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
        except Exception:
            log.exception("broker %s: network loop failed; reconnecting", self.where)

    def _log_failure(self, attempt: int, what: str) -> None:
        # The first failure is news; the hundredth is noise.
        level = logging.WARNING if attempt == 0 else logging.DEBUG
        log.log(level, "broker %s: %s; retrying with backoff", self.where, what)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker %s refused the connection: %s", self.where, reason)
            return
        log.info("connected to broker %s", self.where)
        # MQTT 5: a client must not have more unacknowledged QoS 1 messages than the
        # broker's Receive Maximum (a protocol error; AWS IoT caps it too). paho cannot
        # change its own limit once connected, so the outbox window keeps under it, less
        # the two retained state messages that are published beside the outbox.
        limit = getattr(properties, "ReceiveMaximum", None) if properties else None
        self._window = min(self.config.inflight, max(1, limit - 2) if limit else 1 << 16)
        self._connected_ok = self._connected_once = True
        self._connected.set()
        self.publish_state()
        if self._v5:  # else a retained command sent while we are connected reads as live
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            client.subscribe(self.topics.commands, options=options)
        else:  # MQTT 3.1.1 cannot tell: only one retained before we connected is refused
            client.subscribe(self.topics.commands, qos=1)
        self._wake.set()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        # A broker whose policy refuses the subscription still lets us publish: say why
        # commands never arrive, once per connect, rather than leave operators guessing.
        for reason in reasons:
            if reason.is_failure:
                log.error(
                    "broker %s refused the command subscription %s: %s; commands will not "
                    "arrive (check the broker's ACL or policy)",
                    self.where,
                    self.topics.commands,
                    reason,
                )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set() and not self._stop.is_set():
            log.warning(
                "lost broker %s (%s); %d message(s) wait in the outbox",
                self.where,
                reason,
                self.outbox.depth,
            )
        self._connected.clear()
        self._wake.set()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Runs with paho's message lock held: only enqueue (see the module docstring).
        self._acks.put((mid, reason))
        self._wake.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # Runs in the network thread: an error here (a locked or full outbox) must not end it.
        try:
            self._answer(message)
        except Exception:
            log.exception("command on %s not answered", message.topic[:200])

    def _answer(self, message: paho.MQTTMessage) -> None:
        name = self.topics.command_name(message.topic)
        if name is None or not message.payload:  # zero bytes: a retained command cleared
            return
        topic, correlation = None, None
        props = message.properties if self._v5 else None
        if props is not None:  # the caller's; a sender may make them huge, so they are capped
            response = getattr(props, "ResponseTopic", None)
            if (
                isinstance(response, str)
                and 0 < len(response) <= MAX_RESPONSE_TOPIC
                and not set(response) & {"+", "#"}
            ):
                topic = response
            data = getattr(props, "CorrelationData", None)
            if isinstance(data, bytes) and len(data) <= MAX_CORRELATION:
                correlation = data
        result = self.commands.handle(
            name,
            bytes(message.payload),
            retained=message.retain,
            correlation=correlation,
            reply_to=topic,
        )
        topic = topic or self.topics.command_result(result.command)
        self.outbox.put(topic, result.model_dump_json().encode(), correlation=correlation)

    # ------------------------------------------------------------------ publisher thread

    def _publisher(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._publish_some()
            except Exception:  # one bad row or a full disk must not end publishing for good
                log.exception("publisher: unexpected error; retrying")
                self._stop.wait(1.0)

    def _publish_some(self) -> None:
        """Settle PUBACKs, then hand paho the next rows that fit in the in-flight window:
        first any the broker throttled, once their wait is over."""
        self._settle_acks()
        if not self._connected.is_set() or time.monotonic() < self._quota_until:
            return
        room = self._window - len(self._handed)
        if room <= 0:
            return
        found = self.outbox.rows(self._again[:room])
        present = {m.id for m in found}
        cut = set(self._again[:room]) - present  # acked or evicted meanwhile: nothing to send
        self._again = [row for row in self._again if row not in cut]
        for message in found + self.outbox.take(self._last_id, room - len(found)):
            if not self._hand(message):
                return
            if message.id in present:  # off the list only once handed or refused: an error
                self._again.remove(message.id)  # in _hand leaves it for the next pass

    def _hand(self, message: Pending) -> bool:
        """Publish one row (or refuse it for good); False if it must wait for a connection."""
        props = None
        if self._v5 and message.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = message.correlation
        try:
            info = self._client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=props,
            )
        except ValueError as exc:  # a row paho can never send: it must not block the rest
            log.error("cannot publish to %s: %s; dropped (counted)", message.topic[:200], exc)
            self.outbox.refuse([message.id])
            return True
        offline = info.rc in _KEPT_OFFLINE  # paho queued a QoS 1 message to send again
        if message.qos == 0 and offline:
            return False  # paho keeps no QoS 0 message offline: hand it again after reconnect
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not offline:
            log.error("cannot publish to %s: %s", message.topic, paho.error_string(info.rc))
            self.outbox.refuse([message.id])
            return True
        self._handed[info.mid] = message.id
        self._last_id = max(self._last_id, message.id)
        if message.qos == 0:  # no PUBACK will come: handed is as far as it goes
            self._acks.put((info.mid, ReasonCode(PacketTypes.PUBACK)))
            self._wake.set()
        return True

    def _settle_acks(self) -> None:
        """Commit the broker's answers; rows stay owed (`_owed`) until the outbox took them,
        so a failed commit is retried rather than leaving them to be sent twice."""
        done, refused = self._owed
        while True:
            try:
                mid, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            row = self._handed.pop(mid, None)
            if row is None:
                continue
            if reason.value == QUOTA_EXCEEDED:  # throttled: the row stays, sent again later
                self._throttled(row)
            elif reason.is_failure:
                log.error("broker refused message %d: %s; dropped (counted)", row, reason)
                refused.append(row)
            else:
                self._quota_wait = QUOTA_WAIT_MIN_S
                done.append(row)
        self.outbox.ack(done)
        settled = list(done)
        done.clear()
        self.outbox.refuse(refused)
        refused.clear()
        if self.on_ack is not None:
            for row in settled:
                self.on_ack(row)

    def _throttled(self, row: int) -> None:
        """A broker's quota (AWS IoT Core's publish rate, say, when a backlog replays): the
        row is no refusal; publishing pauses, doubling the pause while it lasts."""
        if time.monotonic() >= self._quota_until:
            log.warning("broker quota exceeded: publishing paused for %.0f s", self._quota_wait)
            self._quota_until = time.monotonic() + self._quota_wait
            self._quota_wait = min(QUOTA_WAIT_MAX_S, 2 * self._quota_wait)
        self._again.append(row)

    # ------------------------------------------------------------------ shutdown

    def stop(self, final_status: AgentState | None = "stopped", timeout: float = 3.0) -> None:
        """Publish the final status if connected, disconnect cleanly (no LWT), join threads,
        all within `timeout`. Messages still unacknowledged stay in the outbox for the next
        start."""
        deadline = time.monotonic() + timeout
        info = None
        with self._state_lock:
            self._stopping = True
            if self._connected.is_set() and final_status is not None:
                info = self._client.publish(
                    self.topics.status, self.retained.status(final_status), qos=1, retain=True
                )
        if info is not None:
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish %s status: %s", final_status, exc)
        self._stop.set()
        self._client.disconnect()
        self._wake.set()
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        if not any(t.is_alive() for t in self._threads):  # else the publisher still owns them
            self._settle_acks()
