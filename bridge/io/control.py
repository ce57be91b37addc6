"""Control socket (JSON lines) and the Prometheus metrics listener.

Rules (docs/DESIGN.md "Control socket"):
- `grebe up` listens on the abstract unix socket `@grebe/<tun name>` (abstract sockets are
  per network namespace) unless `control_socket` names another ("@name" = abstract, else a
  filesystem path, removed on close).
- Protocol: the client sends one JSON object per line, {"cmd": "status", ...}; the server
  answers one JSON object per line: the command's result, or {"error": "..."}.
  Commands are a table (`ControlServer.commands`): other parts (inspection's `flows`) add
  theirs with `register(name, fn)`; fn(request) -> JSON-able dict.
- Metrics: `metrics_listen = "host:port"` serves the Prometheus text format 0.0.4 on any
  GET (HTTP/1.0 style: one response, then close).
- A bad client never raises out of here: bad JSON gets {"error": ...}. Both listeners run
  on the loop's main thread, which also runs every timer (keepalives, reorder flushes,
  splice retransmissions), so each client gets CLIENT_TIMEOUT in all, from accept to the
  last byte of the answer: a deadline per client, not a timeout per recv (a client sending
  a byte every 0.5 s held the thread for seconds, issue 12). Past it the client is cut.
- Who may ask: an abstract unix socket has no file permissions, so any local user of the
  network namespace could connect; the control server reads the client's credentials
  (SO_PEERCRED, unix(7)) and answers only uid 0 and the endpoint's own effective uid (others
  get {"error": "permission denied"}). A filesystem socket is also made mode 0600.
- Counted per listener (`stats`, shown in `grebe status` under io.control / io.metrics and
  in the metrics as grebe_listener_<what>_total{listener=...}, bridge/io/metrics.py):
  clients, timeouts (cut at the deadline), rejected (wrong uid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("grebe.control")

Command = Callable[[dict[str, Any]], Any]
CLIENT_TIMEOUT = 1.0


def socket_name(tun: str, configured: str | None = None) -> str:
    """The control socket name: `configured`, or "@grebe/<tun>"."""
    return configured or f"@grebe/{tun}"


def _address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7))


class _Deadline:
    """One client's time left (module docstring): `recv` and `sendall` within it."""

    __slots__ = ("conn", "end")

    def __init__(self, conn: socket.socket, seconds: float) -> None:
        self.conn = conn
        self.end = time.monotonic() + seconds

    def _arm(self) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("client deadline passed")
        self.conn.settimeout(left)

    def recv(self, n: int) -> bytes:
        self._arm()
        return self.conn.recv(n)

    def sendall(self, data: bytes) -> None:
        self._arm()  # Python >= 3.5: the timeout bounds the whole sendall
        self.conn.sendall(data)


class _Listener:
    """A non-blocking listening socket polled by the main thread: one short client at a time
    (CLIENT_TIMEOUT in all), never blocking the loop on a slow or silent client."""

    sock: socket.socket
    stats: dict[str, int]

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            self.stats["clients"] += 1
            client = _Deadline(conn, CLIENT_TIMEOUT)
            try:
                if self.allowed(conn):
                    self.serve(client)
                else:  # read the request first: a client never writes into a closed socket
                    self.stats["rejected"] += 1
                    _read_line(client)
                    client.sendall(b'{"error": "permission denied"}\n')
            except TimeoutError:
                self.stats["timeouts"] += 1
                log.debug("%s client: cut at the deadline", type(self).__name__)
            except OSError as e:
                log.debug("%s client: %s", type(self).__name__, e)

    def allowed(self, conn: socket.socket) -> bool:
        return True

    def serve(self, conn: _Deadline) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class ControlServer(_Listener):
    """A unix stream socket answering JSON-lines commands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.commands: dict[str, Command] = {}
        self.stats = {"clients": 0, "timeouts": 0, "rejected": 0}
        self.uids = frozenset({0, os.geteuid()})  # who may ask (module docstring)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = _address(name)
        try:
            self.sock.bind(addr)
            if not name.startswith("@"):
                os.chmod(name, 0o600)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"control socket {name}: {e.strerror}") from None
        self.sock.listen(16)
        self.sock.setblocking(False)

    def register(self, name: str, fn: Command) -> None:
        self.commands[name] = fn

    def allowed(self, conn: socket.socket) -> bool:
        """Only uid 0 and our own uid (SO_PEERCRED: the kernel's word, not the client's)."""
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return _PEERCRED.unpack(cred)[1] in self.uids

    def serve(self, conn: _Deadline) -> None:
        conn.sendall(json.dumps(self.handle(_read_line(conn))).encode() + b"\n")

    def handle(self, line: bytes) -> Any:
        """Answer one request line (never raises)."""
        try:
            req = json.loads(line or b"{}")
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
        except ValueError as e:
            return {"error": f"bad request: {e}"}
        cmd = req.get("cmd", "status")
        fn = self.commands.get(cmd)
        if fn is None:
            return {"error": f"unknown command {cmd!r}", "commands": sorted(self.commands)}
        try:
            return fn(req)
        except Exception as e:
            log.exception("control command %s failed", cmd)
            return {"error": f"{cmd}: {type(e).__name__}: {e}"}

    def close(self) -> None:
        self.sock.close()
        if not self.name.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.name)


def _read_line(conn: _Deadline, limit: int = 65536) -> bytes:
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]


def request(name: str, cmd: str = "status", timeout: float = 5.0, **args: Any) -> Any:
    """Send one command to the control socket `name`; return the decoded answer.

    Raises OSError if nobody listens there, ValueError for a garbled answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(_address(name))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


class MetricsServer(_Listener):
    """Minimal HTTP listener serving `render()` as Prometheus text."""

    def __init__(self, listen: str, render: Callable[[], str]) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.render = render
        self.stats = {"clients": 0, "timeouts": 0, "rejected": 0}
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]

    def serve(self, conn: _Deadline) -> None:
        req = b""
        while b"\r\n\r\n" not in req and len(req) < 16384:
            chunk = conn.recv(4096)
            if not chunk:
                break
            req += chunk
        if req.startswith(b"GET "):
            body = self.render().encode()
            head = ("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        else:
            body = b"only GET\n"
            head = (f"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: {len(body)}"
                    "\r\nConnection: close\r\n\r\n")
        conn.sendall(head.encode() + body)
