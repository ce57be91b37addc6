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
- A bad client never raises out of here: bad JSON gets {"error": ...}; a stuck client is cut
  after a 1 s timeout. Both run on the loop's main thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
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


class _Listener:
    """A non-blocking listening socket polled by the main thread: one short client at a time
    (CLIENT_TIMEOUT), never blocking the loop on a slow or silent client."""

    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                self.serve(conn)
            except OSError as e:
                log.debug("%s client: %s", type(self).__name__, e)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class ControlServer(_Listener):
    """A unix stream socket answering JSON-lines commands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.commands: dict[str, Command] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = _address(name)
        try:
            self.sock.bind(addr)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"control socket {name}: {e.strerror}") from None
        self.sock.listen(16)
        self.sock.setblocking(False)

    def register(self, name: str, fn: Command) -> None:
        self.commands[name] = fn

    def serve(self, conn: socket.socket) -> None:
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


def _read_line(conn: socket.socket, limit: int = 65536) -> bytes:
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
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]

    def serve(self, conn: socket.socket) -> None:
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


def io_prometheus(status: dict[str, Any]) -> str:
    """Prometheus lines for the I/O layer's own counters (from Engine.status()["io"])."""
    io = status.get("io", {})
    lines = ["# HELP grebe_io_total I/O layer counters (system calls, packets, errors).",
             "# TYPE grebe_io_total counter"]
    flags = []
    for k in sorted(io):
        v = io[k]
        if isinstance(v, bool):
            flags.append(f'grebe_io_offload{{what="{k}"}} {int(v)}')
        elif isinstance(v, int):
            lines.append(f'grebe_io_total{{what="{k}"}} {v}')
        elif isinstance(v, dict):
            for kk, vv in sorted(v.items()):
                if isinstance(vv, int):
                    lines.append(f'grebe_io_total{{what="{k}_{kk}"}} {vv}')
    if flags:
        lines += ["# HELP grebe_io_offload 1 if the offload (UDP GSO/GRO) is in use.",
                  "# TYPE grebe_io_offload gauge", *flags]
    mtu = status.get("tun", {}).get("mtu")
    if isinstance(mtu, int):
        lines += ["# HELP grebe_tun_mtu MTU of the TUN device.", "# TYPE grebe_tun_mtu gauge",
                  f"grebe_tun_mtu {mtu}"]
    return "\n".join(lines) + "\n"
