"""Simulation: client stack <-> lossy link <-> Terminator (splice) <-> lossy link <-> server stack.

Seeded loss (3 %) and reordering (5 % of packets get up to 3 ms extra delay) on all four
link directions; 10 MB from the server to the client and 1 MB the other way, byte-exact,
through an inspector chain. Goodput is printed (virtual time and CPU time), never asserted.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "splice"))

from splice_harness import Harness, finished  # noqa: E402

from bridge.flows import InspectRule  # noqa: E402
from bridge.inspect.api import CloseReason, Direction, Flow, Inspector  # noqa: E402
from stack.tcp_config import TcpConfig  # noqa: E402

# the endpoints stand in for Linux hosts: 200 ms RTO floor (TCP_RTO_MIN), short TIME-WAIT
LINUX_LIKE = TcpConfig(mss=1400, rto_min=0.2, msl=1.0)


class Digest(Inspector):
    """Hashes what passes each way (an inspector that sees every byte)."""

    def __init__(self) -> None:
        self.h = {d: hashlib.sha256() for d in Direction}
        self.reason: CloseReason | None = None

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        self.h[direction].update(data)
        return None

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        self.reason = reason


@pytest.mark.parametrize("loss,reorder,seed", [(0.03, 0.05, 7)])
def test_10mb_through_lossy_splice(loss: float, reorder: float, seed: int) -> None:
    rng = random.Random(seed)
    down = rng.randbytes(10 * 1024 * 1024)
    up = rng.randbytes(1024 * 1024)
    dig = Digest()
    h = Harness(InspectRule(name="sim", inspectors=("digest",)), [dig],
                client_data=up, server_data=down, client_close=True, server_close=True,
                delay=0.005, loss=loss, reorder=reorder, seed=seed,
                client_cfg=LINUX_LIKE, server_cfg=LINUX_LIKE)
    t0 = time.process_time()
    last_byte = [0.0]

    def watch(h: Harness) -> None:
        if not last_byte[0] and len(h.client.rx) == len(down):
            last_byte[0] = h.now

    h.hooks.append(watch)

    def done(h: Harness) -> bool:
        return h.server is not None and finished(h.client) and finished(h.server)

    assert h.run(done, max_time=600)
    cpu = time.process_time() - t0
    assert h.server is not None
    assert bytes(h.client.rx) == down and bytes(h.server.rx) == up
    assert dig.h[Direction.SERVER_TO_CLIENT].digest() == hashlib.sha256(down).digest()
    assert dig.reason is CloseReason.CLOSED
    links = (h.c2t, h.t2c, h.t2s, h.s2t)
    dropped = sum(x.dropped for x in links)
    sent = sum(x.sent for x in links)
    assert dropped > 0
    print(f"\nsplice sim loss={loss:.0%} reorder={reorder:.0%}: {len(down) / 1e6:.1f} MB down + "
          f"{len(up) / 1e6:.1f} MB up in {last_byte[0]:.2f} s virtual = "
          f"{len(down) / last_byte[0] / 1e6:.2f} MB/s goodput to the last byte "
          f"(links 12.5 MB/s, RTT 10 ms per leg); CPU {cpu:.2f} s = "
          f"{(len(down) + len(up)) / cpu / 1e6:.2f} MB/s of Python; "
          f"{dropped}/{sent} packets dropped")
