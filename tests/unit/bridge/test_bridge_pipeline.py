"""The sans-I/O pipeline over fake inputs: forwarding, drop reasons, TTL, ICMP, MTU, MSS."""

from __future__ import annotations

import pytest
from grebe_sites import A_ADDR, B_ADDR, Pair, site_config, syn4, syn6, v4, v6
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, defragment
from scapy.layers.inet6 import ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import GRE

from bridge.encap import GreHeader, build_gre
from bridge.pipeline import Bridge, Output

VARIANTS = [
    "",
    "key = 7",
    "key = 7\nsequence = \"drop-late\"",
    "key_in = 1\nkey_out = 1\nchecksum = true\nsequence = \"reorder\"",
    "encapsulation = \"ipip\"",
]


def _drops(b: Bridge) -> dict[str, int]:
    return {k: v for k, v in b.counters.snapshot()["drops"].items() if v}


@pytest.mark.parametrize("extra", VARIANTS)
@pytest.mark.parametrize("v6_underlay", [False, True])
def test_round_trip_v4_and_v6(extra: str, v6_underlay: bool) -> None:
    pair = Pair(extra, v6_underlay=v6_underlay)
    p4, p6 = v4(ttl=10), v6(hlim=10)
    oa, ob = pair.a_to_b([p4, p6])
    assert len(oa.udp[pair.b_addr]) == 2 and not oa.tun
    assert len(ob.tun) == 2, _drops(pair.b)
    got4, got6 = IP(bytes(ob.tun[0])), IPv6(bytes(ob.tun[1]))
    # RFC 2003 §3.1: the encapsulator decrements TTL once; the IPv4 checksum stays valid.
    assert got4.ttl == 9 and got6.hlim == 9
    sent4 = IP(p4)
    sent4.ttl = 9
    del sent4.chksum
    assert bytes(ob.tun[0]) == bytes(IP(bytes(sent4)))
    assert bytes(got6.payload) == bytes(IPv6(p6).payload)
    assert pair.b.counters.rx_packets == [2] and pair.a.counters.tx_packets == [2]
    assert pair.a.counters.tx_bytes[0] == sum(len(d) for d in oa.udp[pair.b_addr])
    assert not _drops(pair.a) and not _drops(pair.b)


def test_wire_format_is_gre_in_udp_for_scapy() -> None:
    pair = Pair('key = 99\nsequence = "drop-late"\nchecksum = true')
    oa, _ = pair.a_to_b([v4(), v4()])
    for seq, d in enumerate(oa.udp[B_ADDR]):
        pkt = IP(bytes(IP(src=A_ADDR[0], dst=B_ADDR[0]) / UDP(sport=4754, dport=4754) / d))
        g = pkt[GRE]
        assert (g.key, g.sequence_number, g.proto, g.chksum_present) == (99, seq, 0x0800, 1)
        g2 = GRE(bytes(g))
        g2.chksum = None
        assert GRE(bytes(g2)).chksum == g.chksum
        assert pkt[GRE].payload.src == "198.18.10.5"


def test_tun_mtu_auto_and_fixed() -> None:
    assert Bridge(site_config("a"), 0).tun_mtu == 1500 - 32
    assert Bridge(site_config("a", "key = 1"), 0, underlay_mtu=9000).tun_mtu == 9000 - 36
    assert Bridge(site_config("a", v6_underlay=True), 0).tun_mtu == 1500 - 52
    assert Bridge(site_config("a", 'encapsulation = "ipip"'), 0).tun_mtu == 1500 - 28
    assert Bridge(site_config("a", mtu="1400"), 0).tun_mtu == 1400


# ------------------------------------------------------------------ drop reasons, TUN side


