"""Record a conversation with real Linux TCP, and replay it without root or a TUN.

The stack is sans-I/O and deterministic: the same segments at the same `now`, with the same
config (ISN key included), produce the same output. `record` runs a Linux client against
our echo server through linux_peer.LinuxPeer and stores every pump round (time, segments
in, whether timers ran, segments out) as gzip'd JSON lines. `replay` feeds the recorded
input to a fresh TcpDemux at the recorded times and compares each round's output with the
recording, so a change in the stack's behaviour toward a real Linux peer shows up as the
first differing segment.

    sudo .venv/bin/python tests/sim/replay.py record tests/sim/traces/NAME.jsonl.gz \\
        [--size BYTES] [--loss P]
    .venv/bin/python tests/sim/replay.py replay tests/sim/traces/NAME.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tcp_demux

from tcp_demux import TcpDemux  # noqa: E402

from stack.connection import TcpConnection  # noqa: E402
from stack.events import Closed, ConnectionReset, DataReceived, PeerFinished  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402
from stack.wire.tcp import emit_tcp, parse_tcp  # noqa: E402

PORT = 8080
# Fixed ISN key: replays must compute the same ISNs and TSval offsets.
REPLAY_CFG = TcpConfig(recv_buffer=1 << 20, send_buffer=1 << 20, rto_min=0.2,
                       isn_key=b"grebe-replay")

CLIENT = r"""
import hashlib, random, socket, sys, threading
size = int(sys.argv[1])
data = random.Random(7).randbytes(size)
s = socket.create_connection((sys.argv[2], 8080), timeout=60)
def sender():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=sender, daemon=True).start()
got = bytearray()
while chunk := s.recv(1 << 20):
    got += chunk
s.close()
print("OK" if bytes(got) == data else f"BAD {len(got)}", hashlib.sha256(data).hexdigest())
"""


class Echo:
    """Our application: echo everything back, close after the peer's FIN."""

    def __init__(self, conn: TcpConnection) -> None:
        self.conn = conn
        self.pending = bytearray()
        self.received = 0
        self.peer_done = False
        self.closed = False
        self.reset = False

    def step(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self.pending += ev.data
                self.received += len(ev.data)
            elif isinstance(ev, PeerFinished):
                self.peer_done = True
            elif isinstance(ev, ConnectionReset):
                self.reset = True
            elif isinstance(ev, Closed):
                self.closed = True
        if self.pending and not self.closed and not self.reset:
            n = conn.send(self.pending)
            del self.pending[:n]
        if self.peer_done and not self.pending and str(conn.state) == "CLOSE-WAIT":
            conn.close()


@dataclass
class EchoServer:
    demux: TcpDemux
    apps: list[Echo] = field(default_factory=list)

    def step(self, now: float) -> None:
        while (c := self.demux.accept()) is not None:
            self.apps.append(Echo(c))
        for app in self.apps:
            app.step()


def record(path: Path, size: int, loss: float, seed: int = 21) -> list[dict[str, object]]:
    """Run a Linux client against our echo server (root) and store the rounds at `path`."""
    from linux_peer import STACK_ADDR, LinuxPeer

    demux = TcpDemux(REPLAY_CFG)
    demux.listen(PORT)
    server = EchoServer(demux)
    rounds: list[dict[str, object]] = []
    peer = LinuxPeer(demux, loss=loss, seed=seed, record=rounds)
    try:
        client = peer.popen([sys.executable, "-c", CLIENT, str(size), STACK_ADDR])
        peer.pump(server.step, lambda: client.poll() is not None, timeout=120)
        out, err = client.communicate(timeout=10)
        if not out.startswith(b"OK"):
            raise RuntimeError(f"Linux client failed: {out!r} {err!r}")
    finally:
        peer.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in rounds:
            f.write(json.dumps(r) + "\n")
    return rounds


def _split(item: str) -> tuple[bytes, bytes, bytes]:
    src, dst, tcp = item.split(":")
    return bytes.fromhex(src), bytes.fromhex(dst), bytes.fromhex(tcp)


@dataclass
class ReplayResult:
    rounds: int
    segments_in: int
    segments_out: int
    first_mismatch: str | None
    received: int


def replay(path: Path) -> ReplayResult:
    """Feed a recording to a fresh stack; compare its output round by round."""
    demux = TcpDemux(REPLAY_CFG)
    demux.listen(PORT)
    server = EchoServer(demux)
    n_in = n_out = 0
    mismatch: str | None = None
    with gzip.open(path, "rt") as f:
        rounds = [json.loads(line) for line in f]
    for i, r in enumerate(rounds):
        now = r["t"]
        for item in r["in"]:
            src, dst, tcp = _split(item)
            demux.receive_packet(src, dst, tcp, now)
            n_in += 1
        if r["timer"]:
            demux.handle_timer(now)
        server.step(now)
        got = [src.hex() + ":" + dst.hex() + ":" + emit_tcp(seg, src, dst).hex()
               for src, dst, seg in demux.segments_to_send(now)]
        n_out += len(got)
        if got != r["out"] and mismatch is None:
            want = [repr(parse_tcp(t, s, d)) for s, d, t in map(_split, r["out"])]
            have = [repr(parse_tcp(t, s, d)) for s, d, t in map(_split, got)]
            mismatch = f"round {i} at t={now}: recorded {want}, replayed {have}"
    received = sum(app.received for app in server.apps)
    return ReplayResult(len(rounds), n_in, n_out, mismatch, received)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("path", type=Path)
    rec.add_argument("--size", type=int, default=40_000)
    rec.add_argument("--loss", type=float, default=0.0)
    rep = sub.add_parser("replay")
    rep.add_argument("path", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        rounds = record(args.path, args.size, args.loss)
        print(f"recorded {len(rounds)} rounds to {args.path}")
    else:
        res = replay(args.path)
        print(res)
        sys.exit(1 if res.first_mismatch else 0)


if __name__ == "__main__":
    main()
