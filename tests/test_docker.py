"""The container image run as docs/DEPLOY.md runs it: built from the Dockerfile, read-only
root, no capabilities, no new privileges, uid 10001, state in a named volume, a watched
folder mounted read-only, and a real Mosquitto on loopback (host network).

Needs a Docker engine that can build the image: `make docker-test` runs this module; `make
test` leaves it out (marker `docker`), since CI machines need not have an engine and a
cold build takes minutes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.agentproc import Subscriber, write_frames
from tests.broker import Broker

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[1]
STATE = "/var/lib/corrosion-agent"
FRAMES = 30


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def image() -> str:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode
    ):
        pytest.fail("no Docker engine answers `docker info`: these tests need one")
    tag = "corrosion-agent:test"
    docker("build", "--network", "host", "-t", tag, str(ROOT), timeout=1800)
    return tag


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder uid 10001 in the container can read (pytest's tmp dirs are private)."""
    path = Path(tempfile.mkdtemp(prefix="corrosion-docker-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"corrosion-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", name)
    try:
        yield name
    finally:
        docker("volume", "rm", "-f", name, check=False)


def start(image: str, volume: str, shared: Path, port: int, *args: str) -> str:
    """A detached container with DEPLOY.md's flags; its id."""
    name = f"corrosion-test-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "-d", "--name", name, "--network", "host",
        "-v", f"{volume}:{STATE}",
        "-v", f"{shared / 'model'}:/models/current:ro",
        "-v", f"{shared / 'frames'}:/inbox:ro",
        "-e", "CORROSION_DEVICE_ID=dev-1",
        "-e", "CORROSION_MODEL__PATH=/models/current",
        "-e", "CORROSION_SOURCE__KIND=folder",
        "-e", "CORROSION_SOURCE__URI=/inbox",
        "-e", "CORROSION_SOURCE__SETTLE_S=0",
        "-e", "CORROSION_MQTT__HOST=127.0.0.1",
        "-e", f"CORROSION_MQTT__PORT={port}",
        "-e", "CORROSION_MQTT__RECONNECT_MAX_S=0.5",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--stop-timeout", "15",
        image, "run", "--config", "/etc/corrosion-agent/agent.toml", *args,
    )  # fmt: skip
    return name


def finish(name: str, timeout: float = 60) -> tuple[int, str]:
    """Wait for the container to exit (stopped after `timeout`, so a failed assertion does
    not turn into a hang); its exit code and log, then remove it."""
    try:
        code = int(docker("wait", name, timeout=timeout).strip())
    except subprocess.TimeoutExpired:
        docker("stop", "--time", "15", name, timeout=30, check=False)
        code = int(docker("wait", name, timeout=30).strip())
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=False)
    docker("rm", "-f", name, check=False)
    return code, logs.stdout + logs.stderr


def test_outbox_survives_containers_and_sigterm_stops_cleanly(
    image: str, volume: str, shared: Path, logistic_model: Path, own_broker: Broker
) -> None:
    shutil.copytree(logistic_model.parent, shared / "model")
    names = write_frames(shared / "frames", FRAMES)
    for path in shared.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    # No broker: every detection waits in the outbox on the volume when the run ends.
    first = start(image, volume, shared, own_broker.port, "--exit-when-done")
    assert docker("inspect", "--format", "{{.Config.User}}", first).strip() == "10001"
    code, log = finish(first)
    assert code == 0, log
    assert f"stopped: {FRAMES} frames" in log and "kept in the outbox" in log, log

    # A new container on the same volume: the outbox goes out, no frame is classified
    # twice, a frame added meanwhile is; then SIGTERM stops it within its 15 s.
    own_broker.start()
    sub = Subscriber(own_broker.port, ["corrosion/dev-1/#"], client_id="docker-sub")
    try:
        second = start(image, volume, shared, own_broker.port)
        try:
            assert sub.wait_for(lambda: len(sub.payloads("/detections")) >= FRAMES, 60)
            names += write_frames(shared / "frames", 1, start=FRAMES)
            (shared / "frames" / names[-1]).chmod(0o644)
            assert sub.wait_for(lambda: len(sub.payloads("/detections")) >= FRAMES + 1, 30)
            health = ["exec", second, "corrosion-agent", "health", "--state-dir", STATE]
            assert "healthy" in docker(*health)
            began = time.monotonic()
            docker("stop", second, timeout=30)
            stopped_in = time.monotonic() - began
        finally:
            code, log = finish(second, timeout=5)  # stopped above, unless an assert failed
        assert code == 0, log
        assert stopped_in < 15, log
        assert "to replay" in log and "stopped: 1 frames" in log, log
        assert sub.wait_for(lambda: "stopped" in [p["state"] for p in sub.payloads("/status")])
    finally:
        sub.close()
    detections = sub.payloads("/detections")
    assert sorted(Path(d["source"]).name for d in detections) == names
    assert len({d["message_id"] for d in detections}) == len(detections)


def test_image_carries_no_training_stack(image: str) -> None:
    """A device image holds the agent's runtime only: the `export` extra stays out."""
    for module in ("xgboost", "onnxmltools", "matplotlib"):
        probe = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image,
             "-c", f"import {module}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    version = docker("run", "--rm", "--network", "none", image, "--version")
    assert metadata.version("corrosion-edge") in version
