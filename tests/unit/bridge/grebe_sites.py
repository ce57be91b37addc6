"""Two-site test fixtures for the bridge tests: configs, a back-to-back pair, packet makers."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from bridge.config import Config, loads_config
from bridge.pipeline import Bridge, Output

A_ADDR = ("198.18.0.1", 4754)
B_ADDR = ("198.18.0.2", 4754)

SITE = """
[tun]
name = "gb{name}"
addresses = [{tun_addrs}]
mtu = {mtu}

[listen]
address = "{listen}"
port = 4754

[pmtu]
underlay_mtu = {underlay}
icmp_rate = {icmp_rate}
icmp_burst = {icmp_burst}
fragment = {fragment}

[[peers]]
name = "{peer}"
endpoint = "{endpoint}"
prefixes = [{prefixes}]
{peer_extra}
"""


def site_config(side: str = "a", peer_extra: str = "", mtu: str = '"auto"', underlay: int = 1500,
                icmp_rate: float = 1000.0, icmp_burst: int = 1000, fragment: bool = True,
                v6_underlay: bool = False) -> Config:
    """Site A (LAN 198.18.10.0/24, 2001:db8:10::/48) or B (198.18.20.0/24, 2001:db8:20::/48)."""
    a = side == "a"
    if v6_underlay:
        listen, endpoint = ("2001:db8:ff::1", "[2001:db8:ff::2]:4754") if a else (
            "2001:db8:ff::2", "[2001:db8:ff::1]:4754")
    else:
        listen, endpoint = ("198.18.0.1", "198.18.0.2:4754") if a else (
            "198.18.0.2", "198.18.0.1:4754")
    text = SITE.format(
        name=side,
        tun_addrs='"198.18.100.1/30", "2001:db8:100::1/64"' if a
        else '"198.18.100.2/30", "2001:db8:100::2/64"',
        mtu=mtu, listen=listen, underlay=underlay, icmp_rate=icmp_rate, icmp_burst=icmp_burst,
        fragment=str(fragment).lower(), peer="site-b" if a else "site-a", endpoint=endpoint,
        prefixes='"198.18.20.0/24", "2001:db8:20::/48"' if a
        else '"198.18.10.0/24", "2001:db8:10::/48"',
        peer_extra=peer_extra,
    )
    return loads_config(text)


class Pair:
    """Two Bridges back to back: A's out.udp is fed to B.from_udp and vice versa."""

    def __init__(self, peer_extra: str = "", now: float = 0.0, **kw: object) -> None:
        v6 = bool(kw.get("v6_underlay"))
        self.a = Bridge(site_config("a", peer_extra, **kw), now)  # type: ignore[arg-type]
        self.b = Bridge(site_config("b", peer_extra, **kw), now)  # type: ignore[arg-type]
        self.a_addr = ("2001:db8:ff::1", 4754) if v6 else A_ADDR
        self.b_addr = ("2001:db8:ff::2", 4754) if v6 else B_ADDR

    def a_to_b(self, packets: list[bytes], now: float = 0.0) -> tuple[Output, Output]:
        """A.from_tun(packets) then B.from_udp(what A sent). Returns (A's out, B's out)."""
        oa = Output()
        self.a.from_tun(packets, now, oa)
        ob = Output()
        dgrams = [(d, self.a_addr) for d in oa.udp.get(self.b_addr, [])]
        self.b.from_udp(dgrams, now, ob)
        return oa, ob


def v4(src: str = "198.18.10.5", dst: str = "198.18.20.7", ttl: int = 64, size: int = 100,
       df: bool = True) -> bytes:
    payload = b"x" * max(0, size - 28)
    return bytes(IP(src=src, dst=dst, ttl=ttl, flags="DF" if df else 0, id=77)
                 / UDP(sport=1000, dport=2000) / payload)


def v6(src: str = "2001:db8:10::5", dst: str = "2001:db8:20::7", hlim: int = 64,
       size: int = 100) -> bytes:
    payload = b"y" * max(0, size - 48)
    return bytes(IPv6(src=src, dst=dst, hlim=hlim) / UDP(sport=1000, dport=2000) / payload)


def syn4(mss: int = 1460, flags: str = "S", src: str = "198.18.10.5",
         dst: str = "198.18.20.7") -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=40000, dport=80, flags=flags,
                                            options=[("MSS", mss), ("NOP", None),
                                                     ("WScale", 7)]))


def syn6(mss: int = 1440, flags: str = "S", src: str = "2001:db8:10::5",
         dst: str = "2001:db8:20::7") -> bytes:
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=40000, dport=80, flags=flags,
                                              options=[("MSS", mss)]))
