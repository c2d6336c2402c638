"""Helpers for tests that run the real daemon as a process against a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import toml_value


def write_frames(
    folder: Path, n: int, start: int = 0, size: tuple[int, int] = (96, 64)
) -> list[str]:
    """JPEGs with a rusty patch of varying size; mtimes increase with the index."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    names = []
    base = time.time() - 10_000 + start
    for i in range(start, start + n):
        img = np.full((size[1], size[0], 3), (150, 150, 150), np.uint8)
        w = int(rng.integers(4, size[0] // 2))
        img[8 : 8 + w // 2, 8 : 8 + w] = (30, 60, 150)  # BGR rust brown
        name = f"f{i:05d}.jpg"
        path = folder / name
        cv2.imwrite(str(path), img)
        os.utime(path, (base + i * 0.01, base + i * 0.01))
        names.append(name)
    return names


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """A TOML file from nested dicts (one level of tables, sub-tables dotted)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_settings(
    tmp: Path, model: Path, port: int, frames: Path, *, device: str = "dev-1", **areas: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "device_id": device,
        "state_dir": str(tmp / "state"),
        "log_level": "INFO",
        "model": {"path": str(model)},
        "source": {"kind": "folder", "uri": str(frames), "poll_s": 0.05, "settle_s": 0.0},
        "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "health": {"metrics_interval_s": 1.0},
    }
    for area, values in areas.items():
        settings.setdefault(area, {}).update(values)
    return settings


class AgentProcess:
    """`corrosion-agent run` in a child process; stderr kept for the assertion messages."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.log = config.with_suffix(".log")
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config), *extra],
            stdout=self._fh,
            stderr=self._fh,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.flush()

    def signal(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._fh.close()


class Subscriber:
    """A persistent-session MQTT v5 subscriber that records every message it gets."""

    def __init__(self, port: int, topics: list[str], client_id: str = "test-sub") -> None:
        self.messages: list[tuple[str, bytes, Properties | None]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.reconnect_delay_set(0.05, 0.3)
        self._topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker keeps our queue while it restarts
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("subscriber did not subscribe")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), message.properties))

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, check: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.05)
        return check()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
