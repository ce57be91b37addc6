"""The client leg on a vnet TUN (Terminator.use_tun_offload): TunFrames with NEEDS_CSUM and GSO.

The harness hands every TunFrame to bridge/io/offload.split_frame, which does what the kernel
does with such a write (segment at gso_size, complete the checksum); the client's stack then
parses each segment with checksum verification, so a wrong pseudo-header sum, length, offset
or sequence fails the transfer.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest
from splice_harness import C_ADDR, S_ADDR, Harness, finished

from bridge.flows import InspectRule
from bridge.gso import SuperPacket
from bridge.io.offload import coalesce, split_frame
from bridge.tunframe import TunFrame
from bridge.userspace.terminator import TSO_MAX_SEGMENT, Terminator
from stack.wire.tcp import ACK, PSH, TcpSegment, parse_tcp
from stack.wire.vnet import VNET


def rule(**kw: Any) -> InspectRule:
    return InspectRule(name="t", inspectors=("x",), **kw)


def both_done(h: Harness) -> bool:
    assert h.server is not None
    return finished(h.client) and finished(h.server)


def _term() -> Terminator:
    t = Terminator((), lambda p, n, o: True, lambda d: 1500, lambda: 1500)
    t.use_tun_offload()
    return t


@pytest.mark.parametrize("parts", [False, True])
def test_download_through_gso_frames_is_byte_exact(parts: bool) -> None:
    up = b"GET / HTTP/1.1\r\n\r\n"
    down = os.urandom(2_000_000)
    h = Harness(rule(max_buffer=4 << 20), [], client_data=up, server_data=down,
                client_close=True, server_close=True, tun_offload=True, frame_parts=parts)
    # the client's side is the slower one: bytes queue in the client leg, which then sends
    # them in super-segments as its window opens
    h.t2c.rate = h.c2t.rate = 2.5e6
    assert h.run(both_done, max_time=60)
    assert h.server is not None
    assert bytes(h.client.rx) == down and bytes(h.server.rx) == up
    assert h.tun_frames > 0 and h.gso_frames > 0   # super-segments, not one write per MSS
    assert h.parts_frames == (h.gso_frames if parts else 0)  # TunFrameParts: every GSO one
    assert h.term.drops == {}


@pytest.mark.parametrize("parts", [False, True])
def test_gso_frames_survive_loss_and_reordering(parts: bool) -> None:
    down = os.urandom(500_000)
    h = Harness(rule(), [], server_data=down, client_close=True, server_close=True,
                loss=0.02, reorder=0.05, seed=7, tun_offload=True, frame_parts=parts)
    assert h.run(both_done, max_time=120)
    assert bytes(h.client.rx) == down
    assert h.parts_frames == (h.gso_frames if parts else 0)


def test_without_offload_no_frames() -> None:
    h = Harness(rule(), [], server_data=os.urandom(100_000), client_close=True,
                server_close=True)
    assert h.run(both_done, max_time=60)
    assert h.tun_frames == 0


def _check_frame(frame: bytes, src: bytes, dst: bytes, seg: TcpSegment, mss: int) -> None:
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(frame, 0)
    assert flags == 1 and csum_offset == 16
    assert csum_start == (20 if len(src) == 4 else 40)
    pl = len(seg.payload)
    if pl > mss:
        assert gso_type == (1 if len(src) == 4 else 4) and gso_size == mss
        assert hdr_len == csum_start + 32  # TSopt header
    else:
        assert gso_type == 0
    segs: list[bytes] = []
    assert split_frame(frame, segs)
    assert len(segs) == max(1, -(-pl // mss))
    data = bytearray()
    seq = seg.seq
    for i, p in enumerate(segs):
        ihl = csum_start
        got = parse_tcp(memoryview(p)[ihl:], src, dst)   # checksum verified
        assert got is not None
        assert got.seq == seq and got.ack == seg.ack and got.ts == seg.ts
        assert bool(got.flags & PSH) == (i == len(segs) - 1)
        if len(src) == 4:
            assert int.from_bytes(p[2:4], "big") == len(p)
        else:
            assert int.from_bytes(p[4:6], "big") == len(p) - 40
        data += got.payload
        seq += len(got.payload)
    assert bytes(data) == bytes(seg.payload)


def test_frame_v4_and_v6_split_to_valid_segments() -> None:
    t = _term()
    payload = os.urandom(60_000)
    v6s = ipaddress.ip_address("2001:db8:2::10").packed
    v6c = ipaddress.ip_address("2001:db8:1::10").packed
    for src, dst in ((S_ADDR, C_ADDR), (v6s, v6c)):
        for n in (0, 1, 1387, 1388, 1389, 2 * 1388, 60_000):
            seg = TcpSegment(80, 40000, 123456, 777, ACK | PSH, 500, payload[:n],
                             ts=(11, 22))
            frame = t._frame(src, dst, seg, 1388)
            assert type(frame) is TunFrame
            _check_frame(frame, src, dst, seg, 1388)


def test_ipv4_ident_advances_by_segment_count() -> None:
    t = _term()
    seg = TcpSegment(80, 40000, 1, 1, ACK, 500, os.urandom(5000), ts=(1, 2))
    f1 = t._frame(S_ADDR, C_ADDR, seg, 1000)
    f2 = t._frame(S_ADDR, C_ADDR, seg, 1000)
    id1 = int.from_bytes(f1[10 + 4:10 + 6], "big")
    id2 = int.from_bytes(f2[10 + 4:10 + 6], "big")
    assert id2 == id1 + 5


def test_tso_max_segment_fits_ipv4_total_length() -> None:
    assert TSO_MAX_SEGMENT + 20 + 60 <= 65535
    t = _term()
    assert t.tx_max_segment == TSO_MAX_SEGMENT
    t.use_tun_offload(False)
    assert t.tx_max_segment == 0 and not t.tun_offload


def test_coalesce_writes_tun_frames_unchanged_and_in_order() -> None:
    t = _term()
    seg = TcpSegment(80, 40000, 1, 1, ACK, 500, os.urandom(3000), ts=(1, 2))
    frame = t._frame(S_ADDR, C_ADDR, seg, 1000)
    plain = t.packet(S_ADDR, C_ADDR, seg._replace(payload=b"x" * 100, seq=3001))
    out: list[bytes] = []
    assert coalesce([plain, frame, plain], out) == 3
    assert out[1] is frame
    assert out[0][10:] == plain and out[2][10:] == plain


def _burst_server(h: Harness) -> None:
    """The server's segments reach the Terminator in bursts, as a UDP GRO batch does."""
    h.s2t.rate = float("inf")  # no serialisation: a send burst arrives at once


