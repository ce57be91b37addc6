"""The eBPF fast path's map contents: what Python writes (configuration) and reads (counters).

Rules:
- The byte layouts here are the C structs of bridge/ebpf/grebe_tc.c (little-endian host
  order, natural alignment); tests/unit/ebpf checks both sides name the same fields, flags
  and drop reasons. Addresses are stored in network order; an IPv4 address in a 16-byte
  slot is IPv4-mapped (::ffff:a.b.c.d).
- Everything here is pure: `plan(config, ...)` returns the entries to write, `decode_*`
  turn map values into Python counters. No syscalls (bridge/ebpf/datapath.py does those).
- What the fast path must leave to the Python path is decided here, per peer: no
  encapsulation (PF_TX clear) for peers with GRE checksums; no decapsulation (PF_RX clear)
  for GRE checksums and the `reorder` policy. The program itself passes keepalives,
  fragments, ICMP-needing packets, clamped SYNs and [[inspect]] ports (grebe_tc.c).
- [[inspect]] rules become a set of TCP ports (each rule's dst_ports): a TCP packet with
  either port in it goes to the Python path in both directions. A rule without ports, or
  more than MAX_INSPECT_PORTS ports, sends all TCP there. Coarser than the rules (a port
  match ignores the rule's prefixes): more goes to Python than needed, never less.

Theory of operation: `Plan` holds (key, value) byte pairs per map name; the datapath writes
them in one pass at start-up and rewrites `gb_peers` entries when a peer's MTU or state
changes (`peer_value`).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import Config, Encapsulation, PeerConfig, SeqPolicy, SourcePort
from bridge.counters import DROP_REASONS

__all__ = [
    "MAX_PEERS", "STATS", "PF", "GF", "Plan", "plan", "peer_flags", "peer_value",
    "global_value", "addr16", "decode_percpu_u64", "decode_peerstats", "N_REASONS",
    "MAX_INSPECT_PORTS", "inspect_ports", "C_DROP_REASONS",
]

MAX_PEERS = 64
N_REASONS = 16
N_STATS = 24
MAX_INSPECT_PORTS = 1024
# The reasons grebe_tc.c counts, by the same index as bridge/counters.py DROP_REASONS.
C_DROP_REASONS = DROP_REASONS[:13]
# gb_stats, in the order of grebe_tc.c's S_* enum.
STATS: tuple[str, ...] = (
    "encap", "decap", "pass_fragment", "pass_options", "pass_ttl", "pass_too_big",
    "pass_syn", "pass_inspect", "pass_keepalive", "pass_checksum", "pass_gso",
    "pass_peer", "pass_route", "pass_helper", "pass_underlay", "pass_way_back",
    "csum_filled", "pass_seq_start", "pass_seq_order", "pass_suspended", "pass_seq_jump",
)

PF = {  # gb_peer.flags (grebe_tc.c PF_*)
    "TX": 0x001, "RX": 0x002, "GRE": 0x004, "KEY_OUT": 0x008, "KEY_IN": 0x010,
    "SEQ_TX": 0x020, "DROP_LATE": 0x040, "FLOW_HASH": 0x080, "OUTER_V6": 0x100,
    "CSUM": 0x200,
}
GF = {  # gb_global.flags (grebe_tc.c GF_*)
    "MSS_CLAMP": 0x01, "INSPECT_ALL_TCP": 0x02, "LISTEN_V4": 0x04, "LISTEN_V6": 0x08,
    "LISTEN_ANY4": 0x10, "LISTEN_ANY6": 0x20, "INSPECT": 0x40,
    "SUSPENDED": 0x80,
}

GLOBAL = struct.Struct("<QIHH4s16sI")  # struct gb_global
PEER = struct.Struct("<IIIHHHH16s16s")  # struct gb_peer
LPM4 = struct.Struct("<I4s")
LPM6 = struct.Struct("<I16s")
RXKEY = struct.Struct("<16sII")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
# grebe_seq_reserve's test-run "packet" (grebe_tc.c): peer index, count, op (0 reserve,
# 1 release), padded to the 14 bytes a tc test run needs at least
SEQ_REQ = struct.Struct("<III4x")
U64 = struct.Struct("<Q")
RXSEQ = struct.Struct("<IIIIII")  # struct gb_rxseq
PEERSTAT = struct.Struct("<QQQQ")

# map name: (key size, value size)
SIZES = {
    "gb_global": (4, GLOBAL.size), "gb_peers": (4, PEER.size), "gb_pfx4": (LPM4.size, 4),
    "gb_pfx6": (LPM6.size, 4), "gb_endpoints": (16, 4), "gb_hosts": (16, 4),
    "gb_rxkeys": (RXKEY.size, 4), "gb_inspect_ports": (2, 4), "gb_txseq": (4, 4),
    "gb_rxseq": (4, RXSEQ.size), "gb_heard": (4, 8),
    "gb_pytx": (4, 8), "gb_peerstats": (4, PEERSTAT.size),
    "gb_drops": (4, 8), "gb_stats": (4, 8),
}
PERCPU = frozenset({"gb_peerstats", "gb_drops", "gb_stats"})


def addr16(host: str) -> bytes:
    """16 bytes: an IPv6 address as is, IPv4 as ::ffff:a.b.c.d. Raises ValueError."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def peer_flags(p: PeerConfig) -> int:
    """The gb_peer.flags of one configured peer (before its liveness is applied)."""
    gre = p.encapsulation is Encapsulation.GRE
    f = PF["GRE"] if gre else 0
    if p.key_out is not None:
        f |= PF["KEY_OUT"]
    if p.key_in is not None:
        f |= PF["KEY_IN"]
    if gre and p.sequence is not SeqPolicy.OFF:
        f |= PF["SEQ_TX"]
    if p.sequence is SeqPolicy.DROP_LATE:
        f |= PF["DROP_LATE"]
    if p.source_port is SourcePort.FLOW_HASH:
        f |= PF["FLOW_HASH"]
    if p.ipv6:
        f |= PF["OUTER_V6"]
    if p.checksum:
        f |= PF["CSUM"]  # GRE checksums: the Python path, both directions
    elif p.secure:
        pass  # authenticated/encrypted peers (bridge/secure): only the Python path seals
    else:
        f |= PF["TX"]
        if p.sequence is not SeqPolicy.REORDER:
            f |= PF["RX"]
    return f


