"""`grebe capture`: what one peer sends and receives, outer and inner packets, as pcapng.

Rules:
- Off by default and free when off: the Engine holds `tap = None`; the UDP receive pump and
  the UDP send path test it once per batch (bridge/io/loop.py). Nothing else changes.
- Armed from the control socket: {"cmd": "capture", "peer": NAME, "path": FILE, "count": N,
  "duration": S}; {"cmd": "capture", "stop": true} disarms. Bounded always: at most
  MAX_COUNT datagrams each way and MAX_DURATION seconds; a tap disarms itself at either.
- The client (`grebe capture`, `run` below) creates FILE with the pcapng header
  (bridge/pcapng.py: SHB, IDB 0 "outer", IDB 1 "inner") with its own permissions; the
  endpoint only appends to it, and only to a regular file that already starts with a
  pcapng Section Header Block (never follows a symlink), so the command cannot be used to
  write into other files. Each block is one write(2) on an O_APPEND descriptor: the two
  processes of a split endpoint (bridge/io/split.py; the receiving child gets the same
  request over its socket pair) append whole blocks that never interleave.
- Per datagram of the peer: an EPB on "outer" (the UDP payload inside IP/UDP headers rebuilt
  from the socket addresses, bridge/pcapng.py `outer_packet`) and, when it carries one, an
  EPB on "inner" with the inner packet, both with the direction in epb_flags. A datagram
  counts as the peer's if it comes from the peer's host or is sent to its endpoint.
- The client stops when it has read `count` outer packets each way from the file or when
  `duration` is over, then disarms the endpoint and prints what it wrote.

Theory of operation: `Tap.received(batch)` / `Tap.sent(addr, datagrams, ports)` return
False once expired, and the Engine then drops its tap; the work per datagram (headers,
checksums, the write) is done only while armed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import stat
import sys
import threading
import time
from typing import Any

from bridge import pcapng
from bridge.gro import GroBatch

__all__ = ["Tap", "arm", "register", "setup", "run", "MAX_COUNT", "MAX_DURATION"]

MAX_COUNT = 1_000_000
MAX_DURATION = 3600.0
Addr = tuple[str, int]


class Tap:
    """One armed capture in one process (see the module docstring)."""

    __slots__ = ("fd", "host", "endpoint", "gre", "local", "left", "until", "lock")

    def __init__(self, fd: int, host: str, endpoint: Addr, gre: bool, local: Addr, count: int,
                 until: float) -> None:
        self.fd = fd
        self.host = host
        self.endpoint = endpoint
        self.gre = gre
        self.local = local
        self.left = [count, count]  # inbound, outbound
        self.until = until  # time.monotonic(): one clock for both processes
        self.lock = threading.Lock()  # the send path runs on several threads

    def _live(self) -> bool:
        if self.fd >= 0 and (time.monotonic() >= self.until or self.left == [0, 0]):
            self.close()
        return self.fd >= 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _one(self, direction: int, src: Addr, dst: Addr, payload: Any, micros: int) -> None:
        i = 0 if direction == pcapng.INBOUND else 1
        with self.lock:
            if self.left[i] <= 0:
                return
            self.left[i] -= 1
        block = pcapng.epb(pcapng.IF_OUTER, micros, pcapng.outer_packet(src, dst, payload),
                           direction)
        inner = pcapng.inner_packet(payload, self.gre)
        if inner is not None:
            block += pcapng.epb(pcapng.IF_INNER, micros, inner, direction)
        try:
            os.write(self.fd, block)
        except OSError:
            self.close()

    def received(self, batch: list[tuple[Any, Addr]]) -> bool:
        """A batch from the UDP socket: (payload or GroBatch, source address) pairs."""
        if not self._live():
            return False
        micros = time.time_ns() // 1000
        host = self.host
        for payload, addr in batch:
            if addr[0] != host and addr[0] != "::ffff:" + host:
                continue
            for dg in payload.split() if type(payload) is GroBatch else (payload,):
                self._one(pcapng.INBOUND, addr, self.local, dg, micros)
        return True

    def sent(self, addr: Addr, datagrams: Any, ports: list[int] | None) -> bool:
        """Datagrams the Engine sends to `addr` (with flow-hash source `ports`, if any)."""
        if not self._live():
            return False
        if addr[0] == self.endpoint[0] and addr[1] == self.endpoint[1]:
            micros = time.time_ns() // 1000
            for i, dg in enumerate(datagrams):
                src = (self.local[0], ports[i]) if ports and i < len(ports) else self.local
                self._one(pcapng.OUTBOUND, src, addr, dg, micros)
        return True


def _local(listen: Addr, peer: Addr) -> Addr:
    """The source address the kernel uses toward `peer` (the listen address unless that is
    the wildcard: then asked of the routing table with a connected, unsent UDP socket)."""
    host = listen[0]
    if host not in ("0.0.0.0", "::"):
        return (host, listen[1])
    fam = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect(peer)
            return (str(s.getsockname()[0]), listen[1])
    except OSError:
        return (host, listen[1])


def _open(path: str) -> int:
    """Open an existing pcapng file for appending; OSError / ValueError when it is not one."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:  # checked on the descriptor itself, not by name again
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        if os.pread(fd, 4, 0) != b"\x0a\x0d\x0d\x0a":
            raise ValueError("does not start with a pcapng header (grebe capture writes it)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def arm(engine: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Arm (or with "stop", disarm) `engine`'s tap from a resolved `spec` (`_spec`)."""
    old = engine.tap
    engine.tap = None
    if old is not None:
        old.close()
    if spec.get("stop"):
        return {"ok": True}
    try:
        fd = _open(spec["path"])
    except (OSError, ValueError) as e:
        return {"error": f"{spec['path']}: {getattr(e, 'strerror', None) or e}"}
    engine.tap = Tap(fd, spec["host"], (spec["host"], spec["port"]), spec["gre"],
                     (spec["local"], spec["lport"]), spec["count"], spec["until"])
    return {"ok": True}


def _spec(req: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The request checked against the configuration; {"error": ...} when it is wrong."""
    if req.get("stop"):
        return {"stop": True}
    peer = next((p for p in cfg.peers if p.name == req.get("peer")), None)
    if peer is None:
        names = ", ".join(p.name for p in cfg.peers)
        return {"error": f"no peer {req.get('peer')!r} (peers: {names})"}
    try:
        count = int(req.get("count", 1000))
        duration = float(req.get("duration", 10.0))
    except (TypeError, ValueError):
        return {"error": "count and duration must be numbers"}
    if not 1 <= count <= MAX_COUNT or not 0 < duration <= MAX_DURATION:
        return {"error": f"count 1..{MAX_COUNT}, duration 0..{MAX_DURATION:g} s"}
    path = req.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        return {"error": "path must be an absolute file name"}
    local = _local((cfg.listen.address, cfg.listen.port), peer.endpoint)
    return {"path": path, "host": peer.host, "port": peer.port, "local": local[0],
            "lport": local[1], "gre": peer.encapsulation.value == "gre", "count": count,
            "until": time.monotonic() + duration}


def register(ctl: Any, engine: Any, cfg: Any) -> None:
    """Add the `capture` command to the control server `ctl` for `engine` (and its
    receiving process, if split)."""
    lock = threading.Lock()

    def capture(req: dict[str, Any]) -> dict[str, Any]:
        spec = _spec(req, cfg)
        if "error" in spec:
            return spec
        with lock:
            answer = arm(engine, spec)
            sib = engine.sibling
            if "error" not in answer and sib is not None and hasattr(sib, "control"):
                child = sib.control({"capture": spec})
                if child is None or "error" in child:
                    arm(engine, {"stop": True})
                    return {"error": "the receiving process: "
                            + (child or {}).get("error", "no answer")}
                answer["processes"] = 2
        return answer

    ctl.register("capture", capture)


# -- the client: `grebe capture` ---------------------------------------------------------


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", required=True, help="the peer's name in the configuration")
    p.add_argument("-c", "--count", type=int, default=1000,
                   help="stop after this many datagrams each way (default 1000)")
    p.add_argument("-d", "--duration", type=float, default=10.0,
                   help="stop after this many seconds (default 10)")
    p.add_argument("-w", "--write", required=True, metavar="FILE", help="pcapng file to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-i", "--interface", default="grebe0", help="TUN name (default grebe0)")
    g.add_argument("-s", "--socket", help="control socket (@abstract or path)")


def _counts(path: str) -> tuple[int, int, int]:
    """(outer inbound, outer outbound, inner) packets in the file so far."""
    with open(path, "rb") as f:
        data = f.read()
    n_in = n_out = inner = 0
    for kind, body in pcapng.read_blocks(data):
        if kind != pcapng.EPB:
            continue
        iface = int.from_bytes(body[:4], "little")
        if iface == pcapng.IF_INNER:
            inner += 1
            continue
        flags = int.from_bytes(body[-8:-4], "little")  # epb_flags, before opt_endofopt
        if flags & 3 == pcapng.INBOUND:
            n_in += 1
        else:
            n_out += 1
    return n_in, n_out, inner


def run(args: argparse.Namespace) -> int:
    from bridge.io.control import request, socket_name

    name = args.socket or socket_name(args.interface)
    path = os.path.abspath(args.write)
    try:
        with open(path, "wb") as f:
            f.write(pcapng.header(comment=f"grebe capture --peer {args.peer}"))
    except OSError as e:
        print(f"grebe: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        answer = request(name, "capture", peer=args.peer, path=path, count=args.count,
                         duration=args.duration)
    except OSError as e:
        print(f"grebe: no grebe on {name}: {e.strerror or e}", file=sys.stderr)
        return 1
    if "error" in answer:
        print(f"grebe: {answer['error']}", file=sys.stderr)
        return 1
    print(f"capturing peer {args.peer} to {path} (up to {args.count} datagrams each way, "
          f"{args.duration:g} s)", file=sys.stderr)
    deadline = time.monotonic() + args.duration
    counts = (0, 0, 0)
    try:
        while time.monotonic() < deadline:
            counts = _counts(path)
            if counts[0] >= args.count and counts[1] >= args.count:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            request(name, "capture", stop=True)
    counts = _counts(path)
    print(f"{path}: {counts[0]} datagrams received, {counts[1]} sent, {counts[2]} inner "
          "packets", file=sys.stderr)
    return 0
