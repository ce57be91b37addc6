"""Endpoint configuration: one TOML file per grebe endpoint -> frozen dataclasses.

Rules:
- The file is TOML, read with stdlib `tomllib`. Unknown keys are errors (a typo must not
  silently fall back to a default).
- `check_config(path)` returns *every* problem as a `ConfigError` naming its key path
  ("peers[1].endpoint"); `load_config(path)` raises `ConfigErrors` with the same list.
- Addresses are IP literals in the Config (no DNS in the core). Endpoints are "host:port"
  or "[v6]:port"; the port defaults to 4754 (RFC 8086 §3.3, GRE-in-UDP). A bare IPv6 endpoint
  is an error: in "2001:db8::2:4754" the port cannot be told from the address. An endpoint
  may name its host ("gw-b.example:4754", RFC 1123 §2.1): the caller's resolver (I/O layer,
  bridge/io/resolve.py; `hosts_file` first) turns it into the address `host` holds
  (`hostname` keeps the name); no resolver, or no address, is an error of that key.
- What would break traffic silently is an error here, not at run time: no peer; a prefix
  that is not a string (`42` would be 0.0.0.42/32); a peer of the other address family than
  `listen.address` ("::" takes both); an IPv6 TUN address with mtu < 1280 (RFC 8200 §5); a
  peer prefix covering the peer's own endpoint (RFC 2003 §4 loop; not a /0, a full tunnel:
  policy routing with `tun.table` and `tun.fwmark` keeps the tunnel's datagrams out of it,
  bridge/io/policy.py); dead_after not above
  keepalive; two peers on one host unless both are GRE with different keys (receive matches
  source address + GRE key, RFC 2890 §2.1, never the UDP source port, which is entropy,
  RFC 8086 §3.2.1); `[[inspect]]` errors (all of them, with the other keys' errors) and
  custom inspectors that do not import (`check_imports`). A UTF-8 BOM is skipped.
- `key` sets both GRE key directions; `key_in` / `key_out` set them separately
  (Linux `ikey`/`okey`). Keys, sequence numbers and the GRE checksum exist only for
  encapsulation = "gre"; IPIP (RFC 2003, Linux FOU layout) has no header of its own.
- Sequence policy: "off" | "drop-late" (Linux iseq: gaps accepted, late packets dropped)
  | "reorder" (RFC 2890 §2.2 buffer with max_packets_held / outoforder_timer_ms).
- Security (issue 12, docs/SECURE.md): `security = "plain" | "authenticated" | "encrypted"`
  per peer (default plain, today's wire format) with `private_key_file`, `public_key`,
  `preshared_key_file`, read by bridge/secure/keys.py `parse_security` (key file paths
  relative to the config file's directory). Secure peers speak on `listen.secure_port`
  (default 24754, docs/SECURE.md §2), which is also their endpoint's default port; each has
  an endpoint of its own (the seal is per peer), and never shares one with a plain peer.
- `[[inspect]]` tables are kept raw; `bridge.inspect.rules.parse_rules(raw, "inspect")` checks them
  (its errors join this file's list) and `Config.inspect_rules()` returns its rules.

Theory of operation: `parse_config(data)` walks the TOML dict with a `Reader`
(bridge/configkeys.py) that pops the keys of the table `KEYS` there (every key's type,
default, range, choices and doc; docs/config/ is generated from it), checks them, and records
errors with their key path instead of raising, so that one pass reports everything; the
checks across keys are here. If no error was recorded the
frozen `Config` is returned. `EXAMPLE` below is the reference file, every key commented
(tests/unit/bridge/fixtures/site-a.toml is a copy, checked equal by the tests).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from bridge.configkeys import (
    GRE_IN_UDP_PORT,
    Datapath,
    DownAction,
    Encapsulation,
    Reader,
    SeqPolicy,
    SourcePort,
)
from bridge.endpoint import Resolver, host_name, parse_endpoint
from bridge.endpoint import ResolvingReader as _Reader
from bridge.errors import ConfigError, ConfigErrors
from bridge.flows import InspectRule, SpliceLimits
from bridge.inspect.rules import check_imports, parse_rules
from bridge.scrub import ScrubRule, parse_scrub
from bridge.secure.keys import PeerSecurity, SecurityMode, parse_security
from bridge.secure.wire import SECURE_PORT

__all__ = [
    "Encapsulation",
    "SeqPolicy",
    "DownAction",
    "SourcePort",
    "Datapath",
    "TunConfig",
    "ListenConfig",
    "PmtuConfig",
    "PeerConfig",
    "Config",
    "parse_endpoint",
    "host_name",
    "Resolver",
    "parse_config",
    "loads_config",
    "load_config",
    "check_config",
    "EXAMPLE",
    "GRE_IN_UDP_PORT",
]

FULL_TUNNEL_TABLE = 4755  # tun.table by default (a full tunnel's, /0 prefix): not 4754,
# the kernel inspection backend's table (bridge/kernel/setup.py), which a full tunnel may
# run beside
FULL_TUNNEL_MARK = 4754  # tun.fwmark by default (0x1292; the backend marks 0x4754)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TunConfig:
    name: str
    addresses: tuple[IPInterface, ...]
    mtu: int | None  # None = "auto": underlay MTU minus the largest peer overhead
    table: int = FULL_TUNNEL_TABLE  # full tunnel (a /0 prefix): its routing table
    fwmark: int = FULL_TUNNEL_MARK  # full tunnel: SO_MARK of the tunnel's own sockets


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str
    port: int
    secure_port: int = SECURE_PORT  # the authenticated / encrypted peers' port


@dataclass(frozen=True, slots=True)
class PmtuConfig:
    underlay_mtu: int = 1500  # used for mtu = "auto" when the I/O layer passes none
    icmp_rate: float = 10.0  # ICMP errors per second (token bucket refill)
    icmp_burst: int = 20  # token bucket depth
    fragment: bool = True  # IPv4 DF clear and too big: fragment inner (RFC 4459 §3) or drop


@dataclass(frozen=True, slots=True)
class PeerConfig:
    name: str
    host: str  # canonical IP literal (ipaddress str())
    port: int
    prefixes: tuple[IPNetwork, ...]
    encapsulation: Encapsulation = Encapsulation.GRE
    key_in: int | None = None
    key_out: int | None = None
    sequence: SeqPolicy = SeqPolicy.OFF
    max_packets_held: int = 5
    outoforder_timer_ms: float = 100.0
    checksum: bool = False
    keepalive: float = 10.0  # seconds between keepalives; 0 = none
    dead_after: float = 30.0  # seconds without any datagram -> down
    down_action: DownAction = DownAction.NONE
    source_port: SourcePort = SourcePort.FLOW_HASH  # RFC 8086 §3.2.1: entropy per flow
    security: PeerSecurity = field(default_factory=PeerSecurity)  # plain unless configured
    hostname: str | None = None  # as written in endpoint; `host`: its address

    @property
    def secure(self) -> bool:
        """True for an authenticated or encrypted peer (bridge/secure)."""
        return self.security.mode is not SecurityMode.PLAIN

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def ipv6(self) -> bool:
        return ":" in self.host


@dataclass(frozen=True, slots=True)
class Config:
    tun: TunConfig
    listen: ListenConfig
    peers: tuple[PeerConfig, ...]
    mss_clamp: bool = True
    keep_warm: bool = True  # bridge/io/warm.py: low RTT for sparse traffic, a little CPU
    split_directions: bool = True  # bridge/io/split.py: UDP->TUN in its own process
    pmtu: PmtuConfig = field(default_factory=PmtuConfig)
    control_socket: str | None = None
    metrics_listen: str | None = None
    inspect: tuple[dict[str, Any], ...] = ()
    path: str | None = None
    hosts_file: str | None = None  # names of endpoints looked up here first (then DNS)
    datapath: Datapath = Datapath.PYTHON  # issue 14: the eBPF fast path (bridge/ebpf/), opt-in
    userspace: SpliceLimits = field(default_factory=SpliceLimits)  # bridge/userspace/bounds.py
    scrub: tuple[ScrubRule, ...] = ()  # issue 12: [[scrub]] rules, in order (bridge/scrub.py)

    def inspect_rules(self) -> tuple[InspectRule, ...]:
        """The `[[inspect]]` rules, checked (bridge/inspect/rules.py `parse_rules`).

        Raises whatever parse_rules raises for bad rules (ConfigError / ConfigErrors).
        """
        return parse_rules(list(self.inspect), "inspect")


EXAMPLE = """\
# grebe endpoint configuration (site A)
mss_clamp = true                      # clamp TCP MSS in SYN / SYN-ACK, both directions
keep_warm = true                      # keep the packet path in CPU cache for 1 s after traffic
split_directions = true               # UDP->TUN in its own process (off with [[inspect]])
datapath = "python"                   # "python" (default) | "auto" | "ebpf": kernel fast path
control_socket = "@grebe/grebe0"      # optional; default: abstract @grebe/<tun name>
metrics_listen = "127.0.0.1:9108"     # optional Prometheus text endpoint
hosts_file = "/etc/grebe/hosts"       # optional: endpoint host names looked up here first