def test_server_runs_reach_the_leg_as_one_segment() -> None:
    down = os.urandom(1_000_000)
    h = Harness(rule(max_buffer=4 << 20), [], server_data=down, client_close=True,
                server_close=True)
    _burst_server(h)
    assert h.run(both_done, max_time=60)
    assert bytes(h.client.rx) == down
    assert h.term.counters.get("server_runs", 0) > 0
    assert h.term.drops == {}


def test_corrupt_segment_in_a_run_is_dropped_alone() -> None:
    down = os.urandom(300_000)
    h = Harness(rule(), [], server_data=down, client_close=True, server_close=True)
    _burst_server(h)
    put = h.s2t.put
    state = {"n": 0}

    def corrupt(pkt: bytes, now: float) -> None:
        if len(pkt) > 1000:
            state["n"] += 1
            if state["n"] in (5, 40):  # inside a burst: flip one payload bit
                b = bytearray(pkt)
                b[-7] ^= 0x10
                pkt = bytes(b)
        put(pkt, now)

    h.s2t.put = corrupt  # type: ignore[method-assign]
    assert h.run(both_done, max_time=60)
    assert bytes(h.client.rx) == down
    assert h.term.drops.get("bad_checksum") == 2
    assert h.term.counters.get("server_runs", 0) > 0


