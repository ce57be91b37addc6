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
  Secure peers (bridge/securelink.py) are not found by address at all: only under
  "secure:<index>", the key their verified payloads carry into the pipeline.
- Loop guard (RFC 2003 §4): `is_endpoint(dst)` tells the pipeline that an inner address is
  one of the tunnel endpoints (a peer's or our own listen address).
- The forwarding decisions are written once, here, for every path that uses them:
  `forward(dst, ttl, size)` for a packet to send (the pipeline's per-packet path,
  `Bridge.send_inner`, the TSO fast path), in this order: route (none -> NO_ROUTE, a tunnel
  endpoint -> LOOP, RFC 2003 §4), the peer down with down_action "withdraw" -> PEER_DOWN,
  TTL / hop limit <= 1 -> TTL_EXPIRED (RFC 2003 §3.1, RFC 1812 §5.3.1), larger than the
  peer's tunnel MTU -> TOO_BIG (RFC 2003 §5.1); `accept(peer, src, dst, ttl)` for a
  decapsulated one (the per-packet path and the GRO fast path): the inner source must route
  back to that peer ("spoofed_source", AllowedIPs), TTL 0 -> "ttl" (RFC 2003 §3.1: MUST
  discard), a tunnel endpoint as destination -> "loop", a destination no site host can have
  -> "bad_destination" (`martian`), a destination routed back to the peer it came from ->
  "hairpin".
- Inner destinations from a peer (issue 12): a decapsulated packet goes to the TUN, and the
  kernel forwards it on; a peer must not use us to reach what a site host never is:
  `martian(dst, broadcasts)`: IPv4 0.0.0.0/8 ("this network", RFC 1122 §3.2.1.3), loopback
  127.0.0.0/8 (same section), link-local 169.254.0.0/16 (RFC 3927 §2.7), multicast
  224.0.0.0/4 (RFC 5771) and reserved 240.0.0.0/4 with the limited broadcast
  255.255.255.255 (RFC 1812 §5.3.5.1, §5.3.7), and the directed broadcast of each TUN
  subnet (RFC 1812 §5.3.5.2, `broadcasts`); IPv6 :: and ::1 (RFC 4291 §2.5.2, §2.5.3),
  link-local fe80::/10 (§2.5.6) and multicast ff00::/8 (§2.7). grebe carries unicast only:
  routing protocols that speak multicast over the tunnel are not supported. A destination
  inside a peer's prefixes is not of this site: back to the same peer it is a hairpin
  (the kernel would reflect it into the tunnel); to another peer it is forwarded, since an
  endpoint with several peers is a hub (topologies/three-sites-hub.toml) and that is how
  its spokes reach each other. A destination that only a /0 covers (a full-tunnel peer's
  default route) is of this site: the host's more specific routes win over the full
  tunnel's table (bridge/io/policy.py `suppress_prefixlength 0`), so the kernel delivers
  it locally, and treating it as a hairpin would drop every reply of the full tunnel.
  Outbound, a link-scope destination (`link_scope`: MLD reports, router solicitations) that
  only a /0 covers is not routed either: "link_local", as without a full tunnel (no ICMP
  Time Exceeded for the TUN's own hop-limit-1 multicast).
- `PeerState` is the runtime state of one peer (encoder, sequence receiver, liveness, MTU);
  the table reads it for `forward` (`states`, one per configured peer, same index).
  `new_state` is its one constructor for a configured peer, at start-up (bridge/pipeline.py)
  and on reload (bridge/reconfig.py): the tunnel MTU is tun.mtu if configured, else the
  underlay MTU minus the peer's encapsulation overhead (bridge/encap.py `overhead`, plus the
  secure framing for a secure peer).
- `link_scope(dst)`: a destination no router forwards off its link: IPv6 multicast of
  interface- or link-local scope (RFC 4291 §2.7, e.g. MLD reports to ff02::16, router
  solicitations to ff02::2) and link-local unicast fe80::/10 (§2.5.6), IPv4 224.0.0.0/24
  (RFC 5771 §4) and 169.254.0.0/16 (RFC 3927 §2.7). Unrouted, the pipeline counts them
  "link_local" instead of "no_route": they are the host's own link chatter on the TUN.

The verdict on an inner destination (`_dest`: a peer index, -1 for this site, LOOP or
MARTIAN) is cached per address like routes, so `accept` costs two dict lookups.

Theory of operation: per family, a dict {prefix length: {masked network int: peer index}},
lengths probed longest first. Results are cached per address (bytes -> index, -1 for no
route) in a dict bounded to CACHE_MAX entries and cleared when full, so a flood of random
addresses costs memory no larger than the bound. Lookups take the raw 4- or 16-byte
address slice from the packet: no ipaddress objects on the hot path. `forward` reads the
route cache itself, so a cached destination costs one call for all five checks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from bridge import counters as C
from bridge.config import DownAction, Encapsulation, PeerConfig, SeqPolicy, SourcePort
from bridge.encap import GreEncoder, overhead
from bridge.secure import OVERHEAD
from bridge.secure.keys import SecurityMode
from bridge.secure.wire import HEADER_LEN, TAG_LEN
from bridge.seqpolicy import SeqReceiver

__all__ = ["PeerTable", "PeerState", "Addr", "new_state", "CACHE_MAX", "NO_ROUTE", "LOOP",
           "PEER_DOWN", "TTL_EXPIRED", "TOO_BIG", "canonical_host", "link_scope", "martian"]

Addr = tuple[str, int]
CACHE_MAX = 65536
NO_ROUTE = -1  # route(), forward(): no prefix matches the destination
LOOP = -2  # route(), forward(): the destination is a tunnel endpoint
PEER_DOWN = -3  # forward(): the peer is down and withdrawn
TTL_EXPIRED = -4  # forward(): TTL / hop limit <= 1
TOO_BIG = -5  # forward(): above the peer's tunnel MTU
MARTIAN = -6  # the inner-destination cache: no site host has this address


class PeerState:
    """Runtime state of one peer (one object per peer, not per packet)."""

    __slots__ = ("index", "name", "addr", "gre", "encoder", "key_in", "csum_in", "mtu", "overhead",
                 "seq", "reorder", "up", "heard", "last_rx", "last_tx", "keepalive",
                 "dead_after", "withdraw", "flow_sport", "keepalive_payload", "room")

    def __init__(self, index: int, cfg: Any, mtu: int, now: float) -> None:
        self.index = index
        self.name: str = cfg.name
        self.addr: Addr = (cfg.host, cfg.port)
        self.gre = cfg.encapsulation is Encapsulation.GRE
        self.encoder = GreEncoder(cfg.key_out, cfg.sequence is not SeqPolicy.OFF, cfg.checksum)
        self.key_in: int | None = cfg.key_in
        self.csum_in: bool = cfg.checksum
        self.mtu = mtu
        self.overhead = 0
        self.seq = SeqReceiver(cfg.sequence, cfg.max_packets_held,
                               cfg.outoforder_timer_ms / 1000.0)
        self.reorder = cfg.sequence is SeqPolicy.REORDER
        self.up = True  # until dead_after passes without a word from it
        self.heard = False
        self.last_rx = now
        self.last_tx = now
        self.keepalive: float = cfg.keepalive
        self.dead_after: float = cfg.dead_after
        self.withdraw = cfg.down_action is DownAction.WITHDRAW
        # a secure peer's datagrams all leave from the secure port (docs/SECURE.md §2): no
        # flow hash is computed for them, per datagram, only to be dropped at sealing
        self.flow_sport = cfg.source_port is SourcePort.FLOW_HASH and not cfg.secure
        self.keepalive_payload = self.encoder.keepalive() if self.gre else b""
        # an authenticated peer's TSO runs are built with room for the secure header and
        # tag around each datagram, sealed in place (bridge/gso.py, bridge/securelink.py)
        self.room = (HEADER_LEN, TAG_LEN) \
            if cfg.security.mode is SecurityMode.AUTHENTICATED else (0, 0)


def new_state(index: int, p: PeerConfig, now: float, underlay: int,
              tun_mtu: int | None) -> PeerState:
    """A fresh PeerState for peer `p` (start-up and reload): its tunnel MTU is the
    configured tun.mtu, else the underlay MTU minus its encapsulation overhead."""
    gre = p.encapsulation is Encapsulation.GRE
    ovh = overhead(gre, p.ipv6, p.key_out is not None, p.sequence is not SeqPolicy.OFF,
                   p.checksum) + (OVERHEAD if p.secure else 0)
    st = PeerState(index, p, tun_mtu or underlay - ovh, now)
    st.overhead = ovh
    return st


def secure_key(index: int) -> Addr:
    """The address under which secure peer `index`'s verified payloads enter the pipeline
    (bridge/securelink.py): not an IP literal, so no datagram from a socket carries it."""
    return (f"secure:{index}", 0)


def link_scope(dst: bytes | bytearray | memoryview) -> bool:
    """True for a 4- or 16-byte destination of link (or interface) scope (module docstring)."""
    if len(dst) == 16:
        return (dst[0] == 0xFF and dst[1] & 0x0F <= 2) or (dst[0] == 0xFE
                                                          and dst[1] & 0xC0 == 0x80)
    return (dst[0] == 224 and dst[1] == 0 and dst[2] == 0) or (dst[0] == 169
                                                                and dst[1] == 254)


def martian(dst: bytes, broadcasts: frozenset[bytes] = frozenset()) -> bool:
    """True for a 4- or 16-byte destination no unicast host of a site has (module
    docstring): unspecified, loopback, link-local, multicast, reserved, broadcast."""
    if len(dst) == 16:
        return dst[0] == 0xFF or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80) or (
            not any(dst[:15]) and dst[15] <= 1)
    a = dst[0]
    return a in (0, 127) or a >= 224 or (a == 169 and dst[1] == 254) or dst in broadcasts


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

    __slots__ = ("peers", "states", "_v4", "_v6", "_cache", "_route_cache", "_hosts",
                 "_host_cache", "_endpoints", "_broadcasts", "_dest_cache")

    def __init__(self, peers: Sequence[PeerConfig], local: Sequence[str] = (),
                 states: Sequence[PeerState] = (),
                 tun: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = (),
                 ) -> None:
        self.peers = tuple(peers)
        self.states = tuple(states)  # for forward(); empty: route() and accept() only
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
            # a secure peer is found by its session, never by its address (securelink.py)
            hosts.setdefault(secure_key(i)[0] if peer.secure else peer.host, []).append(i)
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
        # RFC 1812 §5.3.5.2: the directed broadcast of each TUN subnet (not /31, RFC 3021)
        self._broadcasts = frozenset(i.network.broadcast_address.packed for i in tun
                                     if i.version == 4 and i.network.prefixlen < 31)
        self._dest_cache: dict[bytes, int] = {}

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
            if idx >= 0 and link_scope(key) and self._only_default(key):
                idx = NO_ROUTE  # a full tunnel's /0 never takes the link's own chatter
            if len(self._route_cache) >= CACHE_MAX:
                self._route_cache.clear()
            self._route_cache[key] = idx
        return idx

    def forward(self, dst: bytes | bytearray | memoryview, ttl: int, size: int) -> int:
        """The outbound decision for an inner packet to `dst` with `ttl` of `size` bytes: the
        peer index, or why not (NO_ROUTE, LOOP, PEER_DOWN, TTL_EXPIRED, TOO_BIG, checked in
        that order: module docstring)."""
        key = bytes(dst)
        idx = self._route_cache.get(key)
        if idx is None:
            idx = self.route(key)
        if idx < 0:
            return idx
        peer = self.states[idx]
        if peer.withdraw and not peer.up:
            return PEER_DOWN
        if ttl <= 1:
            return TTL_EXPIRED
        if size > peer.mtu:
            return TOO_BIG
        return idx

    def accept(self, peer: int, src: bytes | bytearray | memoryview,
               dst: bytes | bytearray | memoryview, ttl: int) -> int:
        """The inbound decision for an inner packet decapsulated from `peer`: -1 when it may
        go to the TUN, else the drop reason (bridge/counters.py: spoofed_source, ttl, loop,
        bad_destination, hairpin; module docstring)."""
        if self.lookup(src) != peer:
            return C.R_SPOOFED_SOURCE  # WireGuard AllowedIPs
        if ttl == 0:
            return C.R_TTL  # RFC 2003 §3.1: MUST discard, do not decrement
        key = bytes(dst)
        where = self._dest_cache.get(key)
        if where is None:
            where = self._dest(key)
        if where == -1:
            return -1  # a destination of this site
        if where >= 0:  # another peer's prefix: a hub forwards, the same peer is a hairpin
            return C.R_HAIRPIN if where == peer else -1
        return C.R_LOOP if where == LOOP else C.R_BAD_DESTINATION  # RFC 2003 §4; martian

    def _dest(self, key: bytes) -> int:
        """Where an inner destination from a peer leads (module docstring), cached: LOOP,
        MARTIAN, the peer whose prefix covers it, or -1 (this site)."""
        if key in self._endpoints:
            where = LOOP
        elif martian(key, self._broadcasts):
            where = MARTIAN
        else:
            where = self.lookup(key)
            if where >= 0 and self._only_default(key):
                where = -1  # only a full tunnel's /0 covers it: this site's (docstring)
        cache = self._dest_cache
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = where
        return where

    def _only_default(self, key: bytes) -> bool:
        """No prefix but a /0 covers `key` (not on the hot path: `_dest` is cached)."""
        value = int.from_bytes(key, "big")
        return not any(plen and nets.get(value & mask) is not None
                       for plen, mask, nets in (self._v4 if len(key) == 4 else self._v6))

    def allowed(self, peer: int, src: bytes | bytearray | memoryview) -> bool:
        """True if `src` may come from `peer` (its longest match is that peer)."""
        return self.lookup(src) == peer

    def by_host(self, host: str) -> tuple[int, ...]:
        """Peers whose endpoint host is `host` (any textual form); () if none."""
        hit = self._host_cache.get(host)
        if hit is not None:
            return hit
        canon = canonical_host(host)
        hit = self._hosts.get(canon if canon is not None else host, ())
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
