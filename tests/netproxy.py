"""A TCP proxy on loopback that can throttle and cut the link: a slow, flaky uplink."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.broker import free_port


class Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target; `rate` bytes/s upstream (0 = unlimited)."""

    def __init__(self, target: int, rate: int = 0) -> None:
        self.target = target
        self.rate = rate
        self.port = free_port()
        self.up = True
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while data := src.recv(16384):
                if throttled and self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.up = False
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._conns.clear()

    def restore(self, rate: int = 0) -> None:
        self.rate = rate
        self.up = True

    def close(self) -> None:
        self.cut()
        self._closed.set()
        self._server.close()