[tun]
name = "grebe0"
addresses = ["198.18.100.1/30", "2001:db8:100::1/64"]
mtu = "auto"                          # or an integer; auto = underlay MTU - overhead
table = 4755                          # a peer owning 0.0.0.0/0 or ::/0: its routing table
fwmark = 4754                         # and the mark of grebe's sockets, which skip that table

[listen]
address = "198.18.0.1"
port = 4754

[pmtu]
underlay_mtu = 1500                   # fallback for mtu = "auto"
icmp_rate = 10.0                      # ICMP errors per second toward the TUN
icmp_burst = 20
fragment = true                       # IPv4 without DF, too big: fragment inner packet

[userspace]                           # limits of [[inspect]] backend = "userspace"
max_splices = 10000                   # terminated flows (TIME-WAIT ones hold no slot)
max_half_open = 2048                  # SYN seen, client handshake not done; past it: cookies
max_half_open_per_prefix = 512        # ... per source /prefix4 (IPv4) or /prefix6 (IPv6)
prefix4 = 24
prefix6 = 64
syn_cookies = true                    # false: refuse (RST) past the half-open caps
synack_retries = 5                    # a silent half-open client ends after ~63 s (Linux)
memory_budget = 1073741824            # bytes buffered by all splices; back-pressure past it