def _merge(run: list[bytes]) -> TunFrame:
    """What bridge/gro.py coalesce_rows hands on: one IPv4 packet for a contiguous run, the
    pseudo-header sum in the TCP checksum field, behind a NEEDS_CSUM + GSO vnet header."""
    from stack.wire.checksum import pseudo_sum_v4

    first = run[0]
    hl = 20 + (first[32] >> 4) * 4
    payload = b"".join(p[hl:] for p in run)
    total = hl + len(payload)
    h = bytearray(first[:hl])
    h[2:4] = total.to_bytes(2, "big")
    h[33] |= run[-1][33] & PSH
    h[36:38] = pseudo_sum_v4(first[12:16], first[16:20], 6, total - 20).to_bytes(2, "big")
    vh = VNET.pack(1, 1, hl, len(first) - hl, 20, 16)
    return TunFrame(vh + bytes(h) + payload)


def _runs_as_frames(h: Harness, tso: bool = False) -> None:
    """Merge the runs of the server's bursts into TunFrames (the Bridge's GRO path), or with
    `tso` the client's bursts into SuperPackets (the TUN's TSO frames)."""
    link = h.c2t if tso else h.s2t
    due = link.due

    def merged(now: float) -> list[bytes]:
        out: list[bytes] = []
        run: list[bytes] = []
        for p in due(now) + [b""]:
            ok = len(p) > 52 and p[33] & ~PSH == ACK
            last = run[-1] if run else b""
            if run and ok and len(run) < 40 and int.from_bytes(p[24:28], "big") == \
                    int.from_bytes(last[24:28], "big") + len(last) - 52 and \
                    p[28:33] + p[34:36] + p[38:52] == last[28:33] + last[34:36] + last[38:52]:
                run.append(p)
                continue
            if run:
                if len(run) == 1:
                    out.append(run[0])
                elif tso:
                    m = _merge(run)
                    out.append(SuperPacket(bytes(m), 10, len(run[0]) - 52,  # type: ignore[arg-type]
                                           split_frame))
                else:
                    out.append(_merge(run))
                run = []
            if ok:
                run = [p]
            elif p:
                out.append(p)
        return out

    link.due = merged  # type: ignore[method-assign]


def test_merged_server_frames_reach_the_leg_as_one_segment() -> None:
    down = os.urandom(1_000_000)
    h = Harness(rule(max_buffer=4 << 20), [], server_data=down, client_close=True,
                server_close=True, tun_offload=True)
    _burst_server(h)
    _runs_as_frames(h)
    assert h.run(both_done, max_time=60)
    assert bytes(h.client.rx) == down
    assert h.term.counters.get("server_runs", 0) > 0 and h.term.drops == {}
    # a merged frame counts as the segments it carries
    assert h.term.counters["from_server"] == h.s2t.sent



def test_client_tso_frames_reach_the_leg_as_one_segment() -> None:
    up = os.urandom(1_000_000)
    h = Harness(rule(max_buffer=4 << 20), [], client_data=up, client_close=True,
                server_close=True, tun_offload=True)
    h.c2t.rate = float("inf")  # the client's bursts arrive at once, as one TSO frame would
    _runs_as_frames(h, tso=True)
    sent = []
    orig = h.term.from_tun_super

    def spy(sp: SuperPacket, now: float) -> bool:
        took = orig(sp, now)
        sent.append(took)
        return took

    h.term.from_tun_super = spy  # type: ignore[method-assign]
    assert h.run(both_done, max_time=60)
    assert h.server is not None and bytes(h.server.rx) == up
    assert sent and all(sent)
    # every packet counted once (a frame as the segments it carries), but the splice's SYN
    assert h.term.counters["from_client"] == h.c2t.sent - 1 and h.term.drops == {}
