"""PeerTable: longest-prefix match out, allowed-source check in, endpoint lookup.

Rules:
- Outbound: the peer whose prefix is the longest match for the inner destination gets the
  packet (RFC 1812 §5.2.4.3 longest match); no match -> "no_route".
- Inbound (WireGuard's AllowedIPs rule, wireguard-go device/receive.go): the longest match
  for the inner *source* must be the peer the datagram came from, else "spoofed_source".
  With prefixes unique per peer (config enforces), that is "source inside its prefixes" and
  no other peer holds a more specific prefix for it.
- A datagram is from a peer if its source address is that peer's endpoint host. RFC 8086
  §3.2.1: the decapsulator must not rely on the source port (entropy), so the port is not
  part of the match; several peers behind one host are told apart by the GRE key
  (RFC 2890 §2.1). No roaming: an unknown address is dropped ("unknown_peer"), since GRE
  is unauthenticated (RFC 2890 §3) and learning endpoints would be an injection vector.
- Loop guard (RFC 2003 §4): `is_endpoint(dst)` tells the pipeline that an inner address is
  one of the tunnel endpoints (a peer's or our own listen address).
- `link_scope(dst)`: a destination no router forwards off its link: IPv6 multicast of
  interface- or link-local scope (RFC 4291 §2.7, e.g. MLD reports to ff02::16, router
  solicitations to ff02::2) and link-local unicast fe80::/10 (§2.5.6), IPv4 224.0.0.0/24
  (RFC 5771 §4) and 169.254.0.0/16 (RFC 3927 §2.7). Unrouted, the pipeline counts them
  "link_local" instead of "no_route": they are the host's own link chatter on the TUN.

Theory of operation: per family, a dict {prefix length: {masked network int: peer index}},
lengths probed longest first. Results are cached per address (bytes -> index, -1 for no
route) in a dict bounded to CACHE_MAX entries and cleared when full, so a flood of random
addresses costs memory no larger than the bound. Lookups take the raw 4- or 16-byte
address slice from the packet: no ipaddress objects on the hot path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from bridge.config import PeerConfig

__all__ = ["PeerTable", "CACHE_MAX", "LOOP", "canonical_host", "link_scope"]

CACHE_MAX = 65536
LOOP = -2  # route(): the destination is a tunnel endpoint


def link_scope(dst: bytes | bytearray | memoryview) -> bool:
    """True for a 4- or 16-byte destination of link (or interface) scope (module docstring)."""
    if len(dst) == 16:
        return (dst[0] == 0xFF and dst[1] & 0x0F <= 2) or (dst[0] == 0xFE
                                                          and dst[1] & 0xC0 == 0x80)
    return (dst[0] == 224 and dst[1] == 0 and dst[2] == 0) or (dst[0] == 169
                                                                and dst[1] == 254)


def canonical_host(host: str) -> str | None:
    """The canonical text of an IP literal (IPv4-mapped IPv6 -> IPv4), or None if not one.

    Never raises: the I/O layer may hand us any string.
    """
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class PeerTable:
    """Routing and identification of the configured peers (indices into `peers`)."""

    __slots__ = ("peers", "_v4", "_v6", "_cache", "_route_cache", "_hosts", "_host_cache",
                 "_endpoints")

    def __init__(self, peers: Sequence[PeerConfig], local: Sequence[str] = ()) -> None:
        self.peers = tuple(peers)
        v4: dict[int, dict[int, int]] = {}
        v6: dict[int, dict[int, int]] = {}
        for i, peer in enumerate(self.peers):
            for net in peer.prefixes:
                table = v4 if net.version == 4 else v6
                table.setdefault(net.prefixlen, {})[int(net.network_address)] = i
        self._v4 = [(plen, _mask(plen, 32), nets) for plen, nets in sorted(v4.items(),
                                                                           reverse=True)]
        self._v6 = [(plen, _mask(plen, 128), nets) for plen, nets in sorted(v6.items(),
                                                                            reverse=True)]
        self._cache: dict[bytes, int] = {}
        self._route_cache: dict[bytes, int] = {}
        hosts: dict[str, list[int]] = {}
        for i, peer in enumerate(self.peers):
            hosts.setdefault(peer.host, []).append(i)
        self._hosts = {h: tuple(ix) for h, ix in hosts.items()}
        self._host_cache: dict[str, tuple[int, ...]] = {}
        endpoints = {ipaddress.ip_address(p.host).packed for p in self.peers}
        for addr in local:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                continue
            if not ip.is_unspecified:
                endpoints.add(ip.packed)
        self._endpoints = frozenset(endpoints)

    def lookup(self, addr: bytes | bytearray | memoryview) -> int:
        """Return the index of the peer whose prefix best matches `addr` (4 or 16 bytes),
        or -1 if none does."""
        key = bytes(addr)
        cache = self._cache
        idx = cache.get(key)
        if idx is not None:
            return idx
        value = int.from_bytes(key, "big")
        idx = -1
        for _plen, mask, nets in (self._v4 if len(key) == 4 else self._v6):
            hit = nets.get(value & mask)
            if hit is not None:
                idx = hit
                break
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = idx
        return idx

    def route(self, dst: bytes | bytearray | memoryview) -> int:
        """Outbound decision for an inner destination in one cached lookup: the peer index,
        -1 for no route, or LOOP (-2) if `dst` is a tunnel endpoint (RFC 2003 §4)."""
        key = bytes(dst)
        idx = self._route_cache.get(key)
        if idx is None:
            idx = LOOP if key in self._endpoints else self.lookup(key)
            if len(self._route_cache) >= CACHE_MAX:
                self._route_cache.clear()
            self._route_cache[key] = idx
        return idx

    def allowed(self, peer: int, src: bytes | bytearray | memoryview) -> bool:
        """True if `src` may come from `peer` (its longest match is that peer)."""
        return self.lookup(src) == peer

    def by_host(self, host: str) -> tuple[int, ...]:
        """Peers whose endpoint host is `host` (any textual form); () if none."""
        hit = self._host_cache.get(host)
        if hit is not None:
            return hit
        canon = canonical_host(host)
        hit = self._hosts.get(canon, ()) if canon is not None else ()
        if len(self._host_cache) >= CACHE_MAX:
            self._host_cache.clear()
        self._host_cache[host] = hit
        return hit

    def is_endpoint(self, addr: bytes | bytearray | memoryview) -> bool:
        """True if `addr` is a tunnel endpoint address (a peer's or our listen address)."""
        return bytes(addr) in self._endpoints

    def routes(self) -> list[tuple[str, str]]:
        """(prefix, peer name) pairs, for status output."""
        return [(str(net), p.name) for p in self.peers for net in p.prefixes]


def _mask(plen: int, bits: int) -> int:
    return ((1 << plen) - 1) << (bits - plen) if plen else 0
