"""Endpoint configuration: one TOML file per grebe endpoint -> frozen dataclasses.

Rules:
- The file is TOML, read with stdlib `tomllib`. Unknown keys are errors (a typo must not
  silently fall back to a default).
- `check_config(path)` returns *every* problem as a `ConfigError` naming its key path
  ("peers[1].endpoint"); `load_config(path)` raises `ConfigErrors` with the same list.
- Addresses are IP literals only (no DNS in the core). Endpoints are "host:port" or
  "[v6]:port"; the port defaults to 4754 (RFC 8086 §3.3, GRE-in-UDP). A bare IPv6 endpoint is
  an error: in "2001:db8::2:4754" the port cannot be told from the address.
- What would break traffic silently is an error here, not at run time: no peer; a prefix
  that is not a string (`42` would be 0.0.0.42/32); a peer of the other address family than
  `listen.address` ("::" takes both); an IPv6 TUN address with mtu < 1280 (RFC 8200 §5); a
  peer prefix covering the peer's own endpoint (RFC 2003 §4 loop); dead_after not above
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

Theory of operation: `parse_config(data)` walks the TOML dict with a small `_Reader` that
pops known keys, converts and range-checks them, and records errors with their key path
instead of raising, so that one pass reports everything. If no error was recorded the
frozen `Config` is returned. `EXAMPLE` below is the reference file, every key commented
(tests/unit/bridge/fixtures/site-a.toml is a copy, checked equal by the tests).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bridge.errors import ConfigError, ConfigErrors
from bridge.flows import InspectRule
from bridge.inspect.rules import check_imports, parse_rules
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
    "parse_config",
    "loads_config",
    "load_config",
    "check_config",
    "EXAMPLE",
    "GRE_IN_UDP_PORT",
]

GRE_IN_UDP_PORT = 4754  # RFC 8086 §3.3 / IANA "GRE-in-UDP"

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Encapsulation(Enum):
    GRE = "gre"  # GRE-in-UDP, RFC 8086 (GRE header per RFC 2784/2890)
    IPIP = "ipip"  # IPIP-in-UDP, Linux FOU layout (inner version nibble picks v4/v6)


class SeqPolicy(Enum):
    OFF = "off"
    DROP_LATE = "drop-late"
    REORDER = "reorder"


class DownAction(Enum):
    NONE = "none"  # keep sending to a silent peer
    WITHDRAW = "withdraw"  # drop traffic to it (counted "peer_down") + ICMP unreachable


class Datapath(Enum):  # issue 14: bridge/ebpf/datapath.py
    AUTO = "auto"  # the eBPF fast path where the kernel and capabilities allow, else python
    PYTHON = "python"  # the Python data plane only
    EBPF = "ebpf"  # the eBPF fast path, or `grebe up` fails


class SourcePort(Enum):
    FIXED = "fixed"  # the socket's own port (RFC 8086 §3.2.1: one constant port is allowed)
    FLOW_HASH = "flow-hash"  # 49152-65535 from a hash of the inner flow (RFC 8086 §3.2.1)


@dataclass(frozen=True, slots=True)
class TunConfig:
    name: str
    addresses: tuple[IPInterface, ...]
    mtu: int | None  # None = "auto": underlay MTU minus the largest peer overhead


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
    datapath: Datapath = Datapath.AUTO  # issue 14: the eBPF fast path where it can run

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
datapath = "auto"                     # "auto" (default) | "python" | "ebpf": kernel fast path
control_socket = "@grebe/grebe0"      # optional; default: abstract @grebe/<tun name>
metrics_listen = "127.0.0.1:9108"     # optional Prometheus text endpoint

[tun]
name = "grebe0"
addresses = ["198.18.100.1/30", "2001:db8:100::1/64"]
mtu = "auto"                          # or an integer; auto = underlay MTU - overhead

[listen]
address = "198.18.0.1"
port = 4754

[pmtu]
underlay_mtu = 1500                   # fallback for mtu = "auto"
icmp_rate = 10.0                      # ICMP errors per second toward the TUN
icmp_burst = 20
fragment = true                       # IPv4 without DF, too big: fragment inner packet

[[peers]]
name = "site-b"
endpoint = "198.18.0.2:4754"          # "[2001:db8::2]:4754" for IPv6
prefixes = ["198.18.20.0/24", "2001:db8:20::/48"]
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


def parse_endpoint(text: str, default_port: int = GRE_IN_UDP_PORT) -> tuple[str, int]:
    """Parse "host:port", "[v6]:port", "host" or "[v6]" into (canonical host, port).

    Raises ValueError naming the problem; a bare IPv6 address is one (is "2001:db8::2:4754"
    an address or an address and a port?).
    """
    text = text.strip()
    host: str
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' in bracketed IPv6 endpoint")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port = _port(rest[1:])
        addr = ipaddress.ip_address(host)
        if addr.version != 6:
            raise ValueError("brackets are for IPv6 addresses")
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p)
        addr = ipaddress.ip_address(host)
    else:
        addr = ipaddress.ip_address(text)  # bare v4; a bare v6 is refused below
        if addr.version == 6:
            # "2001:db8::2:4754" is a valid address too: the port would be silently lost
            raise ValueError("an IPv6 endpoint needs brackets: " + _bracket_hint(text, addr))
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError("endpoint must be a unicast address")
    return str(addr), port


def _bracket_hint(text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What a bare IPv6 endpoint may have meant, both readings when the last group could be
    a port ("2001:db8::2:4754": address 2001:db8::2 and port 4754, or one address)."""
    alone = f"\"[{addr}]\" (one address, port {GRE_IN_UDP_PORT})"
    head, _, tail = text.rpartition(":")
    if tail.isdigit() and 1 <= int(tail) <= 65535:
        try:
            host = ipaddress.IPv6Address(head)
        except ValueError:
            return alone
        return f"\"[{host}]:{int(tail)}\" (address and port) or {alone}"
    return alone


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1..65535")
    return port