[[peers]]
name = "site-b"
endpoint = "198.18.0.2:4754"          # "[2001:db8::2]:4754" for IPv6; or "host.name:4754"
prefixes = ["198.18.20.0/24", "2001:db8:20::/48"]  # "0.0.0.0/0", "::/0": a full tunnel
encapsulation = "gre"                 # "gre" (GRE-in-UDP) | "ipip" (IPIP-in-UDP, FOU)
key = 42                              # or key_in = 1 / key_out = 2
sequence = "off"                      # "off" | "drop-late" | "reorder"
max_packets_held = 5
outoforder_timer_ms = 100
checksum = false
keepalive = 10                        # seconds; 0 disables
dead_after = 30                       # seconds of silence before the peer is down
down_action = "none"                  # "none" | "withdraw"
source_port = "flow-hash"             # RFC 8086 §3.2.1 entropy per inner flow; or "fixed"
"""


def _parse_tun(r: Reader, data: dict[str, Any]) -> TunConfig:
    t = r.table(data, "tun")
    name = r.take(t, "tun.name", "tun")
    if not 1 <= len(name) <= 15 or "/" in name or " " in name:
        r.error("tun.name", f"{name!r} is not a valid interface name (1-15 chars)")
    addrs: list[IPInterface] = []
    raw = r.take(t, "tun.addresses", "tun") or []
    for i, a in enumerate(raw):
        try:
            addrs.append(ipaddress.ip_interface(a))
        except (ValueError, TypeError) as e:
            r.error(f"tun.addresses[{i}]", str(e))
    mtu_raw = r.take(t, "tun.mtu", "tun")  # range checked by the table
    mtu: int | None = None
    if isinstance(mtu_raw, str):
        if mtu_raw != "auto":
            r.error("tun.mtu", f"{mtu_raw!r}: must be an integer or \"auto\"")
    else:
        mtu = mtu_raw
    table = r.take(t, "tun.table", "tun")
    if table in (253, 254, 255):
        r.error("tun.table", f"{table} is a kernel table (default, main, local): full-tunnel "
                "routes need a table of their own")
        table = FULL_TUNNEL_TABLE
    fwmark = r.take(t, "tun.fwmark", "tun")
    r.unknown(t, "tun", "tun")
    return TunConfig(name=name, addresses=tuple(addrs), mtu=mtu, table=table, fwmark=fwmark)


def _parse_listen(r: Reader, data: dict[str, Any]) -> ListenConfig:
    t = r.table(data, "listen")
    address = r.take(t, "listen.address", "listen")
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError as e:
        r.error("listen.address", str(e))
    port = r.take(t, "listen.port", "listen")
    sport = r.take(t, "listen.secure_port", "listen")
    if sport == port:
        r.error("listen.secure_port", f"{sport} is also listen.port: the secure modes need "
                "a port of their own (docs/SECURE.md §2)")
    r.unknown(t, "listen", "listen")
    return ListenConfig(address=address, port=port, secure_port=sport)


def _parse_pmtu(r: Reader, data: dict[str, Any]) -> PmtuConfig:
    t = r.table(data, "pmtu")
    cfg = PmtuConfig(
        underlay_mtu=r.take(t, "pmtu.underlay_mtu", "pmtu"),
        icmp_rate=float(r.take(t, "pmtu.icmp_rate", "pmtu")),
        icmp_burst=r.take(t, "pmtu.icmp_burst", "pmtu"),
        fragment=r.take(t, "pmtu.fragment", "pmtu"),
    )
    r.unknown(t, "pmtu", "pmtu")
    return cfg


def _parse_userspace(r: Reader, data: dict[str, Any]) -> SpliceLimits:
    """`[userspace]`: the userspace backend's limits (enforced in bridge/userspace/bounds.py)."""
    t = r.table(data, "userspace")
    names = ("max_splices", "max_half_open", "max_half_open_per_prefix", "prefix4", "prefix6",
             "syn_cookies", "synack_retries", "memory_budget")
    cfg = SpliceLimits(**{n: r.take(t, f"userspace.{n}", "userspace") for n in names})
    r.unknown(t, "userspace", "userspace")
    return cfg


