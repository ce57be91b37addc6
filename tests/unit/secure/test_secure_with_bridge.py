"""The integration contract (bridge/secure/__init__.py) exercised with two real Bridges.

Only the Bridge's public calls are used (from_tun, from_udp, Output, peers[i].seq.reset()),
exactly as the package docstring tells the Bridge to call the secure layer: the GRE/IPIP
datagrams the Bridge builds are sealed, opened and handed back unchanged. It shows that
the encapsulation inside is untouched, that the issue-12 injection against drop-late has no
effect behind the secure layer, and that PeerRestarted heals drop-late after a restart.
"""

from __future__ import annotations

import struct

import pytest
from secure_pair import WALL, keypair

from bridge.config import loads_config
from bridge.gso import UdpRun
from bridge.pipeline import Bridge, Output
from bridge.secure import (
    OVERHEAD,
    PeerRestarted,
    PeerSecurity,
    PeerSpec,
    Roamed,
    SecureEndpoint,
    SecurityMode,
)
from bridge.secure.wire import TRANSPORT
from stack.wire.checksum import checksum

SITE = """
[tun]
name = "sec{side}"
addresses = ["198.18.100.{n}/30"]
[listen]
address = "198.18.0.{n}"
[[peers]]
name = "peer"
endpoint = "198.18.0.{m}:4754"
prefixes = ["{prefix}"]
keepalive = 0
{extra}
"""
ADDR = {"a": ("198.18.0.1", 4754), "b": ("198.18.0.2", 4754)}


def _packet(i: int) -> bytes:
    size = 1400
    udp = struct.pack("!HHHH", 1000 + i % 50, 5201, size - 20, 0) + bytes([i & 0xFF]) * (size - 28)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, i & 0xFFFF, 0x4000, 64, 17, 0,
                                bytes([198, 18, 10, 1]), bytes([198, 18, 20, 1])))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + udp


class Site:
    """One gateway: a Bridge and its SecureEndpoint, wired per the contract."""

    def __init__(self, side: str, extra: str, keys: dict[str, bytes], mode: SecurityMode,
                 now: float) -> None:
        n, m = (1, 2) if side == "a" else (2, 1)
        prefix = "198.18.20.0/24" if side == "a" else "198.18.10.0/24"
        self.side = side
        self.bridge = Bridge(loads_config(SITE.format(side=side, n=n, m=m, prefix=prefix,
                                                      extra=extra)), now)
        other = "b" if side == "a" else "a"
        sec = PeerSecurity(mode, (keys["priv_" + side],), (keys["pub_" + other],))
        self.sec = SecureEndpoint([PeerSpec(0, "peer", sec, ADDR[other])], now,
                                  wall_offset=WALL)
        self.tun: list[bytes] = []

    def send(self, pkts: list[bytes], now: float) -> list[bytes]:
        """from_tun, then seal every datagram (UdpRuns as one batch): the wire datagrams."""
        out = Output()
        self.bridge.from_tun(pkts, now, out)
        wire: list[bytes] = []
        for items in out.udp.values():
            for item in items:
                if isinstance(item, UdpRun):
                    seg = item.seg
                    res = self.sec.seal_batch(0, item, seg, now,
                                              alloc=lambda k, s=seg: UdpRun(k, s + OVERHEAD))
                    if res is not None:
                        wire += UdpRun(res[0], res[1]).datagrams()
                else:
                    d = self.sec.seal(0, item, now)
                    if d is not None:
                        wire.append(bytes(d))
        return wire + self.control(now)

    def control(self, now: float) -> list[bytes]:
        if (t := self.sec.get_timer()) is not None and t <= now:
            self.sec.handle_timer(now)
        return [bytes(d) for d, _ in self.sec.datagrams_to_send(now)]

    def receive(self, datagrams: list[bytes], now: float) -> None:
        other = "b" if self.side == "a" else "a"
        out = Output()
        for d in datagrams:
            res = self.sec.receive_datagram(d, ADDR[other], now)
            if self.sec.events_q:  # before the payload: it may be the peer's new life
                self.events()
            if res is not None and len(res[1]):
                self.bridge.from_udp([(bytes(res[1]), ADDR[other])], now, out)
        self.tun += [bytes(p) for p in out.tun]

    def events(self) -> None:
        while (ev := self.sec.next_event()) is not None:
            if isinstance(ev, PeerRestarted):
                self.bridge.peers[ev.peer].seq.reset()
            assert not isinstance(ev, Roamed)


