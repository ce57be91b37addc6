"""PeerTable (LPM, AllowedIPs), MSS clamping and counters rendering, each on its own."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from bridge import peers as peers_mod
from bridge.config import PeerConfig
from bridge.counters import DROP_REASONS, R_LOOP, R_SPOOFED_SOURCE, R_TTL, Counters
from bridge.mss import clamp, clamp_packet, mss_for_mtu
from bridge.peers import PeerTable, canonical_host


def _peer(name: str, host: str, *nets: str) -> PeerConfig:
    return PeerConfig(name=name, host=host, port=4754,
                      prefixes=tuple(ipaddress.ip_network(n) for n in nets))


TABLE = PeerTable([
    _peer("wide", "198.18.0.2", "198.18.0.0/15", "2001:db8::/32"),
    _peer("narrow", "198.18.0.3", "198.18.20.0/24", "2001:db8:20::/48"),
    _peer("host", "2001:db8:ff::3", "198.18.20.7/32", "0.0.0.0/0"),
], local=["198.18.0.1", "0.0.0.0"])


def _a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@pytest.mark.parametrize(("addr", "peer"), [
    ("198.18.20.7", 2), ("198.18.20.8", 1), ("198.19.255.255", 0), ("203.0.113.1", 2),
    ("2001:db8:20::1", 1), ("2001:db8:21::1", 0), ("2001:db9::1", -1),
])
def test_longest_prefix_match(addr: str, peer: int) -> None:
    assert TABLE.lookup(_a(addr)) == peer
    assert TABLE.lookup(_a(addr)) == peer  # cached answer is the same


def test_route_combines_loop_guard_and_lpm() -> None:
    assert TABLE.route(_a("198.18.20.7")) == 2 and TABLE.route(_a("198.18.20.8")) == 1
    assert TABLE.route(_a("198.18.0.1")) == peers_mod.LOOP  # our own listen address
    assert TABLE.route(_a("198.18.0.3")) == peers_mod.LOOP  # a peer endpoint, inside /15
    assert TABLE.route(_a("2001:db9::1")) == -1
    assert TABLE.lookup(_a("198.18.0.3")) == 0  # lookup itself is pure LPM


def test_allowed_sources() -> None:
    assert TABLE.allowed(1, _a("198.18.20.8"))
    assert not TABLE.allowed(0, _a("198.18.20.8"))  # a more specific prefix is peer 1's
    assert not TABLE.allowed(1, _a("198.18.21.1"))


class _State:
    """What `forward` reads of a peer's runtime state (bridge/peers.py PeerState)."""

    def __init__(self, mtu: int = 1400, up: bool = True, withdraw: bool = False) -> None:
        self.mtu, self.up, self.withdraw = mtu, up, withdraw


def test_forward_checks_in_order() -> None:
    """Route, peer down (withdrawn), TTL, MTU: one call, the first failing check's code."""
    cfg = [_peer("a", "198.18.0.2", "198.18.10.0/24"), _peer("b", "198.18.0.3", "198.18.20.0/24")]
    states = [_State(), _State(up=False, withdraw=True)]
    t = PeerTable(cfg, local=["198.18.0.1"], states=states)  # type: ignore[arg-type]
    fwd = t.forward
    assert fwd(_a("198.18.10.5"), 64, 1400) == 0
    assert fwd(_a("198.18.10.5"), 64, 1401) == peers_mod.TOO_BIG
    assert fwd(_a("198.18.10.5"), 1, 1401) == peers_mod.TTL_EXPIRED  # TTL before MTU
    assert fwd(_a("198.18.20.5"), 1, 9000) == peers_mod.PEER_DOWN  # peer state before TTL
    assert fwd(_a("198.18.0.1"), 1, 9000) == peers_mod.LOOP
    assert fwd(_a("203.0.113.1"), 1, 9000) == peers_mod.NO_ROUTE
    states[1].up = True
    assert fwd(_a("198.18.20.5"), 64, 100) == 1  # the route cache does not cache the state


def test_accept_checks_in_order() -> None:
    """AllowedIPs, TTL 0, loop guard: -1 when the packet may go to the TUN."""
    a, b = TABLE.accept, _a("198.18.20.8")
    assert a(1, b, _a("198.18.10.1"), 64) == -1
    assert a(0, b, _a("198.18.10.1"), 0) == R_SPOOFED_SOURCE
    assert a(1, b, _a("198.18.0.1"), 0) == R_TTL
    assert a(1, b, _a("198.18.0.1"), 1) == R_LOOP