def _parse_security(r: Reader, p: str, t: dict[str, Any],
                    base: str | None) -> PeerSecurity:
    """The peer's security keys (bridge/secure/keys.py), popped from `t`; key file paths
    are relative to the directory of the config file `base`."""
    keys = ("security", "private_key_file", "public_key", "preshared_key_file")
    sub = {}
    for k in keys:
        present, value = r.take_raw(t, f"peers.{k}")
        if present:
            sub[k] = value
    if base is not None:
        d = os.path.dirname(os.path.abspath(base))
        for k in ("private_key_file", "preshared_key_file"):
            v = sub.get(k)
            if isinstance(v, str):
                sub[k] = os.path.join(d, v)
            elif isinstance(v, list):
                sub[k] = [os.path.join(d, x) if isinstance(x, str) else x for x in v]
    sec, errors = parse_security(sub)
    for e in errors:
        key, _, msg = e.partition(": ")
        if key in keys:
            r.error(f"{p}.{key}", msg)
        else:
            r.error(f"{p}.security", e)
    return sec or PeerSecurity()


def _parse_peer(r: _Reader, i: int, t: dict[str, Any], secure_port: int = SECURE_PORT,
                ) -> PeerConfig | None:
    p = f"peers[{i}]"
    ok = len(r.errors)
    name = r.take(t, "peers.name", p)
    name = f"peer{i}" if name is None else name
    security = _parse_security(r, p, t, r.file)
    default_port = secure_port if security.mode is not SecurityMode.PLAIN else GRE_IN_UDP_PORT
    host, port = "0.0.0.0", default_port
    hostname: str | None = None
    if "endpoint" not in t:
        r.error(f"{p}.endpoint", "missing (\"host:port\" or \"[v6]:port\")")
    else:
        ep = r.take(t, "peers.endpoint", p)
        if ep is not None:
            try:
                host, port = parse_endpoint(ep, default_port)
            except ValueError as e:
                named = host_name(ep, default_port)
                if named is None:
                    r.error(f"{p}.endpoint", f"{ep!r}: {e}")
                else:
                    hostname, port = named
                    host = r.resolve_host(f"{p}.endpoint", hostname)
    prefixes: list[IPNetwork] = []
    for j, s in enumerate(r.take(t, "peers.prefixes", p) or []):
        if not isinstance(s, str):
            r.error(f"{p}.prefixes[{j}]", f"{s!r}: must be a prefix string such as "
                    "\"198.18.20.0/24\" (a bare number would be read as an address)")
            continue
        try:
            prefixes.append(ipaddress.ip_network(s, strict=True))
        except (ValueError, TypeError) as e:
            r.error(f"{p}.prefixes[{j}]", str(e))
    encap = Encapsulation(r.take(t, "peers.encapsulation", p))
    key = r.take(t, "peers.key", p)
    key_in = r.take(t, "peers.key_in", p)
    key_out = r.take(t, "peers.key_out", p)
    if key is not None:
        if key_in is not None or key_out is not None:
            r.error(f"{p}.key", "use either key or key_in/key_out, not both")
        key_in = key_out = key
    seq = SeqPolicy(r.take(t, "peers.sequence", p))
    held = r.take(t, "peers.max_packets_held", p)
    timer = float(r.take(t, "peers.outoforder_timer_ms", p))
    csum = r.take(t, "peers.checksum", p)
    keepalive = float(r.take(t, "peers.keepalive", p))
    dead_raw = r.take(t, "peers.dead_after", p)  # default: 3 x keepalive
    dead = float(3 * keepalive if dead_raw is None else dead_raw)
    down = DownAction(r.take(t, "peers.down_action", p))
    sport = SourcePort(r.take(t, "peers.source_port", p))
    if encap is Encapsulation.IPIP:
        for k, bad in (("key", key_in is not None or key_out is not None),
                       ("sequence", seq is not SeqPolicy.OFF), ("checksum", csum)):
            if bad:
                r.error(f"{p}.{k}", "only encapsulation = \"gre\" has keys, sequence numbers "
                        "and checksums (IPIP has no header of its own, RFC 2003)")
    if 0 < dead <= keepalive:
        r.error(f"{p}.dead_after", f"{dead:g} s is not above keepalive ({keepalive:g} s): the "
                "peer would be declared down between two keepalives")
    own = ipaddress.ip_address(host)
    for j, net in enumerate(prefixes):
        # a /0 is a full tunnel: policy routing keeps the tunnel's own datagrams out of it
        # (the fwmark, bridge/io/policy.py), so it may cover the endpoint
        if not own.is_unspecified and own.version == net.version and own in net \
                and net.prefixlen:
            r.error(f"{p}.prefixes[{j}]", f"{net} covers the peer's own endpoint {host}: "
                    "its tunnel datagrams would be routed into the tunnel (RFC 2003 §4)")
    if down is DownAction.WITHDRAW and dead <= 0:
        r.error(f"{p}.down_action", "\"withdraw\" needs dead_after > 0 (or a keepalive)")
    r.unknown(t, p, "peers")
    if len(r.errors) != ok:
        return None
    return PeerConfig(
        name=name, host=host, port=port, prefixes=tuple(prefixes), encapsulation=encap,
        key_in=key_in, key_out=key_out, sequence=seq, max_packets_held=held,
        outoforder_timer_ms=timer, checksum=csum, keepalive=keepalive, dead_after=dead,
        down_action=down, source_port=sport, security=security, hostname=hostname,
    )


