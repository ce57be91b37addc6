"""The lab's userspace link emulator: delay, jitter, reordering and duplication of frames.

This kernel has no netem, so `bridge/lab/impair.py` interposes this emulator on one end of a
lab link. The module has two halves:

* `Scheduler`, the pure core for ONE direction of a link: frames and `now` in, (release time,
  frame) out. No sockets, no clock, no globals; its randomness is a `random.Random` seeded by
  the caller, so the same seed and the same arrival times give the same output, bit for bit.
* `run()`, the thin I/O runner (`python -m bridge.lab.linkemu --dev IF --tap IF ...`): two
  AF_PACKET sockets and two Schedulers, one per direction, inside the node's namespace.

Rules of the Scheduler (every parameter applies to one direction; a link has two Schedulers):

1. Delay: a frame pushed at `now` is released at `now + delay + j`, where j is drawn uniformly
   from [-jitter, +jitter] and the sum is clamped at 0 (delay is one-way: a ping across a link
   with delay 20 ms in each direction sees an RTT about 40 ms higher).
2. Jitter never reorders: a release time is raised to the previous frame's release time, so
   frames stay in FIFO order (netem reorders with jitter; we keep reordering a separate knob).
3. Reordering: a fraction `reorder_pct` of frames is held back and released right after the
   next frame that is not held, i.e. it is overtaken by exactly one frame. A held frame that no
   later frame overtakes within `hold` seconds of its own release time goes out then
   (counted as `hold_expired`, not as reordered).
4. Duplication: a fraction `duplicate_pct` of frames is released twice, back to back.
5. Random draws happen in a fixed order per frame: jitter (if jitter > 0), reorder (if
   reorder_pct > 0), duplicate (if duplicate_pct > 0).
6. Bounded memory: at most `max_frames` frames / `max_bytes` bytes wait; beyond that a frame
   is dropped and counted (`dropped_full`), like a tail-drop queue.

Theory of operation of the runner (see `impair.py` for the plumbing it relies on):
frames the node sends through its link interface DEV are redirected by a tc clsact egress
filter to a private veth pair (A, TAP); the runner reads them on TAP, delays them and writes
them to DEV with the socket mark `MARK`, which the egress filter lets through to the wire (and
through any tbf rate limiter on DEV). Frames arriving on DEV are read by the runner's DEV
socket (AF_PACKET taps see a frame before tc/nftables ingress, where an nftables rule then
drops the unmarked original); the delayed copy is written to TAP with `MARK`, crosses to A and
is put back into DEV's receive path by a tc `mirred ingress redirect`, where the mark lets it
pass. Sockets use PACKET_VNET_HDR so that GSO frames and frames with a pending checksum
travel through intact; PACKET_IGNORE_OUTGOING and a classic-BPF socket filter on the mark keep
the runner from reading its own writes. Reads are batched until EAGAIN (bounded per wakeup);
writes that the kernel refuses (full socket buffer, qdisc drop) are counted, never retried.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass

# The mark that tells our own writes from everything else ("greb").
MARK = 0x67726562

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
# Classic BPF: ld [skb->mark] (SKF_AD_OFF + SKF_AD_MARK); accept unless it is MARK.
_SKF_AD_MARK = (0xFFFFF000 + 20) & 0xFFFFFFFF
_BPF_INSN = struct.Struct("HBBI")
_NOT_MARK_PROG = ((0x20, 0, 0, _SKF_AD_MARK), (0x15, 0, 1, MARK), (0x06, 0, 0, 0),
                  (0x06, 0, 0, 0x40000))


@dataclass(frozen=True, slots=True)
class EmuParams:
    """What one direction of a link does to its frames (times in seconds)."""

    delay: float = 0.0
    jitter: float = 0.0
    reorder_pct: float = 0.0
    duplicate_pct: float = 0.0
    hold: float = 0.05
    max_frames: int = 20000
    max_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        for name in ("delay", "jitter", "hold"):
            if not 0.0 <= getattr(self, name) <= 60.0:
                raise ValueError(f"{name} must be within [0, 60] seconds")
        for name in ("reorder_pct", "duplicate_pct"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name} must be within [0, 100]")
        if self.max_frames < 1 or self.max_bytes < 1:
            raise ValueError("queue caps must be positive")


class Scheduler:
    """One direction of an emulated link; see the module docstring for its rules."""

    __slots__ = ("_p", "_rng", "_fifo", "_held", "_held_deadline", "_last", "_frames",
                 "_bytes", "received", "released", "duplicated", "reordered", "hold_expired",
                 "dropped_full")

    def __init__(self, params: EmuParams, rng: random.Random) -> None:
        self._p = params
        self._rng = rng
        self._fifo: deque[tuple[float, bytes]] = deque()
        self._held: list[bytes] = []
        self._held_deadline = 0.0
        self._last = float("-inf")
        self._frames = 0
        self._bytes = 0
        self.received = 0
        self.released = 0
        self.duplicated = 0
        self.reordered = 0
        self.hold_expired = 0
        self.dropped_full = 0

    def push(self, frame: bytes, now: float) -> None:
        """Accept one frame that arrived at `now`; it comes out of pop_due() later."""
        p = self._p
        size = len(frame)
        if self._frames >= p.max_frames or self._bytes + size > p.max_bytes:
            self.dropped_full += 1  # rule 6
            return
        self.received += 1
        rng = self._rng
        delay = p.delay
        if p.jitter:
            delay += rng.uniform(-p.jitter, p.jitter)  # rule 1
            if delay < 0.0:
                delay = 0.0
        release = now + delay
        if release < self._last:
            release = self._last  # rule 2: jitter keeps FIFO order
        hold = bool(p.reorder_pct) and rng.random() * 100.0 < p.reorder_pct
        copies = 2 if p.duplicate_pct and rng.random() * 100.0 < p.duplicate_pct else 1
        self.duplicated += copies - 1
        self._frames += copies
        self._bytes += copies * size
        if hold:  # rule 3: wait for a frame to overtake this one
            if not self._held:
                self._held_deadline = release + p.hold
            self._held.extend([frame] * copies)
            return
        self._last = release
        fifo = self._fifo
        fifo.append((release, frame))
        if copies == 2:
            fifo.append((release, frame))  # rule 4
        if self._held:
            self.reordered += len(self._held)
            for held in self._held:
                fifo.append((release, held))
            self._held.clear()

    def pop_due(self, now: float) -> list[tuple[float, bytes]]:
        """Remove and return, in order, every (release time, frame) due at `now`."""
        if self._held and now >= self._held_deadline:
            release = max(self._held_deadline, self._last)
            self._last = release
            self.hold_expired += len(self._held)
            for held in self._held:
                self._fifo.append((release, held))
            self._held.clear()
        fifo = self._fifo
        out: list[tuple[float, bytes]] = []
        while fifo and fifo[0][0] <= now:
            item = fifo.popleft()
            out.append(item)
            self._bytes -= len(item[1])
        self._frames -= len(out)
        self.released += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When pop_due() next has something to return, or None if nothing waits."""
        first = self._fifo[0][0] if self._fifo else None
        if self._held and (first is None or self._held_deadline < first):
            return self._held_deadline
        return first

    @property
    def queued(self) -> int:
        """Frames waiting (held frames included)."""
        return self._frames

    def stats(self) -> dict[str, int]:
        """Counters as a JSON-able dict."""
        return {name: getattr(self, name) for name in (
            "received", "released", "duplicated", "reordered", "hold_expired", "dropped_full")}


