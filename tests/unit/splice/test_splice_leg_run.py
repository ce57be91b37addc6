"""A terminated flow's GRO run reaches its server leg whole, past 64 KB (bridge/gro.py LEG_RUN_MAX).

Two Bridges over real bytes: the server's segments go through Bridge B's encapsulation, the
datagrams reach Bridge A (userspace inspection, vnet TUN) glued into one receive buffer as
the UDP adapter joins GRO buffers. A's server leg takes the whole buffer as one segment
(one `server_runs`), nothing over 64 KB ever goes to the TUN, a flow A does not terminate
still gets TUN frames of at most 64 KB, and a damaged datagram inside the long run still
ends the run before it and is dropped; a LegRun no leg claims is dropped, never written.
A Linux server's PSH (the last segment of each TSO frame) and its newer timestamps do not
end a server leg's run (the leg takes one segment per receive buffer, not per 64 KB), but
a timestamp that goes back does.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from bridge.config import loads_config
from bridge.gro import GroBatch
from bridge.gso import MAX_MERGED, UdpRun
from bridge.pipeline import Bridge, Output
from bridge.tunframe import LegRun, TunFrame
from stack.connection import TcpConnection
from stack.events import DataReceived
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.checksum import checksum, pseudo_sum_v4
from stack.wire.tcp import parse_tcp
from stack.wire.vnet import VNET_HDR_LEN

CLIENT = ipaddress.ip_address("198.18.10.5").packed
SERVER = ipaddress.ip_address("198.18.20.7").packed
A_ADDR = ("198.18.0.1", 4754)
B_ADDR = ("198.18.0.2", 4754)

SITE = """
[tun]
name = "gb{side}"
addresses = ["{tun4}"]
[listen]
address = "{listen}"
port = 4754
[pmtu]
underlay_mtu = 1500
[[peers]]
name = "other"
endpoint = "{endpoint}:4754"
prefixes = [{prefixes}]
"""

RULE = """
[[inspect]]
name = "web"
backend = "userspace"
dst_ports = [80]
inspectors = ["http"]
"""


def _tcp(pkt: Any, verify: bool = True) -> Any:
    off = (pkt[0] & 15) * 4
    return parse_tcp(memoryview(pkt)[off:], bytes(pkt[12:16]), bytes(pkt[16:20]),
                     verify_checksum=verify)


def _datagrams(out: Output) -> list[bytes]:
    got: list[bytes] = []
    for items in out.udp.values():
        for d in items:
            got.extend(d.datagrams() if isinstance(d, UdpRun) else [bytes(d)])
    return got


class Pair:
    """client <-> A (terminates port 80) <=> B <-> server; the tunnel toward A by hand."""

    def __init__(self, port: int) -> None:
        self.a = Bridge(loads_config(SITE.format(
            side="a", tun4="198.18.100.1/30", listen=A_ADDR[0], endpoint=B_ADDR[0],
            prefixes='"198.18.20.0/24"') + RULE), 0.0)
        self.b = Bridge(loads_config(SITE.format(
            side="b", tun4="198.18.100.2/30", listen=B_ADDR[0], endpoint=A_ADDR[0],
            prefixes='"198.18.10.0/24"')), 0.0)
        assert self.a.terminator is not None
        self.term = self.a.terminator
        self.term.use_tun_offload()
        big: dict[str, Any] = dict(recv_buffer=8 << 20, send_buffer=8 << 20, msl=1.0)
        self.client = TcpConnection((CLIENT, 40001), (SERVER, port), TcpConfig(**big))
        self.server = TcpConnection((SERVER, port), (CLIENT, 40001),
                                    TcpConfig(mss=1400, initial_cwnd=1 << 20, **big))
        self.server.listen()
        self.client.connect(0.0)
        self.now = 0.0
        self.got = bytearray()
        self.frames: list[bytes] = []  # every TUN write A made toward the client

    def server_datagrams(self) -> list[bytes]:
        """What B sends toward A for the server's pending segments."""
        ob = Output()
        pk = [self.term.packet(SERVER, CLIENT, s) for s in self.server.segments_to_send(self.now)]
        self.b.from_tun(pk, self.now, ob)
        return _datagrams(ob)

    def to_a(self, items: list[Any]) -> None:
        """Hand `items` (datagrams or GroBatches) to A, deliver what A sends everywhere."""
        oa = Output()
        self.a.from_udp([(d, B_ADDR) for d in items], self.now, oa)
        self.deliver(oa)

    def deliver(self, oa: Output) -> None:
        ib = Output()
        self.b.from_udp([(d, A_ADDR) for d in _datagrams(oa)], self.now, ib)
        for p in ib.tun:
            self.server.receive_segment(_tcp(p), self.now)
        for p in oa.tun:
            self.frames.append(bytes(p))
            if type(p) is TunFrame:  # Linux's TCP takes a GSO write whole
                self.client.receive_segment(_tcp(memoryview(p)[VNET_HDR_LEN:], False), self.now)
            else:
                self.client.receive_segment(_tcp(p), self.now)
        while (ev := self.client.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self.got += ev.data
        while self.server.next_event() is not None:
            pass

    def step(self) -> None:
        self.now += 0.001
        oa = Output()
        up = [self.term.packet(CLIENT, SERVER, s) for s in self.client.segments_to_send(self.now)]
        if up:
            self.a.from_tun(up, self.now, oa)
        self.deliver(oa)
        self.to_a(self.server_datagrams())
        t = self.a.get_timer()
        if t is not None and t <= self.now:
            oa = Output()
            self.a.handle_timer(self.now, oa)
            self.deliver(oa)

    def established(self) -> None:
        for _ in range(200):
            if self.server.state is State.ESTABLISHED and \
                    self.client.state is State.ESTABLISHED:
                return
            self.step()
        raise AssertionError("no connection")


def _run(p: Pair, rows: int) -> tuple[list[bytes], bytes]:
    """The server sends `rows` full segments at once; their datagrams, glued, and data."""
    data = os.urandom(rows * 1400)
    assert p.server.send(data) == len(data)
    dgrams = p.server_datagrams()
    assert len(dgrams) == rows and len({len(d) for d in dgrams}) == 1
    return dgrams, data


def test_a_long_run_reaches_the_server_leg_as_one_segment() -> None:
    p = Pair(80)
    p.established()
    runs = p.term.counters["server_runs"]
    dgrams, data = _run(p, 90)  # 126 KB (the leg's first window): two TUN frames' worth
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    assert p.term.counters["server_runs"] == runs + 1  # one segment for the whole buffer
    for _ in range(50):
        p.step()
    assert bytes(p.got) == data
    assert max(len(f) for f in p.frames) <= VNET_HDR_LEN + MAX_MERGED  # never a long TUN write
    assert p.term.drops == {}


def test_a_flow_not_terminated_still_gets_frames_of_64_kb_at_most() -> None:
    p = Pair(8080)  # no rule: kernel TCP end to end, A only forwards
    p.established()
    dgrams, data = _run(p, 90)
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    frames = [f for f in p.frames if f[0] < 0x40]  # vnet frames (an IP packet starts 0x4_)
    assert len(frames) >= 2
    assert max(len(f) for f in p.frames) <= VNET_HDR_LEN + MAX_MERGED
    for _ in range(50):
        p.step()
    assert bytes(p.got) == data


def test_a_damaged_datagram_ends_a_long_run_and_is_dropped() -> None:
    p = Pair(80)
    p.established()
    runs = p.term.counters["server_runs"]
    dgrams, data = _run(p, 90)
    bad = bytearray(dgrams[60])
    bad[-1] ^= 0xFF  # a payload byte: the TCP checksum no longer holds
    dgrams[60] = bytes(bad)
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    assert p.term.counters["server_runs"] == runs + 2  # rows 0-59, then 61-89
    assert p.term.drops.get("bad_checksum") == 1
    (sp,) = p.term.splices.values()
    assert sp.server.bytes_in == 60 * 1388  # up to the hole (MSS 1400 less the timestamps)
    for _ in range(400):  # the server resends the damaged segment (its RACK/RTO)
        p.step()
    assert bytes(p.got) == data


def test_a_leg_run_no_leg_claims_is_dropped_never_written() -> None:
    p = Pair(80)
    p.established()
    d = _run(p, 90)[0][0]
    off = next(o for o in (4, 8, 12) if int.from_bytes(d[o + 2:o + 4], "big") == len(d) - o)
    hdr = bytearray(d[off:off + 52])  # IP + TCP header (timestamps) of the first datagram
    runs = p.term.counters["server_runs"]
    out = Output()
    p.term.from_peer([LegRun(hdr, d[off + 52:], len(d) - off - 52)], p.now, out)
    assert p.term.counters["server_runs"] == runs + 1 and p.term.drops == {}  # its leg's
    hdr[22:24] = (81).to_bytes(2, "big")  # another source port: no splice has this flow
    out = Output()
    p.term.from_peer([LegRun(hdr, d[off + 52:], len(d) - off - 52)], p.now, out)
    assert out.tun == [] and p.term.drops == {"leg_run_unclaimed": 1}


def test_a_reordered_batch_costs_rows_linear_in_its_size(monkeypatch: Any) -> None:
    """Every sixth datagram one place late: many short runs in one buffer. Each run's
    check looks at a few rows past its own end, not the whole rest of the buffer
    (fastpath.py `expand`): the rows looked at stay within 6x the batch (22x before)."""
    import bridge.fastpath as fastpath

    looked: list[int] = []
    real = fastpath.__dict__["coalesce_rows"]

    def counting(buf: Any, start: int, seg: int, *a: Any, **k: Any) -> Any:
        avail = (len(buf) - start) // seg
        cap = a[-1] if len(a) >= 8 else k.get("max_rows", 0)
        looked.append(min(avail, cap) if cap else avail)
        return real(buf, start, seg, *a, **k)

    monkeypatch.setattr(fastpath, "coalesce_rows", counting)
    p = Pair(80)
    p.established()
    dgrams, data = _run(p, 90)
    for i in range(4, 89, 6):
        dgrams[i], dgrams[i + 1] = dgrams[i + 1], dgrams[i]
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    assert len(looked) >= 10 and sum(looked) <= 6 * 90, looked
    for _ in range(100):
        p.step()
    assert bytes(p.got) == data and p.term.drops == {}


def _retouch(d: bytes, psh: bool = False, tsval: int = 0, tsecr: int = 0) -> bytes:
    """Datagram `d` (no GRE checksum) with PSH set and TSval / TSecr moved by the given
    amounts, its TCP checksum made right again: as a Linux sender's segments differ."""
    b = bytearray(d)
    off = next(o for o in (4, 8, 12) if int.from_bytes(b[o + 2:o + 4], "big") == len(b) - o)
    t = off + 20
    assert b[t + 20:t + 24] == b"\x01\x01\x08\x0a"  # NOP NOP timestamps
    if psh:
        b[t + 13] |= 0x08
    for at, by in ((t + 24, tsval), (t + 28, tsecr)):
        b[at:at + 4] = ((int.from_bytes(b[at:at + 4], "big") + by) & 0xFFFFFFFF).to_bytes(4, "big")
    b[t + 16:t + 18] = b"\0\0"
    ps = pseudo_sum_v4(bytes(b[off + 12:off + 16]), bytes(b[off + 16:off + 20]), 6, len(b) - t)
    b[t + 16:t + 18] = checksum(b[t:], ps).to_bytes(2, "big")
    return bytes(b)


def _tsval(d: bytes) -> int:
    off = next(o for o in (4, 8, 12) if int.from_bytes(d[o + 2:o + 4], "big") == len(d) - o)
    return int.from_bytes(d[off + 44:off + 48], "big")


def test_psh_and_newer_timestamps_do_not_end_a_server_legs_run() -> None:
    """Rows 0-44 and 45-89 as two TSO frames of a Linux server: PSH on the last row of
    each, the second frame's TSval and TSecr newer. One segment reaches the leg, carrying
    the first row's TSval (RFC 7323 §4.3: the earliest of what the next ACK covers)."""
    p = Pair(80)
    p.established()
    runs = p.term.counters["server_runs"]
    dgrams, data = _run(p, 90)
    first = _tsval(dgrams[0])
    dgrams = [_retouch(d, psh=i in (44, 89), tsval=5 * (i >= 45), tsecr=3 * (i >= 45))
              for i, d in enumerate(dgrams)]
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    assert p.term.counters["server_runs"] == runs + 1  # was three: PSH and TSval ended runs
    (sp,) = p.term.splices.values()
    assert sp.server.bytes_in == 90 * 1388 and sp.server.ts_recent == first
    for _ in range(50):
        p.step()
    assert bytes(p.got) == data and p.term.drops == {}


def test_a_timestamp_that_goes_back_ends_a_server_legs_run() -> None:
    """Rows 60-89 carry an older TSval than rows 0-59: the run ends before row 60 (merged,
    row 60 would have passed the leg's PAWS check, RFC 7323 §5.3, unseen); rows 60-89 are
    then old to the leg, and the server's retransmission completes the data."""
    p = Pair(80)
    p.established()
    runs = p.term.counters["server_runs"]
    dgrams, data = _run(p, 90)
    dgrams = [_retouch(d, tsval=-7 * (i >= 60)) for i, d in enumerate(dgrams)]
    p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))])
    assert p.term.counters["server_runs"] == runs + 2  # rows 0-59, then 60-89
    (sp,) = p.term.splices.values()
    assert sp.server.bytes_in == 60 * 1388 and sp.server.info()["drops"] == {"paws": 1}
    for _ in range(1500):  # no SACK to go by: the server's retransmission timer (RTO 1 s)
        t = p.server.get_timer()
        if t is not None and t <= p.now:
            p.server.handle_timer(p.now)
        p.step()
    assert bytes(p.got) == data


def test_timestamps_that_each_step_forward_but_wrap_to_older_end_the_run() -> None:
    """Rows 0/30/60 carry TSval offsets 0, +0x7FFFFFFF and +0xFFFFFFFE: each step looks newer
    modulo 2**32, yet row 60 is older than row 0. Merged, rows 60-89 would pass the leg's
    PAWS check (RFC 7323 §5.3) unseen; the leg must get what it gets one by one."""
    got = []
    for merged in (True, False):
        p = Pair(80)
        p.established()
        dgrams, _data = _run(p, 90)
        step = [0, 0x7FFFFFFF, 0xFFFFFFFE]
        dgrams = [_retouch(d, tsval=step[i // 30]) for i, d in enumerate(dgrams)]
        p.to_a([GroBatch(bytearray(b"".join(dgrams)), len(dgrams[0]))] if merged else dgrams)
        (sp,) = p.term.splices.values()
        assert sp.server is not None
        got.append((sp.server.bytes_in, sp.server.info()["drops"]))
    assert got[0] == got[1] == (60 * 1388, {"paws": 1})