class _Reader:
    """Pops typed values out of TOML tables, recording errors with their key path."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        self.seen_bad: set[str] = set()  # key paths already reported

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message, self.file))
        self.seen_bad.add(path)

    def table(self, data: dict[str, Any], key: str, prefix: str) -> dict[str, Any]:
        value = data.pop(key, {})
        if not isinstance(value, dict):
            self.error(_join(prefix, key), "must be a table")
            return {}
        return value

    def get(
        self,
        data: dict[str, Any],
        key: str,
        prefix: str,
        kind: type | tuple[type, ...],
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        if key not in data:
            return default
        value = data.pop(key)
        path = _join(prefix, key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.error(path, f"must be {_kind_name(kinds)}, not a boolean")
            return default
        if not isinstance(value, kinds):
            self.error(path, f"must be {_kind_name(kinds)}, not {type(value).__name__}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.error(path, problem)
                return default
        return value

    def enum(
        self, data: dict[str, Any], key: str, prefix: str, enum: type[Enum], default: Any
    ) -> Any:
        value = self.get(data, key, prefix, str, None)
        if value is None:
            return default
        try:
            return enum(value)
        except ValueError:
            choices = " | ".join(repr(m.value) for m in enum)
            self.error(_join(prefix, key), f"{value!r} is not one of {choices}")
            return default

    def unknown(self, data: dict[str, Any], prefix: str) -> None:
        for key in data:
            self.error(_join(prefix, key), "unknown key")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"{v} out of range {lo}..{hi}"

    return check


def _u32(v: Any) -> str | None:
    return None if 0 <= v <= 0xFFFFFFFF else f"{v} is not a 32-bit unsigned key"


def _parse_tun(r: _Reader, data: dict[str, Any]) -> TunConfig:
    t = r.table(data, "tun", "")
    name = r.get(t, "name", "tun", str, "grebe0")
    if not 1 <= len(name) <= 15 or "/" in name or " " in name:
        r.error("tun.name", f"{name!r} is not a valid interface name (1-15 chars)")
    addrs: list[IPInterface] = []
    raw = r.get(t, "addresses", "tun", list, [])
    for i, a in enumerate(raw):
        try:
            addrs.append(ipaddress.ip_interface(a))
        except (ValueError, TypeError) as e:
            r.error(f"tun.addresses[{i}]", str(e))
    mtu_raw = r.get(t, "mtu", "tun", (int, str), "auto")
    mtu: int | None = None
    if isinstance(mtu_raw, str):
        if mtu_raw != "auto":
            r.error("tun.mtu", f"{mtu_raw!r}: must be an integer or \"auto\"")
    elif not 576 <= mtu_raw <= 65535:
        r.error("tun.mtu", f"{mtu_raw} out of range 576..65535")
    else:
        mtu = mtu_raw
    r.unknown(t, "tun")
    return TunConfig(name=name, addresses=tuple(addrs), mtu=mtu)


def _parse_listen(r: _Reader, data: dict[str, Any]) -> ListenConfig:
    t = r.table(data, "listen", "")
    address = r.get(t, "address", "listen", str, "0.0.0.0")
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError as e:
        r.error("listen.address", str(e))
    port = r.get(t, "port", "listen", int, GRE_IN_UDP_PORT, _range(1, 65535))
    sport = r.get(t, "secure_port", "listen", int, SECURE_PORT, _range(1, 65535))
    if sport == port:
        r.error("listen.secure_port", f"{sport} is also listen.port: the secure modes need "
                "a port of their own (docs/SECURE.md §2)")
    r.unknown(t, "listen")
    return ListenConfig(address=address, port=port, secure_port=sport)


def _parse_pmtu(r: _Reader, data: dict[str, Any]) -> PmtuConfig:
    t = r.table(data, "pmtu", "")
    d = PmtuConfig()
    cfg = PmtuConfig(
        underlay_mtu=r.get(t, "underlay_mtu", "pmtu", int, d.underlay_mtu, _range(576, 65535)),
        icmp_rate=float(r.get(t, "icmp_rate", "pmtu", (int, float), d.icmp_rate, _range(0, 1e6))),
        icmp_burst=r.get(t, "icmp_burst", "pmtu", int, d.icmp_burst, _range(0, 1_000_000)),
        fragment=r.get(t, "fragment", "pmtu", bool, d.fragment),
    )
    r.unknown(t, "pmtu")
    return cfg


def _parse_security(r: _Reader, p: str, t: dict[str, Any],
                    base: str | None) -> PeerSecurity:
    """The peer's security keys (bridge/secure/keys.py), popped from `t`; key file paths
    are relative to the directory of the config file `base`."""
    keys = ("security", "private_key_file", "public_key", "preshared_key_file")
    sub = {k: t.pop(k) for k in keys if k in t}
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
    name = r.get(t, "name", p, str, f"peer{i}")
    security = _parse_security(r, p, t, r.file)
    default_port = secure_port if security.mode is not SecurityMode.PLAIN else GRE_IN_UDP_PORT
    host, port = "0.0.0.0", default_port
    if "endpoint" not in t:
        r.error(f"{p}.endpoint", "missing (\"host:port\" or \"[v6]:port\")")
    else:
        ep = r.get(t, "endpoint", p, str, None)
        if ep is not None:
            try:
                host, port = parse_endpoint(ep, default_port)
            except ValueError as e:
                r.error(f"{p}.endpoint", f"{ep!r}: {e}")
    prefixes: list[IPNetwork] = []
    for j, s in enumerate(r.get(t, "prefixes", p, list, [])):
        if not isinstance(s, str):
            r.error(f"{p}.prefixes[{j}]", f"{s!r}: must be a prefix string such as "
                    "\"198.18.20.0/24\" (a bare number would be read as an address)")
            continue
        try:
            prefixes.append(ipaddress.ip_network(s, strict=True))
        except (ValueError, TypeError) as e:
            r.error(f"{p}.prefixes[{j}]", str(e))
    d = PeerConfig(name="", host="", port=0, prefixes=())
    encap = r.enum(t, "encapsulation", p, Encapsulation, d.encapsulation)
    key = r.get(t, "key", p, int, None, _u32)
    key_in = r.get(t, "key_in", p, int, None, _u32)
    key_out = r.get(t, "key_out", p, int, None, _u32)
    if key is not None:
        if key_in is not None or key_out is not None:
            r.error(f"{p}.key", "use either key or key_in/key_out, not both")
        key_in = key_out = key
    seq = r.enum(t, "sequence", p, SeqPolicy, d.sequence)
    held = r.get(t, "max_packets_held", p, int, d.max_packets_held, _range(1, 4096))
    timer = float(r.get(t, "outoforder_timer_ms", p, (int, float), d.outoforder_timer_ms,
                        _range(0.001, 60_000)))
    csum = r.get(t, "checksum", p, bool, d.checksum)
    keepalive = float(r.get(t, "keepalive", p, (int, float), d.keepalive, _range(0, 86400)))
    dead = float(r.get(t, "dead_after", p, (int, float), 3 * keepalive if keepalive else 0.0,
                       _range(0, 86400 * 7)))
    down = r.enum(t, "down_action", p, DownAction, d.down_action)
    sport = r.enum(t, "source_port", p, SourcePort, d.source_port)
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
        if not own.is_unspecified and own.version == net.version and own in net:
            r.error(f"{p}.prefixes[{j}]", f"{net} covers the peer's own endpoint {host}: "
                    "its tunnel datagrams would be routed into the tunnel (RFC 2003 §4)")
    if down is DownAction.WITHDRAW and dead <= 0:
        r.error(f"{p}.down_action", "\"withdraw\" needs dead_after > 0 (or a keepalive)")
    r.unknown(t, p)
    if len(r.errors) != ok:
        return None
    return PeerConfig(
        name=name, host=host, port=port, prefixes=tuple(prefixes), encapsulation=encap,
        key_in=key_in, key_out=key_out, sequence=seq, max_packets_held=held,
        outoforder_timer_ms=timer, checksum=csum, keepalive=keepalive, dead_after=dead,
        down_action=down, source_port=sport, security=security,
    )


def _check_peers(r: _Reader, peers: list[tuple[int, PeerConfig]]) -> None:
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


def _check_families(r: _Reader, tun: TunConfig, listen: ListenConfig,
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


def parse_config(data: dict[str, Any], file: str | None = None) -> tuple[Config | None,
                                                                            list[ConfigError]]:
    """Validate a TOML dict. Returns (Config, []) or (None, every error found)."""
    data = dict(data)
    r = _Reader(file)
    tun = _parse_tun(r, data)
    listen = _parse_listen(r, data)
    pmtu = _parse_pmtu(r, data)
    mss = r.get(data, "mss_clamp", "", bool, True)
    keep_warm = r.get(data, "keep_warm", "", bool, True)
    split = r.get(data, "split_directions", "", bool, True)
    datapath = r.enum(data, "datapath", "", Datapath, Datapath.AUTO)
    control = r.get(data, "control_socket", "", str, None)
    metrics = r.get(data, "metrics_listen", "", str, None)
    if metrics is not None:
        try:
            parse_endpoint(metrics, default_port=9108)
        except ValueError as e:
            r.error("metrics_listen", f"{metrics!r}: {e}")
    raw_peers = r.get(data, "peers", "", list, [])
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
    inspect = r.get(data, "inspect", "", list, [])
    for i, t in enumerate(inspect):
        if not isinstance(t, dict):
            r.error(f"inspect[{i}]", "must be a table ([[inspect]])")
    r.unknown(data, "")
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
                 inspect=tuple(inspect), path=file, datapath=datapath)
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


def check_config(path: str) -> list[ConfigError]:
    """Return every error in the file at `path` (empty list: the file is good)."""
    data, errors = _read(path)
    if data is None:
        return errors
    return parse_config(data, path)[1]


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


def load_config(path: str) -> Config:
    """Read and validate the file at `path`. Raises ConfigErrors listing every problem."""
    data, errors = _read(path)
    if data is None:
        raise ConfigErrors(errors)
    cfg, errors = parse_config(data, path)
    if cfg is None:
        raise ConfigErrors(errors)
    return cfg