def test_from_tun_drops() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    b.from_tun([b"", b"\x45\x00", b"\x70" + bytes(40), v4()[:30]], 0, out)
    assert b.counters.drop("malformed") == 4
    b.from_tun([v4(dst="198.18.99.1"), v6(dst="2001:db8:99::1")], 0, out)
    assert b.counters.drop("no_route") == 2
    b.from_tun([v4(dst="198.18.0.2"), v4(dst="198.18.0.1")], 0, out)  # tunnel endpoints
    assert b.counters.drop("loop") == 2
    b.from_tun([v4(ttl=1), v4(ttl=0), v6(hlim=1)], 0, out)
    assert b.counters.drop("ttl") == 3
    assert not out.udp
    assert b.counters.total_drops == 11


def test_no_route_answers_icmp_unreachable() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    orig = v4(dst="198.18.99.1")
    b.from_tun([orig], 0, out)
    err = IP(bytes(out.tun[0]))
    assert (err.src, err.dst, err[ICMP].type, err[ICMP].code) == ("198.18.100.1",
                                                                 "198.18.10.5", 3, 1)
    assert bytes(err[IPerror])[:20] == orig[:20]


def test_time_exceeded_v4_checked_by_scapy() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    orig = v4(ttl=1, size=1000)
    b.from_tun([orig], 0, out)
    raw = bytes(out.tun[0])
    err = IP(raw)
    assert err[ICMP].type == 11 and err[ICMP].code == 0
    assert len(raw) <= 576  # RFC 1812 §4.3.2.3
    assert raw[28:] == orig[: len(raw) - 28]
    # Checksums as scapy would compute them.
    fresh = IP(raw)
    del fresh.chksum
    del fresh[ICMP].chksum
    assert bytes(IP(bytes(fresh))) == raw


def test_time_exceeded_v6_checked_by_scapy() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    orig = v6(hlim=1)
    b.from_tun([orig], 0, out)
    err = IPv6(bytes(out.tun[0]))
    te = err[ICMPv6TimeExceeded]
    assert (err.src, err.dst, te.code) == ("2001:db8:100::1", "2001:db8:10::5", 0)
    cks = te.cksum
    te.cksum = None
    assert IPv6(bytes(err))[ICMPv6TimeExceeded].cksum == cks
    assert bytes(te.payload) == orig


def test_no_icmp_about_icmp_errors() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    err = bytes(IP(src="198.18.10.5", dst="198.18.20.7", ttl=1) / ICMP(type=3, code=1)
                / IPerror(bytes(IP(src="198.18.20.7", dst="198.18.10.5") / UDP())))
    b.from_tun([err], 0, out)
    assert b.counters.drop("ttl") == 1 and out.tun == []


# ------------------------------------------------------------------ MTU


def test_too_big_df_v4_gets_frag_needed_with_tunnel_mtu() -> None:
    b = Bridge(site_config("a", "key = 1"), 0)
    out = Output()
    mtu = b.tun_mtu
    b.from_tun([v4(size=mtu), v4(size=mtu + 1)], 0, out)
    assert len(out.udp[B_ADDR]) == 1
    assert b.counters.drop("too_big") == 1
    err = IP(bytes(out.tun[0]))
    assert (err[ICMP].type, err[ICMP].code, err[ICMP].nexthopmtu) == (3, 4, mtu)


def test_too_big_v6_gets_packet_too_big() -> None:
    b = Bridge(site_config("a"), 0)
    out = Output()
    b.from_tun([v6(size=b.tun_mtu + 1)], 0, out)
    ptb = IPv6(bytes(out.tun[0]))[ICMPv6PacketTooBig]
    assert ptb.mtu == b.tun_mtu and b.counters.drop("too_big") == 1


def test_v6_tunnel_below_1280_still_carries_1280() -> None:
    b = Bridge(site_config("a", underlay=1300), 0)
    assert b.tun_mtu == 1268
    out = Output()
    b.from_tun([v6(size=1280), v6(size=1281)], 0, out)
    assert len(out.udp[B_ADDR]) == 1  # RFC 8200 §5: the underlay fragments the outer packet
    assert IPv6(bytes(out.tun[0]))[ICMPv6PacketTooBig].mtu == 1280


