"""A loopback HTTP proxy in front of the real S3 server (SeaweedFS) that injects the faults object
stores really have, on a plan: per kind of request, the 1st is answered 503 SlowDown, the 2nd has
its connection dropped before it reaches the store, the 3rd reaches the store and its answer is
lost (the connection closes instead). Every fault is counted and recorded; the number of faults
is bounded by the plan, so a test through it ends. Apart from the plan, GETs of the objects in
`denied` are refused (403 AccessDenied: credentials that may not read them) and of those in
`gone` find nothing (404 NoSuchKey: deleted after listing). `delay_s` holds every request that
reaches the store that long first (a remote store's time to first byte, which loopback lacks);
`list_delay_s` holds each LIST (ListObjectsV2) that long more: a bucket that takes long to list.
`most_in_flight` is the most requests it has had under way at once; `log` is every request's method
and path.

Kinds: "read" (GET of an input shard), "part" (PUT of a staged part file), "commit" (writes of
_manifest.json and _SUCCESS, copies into place), "lease" (the conditional create of _lease.json).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections import Counter

FAULTS = ("slowdown", "drop", "lose")  # the 1st, 2nd and 3rd request of each kind


def _error(status: int, reason: str, code: str) -> bytes:
    """An S3 error response, as the store sends it."""
    body = f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{reason}</Message></Error>'.encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def kind_of(method: str, target: str, headers: dict[str, str]) -> str | None:
    path = target.split("?", 1)[0]
    if method == "GET" and path.endswith(".tar"):
        return "read"
    if method == "PUT" and "/_pending/" in path and path.endswith(".parquet"):
        return "part"
    if method == "PUT" and path.endswith("/_lease.json") and headers.get("if-none-match") == "*":
        return "lease"
    if method == "PUT" and (path.endswith("/_manifest.json") or path.endswith("/_SUCCESS")
                            or "x-amz-copy-source" in headers):
        return "commit"
    return None


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


def _read_body(sock: socket.socket, buf: bytearray, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            buf[:] = rest
            while len(buf) < size + 2:
                buf += sock.recv(65536)
            out += line + b"\r\n" + bytes(buf[: size + 2])
            del buf[: size + 2]
            if size == 0:
                return bytes(out)
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return body


def _headers(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method or HTTP version, target or status, headers in lower case) of a request or response head."""
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ")
    method, target = first[0], first[1] if len(first) > 1 else ""
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return method, target, headers


class FaultProxy:
    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 8333), faults: bool = True, delay_s: float = 0.0,
                 list_delay_s: float = 0.0):
        self.upstream, self.inject, self.delay_s, self.list_delay_s = upstream, faults, delay_s, list_delay_s
        self.in_flight = self.most_in_flight = 0
        self.denied: set[str] = set()  # object paths (/bucket/key) whose GET is refused: 403 AccessDenied
        self.gone: set[str] = set()  # object paths whose GET finds nothing: 404 NoSuchKey (deleted after listing)
        self.seen: Counter = Counter()  # requests per kind
        self.faults: list[tuple[str, str, str]] = []  # (kind, fault, method + path)
        self.requests = 0
        self.log: list[str] = []  # every request: method and path
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _plan(self, method: str, target: str, headers: dict[str, str]) -> str | None:
        kind = kind_of(method, target, headers)
        path = target.split("?", 1)[0]
        with self._lock:
            self.requests += 1
            self.log.append(f"{method} {path}")
            if method == "GET" and path in self.denied | self.gone:
                self.faults.append(("read", "denied" if path in self.denied else "gone", f"{method} {path}"))
                return "denied" if path in self.denied else "gone"
            if kind is None or not self.inject:
                return None
            self.seen[kind] += 1
            n = self.seen[kind]
            fault = FAULTS[n - 1] if n <= len(FAULTS) else None
            if kind == "lease":  # the case that matters for a lease: created, but the answer lost
                fault = "lose" if n == 1 else None
            if fault:
                self.faults.append((kind, fault, f"{method} {target.split('?', 1)[0]}"))
            return fault

    def _serve(self, client: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                head = _read_head(client, buf)
                if head is None:
                    return
                method, target, headers = _headers(head)
                if headers.get("expect", "").lower() == "100-continue":  # botocore's PUTs wait for this
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(client, buf, headers)
                fault = self._plan(method, target, headers)
                if fault in ("slowdown", "denied", "gone"):
                    client.sendall(_error(*{"slowdown": (503, "Slow Down", "SlowDown"),
                                            "denied": (403, "Forbidden", "AccessDenied"),
                                            "gone": (404, "Not Found", "NoSuchKey")}[fault]))
                    continue
                if fault == "drop":
                    return  # closed before the store saw it
                if method == "GET" and "list-type=" in target:
                    time.sleep(self.list_delay_s)
                answer = self._delayed_forward(head, body, method)
                if fault == "lose":
                    return  # the store did it; the client never hears
                client.sendall(answer)
        except OSError:
            return
        finally:
            client.close()

    def _delayed_forward(self, head: bytes, body: bytes, method: str) -> bytes:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            return self._forward(head, body, method)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _forward(self, head: bytes, body: bytes, method: str) -> bytes:
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith((b"connection:", b"expect:"))]
        request = b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(request)
            buf = bytearray()
            rhead = _read_head(up, buf) or b"HTTP/1.1 502 Bad Gateway"
            _, status, rheaders = _headers(rhead)
            status = int(status)
            if method == "HEAD" or status in (204, 304):
                rbody = b""
            elif "content-length" in rheaders or rheaders.get("transfer-encoding", "").lower() == "chunked":
                rbody = _read_body(up, buf, rheaders)
            else:
                while chunk := up.recv(65536):
                    buf += chunk
                rbody = bytes(buf)
        lines = [ln for ln in rhead.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        return b"\r\n".join(lines) + b"\r\n\r\n" + rbody
