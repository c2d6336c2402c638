"""Config areas of the broker link and the durable outbox."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, SecretStr, field_validator

from agent.config.areas import Area

DEVICE_ID: Final = "{device_id}"
"""The one placeholder `mqtt.topic_prefix` may hold: AgentConfig.topic_prefix replaces it."""


class TlsConfig(Area):
    """TLS to the broker; a client certificate makes it mutual TLS (AWS IoT Core)."""

    enabled: bool = Field(default=False, description="Connect over TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle; None = system store")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS)")
    check_hostname: bool = Field(default=True, description="Verify the broker's host name")


class MqttConfig(Area):
    """The broker and how we talk to it."""

    enabled: bool = Field(default=True, description="False: messages only go to the outbox")
    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 for TLS)")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive")
    username: str | None = Field(default=None, description="User name, if the broker wants one")
    password: SecretStr | None = Field(default=None, description="Password (never logged)")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings")
    topic_prefix: str = Field(
        default=f"corrosion/{DEVICE_ID}/",
        description="Prefix of every topic; {device_id} is replaced; ends with /",
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0.0, le=60.0, description="First reconnect wait (full jitter)"
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="Longest reconnect wait"
    )
    inflight: int = Field(
        default=64,
        ge=1,
        le=65535,
        description="QoS 1 messages awaiting PUBACK at once (an MQTT 5 broker may ask fewer)",
    )
    max_command_bytes: int = Field(
        default=65536, ge=64, le=1 << 24, description="Larger command payloads are refused"
    )

    @field_validator("topic_prefix")
    @classmethod
    def _publishable_prefix(cls, value: str) -> str:
        """A typo'd placeholder (`{device}`) published to that literal topic; the rest is
        what MQTT forbids in a topic the agent publishes to and subscribes under."""
        if bad := [p for p in re.findall(r"\{[^{}]*\}?|\}", value) if p != DEVICE_ID]:
            raise ValueError(f"unknown placeholder {bad[0]!r} (known: {DEVICE_ID})")
        if wild := [c for c in value if c in "+#"]:
            raise ValueError(f"MQTT wildcard {wild[0]!r}: a topic to publish to cannot hold one")
        if "\0" in value:
            raise ValueError("a NUL character: MQTT forbids it in topics")
        try:  # a variable's bytes that are not UTF-8 arrive as surrogates; paho cannot send them
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{value!r} is not UTF-8 text: MQTT topics are") from None
        if value.startswith("$"):
            raise ValueError("starts with $: such topics are the broker's ($SYS, $aws)")
        if not value.endswith("/"):
            raise ValueError("must end with /: a topic is the prefix + its name (status, ...)")
        return value


class OutboxConfig(Area):
    """The durable queue every outgoing message passes through."""

    max_messages: int = Field(
        default=200_000, ge=10, description="Most messages kept waiting for the broker"
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024,
        description="Most bytes kept waiting (payloads, topics, correlation data)",
    )
    when_full: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="Which message goes when a bound is hit (counted in metrics, never silent)",
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite synchronous: normal survives crashes, full also power loss",
    )
