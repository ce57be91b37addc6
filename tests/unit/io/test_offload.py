"""Table tests for bridge/io/offload.py: vnet header, TSO split, NEEDS_CSUM, coalescing.

scapy (tests only) is the independent reference for lengths, flags and checksums.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from bridge.io import offload as ol
from stack.wire import vnet
from stack.wire.checksum import partial, pseudo_sum_v4, pseudo_sum_v6

SRC4, DST4 = "198.18.1.10", "198.18.2.10"
SRC6, DST6 = "2001:db8:1::10", "2001:db8:2::10"


def _payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _super(v6: bool, size: int, flags: str = "PA", seq: int = 1000, ip_id: int = 7,
           opts: list | None = None) -> bytes:
    tcp = TCP(sport=40000, dport=80, seq=seq, ack=55, flags=flags, window=500,
              options=opts or [])
    if v6:
        pkt = IPv6(src=SRC6, dst=DST6, hlim=63) / tcp / _payload(size)
    else:
        pkt = IP(src=SRC4, dst=DST4, id=ip_id, ttl=63, flags="DF") / tcp / _payload(size)
    return bytes(pkt)


def _as_tso_frame(pkt: bytes, v6: bool, mss: int) -> bytes:
    """What the kernel hands us: pseudo-header sum (no length) in the TCP field, NEEDS_CSUM."""
    b = bytearray(pkt)
    ihl = 40 if v6 else (b[0] & 15) * 4
    ps = pseudo_sum_v6(b[8:24], b[24:40], 6, 0) if v6 else pseudo_sum_v4(b[12:16], b[16:20], 6, 0)
    b[ihl + 16:ihl + 18] = ps.to_bytes(2, "big")
    doff = (b[ihl + 12] >> 4) * 4
    gso = vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4
    return vnet.build_vnet(vnet.F_NEEDS_CSUM, gso, ihl + doff, mss, ihl, 16) + bytes(b)


def _check_segments(segs: list[bytes], orig: bytes, v6: bool, mss: int) -> None:
    o = IPv6(orig) if v6 else IP(orig)
    data = b"".join(bytes(IPv6(s)[TCP].payload) if v6 else bytes(IP(s)[TCP].payload)
                    for s in segs)
    assert data == bytes(o[TCP].payload)
    for i, s in enumerate(segs):
        p = IPv6(s) if v6 else IP(s)
        last = i == len(segs) - 1
        t = p[TCP]
        assert len(t.payload) == (mss if not last else len(data) - mss * (len(segs) - 1))
        assert t.seq == (o[TCP].seq + i * mss) & 0xFFFFFFFF
        want_flags = int(o[TCP].flags) if last else int(o[TCP].flags) & ~0x09
        if i:
            want_flags &= ~0x80
        assert int(t.flags) == want_flags
        assert t.options == o[TCP].options
        # the checksums scapy computes itself equal ours
        ref = p.copy()
        del ref[TCP].chksum
        if not v6:
            del ref[IP].chksum
            del ref[IP].len
            assert p[IP].id == (o[IP].id + i) & 0xFFFF
            assert p[IP].len == len(s)
        else:
            del ref[IPv6].plen
            assert p[IPv6].plen == len(s) - 40
        assert bytes(ref.__class__(bytes(ref))) == s


VNET_CASES = [
    ((0, 0, 0, 0, 0, 0), bytes(10)),
    ((1, 1, 52, 1448, 20, 16), bytes([1, 1, 52, 0, 0xA8, 5, 20, 0, 16, 0])),
    ((1, 4, 72, 1428, 40, 16), bytes([1, 4, 72, 0, 0x94, 5, 40, 0, 16, 0])),
]


@pytest.mark.parametrize("fields,wire", VNET_CASES)
def test_vnet_round_trip(fields: tuple[int, ...], wire: bytes) -> None:
    assert vnet.build_vnet(*fields) == wire
    assert vnet.parse_vnet(wire) == fields


SPLIT_CASES = [
    # (v6, payload size, mss, flags, options)
    (False, 5000, 1448, "PA", None),
    (False, 64000, 1448, "FPA", None),
    (False, 2897, 1448, "CA", [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]),
    (False, 4000, 1001, "PA", None),  # odd MSS: padding per segment
    (False, 2896, 1448, "A", None),  # exact multiple: last segment is full size
    (True, 5000, 1428, "PA", None),
    (True, 63000, 1428, "FPA", [("NOP", None), ("NOP", None), ("Timestamp", (9, 8))]),
    (True, 3001, 999, "A", None),
]


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("v6,size,mss,flags,opts", SPLIT_CASES)
def test_tso_split(v6: bool, size: int, mss: int, flags: str, opts: list | None,
                   use_numpy: bool) -> None:
    orig = _super(v6, size, flags, seq=0xFFFFF000, opts=opts)  # seq wraps during the split
    out: list[bytes] = []
    assert ol.split_frame(_as_tso_frame(orig, v6, mss), out, use_numpy=use_numpy)
    assert len(out) == -(-size // mss)
    _check_segments(out, orig, v6, mss)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 20000), mss=st.integers(500, 1460), v6=st.booleans(),
       seed=st.integers(0, 1000))
def test_numpy_and_python_paths_equal(size: int, mss: int, v6: bool, seed: int) -> None:
    random.seed(seed)
    orig = _super(v6, size)
    frame = _as_tso_frame(orig, v6, mss)
    a: list[bytes] = []
    b: list[bytes] = []
    assert ol.split_frame(frame, a, use_numpy=True)
    assert ol.split_frame(frame, b, use_numpy=False)
    assert a == b


@pytest.mark.parametrize("v6", [False, True])
def test_needs_csum_completion(v6: bool) -> None:
    inner = (IPv6(src=SRC6, dst=DST6) if v6 else IP(src=SRC4, dst=DST4)) / UDP(
        sport=5, dport=6) / _payload(333)
    good = bytes(inner)
    b = bytearray(good)
    ihl = 40 if v6 else 20
    ulen = len(b) - ihl
    ps = (pseudo_sum_v6(b[8:24], b[24:40], 17, ulen) if v6
          else pseudo_sum_v4(b[12:16], b[16:20], 17, ulen))
    b[ihl + 6:ihl + 8] = ps.to_bytes(2, "big")
    out: list[bytes] = []
    assert ol.split_frame(vnet.build_vnet(vnet.F_NEEDS_CSUM, 0, 0, 0, ihl, 6) + bytes(b), out)
    assert out == [good]


@pytest.mark.parametrize("frame", [
    b"",
    bytes(10),
    vnet.build_vnet(vnet.F_NEEDS_CSUM, 0, 0, 0, 200, 16) + _super(False, 10),  # offsets past end
    vnet.build_vnet(1, vnet.GSO_TCPV4, 40, 1448, 20, 16) + b"\x45" + bytes(30),  # truncated
    vnet.build_vnet(1, vnet.GSO_TCPV4, 40, 1448, 20, 16)
    + bytes(IP(dst=DST4) / UDP() / bytes(3000)),
    vnet.build_vnet(1, 3, 40, 1448, 20, 6) + bytes(IP(dst=DST4) / UDP() / bytes(3000)),  # UFO
    vnet.build_vnet(1, vnet.GSO_TCPV4, 40, 0, 20, 16) + _super(False, 3000),  # gso_size 0
    vnet.build_vnet(1, vnet.GSO_TCPV4, 40, 1448, 20, 16) + b"\x75" + bytes(3000),  # version 7
])
def test_malformed_frames_are_refused(frame: bytes) -> None:
    out: list[bytes] = []
    assert ol.split_frame(frame, out) is False
    assert out == []


def test_plain_frame_passes() -> None:
    pkt = bytes(IP(dst=DST4) / UDP() / b"x")
    out: list[bytes] = []
    assert ol.split_frame(vnet.VNET_NONE + pkt, out)
    assert out == [pkt]


def _segments(v6: bool, size: int, mss: int, flags: str = "A", seq: int = 1000,
              opts: list | None = None) -> list[bytes]:
    out: list[bytes] = []
    assert ol.split_frame(_as_tso_frame(_super(v6, size, flags, seq=seq, opts=opts), v6, mss),
                          out)
    return out


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size,mss", [(20000, 1448), (64000, 1400), (3000, 1001), (2896, 1448)])
def test_coalesce_then_split_round_trip(v6: bool, size: int, mss: int) -> None:
    segs = _segments(v6, size, mss, "PA")
    frames: list[bytes] = []
    assert ol.coalesce(segs, frames) == 1
    fl, gso, hdr_len, gso_size, cs, co = vnet.parse_vnet(frames[0])
    assert (fl, gso, gso_size, cs, co) == (
        vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4, mss, 40 if v6 else 20, 16)
    # what the kernel will do with it: segment it again, computing checksums from scratch
    again: list[bytes] = []
    assert ol.split_frame(frames[0], again)
    assert again == segs


def _frames_of(pkts: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    ol.coalesce(pkts, out)
    return out


def _n_segments(frame: bytes) -> int:
    out: list[bytes] = []
    assert ol.split_frame(frame, out)
    return len(out)


def test_coalesce_rules() -> None:
    a = _segments(False, 4344, 1448, "A")          # 3 x 1448, contiguous
    b = _segments(False, 2896, 1448, "A", seq=10**6)  # 2 segments, another seq space
    # interleaved flows with the same 4-tuple but a gap: seq not contiguous -> two groups
    assert [_n_segments(f) for f in _frames_of(a + b)] == [3, 2]
    # a gap in the middle
    assert [_n_segments(f) for f in _frames_of([a[0], a[2]])] == [1, 1]
    # a larger segment after a smaller one closes the group
    small = _segments(False, 1000, 1000, "A")[0]
    c = _segments(False, 4344, 1448, "A", seq=2000)
    assert [_n_segments(f) for f in _frames_of([small, *c])] == [1, 3]
    # SYN and FIN never merge
    syn = bytes(IP(src=SRC4, dst=DST4) / TCP(sport=40000, dport=80, flags="S"))
    fin = _segments(False, 1448, 1448, "FA", seq=1000 + 4344)
    assert len(_frames_of([syn, *a, *fin])) == 3
    # PSH on a segment ends its group after it
    p = _segments(False, 2896, 1448, "PA", seq=1000 + 2896)  # PSH on p[1] only
    nxt = _segments(False, 1448, 1448, "A", seq=1000 + 2 * 2896)
    frames = _frames_of([*a[:2], *p, *nxt])
    assert [_n_segments(f) for f in frames] == [4, 1]
    # different options (timestamps) never merge
    t1 = _segments(False, 1448, 1448, "A", seq=1000, opts=[("Timestamp", (1, 1))])
    t2 = _segments(False, 1448, 1448, "A", seq=2448, opts=[("Timestamp", (2, 1))])
    assert len(_frames_of(t1 + t2)) == 2


def test_coalesce_bad_checksum_sends_every_packet_alone() -> None:
    segs = _segments(True, 5792, 1448, "A")
    bad = bytearray(segs[1])
    bad[-1] ^= 0xFF
    frames = _frames_of([segs[0], bytes(bad), *segs[2:]])
    assert frames == [vnet.VNET_NONE + p for p in (segs[0], bytes(bad), *segs[2:])]


def test_coalesce_odd_sizes_verified_one_by_one() -> None:
    segs = _segments(False, 3003, 1001, "A")
    assert len(_frames_of(segs)) == 1
    bad = bytearray(segs[0])
    bad[-1] ^= 1
    assert len(_frames_of([bytes(bad), *segs[1:]])) == 3


def test_coalesce_keeps_non_tcp_and_order_within_flows() -> None:
    udp = bytes(IPv6(src=SRC6, dst=DST6) / UDP() / b"hi")
    segs = _segments(True, 2856, 1428, "A")
    frames = _frames_of([udp, *segs])
    assert frames[0] == vnet.VNET_NONE + udp
    assert _n_segments(frames[1]) == 2
    assert partial(b"") == 0


# IPv4 header damage (RFC 791 §3.1): the coalescer rebuilds a merged header from the first
# packet with fresh lengths, identification and checksum, so a damaged header must never
# join a group: it goes alone, unchanged, and the kernel drops it as it would have.
IPV4_DAMAGE = [  # (segment index of 5, header byte, xor)
    (0, 4, 0x01), (0, 10, 0x80), (0, 11, 0xFF),   # identification, checksum of the first
    (2, 4, 0x10), (2, 5, 0x01), (2, 10, 0x01), (2, 11, 0x40),  # of a middle one
    (4, 5, 0x02), (4, 10, 0xFF),                   # of the (full-size) last one
    (2, 1, 0x04), (2, 8, 0x01), (2, 12, 0x01), (2, 19, 0x01),  # TOS, TTL, addresses
    (1, 3, 0x01), (3, 6, 0x40),                    # total length; DF
]


@pytest.mark.parametrize("k,at,xor", IPV4_DAMAGE)
def test_coalesce_never_merges_a_damaged_ipv4_header(k: int, at: int, xor: int) -> None:
    segs = _segments(False, 5 * 1448, 1448, "A")
    bad = bytearray(segs[k])
    bad[at] ^= xor
    assert partial(bytes(bad[:20])) != 0xFFFF  # the header checksum no longer holds
    pkts = [*segs[:k], bytes(bad), *segs[k + 1:]]
    frames = _frames_of(pkts)
    assert frames.count(vnet.VNET_NONE + bytes(bad)) == 1  # alone and unchanged
    # every other packet still reaches the kernel, the intact ones on each side merged
    again: list[bytes] = []
    for f in frames:
        assert ol.split_frame(f, again)
    assert again == pkts
    merged = [f for f in frames if vnet.parse_vnet(f)[1]]
    assert sum(map(_n_segments, merged)) + len(frames) - len(merged) == 5
    before, after = k, 4 - k
    assert len(merged) == (before >= 2) + (after >= 2)


def test_coalesce_damaged_ipv4_header_in_another_flow_between() -> None:
    """A damaged packet interleaved with a flow's run (the per-key, not the fast, path)."""
    a = _segments(False, 3 * 1448, 1448, "A")
    other = bytearray(_segments(False, 1448, 1448, "A", seq=10**6)[0])
    other[21] ^= 0x01  # the other flow: source port differs -> its own key
    other[10] ^= 0x01  # ... and its IPv4 header checksum is broken
    # TCP checksum no longer matters: the packet must go alone before any grouping
    frames = _frames_of([a[0], bytes(other), a[1], a[2]])
    assert frames[1] == vnet.VNET_NONE + bytes(other)
    assert _n_segments(frames[0]) == 3 and len(frames) == 2


