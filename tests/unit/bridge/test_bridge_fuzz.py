"""Hypothesis: random datagrams and TUN packets never raise, and every drop is counted."""

from __future__ import annotations

from grebe_sites import A_ADDR, site_config, v4, v6
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.encap import GreHeader, build_gre
from bridge.pipeline import Bridge, Output

CONFIGS = [
    "",
    "key = 9\nchecksum = true\nsequence = \"reorder\"",
    "sequence = \"drop-late\"",
    "encapsulation = \"ipip\"",
]
BRIDGES = [Bridge(site_config("b", extra), 0) for extra in CONFIGS]
SOURCES = st.sampled_from([A_ADDR, ("198.18.0.77", 1), ("::ffff:198.18.0.1", 9), ("", 0)])


def _accounted(b: Bridge, before: tuple[int, int, int, int], out: Output, n: int) -> None:
    c = b.counters
    drops = c.total_drops - before[0]
    rx = sum(c.rx_packets) - before[1]
    keep = c.events[3] - before[2]  # keepalive_rx
    assert drops + rx + keep == n, (drops, rx, keep, n)


def _state(b: Bridge) -> tuple[int, int, int, int]:
    c = b.counters
    return c.total_drops, sum(c.rx_packets), c.events[3], 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(CONFIGS) - 1),
       batch=st.lists(st.tuples(st.binary(max_size=120), SOURCES), max_size=8))
def test_random_datagrams(which: int, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
    b = BRIDGES[which]
    before = _state(b)
    out = Output()
    b.from_udp(batch, 1.0, out)
    _accounted(b, before, out, len(batch))


inner = st.sampled_from([v4(), v6(), v4(src="198.18.20.9"), v4(ttl=0)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(CONFIGS) - 1), pkt=inner,
       flags=st.integers(0, 0xFFFF), proto=st.sampled_from([0x0800, 0x86DD, 0, 0x6558]),
       cut=st.integers(0, 200), flip=st.integers(0, 400))
def test_mutated_gre(which: int, pkt: bytes, flags: int, proto: int, cut: int,
                     flip: int) -> None:
    """Near-valid GRE (flags, protocol, truncation, one flipped byte) hits the deep checks."""
    b = BRIDGES[which]
    d = bytearray(build_gre(GreHeader(proto, key=9, seq=1, checksum_present=True), pkt))
    d[0:2] = flags.to_bytes(2, "big")
    if flip < len(d):
        d[flip] ^= 0x5A
    d = d[: len(d) - cut] if cut < len(d) else d
    before = _state(b)
    b.from_udp([(bytes(d), A_ADDR)], 1.0, Output())
    _accounted(b, before, Output(), 1)  # exactly one outcome: delivered/held, keepalive, drop


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.binary(max_size=200), max_size=6))
def test_random_tun_packets(data: list[bytes]) -> None:
    b = Bridge(site_config("a", "key = 1"), 0)
    out = Output()
    b.from_tun(data, 0.0, out)
    sent = sum(b.counters.tx_packets)
    assert b.counters.total_drops + sent == len(data)  # small: never fragmented


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.binary(min_size=20, max_size=120), max_size=6))
def test_random_ipv4_headers_from_tun(data: list[bytes]) -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    pkts = [b"\x45" + d[1:2] + len(d).to_bytes(2, "big") + d[4:] for d in data]
    b.from_tun(pkts, 0.0, out)
    assert b.counters.total_drops + sum(b.counters.tx_packets) == len(pkts)