def test_hosts_and_endpoints() -> None:
    assert TABLE.by_host("198.18.0.3") == (1,)
    assert TABLE.by_host("::ffff:198.18.0.3") == (1,)
    assert TABLE.by_host("2001:DB8:FF:0::3") == (2,)
    assert TABLE.by_host("198.18.0.9") == () and TABLE.by_host("nonsense") == ()
    assert TABLE.is_endpoint(_a("198.18.0.1")) and TABLE.is_endpoint(_a("2001:db8:ff::3"))
    assert not TABLE.is_endpoint(_a("0.0.0.0")) and not TABLE.is_endpoint(_a("198.18.0.9"))
    assert canonical_host("fe80::1%eth0") == "fe80::1"


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers_mod, "CACHE_MAX", 10)
    t = PeerTable([_peer("p", "198.18.0.2", "198.18.0.0/15")])
    for i in range(100):
        t.lookup(bytes([198, 18, 1, i]))
    assert len(t._cache) <= 10


def _syn(mss: int | None, flags: str = "S", v6: bool = False,
         extra: list | None = None) -> bytearray:
    opts = ([("MSS", mss)] if mss is not None else []) + (extra or [])
    ip = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="198.18.1.1",
                                                                   dst="198.18.2.2")
    return bytearray(bytes(ip / TCP(flags=flags, options=opts) / b"data"))


def _read(pkt: bytearray) -> tuple[int | None, bool]:
    p = (IPv6 if pkt[0] >> 4 == 6 else IP)(bytes(pkt))
    c = p[TCP].chksum
    p[TCP].chksum = None
    ok = (IPv6 if pkt[0] >> 4 == 6 else IP)(bytes(p))[TCP].chksum == c
    return dict(p[TCP].options).get("MSS"), ok


@pytest.mark.parametrize(("pkt", "mtu", "mss", "changed"), [
    (_syn(1460), 1400, 1360, True),
    (_syn(1460, "SA"), 1400, 1360, True),
    (_syn(1200), 1400, 1200, False),
    (_syn(1460, "A"), 1400, 1460, False),
    (_syn(1440, v6=True), 1400, 1340, True),
    (_syn(1460, extra=[("NOP", None), ("NOP", None), ("Timestamp", (1, 0))]), 1300, 1260, True),
    (_syn(None, extra=[("NOP", None), ("WScale", 7), ("MSS", 9000)]), 1500, 1460, True),
    (_syn(None, extra=[("WScale", 7)]), 1400, None, False),
])
def test_clamp(pkt: bytearray, mtu: int, mss: int | None, changed: bool) -> None:
    assert clamp_packet(pkt, 0, mtu) is changed
    assert _read(pkt) == (mss, True)


def test_clamp_malformed_options_untouched() -> None:
    pkt = _syn(1460)
    tcp = 20
    pkt[tcp + 20 : tcp + 22] = b"\x02\x00"  # MSS option with length 0
    before = bytes(pkt)
    assert clamp(pkt, tcp, 100) is False and bytes(pkt) == before
    short = bytearray(before[:30])
    assert clamp(short, tcp, 100) is False
    assert mss_for_mtu(1500, False) == 1460 and mss_for_mtu(1500, True) == 1440


def test_counters_snapshot_and_prometheus() -> None:
    c = Counters(["a", 'we"ird\\'])
    c.drops[R_TTL] += 3
    c.rx_bytes[1] += 100
    snap = c.snapshot()
    assert snap["drops"]["ttl"] == 3 and set(snap["drops"]) == set(DROP_REASONS)
    assert snap["peers"]['we"ird\\']["rx_bytes"] == 100
    text = c.prometheus(peer_up=[True, False])
    assert 'grebe_drops_total{reason="ttl"} 3' in text
    assert 'grebe_peer_rx_bytes_total{peer="we\\"ird\\\\"} 100' in text
    assert 'grebe_peer_up{peer="a"} 1' in text
    assert text.endswith("\n") and "# TYPE grebe_drops_total counter" in text
    for line in text.splitlines():
        assert line.startswith("#") or line.rsplit(" ", 1)[1].isdigit()
    assert c.drop("ttl") == 3 and c.total_drops == 3
    with pytest.raises(KeyError):
        c.drop("nope")
