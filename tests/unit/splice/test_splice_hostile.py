"""Hostile input never makes the Terminator raise: random bytes, and well-formed segments with
random flags, numbers and payloads from either side of a live splice (then the flow still ends)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from splice_harness import C_ADDR, C_PORT, S_ADDR, S_PORT, Harness

from bridge.inspect.api import CloseReason
from bridge.inspect.replace import ReplaceInspector
from bridge.inspect.rules import parse_rules
from stack.wire.tcp import TcpSegment

RULE = parse_rules([{"name": "t", "inspectors": ["replace"], "replace": [["ab", "xyz"]]}])[0]

segments = st.builds(
    TcpSegment,
    src_port=st.just(0), dst_port=st.just(0),
    seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255), window=st.integers(0, 65535),
    payload=st.binary(max_size=1500),
    mss=st.none() | st.integers(0, 65535), wscale=st.none() | st.integers(0, 255),
    sack_perm=st.booleans(),
    ts=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)


def _live() -> Harness:
    h = Harness(RULE, [ReplaceInspector(RULE)], client_data=b"hello ab " * 100,
                server_data=b"ab" * 3000)
    assert h.run(lambda h: len(h.client.rx) > 0)
    return h


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), segments), max_size=12),
       st.lists(st.binary(max_size=80), max_size=5))
def test_random_segments_and_bytes_never_raise(attack: list[tuple[bool, TcpSegment]],
                                                junk: list[bytes]) -> None:
    h = _live()
    term = h.term
    for from_client, seg in attack:
        if from_client:
            seg = TcpSegment(C_PORT, S_PORT, *_rest(seg))
            pkt = term.packet(C_ADDR, S_ADDR, seg)
            term.from_tun(pkt, len(pkt), h.now)
        else:
            seg = TcpSegment(S_PORT, C_PORT, *_rest(seg))
            pkt = term.packet(S_ADDR, C_ADDR, seg)
            term.from_peer([pkt], h.now, h.out)
        term.flush(h.now, h.out)
    for b in junk:
        term.from_tun(b, len(b), h.now)
        term.from_peer([b], h.now, h.out)
    term.flush(h.now, h.out)
    h.out.tun.clear()
    h.out.peer.clear()
    # whatever happened, the splice can still be shut down and reaped
    for sp in list(term.splices.values()):
        sp.abort(CloseReason.SHUTDOWN, h.now)
        term.touched[sp.key] = sp
    term.flush(h.now, h.out)
    assert h.run(lambda h: not h.term.splices, max_time=h.now + 300)


def _rest(seg: TcpSegment) -> tuple[object, ...]:
    """Every field after the ports."""
    return (seg.seq, seg.ack, seg.flags, seg.window, seg.payload, 0, seg.mss, seg.wscale,
            seg.sack_perm, seg.ts)