def test_v4_without_df_is_fragmented_before_encapsulation() -> None:
    pair = Pair()
    big = v4(size=4000, df=False, ttl=20)
    oa, ob = pair.a_to_b([big])
    assert len(oa.udp[B_ADDR]) == 3
    assert all(len(d) - 4 <= pair.a.tun_mtu for d in oa.udp[B_ADDR])
    frags = [IP(bytes(p)) for p in ob.tun]
    whole = defragment(frags)[0]
    ref = IP(big)
    assert bytes(whole[UDP]) == bytes(ref[UDP])
    assert whole.ttl == 19
    assert pair.a.counters.event("fragmented") == 1


def test_fragment_disabled_drops() -> None:
    b = Bridge(site_config("a", fragment=False), 0)
    out = Output()
    b.from_tun([v4(size=3000, df=False)], 0, out)
    assert b.counters.drop("too_big") == 1 and not out.udp and not out.tun


def test_icmp_rate_limit_token_bucket() -> None:
    b = Bridge(site_config("a", icmp_rate=2.0, icmp_burst=3), 0)
    out = Output()
    b.from_tun([v4(ttl=1)] * 10, 0.0, out)
    assert len(out.tun) == 3 and b.counters.event("icmp_rate_limited") == 7
    out.clear()
    b.from_tun([v4(ttl=1)] * 10, 1.0, out)  # one second refills 2 tokens
    assert len(out.tun) == 2
    assert b.counters.drop("ttl") == 20  # every packet still counted as dropped


# ------------------------------------------------------------------ MSS


def _mss(pkt: bytes) -> int:
    tcp = (IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt))[TCP]
    return dict(tcp.options)["MSS"]


def _tcp_checksum_ok(pkt: bytes) -> bool:
    p = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    c = p[TCP].chksum
    p[TCP].chksum = None
    return (IP if pkt[0] >> 4 == 4 else IPv6)(bytes(p))[TCP].chksum == c


def test_mss_clamped_on_syn_tun_to_tunnel() -> None:
    pair = Pair("key = 3")
    oa, ob = pair.a_to_b([syn4(1460), syn6(1440), syn4(500), syn4(1460, flags="A")])
    mtu = pair.a.tun_mtu
    got = [bytes(p) for p in ob.tun]
    assert _mss(got[0]) == mtu - 40 and _mss(got[1]) == mtu - 60
    assert _mss(got[2]) == 500  # already small: untouched
    assert _mss(got[3]) == 1460  # not a SYN: untouched
    assert all(_tcp_checksum_ok(p) for p in got)
    assert pair.a.counters.event("mss_clamped") == 2


def test_mss_clamped_on_synack_tunnel_to_tun() -> None:
    # B receives a SYN-ACK from A's side whose MSS was not clamped (e.g. mss_clamp off at A).
    pair = Pair()
    b = pair.b
    synack = syn4(8960, flags="SA")
    dgram = build_gre(GreHeader(0x0800), synack)
    out = Output()
    b.from_udp([(dgram, A_ADDR)], 0, out)
    assert _mss(bytes(out.tun[0])) == b.tun_mtu - 40
    assert _tcp_checksum_ok(bytes(out.tun[0]))
    assert b.counters.event("mss_clamped") == 1


def test_mss_clamp_can_be_disabled() -> None:
    cfg = site_config("a")
    import dataclasses

    b = Bridge(dataclasses.replace(cfg, mss_clamp=False), 0)
    out = Output()
    b.from_tun([syn4(1460)], 0, out)
    assert _mss(bytes(out.udp[B_ADDR][0][4:])) == 1460


# ------------------------------------------------------------------ receive-side drops


def _gre(inner: bytes, **kw: object) -> bytes:
    return build_gre(GreHeader(0x0800 if inner[0] >> 4 == 4 else 0x86DD, **kw), inner)  # type: ignore[arg-type]


