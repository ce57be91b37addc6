"""A seeded, event-driven network simulation for two TcpConnections (smoltcp netsim style).

Every segment goes through emit_tcp() to bytes and parse_tcp() back, so checksums and
options are exercised on each hop. The link per direction has a one-way delay, a
serialisation rate with a drop-tail queue, and seeded random loss, duplication and
reordering (a random extra delay). Time is virtual: `run()` jumps from event to event.
With `ce_queue`, the link is an ECN-marking AQM (RFC 3168 §5, RFC 7567): an ECT packet
that finds that many packets queued is marked CE instead of waiting to be dropped; the
receiver gets the IP ECN field as `parse_tcp(..., ecn=)`, as the bridge hands it over.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from stack.connection import TcpConnection
from stack.events import Closed, ConnectionReset, DataReceived, PeerFinished
from stack.tcp_config import TcpConfig
from stack.wire.tcp import emit_tcp, parse_tcp

A = (bytes([198, 18, 0, 1]), 40000)
B = (bytes([198, 18, 0, 2]), 80)


@dataclass
class LinkSpec:
    delay: float = 0.005  # one way, seconds
    rate: float = 50e6  # bytes per second
    queue: int = 400  # packets
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0  # probability of an extra delay
    reorder_delay: float = 0.004
    ce_queue: int = 0  # > 0: mark ECT packets CE from this queue length on (RFC 3168 §5)


@dataclass
class SimResult:
    ok: bool
    received: int
    sim_time: float
    wall_time: float
    segments: int
    dropped: int
    retransmissions: int
    marked: int = 0  # packets the links marked CE
    sender_info: dict[str, object] = field(default_factory=dict)
    receiver_info: dict[str, object] = field(default_factory=dict)

    @property
    def goodput_sim(self) -> float:
        """MB/s in simulated time up to the last byte (what the protocol achieves here)."""
        return self.received / self.sim_time / 1e6 if self.sim_time else 0.0

    @property
    def goodput_wall(self) -> float:
        """MB/s of CPU time (how fast this Python moves the bytes)."""
        return self.received / self.wall_time / 1e6 if self.wall_time else 0.0

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.received / 1e6:.1f} MB ok={self.ok} "
            f"goodput {self.goodput_sim:.1f} MB/s simulated, {self.goodput_wall:.1f} MB/s wall "
            f"({self.wall_time:.2f} s); {self.segments} segments, {self.dropped} dropped by "
            f"the link, {self.retransmissions} retransmissions"
        )


class _Link:
    def __init__(self, spec: LinkSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.free_at = 0.0
        self.in_queue: list[float] = []  # departure times of queued packets
        self.dropped = 0
        self.marked = 0
        self.ce = False  # the last packet scheduled was CE-marked

    def schedule(self, now: float, size: int, ect: bool = False) -> list[float]:
        """Arrival times for one packet (0, 1 or 2 copies); `ce` says if it was marked."""
        spec, rng = self.spec, self.rng
        q = self.in_queue
        while q and q[0] <= now:
            q.pop(0)
        if len(q) >= spec.queue:
            self.dropped += 1
            return []
        self.ce = ect and 0 < spec.ce_queue <= len(q)
        self.marked += self.ce
        start = max(now, self.free_at)
        self.free_at = start + size / spec.rate
        q.append(self.free_at)
        if spec.loss and rng.random() < spec.loss:
            self.dropped += 1
            return []
        copies = 2 if spec.dup and rng.random() < spec.dup else 1
        out = []
        for _ in range(copies):
            extra = spec.reorder_delay * rng.random() if rng.random() < spec.reorder else 0.0
            out.append(self.free_at + spec.delay + extra)
        return out


def transfer(
    nbytes: int,
    spec: LinkSpec,
    *,
    seed: int = 1,
    config: TcpConfig | None = None,
    chunk: int = 65536,
    max_sim_time: float = 600.0,
) -> SimResult:
    """Send `nbytes` from A to B over `spec` links both ways; return what arrived and how."""
    rng = random.Random(seed)
    cfg = config or TcpConfig(rto_min=0.2, isn_key=b"netsim")
    payload = random.Random(seed + 1).randbytes(nbytes)
    sender = TcpConnection(A, B, cfg)
    receiver = TcpConnection(B, A, cfg)
    receiver.listen()
    links = {id(sender): _Link(spec, rng), id(receiver): _Link(spec, rng)}
    peer = {id(sender): receiver, id(receiver): sender}
    addrs = {id(sender): (A[0], B[0]), id(receiver): (B[0], A[0])}
    heap: list[tuple[float, int, int, bytes, int]] = []
    counter = 0
    segments = 0
    now = 0.0
    sent = 0
    got: list[bytes] = []
    received = 0
    t_last = 0.0
    done = False
    closed = 0
    wall0 = time.perf_counter()
    sender.connect(now)
    while now < max_sim_time:
        if sent < nbytes:
            sent += sender.send(memoryview(payload)[sent : sent + chunk])
            if sent == nbytes:
                sender.close()
        for conn in (sender, receiver):
            src, dst = addrs[id(conn)]
            for seg in conn.segments_to_send(now):
                raw = emit_tcp(seg, src, dst)
                segments += 1
                link = links[id(conn)]
                for at in link.schedule(now, len(raw) + 20, seg.ecn in (1, 2)):
                    counter += 1
                    heapq.heappush(heap, (at, counter, id(peer[id(conn)]), raw,
                                          3 if link.ce else seg.ecn))
        for conn in (sender, receiver):
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    got.append(ev.data)
                    received += len(ev.data)
                    t_last = now
                elif isinstance(ev, PeerFinished) and conn is receiver:
                    receiver.close()
                elif isinstance(ev, ConnectionReset):
                    done = True
                elif isinstance(ev, Closed):
                    closed += 1
        if done or closed == 2 or (received == nbytes and str(sender.state) == "TIME-WAIT"):
            break
        cands = [t for t in (sender.get_timer(), receiver.get_timer()) if t is not None]
        if heap:
            cands.append(heap[0][0])
        if not cands:
            break
        now = max(now, min(cands))
        while heap and heap[0][0] <= now:
            _, _, dst_id, raw, ecn = heapq.heappop(heap)
            conn = sender if dst_id == id(sender) else receiver
            src, dst = addrs[id(peer[dst_id])]
            seg = parse_tcp(raw, src, dst, ecn=ecn)
            assert seg is not None
            conn.receive_segment(seg, now)
        for conn in (sender, receiver):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
    wall = time.perf_counter() - wall0
    data = b"".join(got)
    return SimResult(
        ok=data == payload,
        received=len(data),
        sim_time=t_last,
        wall_time=wall,
        segments=segments,
        dropped=sum(link.dropped for link in links.values()),
        retransmissions=sender.retransmissions,
        marked=sum(link.marked for link in links.values()),
        sender_info=sender.info(),
        receiver_info=receiver.info(),
    )