def _check_peers(r: Reader, peers: list[tuple[int, PeerConfig]]) -> None:
    names: dict[str, int] = {}
    owners: dict[IPNetwork, int] = {}
    hosts: dict[str, list[tuple[int, PeerConfig]]] = {}
    for i, peer in peers:
        if peer.name in names:
            r.error(f"peers[{i}].name", f"{peer.name!r} already used by peers[{names[peer.name]}]")
        names.setdefault(peer.name, i)
        for j, net in enumerate(peer.prefixes):
            if net in owners and owners[net] != i:
                r.error(f"peers[{i}].prefixes[{j}]", f"{net} also belongs to peers[{owners[net]}]")
            owners.setdefault(net, i)
        # Receive tells peers on one host apart by the GRE key (RFC 2890 §2.1) only, never by
        # the UDP port: the sender's source port is flow entropy (RFC 8086 §3.2.1), so it
        # cannot name a peer. A second peer on a host needs a GRE key of its own.
        for k, other in hosts.get(peer.host, []) if not peer.secure else ():
            if Encapsulation.IPIP in (peer.encapsulation, other.encapsulation):
                r.error(f"peers[{i}].endpoint", f"same host {peer.host} as peers[{k}], and "
                        "an ipip peer cannot share its host: received datagrams are matched "
                        "to peers by source address and GRE key, never by UDP port "
                        "(RFC 8086 §3.2.1)")
                break
            if other.key_in == peer.key_in:
                r.error(f"peers[{i}].endpoint", f"same host {peer.host} and key as "
                        f"peers[{k}]: peers on one host are told apart by their GRE key "
                        "(RFC 2890 §2.1), not by UDP port (RFC 8086 §3.2.1); give each a "
                        "different key")
                break
        if not peer.secure:  # a secure peer is found by its session, not its address
            hosts.setdefault(peer.host, []).append((i, peer))
    # A secure peer's datagrams are sealed per peer, found by their endpoint: one each.
    ends: dict[tuple[str, int], tuple[int, bool]] = {}
    for i, peer in peers:
        prev = ends.get(peer.endpoint)
        if prev is not None and (peer.secure or prev[1]):
            r.error(f"peers[{i}].endpoint", f"secure peers need an endpoint of their own; "
                    f"{peer.host}:{peer.port} is also peers[{prev[0]}]'s")
        ends.setdefault(peer.endpoint, (i, peer.secure))


