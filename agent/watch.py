"""`corrosion-agent watch`: what the devices publish, readable by a person at a terminal.

Every payload is validated against the contract, so an integrator sees at once when a
device (or their own publisher) sends something the contract does not allow.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
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


def _detection(m: DetectionMessage) -> str:
    flag = "FLAGGED" if m.flagged else "ok"
    rust = "" if m.rust_probability is None else f"P(rust) {m.rust_probability:.2f} "
    return (
        f"detection #{m.frame_index} {m.corrosion_pct:6.2f}% {flag:7s} {rust}{len(m.regions)} "
        f"regions  {m.model.name} {m.model.version}  {m.latency_ms:.0f} ms  {m.source}"
    )


def _status(m: StatusMessage) -> str:
    model = f"{m.model.name} {m.model.version}" if m.model else "no model"
    source = f"{m.source.kind} {m.source.state}" if m.source else "-"
    return (
        f"status {m.state.upper()}  v{m.agent_version}  {model}  "
        f"up {m.uptime_s:.0f} s  source {source}"
    )


def _model(m: ModelStatus) -> str:
    refused = f"  refused: {m.refused}" if m.refused else ""
    rule = (  # when the image rule decides, the flag % is only the operator's fallback
        f"flag P(rust) >= {m.rule_threshold:.3g} (image rule)"
        if m.rule_threshold is not None
        else f"flag >= {m.flag_pct:g}%"
    )
    return f"model {m.serving.name} {m.serving.version}  {rule}{refused}"


def _metrics(m: MetricsMessage) -> str:
    lat = m.latency
    timing = f"p50 {lat.p50_ms:.1f} ms p95 {lat.p95_ms:.1f} ms" if lat else "idle"
    return (
        f"metrics {m.fps:.1f} fps {timing}  frames {m.frames_total} "
        f"dropped {m.frames_dropped} failed {m.frames_failed}  "
        f"outbox {m.outbox.depth} ({m.outbox.dropped_total} dropped ever)"
    )


def _upload(m: UploadNotice) -> str:
    return f"upload {m.category} {m.corrosion_pct:.2f}%  s3://{m.bucket}/{m.image_key}"


def _result(m: CommandResult) -> str:
    return f"cmd {m.command} -> {m.result if m.ok else f'ERROR {m.error}'}"


LINES: dict[type[BaseModel], Callable[[Any], str]] = {
    DetectionMessage: _detection,
    StatusMessage: _status,
    ModelStatus: _model,
    MetricsMessage: _metrics,
    UploadNotice: _upload,
    CommandResult: _result,
}


def describe_message(kind: str, device: str, payload: Any) -> str:
    """One line for a person: the fields that matter for each kind of message."""
    line = LINES.get(type(payload))
    return f"{device} {line(payload) if line else f'{kind} {payload}'}"


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
    """Print messages until interrupted (or `count` were printed); 2 if the broker refused."""
    seen = 0
    refused = False
    base = f"{prefix}{device}/"
    subscriptions = [base + k for k in ("detections", "status", "model", "metrics", "uploads")]
    subscriptions.append(base + "cmd/+/result")

    def on_connect(client: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        nonlocal refused
        if reason.is_failure:
            refused = True
            print(f"error: broker {config.host}:{config.port} refused: {reason}", file=sys.stderr)
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
    return 2 if refused else 0
