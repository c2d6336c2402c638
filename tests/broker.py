"""A real Mosquitto per test session (or per test, when a test kills it), on free loopback
ports, run as the unprivileged `mosquitto` user when the tests run as root.

Also a throw-away PKI (CA, server and client certificates) for the mutual-TLS listener.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: while its server is down, any client
    connection (a reconnecting agent, even one to that very port by TCP self-connect)
    can be given it as a source port, and the server then fails "Address already in
    use" when it starts.
    """
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    while True:
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"mosquitto did not open 127.0.0.1:{port}")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA: must be refused
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)

    def write(
        name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        c, k = directory / f"{name}.pem", directory / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return c, k

    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("rogue-ca", rogue_ca_key, None, rogue_ca_key, ca=True)
    ca_path, _ = write("ca", ca, ca_key)
    skey, ckey, rkey = _key(), _key(), _key()
    server = write("server", _cert("localhost", skey, ca, ca_key, server=True), skey)
    client = write("client", _cert("device-1", ckey, ca, ca_key), ckey)
    rogue = write("rogue", _cert("device-1", rkey, rogue_ca, rogue_ca_key), rkey)
    return Pki(ca_path, *server, *client, *rogue)


class Broker:
    """One mosquitto process; `kill` and `start` keep the same ports and persistence."""

    def __init__(
        self,
        directory: Path,
        pki: Pki | None = None,
        persistence: bool = True,
        users: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if pki else None
        self.pki = pki
        self.log = self.dir / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'false' if users else 'true'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
            *extra,
            f"listener {self.port} 127.0.0.1",
        ]
        if users:
            passwords = self.dir / "passwords"
            passwords.touch()
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwords), user, password], check=True
                )
            lines.append(f"password_file {passwords}")
        if pki is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {pki.ca}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                "require_certificate true",
            ]
        if os.geteuid() == 0:
            lines.insert(0, "user mosquitto")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        _give_to_broker(self.dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_port(self.port)
        except RuntimeError:
            self.proc.kill()
            _, err = self.proc.communicate()
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"mosquitto failed: {err.decode()} {log}") from None
        return self

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM lets mosquitto save its persistence (what a service stop does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@contextmanager
def broker_dir(name: str) -> Iterator[Path]:
    """A folder under /tmp owned by the broker's user (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=f"corrosion-{name}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _give_to_broker(directory: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("mosquitto")
        for path in [directory, *directory.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    with broker_dir("pki") as directory:
        p = make_pki(directory)
        _give_to_broker(directory)
        yield p


@pytest.fixture(scope="session")
def broker(pki: Pki) -> Iterator[Broker]:
    """One broker for the session (plain and mutual-TLS listeners). Do not kill it."""
    with broker_dir("mosquitto") as directory:
        b = Broker(directory, pki).start()
        yield b
        b.kill()


@pytest.fixture
def password_broker() -> Iterator[Broker]:
    """A broker that takes only user `device-1` with password `s3cret-pass`."""
    with broker_dir("mosquitto") as directory:
        b = Broker(directory, users={"device-1": "s3cret-pass"}).start()
        yield b
        b.kill()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker for one test, which may kill and restart it (not started yet)."""
    with broker_dir("mosquitto") as directory:
        b = Broker(directory)
        yield b
        b.kill()
