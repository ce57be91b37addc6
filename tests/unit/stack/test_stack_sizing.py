"""Issue 11 #6: every segment fits the MSS-derived limit, whatever options it carries
(RFC 9293 §3.7.1, RFC 6691), and a path MTU drop reaches connections already open."""

from __future__ import annotations

from dataclasses import replace

from tcp_script import ALL_OPTIONS, active, lseq, recv, rseq, send

from stack.wire.tcp import emit_tcp

PEER_MSS = 1460


def _wire_len(seg: object) -> int:
    return len(emit_tcp(seg, b"\x00" * 4, b"\x00" * 4))  # type: ignore[arg-type]


def test_segments_carrying_sack_blocks_never_exceed_the_mss_limit() -> None:
    """Data segments sent while we hold out-of-order data carry SACK blocks next to the
    TSopt: header + options + payload stays within 20 + peer MSS (at MTU 1500: 1500 bytes
    with the IP header), not 1448 bytes of payload plus 12 more option bytes per block."""
    conn = active(replace(ALL_OPTIONS, nagle=False, initial_cwnd=10 * PEER_MSS), window=65535,
                  ts=(100, 0), sack_perm=True, mss=PEER_MSS)
    # The peer's data arrives with holes: we hold three out-of-order ranges, so our
    # segments carry three SACK blocks (the most that fit beside the TSopt).
    for k in (2, 4, 6):
        send(conn, 0.01, seq=rseq(1 + 100 * k), ack=lseq(1), window=65535,
             payload=bytes(100), ts=(101, 0))
    recv(conn, 0.01)
    conn.send(bytes(8 * PEER_MSS))
    segs = recv(conn, 0.02)
    data = [s for s in segs if s.payload]
    assert data and all(len(s.sack) == 3 for s in data)
    assert max(_wire_len(s) for s in data) <= 20 + PEER_MSS
    assert sum(len(s.payload) for s in data) > 5 * (PEER_MSS - 12 - 28)


def test_a_retransmission_with_sack_blocks_fits_too() -> None:
    conn = active(replace(ALL_OPTIONS, nagle=False, initial_cwnd=10 * PEER_MSS, rto_min=0.2),
                  window=65535, ts=(100, 0), sack_perm=True, mss=PEER_MSS)
    conn.send(bytes(4 * PEER_MSS))
    recv(conn, 0.0)
    send(conn, 0.01, seq=rseq(201), ack=lseq(1), window=65535, payload=bytes(100),
         ts=(101, 0))
    recv(conn, 0.01)
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    rx = [s for s in recv(conn, t) if s.payload]
    assert rx and rx[0].sack and rx[0].seq == lseq(1)
    assert _wire_len(rx[0]) <= 20 + PEER_MSS


def test_path_mtu_lowers_the_mss_of_an_open_connection() -> None:
    conn = active(replace(ALL_OPTIONS, nagle=False), window=65535, ts=(100, 0),
                  mss=PEER_MSS)
    before = conn.send_mss
    conn.path_mtu(1400)
    assert conn.send_mss == 1400 - 40 - 12 < before
    conn.send(bytes(4000))
    assert all(_wire_len(s) <= 1400 - 20 for s in recv(conn, 0.1))