@settings(max_examples=200, deadline=None)
@given(k=st.integers(0, 5), at=st.integers(0, 19), xor=st.integers(1, 255),
       v_size=st.sampled_from([(1448, 6 * 1448), (1001, 5 * 1001 + 7)]))
def test_coalesce_ipv4_header_damage_hypothesis(k: int, at: int, xor: int,
                                                v_size: tuple[int, int]) -> None:
    """Any one-byte change of any IPv4 header: that packet reaches the kernel as it is."""
    mss, size = v_size
    segs = _segments(False, size, mss, "A")
    k %= len(segs)
    bad = bytearray(segs[k])
    bad[at] ^= xor
    pkts = [*segs[:k], bytes(bad), *segs[k + 1:]]
    frames = _frames_of(pkts)
    assert vnet.VNET_NONE + bytes(bad) in frames
    again: list[bytes] = []  # what the kernel gets: a merged frame is split as TSO would
    for f in frames:
        assert ol.split_frame(f, again)
    assert again == pkts  # nothing repaired, nothing lost, order kept


@pytest.mark.parametrize("at", [4, 5, 10, 11])
def test_gro_batch_rows_stop_before_a_damaged_ipv4_header(at: int) -> None:
    """bridge/gro.py coalesce_rows (the GRO-batch path) checks every row's IPv4 header
    checksum too: a run ends before the damaged row, which never starts one."""
    from bridge.gro import coalesce_rows

    segs = _segments(False, 5 * 1448, 1448, "A")
    seg = len(segs[0])
    bad = bytearray(segs[2])
    bad[at] ^= 0x01
    buf = b"".join([*segs[:2], bytes(bad), *segs[3:]])
    r = coalesce_rows(buf, 0, seg, 0, -1, True, 20, 20)
    assert r is not None
    frame, merged, _gseq, used = r
    assert merged == 2 and used == 2 * seg
    again: list[bytes] = []
    assert ol.split_frame(bytes(frame), again) and again == segs[:2]
    assert coalesce_rows(buf, used, seg, 0, -1, True, 20, 20) is None  # the damaged row
    r = coalesce_rows(buf, used + seg, seg, 0, -1, True, 20, 20)
    assert r is not None and r[1] == 2  # the intact rows after it merge again
