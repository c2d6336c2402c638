"""`corrosion-agent watch`: what the devices publish, readable by a person at a terminal.

Every payload is validated against the contract, so an integrator sees at once when a
device (or their own publisher) sends something the contract does not allow.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ValidationError

from agent.config import MqttConfig, TlsConfig
from agent.contract import DetectionMessage, describe
from agent.contract.captures import UploadNotice
from agent.contract.messages import CommandResult, MetricsMessage, ModelStatus, StatusMessage
from agent.mqtt import make_client

KINDS: dict[str, type[BaseModel]] = {
    "detections": DetectionMessage,
    "status": StatusMessage,
    "model": ModelStatus,
    "metrics": MetricsMessage,
    "result": CommandResult,
    "uploads": UploadNotice,
}


def broker_config(
    url: str, tls: TlsConfig, username: str | None, password: str | None
) -> MqttConfig:
    """mqtt://[user:pass@]host[:port] or mqtts://... (TLS, port 8883 by default)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    secure = parts.scheme == "mqtts"
    return MqttConfig(
        host=parts.hostname,
        port=parts.port or (8883 if secure else 1883),
        username=username or (unquote(parts.username) if parts.username else None),
        password=password or (unquote(parts.password) if parts.password else None),
        tls=tls.model_copy(update={"enabled": tls.enabled or secure}),
    )


def describe_message(kind: str, device: str, payload: Any) -> str:
    """One line for a person: the fields that matter for each kind of message."""
    if isinstance(payload, DetectionMessage):
        flag = "FLAGGED" if payload.flagged else "ok"
        return (
            f"{device} detection #{payload.frame_index} {payload.corrosion_pct:6.2f}% {flag:7s} "
            f"{len(payload.regions)} regions  {payload.model.name} {payload.model.version}  "
            f"{payload.latency_ms:.0f} ms  {payload.source}"
        )
    if isinstance(payload, StatusMessage):
        model = f"{payload.model.name} {payload.model.version}" if payload.model else "no model"
        source = f"{payload.source.kind} {payload.source.state}" if payload.source else "-"
        return (
            f"{device} status {payload.state.upper()}  v{payload.agent_version}  {model}  "
            f"up {payload.uptime_s:.0f} s  source {source}"
        )
    if isinstance(payload, ModelStatus):
        refused = f"  refused: {payload.refused}" if payload.refused else ""
        return (
            f"{device} model {payload.serving.name} {payload.serving.version}  "
            f"flag >= {payload.flag_pct:g}%{refused}"
        )
    if isinstance(payload, MetricsMessage):
        lat = payload.latency
        timing = f"p50 {lat.p50_ms:.1f} ms p95 {lat.p95_ms:.1f} ms" if lat else "idle"
        return (
            f"{device} metrics {payload.fps:.1f} fps {timing}  frames {payload.frames_total} "
            f"dropped {payload.frames_dropped} failed {payload.frames_failed}  "
            f"outbox {payload.outbox.depth} ({payload.outbox.dropped_total} dropped ever)"
        )
    if isinstance(payload, UploadNotice):
        return (
            f"{device} upload {payload.category} {payload.corrosion_pct:.2f}%  "
            f"s3://{payload.bucket}/{payload.image_key}"
        )
    if isinstance(payload, CommandResult):
        answer = payload.result if payload.ok else f"ERROR {payload.error}"
        return f"{device} cmd {payload.command} -> {answer}"
    return f"{device} {kind} {payload}"


def parse(topic: str, prefix: str, raw: bytes) -> tuple[str, str, Any]:
    """(device, kind, validated payload or an error line) for a topic under `prefix`."""
    rest = topic[len(prefix) :].split("/")
    device, kind = rest[0], rest[-1]
    model = KINDS.get(kind)
    if model is None:
        return device, kind, raw.decode("utf-8", "replace")
    try:
        return device, kind, model.model_validate_json(raw)
    except ValidationError as exc:
        return device, kind, f"INVALID {kind}: {describe(exc)}"


def watch(
    config: MqttConfig,
    *,
    prefix: str = "corrosion/",
    device: str = "+",
    as_json: bool = False,
    count: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print messages until interrupted (or `count` were printed)."""
    seen = 0
    base = f"{prefix}{device}/"
    subscriptions = [base + k for k in ("detections", "status", "model", "metrics", "uploads")]
    subscriptions.append(base + "cmd/+/result")

    def on_connect(client: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            print(f"broker {config.host}:{config.port} refused: {reason}", file=sys.stderr)
            client.disconnect()
            return
        client.subscribe([(t, 1) for t in subscriptions])

    def on_message(client: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        nonlocal seen
        device_id, kind, payload = parse(message.topic, prefix, bytes(message.payload))
        if as_json:
            body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
            line = json.dumps({"topic": message.topic, "payload": body})
        else:
            line = describe_message(kind, device_id, payload)
        print(line, file=out, flush=True)
        seen += 1
        if count is not None and seen >= count:
            client.disconnect()

    client = make_client(config, client_id="")
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(config.host, config.port, config.keepalive_s)
    except OSError as exc:
        print(f"error: broker {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        client.loop_forever()
    return 0