def test_from_udp_drop_reasons() -> None:
    b = Bridge(site_config("b", "key = 5\nchecksum = true"), 0)
    good = v4()
    cases = [
        ((_gre(good, key=5, checksum_present=True), ("198.18.0.99", 4754)), "unknown_peer"),
        ((_gre(good, key=5, checksum_present=True), ("not an address", 1)), "unknown_peer"),
        ((b"\x80\x01\x08\x00" + bytes(8) + good, A_ADDR), "bad_version"),
        ((b"\xc0\x00\x08\x00" + bytes(8) + good, A_ADDR), "bad_flags"),
        ((_gre(good, key=6, checksum_present=True), A_ADDR), "wrong_key"),
        ((_gre(good, checksum_present=True), A_ADDR), "wrong_key"),
        ((_gre(good, key=5), A_ADDR), "checksum"),
        ((_gre(good, key=5, checksum_present=True)[:-1] + b"Z", A_ADDR), "checksum"),
        ((build_gre(GreHeader(0x6558, key=5, checksum_present=True), good), A_ADDR),
         "bad_proto"),
        ((_gre(good[:25], key=5, checksum_present=True), A_ADDR), "malformed"),
        ((_gre(v4(src="198.18.20.1"), key=5, checksum_present=True), A_ADDR),
         "spoofed_source"),
        ((_gre(v4(src="198.18.99.1"), key=5, checksum_present=True), A_ADDR),
         "spoofed_source"),
        ((_gre(v4(ttl=0), key=5, checksum_present=True), A_ADDR), "ttl"),
        ((_gre(v4(dst="198.18.0.1"), key=5, checksum_present=True), A_ADDR), "loop"),
    ]
    out = Output()
    for (dgram, addr), reason in cases:
        before = b.counters.drop(reason)
        b.from_udp([(dgram, addr)], 0, out)
        assert b.counters.drop(reason) == before + 1, reason
    assert out.tun == []
    assert b.counters.total_drops == len(cases)
    b.from_udp([(_gre(good, key=5, checksum_present=True), A_ADDR)], 0, out)
    assert len(out.tun) == 1


def test_ipv4_mapped_source_address_is_the_peer() -> None:
    b = Bridge(site_config("b"), 0)
    out = Output()
    b.from_udp([(_gre(v4()), ("::ffff:198.18.0.1", 4754, 0, 0))], 0, out)  # type: ignore[list-item]
    assert len(out.tun) == 1


def test_peers_sharing_a_host_are_told_apart_by_key() -> None:
    from bridge.config import loads_config

    text = """
[tun]
name = "gbk"
addresses = ["198.18.100.2/30"]
[listen]
address = "198.18.0.2"
[[peers]]
name = "one"
endpoint = "198.18.0.1:4754"
prefixes = ["198.18.10.0/24"]
key = 1
[[peers]]
name = "two"
endpoint = "198.18.0.1:4754"
prefixes = ["198.18.11.0/24"]
key = 2
"""
    b = Bridge(loads_config(text), 0)
    out = Output()
    b.from_udp([(_gre(v4(src="198.18.11.3"), key=2), A_ADDR),
                (_gre(v4(src="198.18.10.3"), key=1), A_ADDR),
                (_gre(v4(src="198.18.10.3"), key=2), A_ADDR)], 0, out)
    assert len(out.tun) == 2
    assert b.counters.rx_packets == [1, 1]
    assert b.counters.drop("spoofed_source") == 1


def test_flow_hash_source_ports_align_with_datagrams() -> None:
    b = Bridge(site_config("a", 'source_port = "flow-hash"'), 0)
    out = Output()
    pkts = [syn4(src="198.18.10.5"), syn4(src="198.18.10.6"), syn4(src="198.18.10.5")]
    b.from_tun(pkts, 0, out)
    ports = out.udp_sport[B_ADDR]
    assert len(ports) == len(out.udp[B_ADDR]) == 3
    assert ports[0] == ports[2] and all(49152 <= p <= 65535 for p in ports)
    default = Output()  # flow-hash is the default (RFC 8086 §3.2.1)
    Bridge(site_config("a"), 0).from_tun(pkts, 0, default)
    assert default.udp_sport == out.udp_sport
    plain = Output()
    Bridge(site_config("a", 'source_port = "fixed"'), 0).from_tun(pkts, 0, plain)
    assert plain.udp_sport == {}


