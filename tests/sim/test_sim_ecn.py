"""ECN in the simulator (RFC 3168): a bottleneck that marks CE instead of dropping.

The link is a 12.5 MB/s bottleneck with a 60-packet drop-tail queue whose AQM marks ECT
packets CE once 20 are queued (netsim `ce_queue`). With ECN negotiated the sender learns
of the queue from the receiver's ECE (§6.1.3) and halves its window once per window of
data (§6.1.2): the transfer completes byte-exact with window reductions, nothing dropped
and nothing sent twice. Without ECN the same path drops from its full queue and the sender
retransmits. Goodput of both is printed (`-s`), never asserted (house rule).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from netsim import LinkSpec, transfer

from stack.tcp_config import TcpConfig

MARKING = LinkSpec(delay=0.005, rate=12.5e6, queue=60, ce_queue=20)
BASE = TcpConfig(rto_min=0.2, rto_var_min=0.2, isn_key=b"netsim", recv_buffer=4 << 20,
                 send_buffer=4 << 20)


@pytest.mark.parametrize("cc", ["cubic", "newreno"])
def test_ce_marks_instead_of_drops_reduce_the_window_without_retransmissions(cc: str) -> None:
    ecn = transfer(10_000_000, MARKING, seed=1, config=replace(BASE, ecn=True, congestion=cc))
    plain = transfer(10_000_000, MARKING, seed=1, config=replace(BASE, congestion=cc))
    print(f"\nCE-marking bottleneck, {cc}: ECN {ecn.goodput_sim:.2f} MB/s, "
          f"{ecn.marked} marked, {ecn.sender_info['ecn_cuts']} reductions, "
          f"{ecn.retransmissions} retransmissions; without ECN {plain.goodput_sim:.2f} MB/s, "
          f"{plain.dropped} dropped, {plain.retransmissions} retransmissions "
          f"({ecn.goodput_sim / plain.goodput_sim:.2f}x)")
    assert ecn.ok and ecn.sender_info["ecn"] and ecn.receiver_info["ecn"]
    assert ecn.marked > 0 and ecn.receiver_info["ce_marks"] == ecn.marked
    cuts = ecn.sender_info["ecn_cuts"]
    assert isinstance(cuts, int) and cuts >= 2  # once per window, not once per mark
    assert cuts < ecn.marked
    assert ecn.dropped == 0 and ecn.retransmissions == 0
    # the same path without ECN: the queue overflows and the sender recovers from drops
    assert plain.ok and not plain.sender_info["ecn"] and plain.marked == 0
    assert plain.dropped > 0 and plain.retransmissions > 0
