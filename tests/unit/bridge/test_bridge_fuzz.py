"""Hypothesis: random datagrams and TUN packets never raise, and every drop is counted."""

from __future__ import annotations

from grebe_sites import A_ADDR, site_config, v4, v6
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bridge_gso import TS_OPTS, _bulk  # same directory (pytest rootdir import)

from bridge.encap import GreHeader, build_gre
from bridge.gro import GroBatch
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


# GRO batches (bridge/gro.py GroBatch): random, and real runs damaged, cut and re-sized.
# Every datagram the batch holds (one without a segment size: one) has exactly one outcome.

def _gro_count(buf: bytes, seg: int) -> int:
    return 1 if seg <= 0 else -(-len(buf) // seg)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(CONFIGS) - 1), buf=st.binary(max_size=600),
       seg=st.integers(-2, 200))
def test_random_gro_batches(which: int, buf: bytes, seg: int) -> None:
    b = BRIDGES[which]
    before = _state(b)
    out = Output()
    b.from_udp([(GroBatch(bytearray(buf), seg), A_ADDR)], 1.0, out)
    _accounted(b, before, out, _gro_count(buf, seg))


_RUNS: dict[tuple[int, bool], list[bytes]] = {}


def _run(which: int, v6: bool) -> list[bytes]:
    """Site A's datagrams of one TCP flow near the 64 KB cap (test_bridge_gso.py `_bulk`):
    the most one merged packet holds, and a short last one."""
    got = _RUNS.get((which, v6))
    if got is None:
        hl = (40 if v6 else 20) + 32
        got = _RUNS[(which, v6)] = _bulk(CONFIGS[which], v6, 1408, (0xFFFF - hl) // 1408,
                                         1000, TS_OPTS)
    return got


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, len(CONFIGS) - 1), v6=st.booleans(), skip=st.integers(0, 46),
       cut=st.integers(0, 3000), flips=st.lists(st.integers(0, 70000), max_size=3),
       reseg=st.one_of(st.none(), st.integers(-1, 3000)))
def test_damaged_gro_runs(which: int, v6: bool, skip: int, cut: int, flips: list[int],
                          reseg: int | None) -> None:
    """Real runs at the length cap, damaged anywhere, cut short, started mid-run or
    handed over with a wrong segment size: from_udp never raises and counts every one."""
    dgrams = _run(which, v6)
    seg = len(dgrams[0]) if reseg is None else reseg
    buf = bytearray(b"".join(dgrams[skip:]))
    for f in flips:
        if buf:
            buf[f % len(buf)] ^= 0x5A
    del buf[max(0, len(buf) - cut):]
    b = Bridge(site_config("b", CONFIGS[which]), 0)
    before = _state(b)
    out = Output()
    b.from_udp([(GroBatch(buf, seg), A_ADDR)], 1.0, out)
    _accounted(b, before, out, _gro_count(bytes(buf), seg))
