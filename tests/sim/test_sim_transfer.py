"""Two TcpConnections over a seeded lossy link: byte-exact transfers (goodput printed).

Goodput is printed, never asserted (house rule: performance is shown, not timed-asserted).
Run with `-s` to see the lines.
"""

from __future__ import annotations

import pytest
from netsim import LinkSpec, transfer

from stack.tcp_config import TcpConfig

TEN_MB = 10 * 1000 * 1000


def test_sim_10mb_loss_free() -> None:
    r = transfer(TEN_MB, LinkSpec(), seed=1)
    print("\n" + r.line("loss-free 10 MB"))
    assert r.ok and r.received == TEN_MB
    assert r.retransmissions == 0 and r.dropped == 0
    # Header prediction takes nearly every in-order data segment.
    assert r.receiver_info["fast_path"] >= 0.9 * TEN_MB / 1448  # type: ignore[operator]


@pytest.mark.parametrize("seed", [1, 2])
def test_sim_10mb_5pct_loss_reorder_duplication(seed: int) -> None:
    spec = LinkSpec(loss=0.05, dup=0.02, reorder=0.05)
    r = transfer(TEN_MB, spec, seed=seed)
    print("\n" + r.line(f"5% loss, 2% dup, 5% reorder, seed {seed}"))
    assert r.ok and r.received == TEN_MB
    assert r.dropped > 0 and r.retransmissions > 0  # the link really was lossy


def test_sim_without_sack_or_timestamps_still_exact() -> None:
    cfg = TcpConfig(rto_min=0.2, sack=False, timestamps=False, window_scaling=False,
                    isn_key=b"netsim")
    r = transfer(2 * 1000 * 1000, LinkSpec(loss=0.05, reorder=0.05), seed=3, config=cfg)
    print("\n" + r.line("2 MB, 5% loss, no SACK/TS/WS"))
    assert r.ok


def test_sim_heavy_loss_small_buffers() -> None:
    cfg = TcpConfig(rto_min=0.2, recv_buffer=16384, send_buffer=8192, mss=536,
                    isn_key=b"netsim")
    r = transfer(500_000, LinkSpec(loss=0.15, dup=0.05, reorder=0.2), seed=4, config=cfg)
    print("\n" + r.line("0.5 MB, 15% loss, MSS 536, 16 KB window"))
    assert r.ok


def test_sim_super_segments_both_ways() -> None:
    # The sender emits 64 KB super-segments (tx_max_segment), as toward a TUN with GSO;
    # the receiver takes them whole, as from a TUN with GRO.
    cfg = TcpConfig(rto_min=0.2, tx_max_segment=65536, isn_key=b"netsim")
    r = transfer(TEN_MB, LinkSpec(rate=1e9), seed=5, config=cfg)
    print("\n" + r.line("10 MB in 64 KB super-segments"))
    assert r.ok