def peer_value(p: PeerConfig, flags: int, mtu: int, local: str, sport: int) -> bytes:
    """struct gb_peer for peer `p` sending from `local`:`sport` with tunnel MTU `mtu`."""
    return PEER.pack(flags, p.key_out or 0, p.key_in or 0, max(0, min(mtu, 0xFFFF)),
                     sport, p.port, 0, _slot(local), _slot(p.host))


def _slot(host: str) -> bytes:
    """An address as the C side stores it in a 16-byte field: IPv4 in the first 4 bytes."""
    ip = ipaddress.ip_address(host)
    return ip.packed.ljust(16, b"\x00")


def global_value(cfg: Config, tun_ifindex: int, live_until_ns: int,
                 inspect_all_tcp: bool = False, suspended: bool = False) -> bytes:
    """struct gb_global (live_until_ns 0: the program passes everything; `suspended`: it
    passes everything but fills in partial inner checksums first, grebe_tc.c)."""
    flags = GF["MSS_CLAMP"] if cfg.mss_clamp else 0
    if suspended:
        flags |= GF["SUSPENDED"]
    if inspect_all_tcp:
        flags |= GF["INSPECT_ALL_TCP"]
    if cfg.inspect:  # ICMP errors may belong to an inspected flow: the Python path
        flags |= GF["INSPECT"]
    ip = ipaddress.ip_address(cfg.listen.address)
    l4, l6 = b"\x00" * 4, b"\x00" * 16
    if ip.version == 4:
        flags |= GF["LISTEN_V4"]
        if ip.is_unspecified:
            flags |= GF["LISTEN_ANY4"]
        l4 = ip.packed
    else:  # a v6 socket on :: takes IPv4 too (dual stack)
        flags |= GF["LISTEN_V6"]
        if ip.is_unspecified:
            flags |= GF["LISTEN_ANY6"] | GF["LISTEN_V4"] | GF["LISTEN_ANY4"]
        l6 = ip.packed
    return GLOBAL.pack(live_until_ns, tun_ifindex, cfg.listen.port, flags, l4, l6, 0)