# ----------------------------------------------------------------------------------------
# The I/O runner. Everything below touches sockets and the clock; nothing above does.


def open_port(ifname: str, skip_marked: bool) -> socket.socket:
    """An AF_PACKET socket on `ifname` that reads incoming frames and writes with MARK."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    if skip_marked:
        code = b"".join(_BPF_INSN.pack(*insn) for insn in _NOT_MARK_PROG)
        buf = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HL", len(_NOT_MARK_PROG), ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


class Runner:
    """Relays frames between DEV and TAP through one Scheduler per direction."""

    BATCH = 256  # frames read per socket per wakeup, so that timers stay on time

    def __init__(self, dev_sock: socket.socket, tap_sock: socket.socket, params: EmuParams,
                 seed: int) -> None:
        """Relay between two non-blocking datagram sockets (AF_PACKET, or a fake pair)."""
        self.dev_sock = dev_sock
        self.tap_sock = tap_sock
        # "in": arriving on DEV, delivered via TAP; "out": leaving via TAP, sent on DEV.
        self.sched_in = Scheduler(params, random.Random(seed * 2))
        self.sched_out = Scheduler(params, random.Random(seed * 2 + 1))
        self.tx_refused = {"in": 0, "out": 0}
        self.rx_errors = 0
        self.rx_overrun = {"in": 0, "out": 0}
        self._buf = bytearray(1 << 17)

    def _read(self, sock: socket.socket, sched: Scheduler, now: float) -> None:
        view = memoryview(self._buf)
        recv_into = sock.recv_into
        push = sched.push
        for _ in range(self.BATCH):
            try:
                n = recv_into(view)
            except BlockingIOError:
                return
            except OSError:  # ENETDOWN and friends are reported once; the next read blocks
                self.rx_errors += 1
                return
            push(bytes(view[:n]), now)

    def _flush(self, now: float) -> None:
        for name, sched, sock in (("in", self.sched_in, self.tap_sock),
                                  ("out", self.sched_out, self.dev_sock)):
            due = sched.pop_due(now)
            send = sock.send
            for _, frame in due:
                try:
                    send(frame)
                except OSError as exc:  # EAGAIN, ENOBUFS (qdisc drop), ENETDOWN ...
                    if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETDOWN,
                                         errno.ENXIO, errno.EMSGSIZE):
                        raise
                    self.tx_refused[name] += 1

    def stats(self) -> dict[str, object]:
        """Counters of both directions as a JSON-able dict.

        `rx_overrun`: frames the kernel dropped because a socket's receive buffer was full
        (PACKET_STATISTICS, which resets on reading, so it is accumulated here).
        """
        for name, sock in (("in", self.dev_sock), ("out", self.tap_sock)):
            if sock.family != socket.AF_PACKET:
                continue
            _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self.rx_overrun[name] += drops
        return {"pid": os.getpid(), "in": self.sched_in.stats(), "out": self.sched_out.stats(),
                "tx_refused": dict(self.tx_refused), "rx_overrun": dict(self.rx_overrun),
                "rx_errors": self.rx_errors}

    def loop(self, stats_path: str | None, until: float | None = None) -> None:
        """Relay until SIGTERM/SIGINT (or `until`, a monotonic time, for tests).

        select() rather than epoll: its timeout has microsecond resolution (epoll's is 1 ms),
        and with two descriptors its cost does not matter.
        """
        dev, tap = self.dev_sock, self.tap_sock
        rlist = [dev, tap]
        next_stats = 0.0
        try:
            while True:
                now = time.monotonic()
                self._flush(now)
                if stats_path and now >= next_stats:
                    _write_json(stats_path, self.stats())
                    next_stats = now + 1.0
                if until is not None and now >= until:
                    return
                deadlines = [d for d in (self.sched_in.next_deadline(),
                                         self.sched_out.next_deadline(), until,
                                         next_stats if stats_path else None) if d is not None]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                readable, _, _ = select.select(rlist, [], [], timeout)
                now = time.monotonic()
                for sock in readable:
                    self._read(sock, self.sched_in if sock is dev else self.sched_out, now)
        except _Stop:
            return
        finally:
            if stats_path:
                _write_json(stats_path, self.stats())


def _write_json(path: str, data: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m bridge.lab.linkemu --dev IF --tap IF [--delay-ms ...]`; see impair.py."""
    ap = argparse.ArgumentParser(prog="linkemu", description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True, help="the link interface of this node")
    ap.add_argument("--tap", required=True, help="our end of the private veth pair")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--reorder-pct", type=float, default=0.0)
    ap.add_argument("--duplicate-pct", type=float, default=0.0)
    ap.add_argument("--hold-ms", type=float, default=50.0)
    ap.add_argument("--max-frames", type=int, default=20000)
    ap.add_argument("--max-bytes", type=int, default=32 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready", help="file written once the sockets are bound")
    ap.add_argument("--stats", help="file the counters are written to, every second")
    args = ap.parse_args(argv)
    params = EmuParams(delay=args.delay_ms / 1000, jitter=args.jitter_ms / 1000,
                       reorder_pct=args.reorder_pct, duplicate_pct=args.duplicate_pct,
                       hold=args.hold_ms / 1000, max_frames=args.max_frames,
                       max_bytes=args.max_bytes)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    runner = Runner(open_port(args.dev, skip_marked=True),
                    open_port(args.tap, skip_marked=False), params, args.seed)
    if args.ready:
        _write_json(args.ready, {"pid": os.getpid()})
    runner.loop(args.stats)
    print(json.dumps(runner.stats()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