def _check_families(r: Reader, tun: TunConfig, listen: ListenConfig,
                    peers: list[tuple[int, PeerConfig]]) -> None:
    """The listen socket's family must reach every peer; IPv6 on the TUN needs 1280 bytes."""
    try:
        laddr = ipaddress.ip_address(listen.address)
    except ValueError:
        return
    dual = laddr.version == 6 and laddr.is_unspecified  # "::" also takes IPv4 (V6ONLY off)
    for i, peer in peers:
        v = 6 if peer.ipv6 else 4
        if v != laddr.version and not dual:
            r.error(f"peers[{i}].endpoint", f"IPv{v} peer {peer.host} but listen.address "
                    f"{listen.address} is IPv{laddr.version}: datagrams to it could not be "
                    "sent (listen.address = \"::\" takes both families)")
    if tun.mtu is not None and tun.mtu < 1280 and any(a.version == 6 for a in tun.addresses):
        r.error("tun.mtu", f"{tun.mtu} is below 1280, the IPv6 minimum link MTU "
                "(RFC 8200 §5), and tun.addresses has an IPv6 address")


def _parse_scrub(r: Reader, data: dict[str, Any], peers: list[str],
                 datapath: Datapath) -> tuple[ScrubRule, ...]:
    """The `[[scrub]]` rules (bridge/scrub.py `parse_scrub`), popped from `data`."""
    raw = r.take(data, "scrub", "")
    rules, errors = parse_scrub(raw, peers)
    for key, msg in errors:
        r.error(key, msg)
    if rules and datapath is Datapath.EBPF:  # the eBPF program knows no [[scrub]] rules
        r.error("scrub", 'needs the Python data path (datapath = "python" or "auto")')
    return rules


