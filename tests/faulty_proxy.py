"""A TCP proxy in front of an S3 server that fails one request in `every`: a 503 SlowDown (what S3 answers when
throttling) or a connection dropped before any answer, in turn. Each connection carries one request (the proxy
asks for `Connection: close`), so "a request" is what it counts.

Or, for the requests whose first line matches `match` (a method and a part of the path): always answer `status`
(a persistent 403 AccessDenied or 503 SlowDown), or pass them on after `delay` seconds (a slow upload)."""

from __future__ import annotations

import itertools
import socket
import threading
import time

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: 92\r\n\r\n<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Slow down</Message>"
             b"</Error>\n\n")


ACCESS_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                 b"Content-Length: 99\r\n\r\n<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code>"
                 b"<Message>Access Denied</Message></Error>\n\n")
ANSWERS = {403: ACCESS_DENIED, 503: SLOW_DOWN}


class FaultyProxy:
    def __init__(self, upstream_host: str, upstream_port: int, every: int = 5, match=None, status: int | None = None,
                 delay: float = 0.0):
        """`match`: a function of the request line (bytes) choosing the requests `status` or `delay` applies to;
        without one, one request in `every` fails."""
        self.upstream = (upstream_host, upstream_port)
        self.every = every
        self.match, self.status, self.delay = match, status, delay
        self.matched = 0
        self.requests = itertools.count(1)
        self.failed = {"503": 0, "dropped": 0}
        self.served = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            with self._lock:
                n = next(self.requests)
            request_line = head.split(b"\r\n", 1)[0]
            if self.match is not None:
                if self.match(request_line):
                    with self._lock:
                        self.matched += 1
                    if self.status:
                        conn.sendall(ANSWERS[self.status])
                        return
                    time.sleep(self.delay)
            elif n % self.every == 0:
                kind = "503" if (n // self.every) % 2 else "dropped"
                with self._lock:
                    self.failed[kind] += 1
                if kind == "503":
                    conn.sendall(SLOW_DOWN)
                return  # "dropped": closed with no answer at all
            header, _, rest = head.partition(b"\r\n\r\n")
            lines = [ln for ln in header.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + rest)
            pump = threading.Thread(target=self._pump, args=(conn, upstream), daemon=True)
            pump.start()
            self._pump(upstream, conn)
            with self._lock:
                self.served += 1
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
