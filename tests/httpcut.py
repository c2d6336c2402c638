"""An HTTP proxy on loopback that drops the link in the middle of chosen responses' bodies:
a flaky uplink as a device's HTTP client meets it (the headers arrive, then the socket
closes cleanly before Content-Length bytes)."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlparse


class CutProxy:
    """One request per connection to `upstream`; a request whose first line contains `cut`
    gets the headers and half its body, then the connection closes."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.cut: str | None = None
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = _read_request(conn)
            if not request:
                return
            line = request.split(b"\r\n", 1)[0].decode()
            with socket.create_connection(self.upstream) as up:
                up.sendall(_close_after(request))
                response = b"".join(iter(lambda: up.recv(65536), b""))
            head, _, body = response.partition(b"\r\n\r\n")
            if self.cut and self.cut in line:
                body = body[: len(body) // 2]
            conn.sendall(_close_after(head + b"\r\n\r\n") + body)
            conn.shutdown(socket.SHUT_RDWR)


def _read_request(conn: socket.socket) -> bytes:
    """Headers and the body their Content-Length announces."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for header in head.split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _close_after(message: bytes) -> bytes:
    """The message with `Connection: close`: one exchange per connection."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