def _sites(extra: str, mode: SecurityMode) -> tuple[Site, Site, dict[str, bytes]]:
    sa, pa = keypair()
    sb, pb = keypair()
    keys = {"priv_a": sa, "pub_a": pa, "priv_b": sb, "pub_b": pb}
    return Site("a", extra, keys, mode, 0.0), Site("b", extra, keys, mode, 0.0), keys


def _settle(a: Site, b: Site, now: float) -> None:
    for _ in range(6):
        b.receive(a.control(now), now)
        a.receive(b.control(now), now)


VARIANTS = ['key = 1\nsequence = "drop-late"', 'encapsulation = "ipip"']


@pytest.mark.parametrize("mode", [SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED])
@pytest.mark.parametrize("extra", VARIANTS)
def test_bridge_datagrams_cross_the_secure_layer_unchanged(extra: str,
                                                           mode: SecurityMode) -> None:
    a, b, _ = _sites(extra, mode)
    _settle(a, b, 0.0)
    pkts = [_packet(i) for i in range(40)]
    b.receive(a.send(pkts, 1.0), 1.0)
    assert len(b.tun) == 40
    assert b.bridge.counters.total_drops == 0 and sum(b.sec.drops.values()) == 0


def test_forged_far_ahead_sequence_numbers_cost_nothing_behind_the_secure_layer() -> None:
    """Issue 12: one forged datagram per 33 with a far-ahead GRE sequence made drop-late
    discard 94 % of the real traffic. The attacker knows every header; here the forgery is
    a real sealed datagram with its counter raised and its payload's GRE sequence raised:
    the tag fails, nothing reaches the Bridge."""
    a, b, _ = _sites('key = 1\nsequence = "drop-late"', SecurityMode.AUTHENTICATED)
    _settle(a, b, 0.0)
    delivered = 0
    for i in range(660):
        wire = a.send([_packet(i)], 1.0 + i * 0.001)
        if i % 33 == 0:
            forged = bytearray(wire[0])
            _, idx, ctr = TRANSPORT.unpack_from(forged)
            TRANSPORT.pack_into(forged, 0, forged[0], idx, ctr + 10**6)
            forged[16 + 8:16 + 12] = struct.pack("!I", 10**6)  # GRE seq (K and S present)
            b.receive([bytes(forged)], 1.0 + i * 0.001)
        b.receive(wire, 1.0 + i * 0.001)
        delivered += 1
    assert len(b.tun) == delivered
    assert b.sec.drops["bad_mac"] == 20 and b.bridge.counters.drop("sequence") == 0


def test_a_restarted_gateway_with_drop_late_is_heard_at_once() -> None:
    """The issue's restart: a's process dies and starts again; its GRE sequence numbers
    start at 0 again. PeerRestarted resets b's drop-late receiver: no 'sequence' drops."""
    extra = 'key = 1\nsequence = "drop-late"'
    a, b, keys = _sites(extra, SecurityMode.ENCRYPTED)
    _settle(a, b, 0.0)
    for i in range(100):
        b.receive(a.send([_packet(i)], 1.0 + i * 0.01), 1.0 + i * 0.01)
    assert len(b.tun) == 100
    a = Site("a", extra, keys, SecurityMode.ENCRYPTED, 5.0)  # kill -9, start again
    before = len(b.tun)
    for i in range(20):
        now = 5.0 + i * 0.01
        b.receive(a.send([_packet(i)], now), now)
        a.receive(b.control(now), now)
        b.receive(a.control(now), now)  # drained after every call: staged ones go first
    assert len(b.tun) - before == 20  # staged during the handshake, none lost
    assert b.bridge.counters.drop("sequence") == 0
    assert b.sec.events["peer_restarted"] == 2  # the first start and the restart