def test_status_and_metrics() -> None:
    pair = Pair("key = 1")
    pair.a_to_b([v4(), v6()], now=1.0)
    st = pair.b.status(2.0)
    assert st["peers"][0]["rx_packets"] == 2 and st["peers"][0]["up"] is True
    assert st["peers"][0]["last_seen_s"] == 1.0
    assert st["tun"]["mtu"] == pair.b.tun_mtu
    import json

    json.dumps(st)
    text = pair.b.metrics_text()
    assert 'grebe_peer_rx_packets_total{peer="site-a"} 2' in text
    assert 'grebe_drops_total{reason="spoofed_source"} 0' in text
    assert 'grebe_peer_up{peer="site-a"} 1' in text


def test_path_mtu_update_lowers_tunnel_mtu_and_icmp() -> None:
    b = Bridge(site_config("a", "key = 1"), 0)
    assert b.tun_mtu == 1464
    assert b.set_path_mtu(1400, B_ADDR) == 1364
    out = Output()
    b.from_tun([v4(size=1400), syn4(1460)], 0, out)
    assert IP(bytes(out.tun[0]))[ICMP].nexthopmtu == 1364
    assert dict(IP(bytes(out.udp[B_ADDR][0][8:]))[TCP].options)["MSS"] == 1324
    assert b.set_path_mtu(1500, ("198.18.0.99", 1)) == 1364  # not our peer: unchanged
    fixed = Bridge(site_config("a", mtu="1400"), 0)
    assert fixed.set_path_mtu(9000) == 1400 and fixed.set_path_mtu(1300) == 1268
    with pytest.raises(ValueError):
        fixed.set_path_mtu(500)


@pytest.mark.parametrize("extra", VARIANTS)
def test_memoryviews_of_a_reused_buffer(extra: str) -> None:
    """The I/O layer may pass views into one receive buffer it reuses: outputs must be copies."""
    pair = Pair(extra)
    buf = bytearray(4096)
    out_a = Output()
    for pkt in (v4(ttl=9), syn6()):
        buf[: len(pkt)] = pkt
        pair.a.from_tun([memoryview(buf)[: len(pkt)]], 0, out_a)
    buf[:] = bytes(4096)  # the I/O layer reuses its buffer
    dgrams = [bytes(d) for d in out_a.udp[B_ADDR]]
    out_b = Output()
    rx = bytearray(4096)
    for d in dgrams:
        rx[: len(d)] = d
        pair.b.from_udp([(memoryview(rx)[: len(d)], A_ADDR)], 0, out_b)
    rx[:] = bytes(4096)
    assert len(out_b.tun) == 2, _drops(pair.b)
    assert IP(bytes(out_b.tun[0])).ttl == 8
    assert IPv6(bytes(out_b.tun[1]))[TCP].flags == "S"


def test_send_inner_drops_a_packet_over_the_tunnel_mtu() -> None:
    """Issue 11 #6: the terminator's own packets are sized by the legs; one over the
    tunnel MTU is dropped and counted (too_big), never sent to be fragmented."""
    b = Bridge(site_config("a"), 0)
    out = Output()
    assert b.send_inner(v4(size=b.tun_mtu), 0.0, out)
    assert sum(map(len, out.udp.values())) == 1
    assert b.send_inner(v4(size=b.tun_mtu + 1), 0.0, out)  # a route exists: not "no peer"
    assert sum(map(len, out.udp.values())) == 1
    assert b.counters.drop("too_big") == 1