def parse_config(data: dict[str, Any], file: str | None = None,
                 resolve: Resolver | None = None) -> tuple[Config | None, list[ConfigError]]:
    """Validate a TOML dict. Returns (Config, []) or (None, every error found). Endpoint host
    names are looked up with `resolve` (name, IP version or 0, hosts_file) -> address."""
    data = dict(data)
    r = _Reader(file, resolve)
    tun = _parse_tun(r, data)
    listen = _parse_listen(r, data)
    r.hosts_file = r.take(data, "hosts_file", "")
    if r.hosts_file and file and not os.path.isabs(r.hosts_file):  # as key files: beside it
        r.hosts_file = os.path.join(os.path.dirname(file), r.hosts_file)
    with contextlib.suppress(ValueError):
        la = ipaddress.ip_address(listen.address)
        r.family = 0 if la.version == 6 and la.is_unspecified else la.version
    pmtu = _parse_pmtu(r, data)
    userspace = _parse_userspace(r, data)
    mss = r.take(data, "mss_clamp", "")
    keep_warm = r.take(data, "keep_warm", "")
    split = r.take(data, "split_directions", "")
    datapath = Datapath(r.take(data, "datapath", ""))
    control = r.take(data, "control_socket", "")
    metrics = r.take(data, "metrics_listen", "")
    if metrics is not None:
        try:
            parse_endpoint(metrics, default_port=9108)
        except ValueError as e:
            r.error("metrics_listen", f"{metrics!r}: {e}")
    raw_peers = r.take(data, "peers", "") or []
    peers: list[tuple[int, PeerConfig]] = []
    for i, t in enumerate(raw_peers):
        if not isinstance(t, dict):
            r.error(f"peers[{i}]", "must be a table ([[peers]])")
            continue
        peer = _parse_peer(r, i, dict(t), listen.secure_port)
        if peer is not None:
            peers.append((i, peer))
    if not raw_peers and "peers" not in r.seen_bad:
        r.error("peers", "no [[peers]] table: an endpoint needs at least one peer")
    _check_peers(r, peers)
    _check_families(r, tun, listen, peers)
    scrub = _parse_scrub(r, data, [p.name for _, p in peers], datapath)
    inspect = r.take(data, "inspect", "") or []
    for i, t in enumerate(inspect):
        if not isinstance(t, dict):
            r.error(f"inspect[{i}]", "must be a table ([[inspect]])")
    r.unknown(data, "", "")
    if inspect and all(isinstance(t, dict) for t in inspect):
        try:
            # its path argument is the key path; custom inspectors are imported here too
            r.errors.extend(check_imports(parse_rules(list(inspect), "inspect"), "inspect"))
        except ConfigErrors as e:
            r.errors.extend(e.errors)
        except ConfigError as e:
            r.errors.append(e)
        for err in r.errors:
            err.file = err.file or file
    if r.errors:
        return None, r.errors
    cfg = Config(tun=tun, listen=listen, peers=tuple(p for _, p in peers), mss_clamp=mss,
                 keep_warm=keep_warm, split_directions=split, pmtu=pmtu, control_socket=control,
                 metrics_listen=metrics,
                 inspect=tuple(inspect), path=file, datapath=datapath, userspace=userspace,
                 hosts_file=r.hosts_file, scrub=scrub)
    return cfg, []


def _read(path: str) -> tuple[dict[str, Any] | None, list[ConfigError]]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, [ConfigError("", f"cannot read: {e.strerror or e}", path)]
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 BOM (Windows editors) is not TOML, drop it
    except UnicodeDecodeError as e:
        return None, [ConfigError("", f"not UTF-8 text: {e}", path)]
    try:
        return tomllib.loads(text), []
    except tomllib.TOMLDecodeError as e:
        return None, [ConfigError("", f"not valid TOML: {e}", path)]


def check_config(path: str, resolve: Resolver | None = None) -> list[ConfigError]:
    """Return every error in the file at `path` (empty list: the file is good)."""
    data, errors = _read(path)
    if data is None:
        return errors
    return parse_config(data, path, resolve)[1]


def loads_config(text: str, file: str | None = None) -> Config:
    """Parse TOML text. Raises ConfigErrors listing every problem."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([ConfigError("", f"not valid TOML: {e}", file)]) from None
    cfg, errors = parse_config(data, file)
    if cfg is None:
        raise ConfigErrors(errors)
    return cfg


def load_config(path: str, resolve: Resolver | None = None) -> Config:
    """Read and validate the file at `path`. Raises ConfigErrors listing every problem."""
    data, errors = _read(path)
    if data is None:
        raise ConfigErrors(errors)
    cfg, errors = parse_config(data, path, resolve)
    if cfg is None:
        raise ConfigErrors(errors)
    return cfg
