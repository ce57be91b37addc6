"""Issue 11 #6: a path MTU drop reaches the legs of splices already open (RFC 1191 §6.3,
RFC 8201 §5.2)."""

from __future__ import annotations

import os

from splice_harness import TUN_MTU, Harness

from bridge.flows import InspectRule
from stack.state import State


def test_path_mtu_drop_reaches_live_legs() -> None:
    data = os.urandom(2_000_000)
    h = Harness(InspectRule(name="t"), client_data=data, client_close=True)
    assert h.server is not None
    assert h.run(lambda h: h.server is not None and len(h.server.rx) > 200_000)
    (sp,) = h.term.splices.values()
    assert sp.client is not None and sp.client.state is State.ESTABLISHED
    before = sp.server.send_mss
    new_mtu = TUN_MTU - 200
    h.term.mtu_for = lambda dst: new_mtu  # the tunnel toward the server shrank
    h.term.path_mtu_changed()
    assert sp.server.send_mss <= new_mtu - 40 - 12 < before
    sizes: list[int] = []
    orig = h.term.send_to_peer

    def sized(pkt: bytes, now: float, out: object) -> bool:
        sizes.append(len(pkt))
        return orig(pkt, now, out)

    h.term.send_to_peer = sized
    assert h.run(lambda h: h.server is not None and len(h.server.rx) == len(data),
                 max_time=60)
    assert bytes(h.server.rx) == data
    assert sizes and max(sizes) <= new_mtu