def inspect_ports(rules: Iterable[Any]) -> tuple[frozenset[int], bool]:
    """(TCP ports, all_tcp) that [[inspect]] rules need on the Python path (module rules)."""
    ports: set[int] = set()
    for r in rules:
        ranges = getattr(r, "dst_ports", ())
        if not ranges:
            return frozenset(), True
        for lo, hi in ranges:
            if hi - lo + len(ports) > MAX_INSPECT_PORTS:
                return frozenset(), True
            ports.update(range(lo, hi + 1))
    return frozenset(ports), False


@dataclass
class Plan:
    """Map name -> [(key, value)] to write at start-up."""

    entries: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    inspect_all_tcp: bool = False

    def add(self, name: str, key: bytes, value: bytes) -> None:
        self.entries.setdefault(name, []).append((key, value))


def plan(cfg: Config, tun_ifindex: int, mtus: Sequence[int], locals_: Sequence[str],
         live_until_ns: int, rules: Iterable[Any] = ()) -> Plan:
    """Every map entry for `cfg`: peer i has tunnel MTU mtus[i] and sends from locals_[i].

    Raises ValueError for more than MAX_PEERS peers.
    """
    if len(cfg.peers) > MAX_PEERS:
        raise ValueError(f"the eBPF path takes at most {MAX_PEERS} peers")
    out = Plan()
    ports, all_tcp = inspect_ports(rules)
    out.inspect_all_tcp = all_tcp
    out.add("gb_global", U32.pack(0), global_value(cfg, tun_ifindex, live_until_ns, all_tcp))
    for port in sorted(ports):
        out.add("gb_inspect_ports", U16.pack(port), U32.pack(1))
    endpoints = {addr16(p.host) for p in cfg.peers}
    lip = ipaddress.ip_address(cfg.listen.address)
    if not lip.is_unspecified:
        endpoints.add(addr16(cfg.listen.address))
    for e in sorted(endpoints):
        out.add("gb_endpoints", e, U32.pack(1))
    seen_hosts: set[bytes] = set()
    for i, p in enumerate(cfg.peers):
        out.add("gb_peers", U32.pack(i),
                peer_value(p, peer_flags(p), mtus[i], locals_[i], cfg.listen.port))
        for net in p.prefixes:
            if net.version == 4:
                out.add("gb_pfx4", LPM4.pack(net.prefixlen, net.network_address.packed),
                        U32.pack(i))
            else:
                out.add("gb_pfx6", LPM6.pack(net.prefixlen, net.network_address.packed),
                        U32.pack(i))
        h = addr16(p.host)
        if h not in seen_hosts:  # the first peer on a host (bridge/peers.py by_host)
            seen_hosts.add(h)
            out.add("gb_hosts", h, U32.pack(i))
        if p.key_in is not None:
            out.add("gb_rxkeys", RXKEY.pack(h, p.key_in, 1), U32.pack(i))
    return out


def decode_percpu_u64(raw: bytes | None) -> int:
    """The sum over CPUs of one per-CPU u64."""
    if not raw:
        return 0
    return sum(v for (v,) in U64.iter_unpack(raw))


def decode_peerstats(raw: bytes | None) -> tuple[int, int, int, int]:
    """(rx_packets, rx_bytes, tx_packets, tx_bytes) summed over CPUs."""
    tot = [0, 0, 0, 0]
    if raw:
        for vals in PEERSTAT.iter_unpack(raw):
            for k in range(4):
                tot[k] += vals[k]
    return tot[0], tot[1], tot[2], tot[3]
