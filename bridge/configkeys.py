"""The configuration's vocabulary: every key of a grebe TOML file, in one declarative table.

Rules:
- `KEYS` lists every key the endpoint file may hold: its section ("" = top level, "tun",
  "listen", "pmtu", "peers", "inspect"), name, TOML types, default, allowed values or range,
  a one-paragraph doc, and the RFC section behind it where there is one.
- The parser (bridge/config.py, and bridge/inspect/rules.py for the `[[inspect]]` rule keys)
  reads keys only through this table: `Reader.take` looks the key up (a key missing from
  the table is a KeyError, a programming error that every config test hits), checks type,
  choices and range from it, and returns the table's default when the key is absent. A key
  left over in a table after parsing is reported as "unknown key", with the closest known
  name. So the parser cannot accept a key the table does not know, nor the table describe
  one the parser ignores (tests/unit/bridge/test_configkeys.py parses a file holding every
  key and compares what was read with the table).
- docs/config/ is generated from this table (`python -m bridge.configdocs`, `grebe docs`);
  tests/unit/bridge/test_configkeys.py fails when the pages differ from it.
- Checks that involve several keys (dead_after above keepalive, a peer prefix covering its
  own endpoint...) stay in bridge/config.py, which parses the values this table admits.

Adding a key is one entry here plus the line in bridge/config.py that uses its value:
    Key("peers", "fwmark", (int,), None, "The firewall mark ...", lo=1, hi=0xFFFFFFFF),
    ...  value = r.take(t, "peers.fwmark", p)   # in _parse_peer; None when absent
then `python -m bridge.configdocs` to write its page, and commit both.

Theory of operation: `Key` is a frozen record; `SPEC` indexes the table by dotted name
("peers.keepalive"). `Reader` carries the error list of one parse: `take` pops a key, checks
it against its `Key` and records a `ConfigError` with the key path instead of raising, so one
pass reports every problem; `unknown` reports what is left over. The Enums of the file's
string choices live here too, so a key's allowed values are the Enum's values.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bridge.errors import ConfigError
from bridge.secure.wire import SECURE_PORT

__all__ = ["Key", "KEYS", "SPEC", "SECTIONS", "Reader", "Encapsulation", "SeqPolicy",
           "DownAction", "Datapath", "SourcePort", "GRE_IN_UDP_PORT", "section_keys"]

GRE_IN_UDP_PORT = 4754  # RFC 8086 §3.3 / IANA "GRE-in-UDP"


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


SECTIONS = {  # section -> (how it is written, what it is)
    "": ("top level", "Keys outside any table: the endpoint as a whole."),
    "tun": ("[tun]", "The TUN device the inner packets enter and leave by."),
    "listen": ("[listen]", "The UDP socket the outer datagrams use."),
    "pmtu": ("[pmtu]", "Path MTU handling: ICMP errors and fragmentation of inner packets."),
    "peers": ("[[peers]]", "One table per remote endpoint (site)."),
    "userspace": ("[userspace]", "Limits of the userspace termination backend (bridge/userspace/): "
                  "how many flows it holds, half-open caps and SYN cookies, memory."),
    "scrub": ("[[scrub]]", "One table per scrubbing rule, in order; the first rule that "
              "matches a packet decides, and a packet no rule matches passes. Applied to inner "
              "packets before encapsulation (out) and after decapsulation (in)."),
    "inspect": ("[[inspect]]", "One table per rule selecting TCP flows for inspection; "
                "first match wins."),
}


@dataclass(frozen=True, slots=True)
class Key:
    section: str
    name: str
    types: tuple[type, ...]  # TOML value types accepted
    default: Any  # None: absent means "not set"
    doc: str
    choices: tuple[str, ...] = ()  # allowed string values (when `types` is (str,))
    lo: float | None = None  # numeric range, inclusive
    hi: float | None = None
    rfc: str = ""
    default_text: str = ""  # the default in words when it is computed from other keys
    example: str = ""  # a TOML value, for the docs
    required: bool = False
    unit: str = ""  # what a number counts ("seconds", "bytes", "a 32-bit GRE key")

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def _choices(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(str(m.value) for m in enum)


_B, _I, _N, _S, _L = (bool,), (int,), (int, float), (str,), (list,)

KEYS: tuple[Key, ...] = (
    # ---- top level
    Key("", "mss_clamp", _B, True, "Clamp the TCP MSS option of SYN and SYN-ACK segments, both "
        "directions, so that inner TCP segments fit the tunnel MTU without fragmentation.",
        rfc="RFC 879; RFC 4459 §3.2"),
    Key("", "keep_warm", _B, True, "Keep the packet path hot (in CPU cache, threads awake) for "
        "about a second after traffic: low latency for sparse traffic at the cost of a "
        "little CPU (bridge/io/warm.py)."),
    Key("", "split_directions", _B, True, "Run the UDP-to-TUN direction in a process of its "
        "own (bridge/io/split.py), using a second core. It does not combine with "
        "`[[inspect]]` rules: with inspection the endpoint runs as one process."),
    Key("", "datapath", _S, Datapath.PYTHON.value, "Which data plane forwards plain GRE/IPIP "
        "traffic: \"python\" (the Python data plane only), \"auto\" (the tc eBPF fast path "
        "where the kernel and capabilities allow, else python; `grebe status` and the log say "
        "which) or \"ebpf\" (the fast path or `grebe up` fails). While the program runs, a "
        "reload that changes peers needs a restart. What the program does "
        "not handle (inspected flows, ICMP errors, fragments, keepalives, the reorder policy, "
        "secure peers, [[scrub]] rules) takes the Python path either way.",
        choices=_choices(Datapath)),
    Key("", "control_socket", _S, None, "The control socket `grebe status`, `reload` and "
        "`capture` talk to: \"@name\" is an abstract unix socket (per network namespace), "
        "anything else a filesystem path (mode 0600).", default_text="\"@grebe/<tun.name>\"",
        example="\"@grebe/grebe0\""),
    Key("", "metrics_listen", _S, None, "\"host:port\" where the Prometheus text exposition "
        "is served (any GET). Unset: no metrics listener.", example="\"127.0.0.1:9108\""),
    Key("", "hosts_file", _S, None, "A hosts(5)-format file (relative to the config file) "
        "searched first for endpoint host names, before the system resolver; names are "
        "resolved at start, `grebe reload` and `grebe check-config`.",
        example="\"hosts\""),
    Key("", "peers", _L, None, "The array of `[[peers]]` tables; at least one is required.",
        required=True),
    Key("", "scrub", _L, None, "The array of `[[scrub]]` rules: prefix allow/deny lists and "
        "token-bucket rate limits per peer and per inner prefix (bridge/scrub.py); not with "
        "datapath = \"ebpf\"."),
    Key("", "inspect", _L, None, "The array of `[[inspect]]` rules selecting TCP flows for "
        "the userspace (or kernel TPROXY) inspection path."),
    # ---- [tun]
    Key("tun", "name", _S, "grebe0", "Name of the TUN interface (1-15 characters, Linux "
        "IFNAMSIZ), created by `grebe up`."),
    Key("tun", "addresses", _L, None, "Interface addresses (\"prefix/length\") given to the "
        "TUN device, IPv4 and IPv6.", example="[\"198.18.100.1/30\", \"2001:db8:100::1/64\"]"),
    Key("tun", "mtu", (int, str), "auto", "MTU of the TUN device: an integer 576..65535, or "
        "\"auto\" = the underlay MTU minus the largest peer's encapsulation overhead. With an "
        "IPv6 address it must be at least 1280.", rfc="RFC 8200 §5; RFC 8086 §5",
        lo=576, hi=65535, unit="bytes"),
    # ---- [listen]
    Key("tun", "table", _I, 4755, "Routing table of a full tunnel's default route (a peer "
        "owning 0.0.0.0/0 or ::/0), used by the rule `not fwmark <tun.fwmark> lookup "
        "<tun.table>`, as wg-quick does it; not 253-255 (the kernel's tables) and not 4754 "
        "when kernel-backend [[inspect]] rules run (their table).", lo=1, hi=0xFFFFFFFF),
    Key("tun", "fwmark", _I, 4754, "Firewall mark (SO_MARK) on grebe's own UDP sockets, so "
        "the tunnel's datagrams skip the full-tunnel table and leave by the main table.",
        lo=1, hi=0xFFFFFFFF),
    Key("listen", "address", _S, "0.0.0.0", "Local address of the UDP socket (an IP literal; "
        "\"::\" takes both families). Every peer must be reachable from its family."),
    Key("listen", "port", _I, GRE_IN_UDP_PORT, "UDP port of the plain GRE/IPIP-in-UDP "
        "socket; 4754 is the IANA GRE-in-UDP port.", rfc="RFC 8086 §3.3", lo=1, hi=65535),
    Key("listen", "secure_port", _I, SECURE_PORT, "UDP port of the authenticated and "
        "encrypted peers (docs/SECURE.md §2); must differ from `listen.port`.", lo=1, hi=65535),
    # ---- [pmtu]
    Key("pmtu", "underlay_mtu", _I, 1500, "Underlay MTU assumed for `tun.mtu = \"auto\"` when "
        "the I/O layer cannot read the real one.", lo=576, hi=65535, unit="bytes"),
    Key("pmtu", "icmp_rate", _N, 10.0, "ICMP errors (fragmentation needed / packet too big) "
        "sent toward the TUN per second: the token bucket's refill rate.",
        rfc="RFC 4443 §2.4(f); RFC 1812 §4.3.2.8", lo=0, hi=1e6, unit="per second"),
    Key("pmtu", "icmp_burst", _I, 20, "Depth of the ICMP error token bucket.", lo=0,
        hi=1_000_000),
    Key("pmtu", "fragment", _B, True, "An IPv4 inner packet without DF that does not fit the "
        "tunnel is fragmented before encapsulation (true) or dropped with an ICMP error.",
        rfc="RFC 4459 §3"),
    # ---- [[peers]]
    Key("peers", "name", _S, None, "The peer's name in status, metrics and logs; unique.",
        default_text="\"peer<i>\"", example="\"site-b\""),
    Key("peers", "endpoint", _S, None, "Where the peer's datagrams go: \"host:port\" or "
        "\"[v6]:port\"; a bare IPv6 address is refused (its last group could be a port). The "
        "host may be a name, resolved (hosts_file first, then the system resolver) at start, "
        "reload and check-config. The port defaults to 4754 (24754 for secure peers).",
        rfc="RFC 8086 §3.3",
        required=True, example="\"198.18.0.2:4754\""),
    Key("peers", "prefixes", _L, None, "Inner destination prefixes routed to this peer (strings "
        "\"net/len\"); each prefix belongs to one peer, and none may cover the peer's own "
        "endpoint, except 0.0.0.0/0 and ::/0: a full tunnel, by policy routing (tun.table, "
        "tun.fwmark).", rfc="RFC 2003 §4", example="[\"198.18.20.0/24\", \"2001:db8:20::/48\"]"),
    Key("peers", "encapsulation", _S, Encapsulation.GRE.value, "\"gre\": GRE-in-UDP (RFC 8086, "
        "GRE header per RFC 2784/2890); \"ipip\": IPIP-in-UDP in the Linux FOU layout, no "
        "header of its own (RFC 2003).", choices=_choices(Encapsulation),
        rfc="RFC 8086; RFC 2784; RFC 2003"),
    Key("peers", "key", _I, None, "GRE key for both directions (Linux `key`); peers on one "
        "host are told apart by it. Only with encapsulation = \"gre\"; not with key_in/key_out.",
        rfc="RFC 2890 §2.1", lo=0, hi=0xFFFFFFFF, unit="a 32-bit unsigned key", example="42"),
    Key("peers", "key_in", _I, None, "GRE key expected on received datagrams (Linux `ikey`).",
        rfc="RFC 2890 §2.1", lo=0, hi=0xFFFFFFFF, unit="a 32-bit unsigned key", example="1"),
    Key("peers", "key_out", _I, None, "GRE key put on sent datagrams (Linux `okey`).",
        rfc="RFC 2890 §2.1", lo=0, hi=0xFFFFFFFF, unit="a 32-bit unsigned key", example="2"),
    Key("peers", "sequence", _S, SeqPolicy.OFF.value, "GRE sequence numbers: \"off\"; "
        "\"drop-late\" (sent, and late packets dropped, gaps accepted: Linux iseq); "
        "\"reorder\" (a reordering buffer of max_packets_held for outoforder_timer_ms).",
        choices=_choices(SeqPolicy), rfc="RFC 2890 §2.2"),
    Key("peers", "max_packets_held", _I, 5, "With sequence = \"reorder\": packets held while "
        "waiting for a missing one.", rfc="RFC 2890 §2.2", lo=1, hi=4096, unit="packets"),
    Key("peers", "outoforder_timer_ms", _N, 100.0, "With sequence = \"reorder\": how long a "
        "held packet waits for the gap before it is let go (milliseconds).",
        rfc="RFC 2890 §2.2", lo=0.001, hi=60_000, unit="milliseconds"),
    Key("peers", "checksum", _B, False, "Send the GRE checksum and require it on receive.",
        rfc="RFC 2784 §2.5"),
    Key("peers", "keepalive", _N, 10.0, "Seconds between keepalives sent to the peer; 0 "
        "sends none.", lo=0, hi=86400, unit="seconds"),
    Key("peers", "dead_after", _N, None, "Seconds without any datagram from the peer after "
        "which it is down; must be above keepalive. 0: never down.", lo=0, hi=86400 * 7,
        unit="seconds", default_text="3 × keepalive", example="30"),
    Key("peers", "down_action", _S, DownAction.NONE.value, "What happens to traffic for a "
        "down peer: \"none\" (keep sending) or \"withdraw\" (drop it, counted as peer_down, "
        "and answer ICMP destination unreachable). \"withdraw\" needs dead_after > 0.",
        choices=_choices(DownAction), rfc="RFC 792; RFC 4443 §3.1"),
    Key("peers", "source_port", _S, SourcePort.FLOW_HASH.value, "UDP source port of sent "
        "datagrams: \"flow-hash\" (49152-65535 from a hash of the inner flow, entropy for "
        "ECMP) or \"fixed\" (the socket's own port).", choices=_choices(SourcePort),
        rfc="RFC 8086 §3.2.1"),
    Key("peers", "security", _S, "plain", "\"plain\" (today's wire format), \"authenticated\" "
        "or \"encrypted\" (Noise IK sessions, docs/SECURE.md).",
        choices=("plain", "authenticated", "encrypted")),
    Key("peers", "private_key_file", (str, list), None, "This endpoint's X25519 private key "
        "file (or two during a key rotation); relative to the config file's directory. "
        "Required with a secure mode.", example="\"site-a.key\""),
    Key("peers", "public_key", (str, list), None, "The peer's base64 X25519 public key (or "
        "two during a rotation). Required with a secure mode.", example="\"<base64>\""),
    Key("peers", "preshared_key_file", (str, list), None, "An optional 32-byte pre-shared key "
        "file mixed into the handshake (or two during a rotation).", example="\"ab.psk\""),
    # ---- [[inspect]] rule keys (bridge/inspect/rules.py); built-in inspectors add theirs
    Key("inspect", "name", _S, None, "The rule's unique name (flow records, status).",
        required=True, example="\"web\""),
    Key("inspect", "src", _L, None, "Source prefixes the flow must come from (empty: any).",
        example="[\"198.18.10.0/24\"]"),
    Key("inspect", "dst", _L, None, "Destination prefixes (empty: any).",
        example="[\"198.18.20.0/24\"]"),
    Key("inspect", "dst_ports", _L, None, "Destination ports or [lo, hi] ranges (empty: any).",
        example="[80, [8000, 8100]]"),
    Key("inspect", "inspectors", _L, None, "Inspectors the flow's bytes pass through, in "
        "order: built-in names or \"package.module:Class\".", example="[\"log\", \"http\"]"),
    Key("inspect", "fail_open", _B, True, "An inspector that raises lets the flow continue "
        "uninspected (true) or resets it (false)."),
    Key("inspect", "backend", _S, "userspace", "\"userspace\": the flow is terminated in "
        "grebe's own TCP stack; \"kernel\": relayed through nftables TPROXY sockets.",
        choices=("userspace", "kernel")),
    Key("inspect", "action", _S, "inspect", "\"inspect\", \"forward\" (pass untouched) or "
        "\"drop\".", choices=("inspect", "forward", "drop")),
    Key("inspect", "max_buffer", _I, 16 << 20, "Bytes buffered per direction before the "
        "sender is flow-controlled. The userspace backend's legs start at 128 KiB and "
        "autotune: the receiving leg's window up to three quarters of it (the room a lossy, "
        "long path needs above a hole), the other leg's send buffer up to a quarter; past "
        "`[userspace] memory_budget` all terminated flows are held back. Kernel-backend "
        "rules default to 1 MiB (kernel TCP autotunes its own windows).",
        default_text="16 MiB (16777216) for userspace rules, 1 MiB for kernel rules",
        lo=4096, hi=1 << 30, unit="bytes"),
    Key("inspect", "iif", _L, None, "Incoming interface names matched (backend = \"kernel\" "
        "only).", example="[\"veth0\"]"),
    Key("inspect", "idle_timeout", _N, 7200.0, "Seconds without traffic after which an "
        "inspected flow is closed (both backends). Userspace legs also send TCP keep-alives "
        "after this long idle, and a keep-alive probe from one endpoint is passed on to the "
        "other side.", lo=0, hi=7 * 86400, unit="seconds", rfc="RFC 9293 §3.8.4"),
    Key("inspect", "connect_first", _B, False, "Userspace rules only: open the server leg "
        "before answering the client's SYN, so the client sees the server's own answer (a "
        "refusal as RST to its SYN). Costs one upstream connection per SYN, which the half-open "
        "caps bound. Default: accept first, so a spoofed SYN never reaches the server; a "
        "refusing server then resets the accepted connection."),
    Key("inspect", "congestion", _S, "cubic", "Congestion control of the userspace backend's "
        "legs: \"cubic\" (RFC 9438, Linux's default) or \"newreno\" (RFC 6582).",
        choices=("cubic", "newreno"), rfc="RFC 9438"),
    # ---- [[scrub]] (read by bridge/scrub.py)
    Key("scrub", "action", _S, None, "\"deny\" drops a matching packet (counted "
        "`scrub_denied`); \"allow\" passes it, subject to `rate` (the excess counted "
        "`scrub_rate`).", choices=("allow", "deny"), required=True),
    Key("scrub", "direction", _S, "both", "\"in\": packets from a peer, after "
        "decapsulation; \"out\": packets to a peer, before encapsulation; \"both\".",
        choices=("both", "in", "out")),
    Key("scrub", "peer", _S, None, "Only packets from, or routed to, this peer (a [[peers]] "
        "name); absent: any peer.", example="\"site-b\""),
    Key("scrub", "src", _L, None, "Inner source prefixes matched; a packet of the other "
        "address family does not match. Absent: any.", example="[\"198.18.20.0/24\"]"),
    Key("scrub", "dst", _L, None, "Inner destination prefixes matched. Absent: any.",
        example="[\"198.18.10.0/24\"]"),
    Key("scrub", "rate", _N, None, "Allow rules only: packets per second admitted by a token "
        "bucket; the excess is dropped.", lo=0, hi=1e9, unit="packets per second"),
    Key("scrub", "burst", _I, None, "Depth of the token bucket (default: one second's worth "
        "of `rate`).", default_text="max(1, rate)", lo=1, hi=1e9, unit="packets"),
    Key("scrub", "bucket", _S, "peer", "\"peer\": one bucket per rule and peer; \"rule\": "
        "one bucket shared by every peer the rule matches; \"source\": one bucket per inner "
        "source address (IPv6: per /64), from a fixed table of `buckets` indexed by a keyed "
        "hash, so sources whose hashes collide share a bucket.",
        choices=("peer", "rule", "source")),
    Key("scrub", "buckets", _I, 1024, "With `bucket = \"source\"`: the size of the rule's "
        "preallocated bucket table (a power of two). Nothing a sender does adds buckets; "
        "with n busy sources each shares its bucket with about n / buckets others.",
        lo=1, hi=1 << 20, unit="buckets"),
    # ---- [userspace]
    Key("userspace", "max_splices", _I, 10_000, "Terminated flows held at once; flows whose "
        "legs are only in TIME-WAIT do not count.", lo=1, hi=10_000_000, unit="flows"),
    Key("userspace", "max_half_open", _I, 2048, "Flows whose client has not completed its "
        "handshake, in total; past it, SYN cookies (or RST when syn_cookies = false).",
        lo=0, hi=10_000_000, unit="flows", rfc="RFC 4987 §3.6"),
    Key("userspace", "max_half_open_per_prefix", _I, 512, "The half-open cap per source "
        "prefix (see prefix4/prefix6).", lo=0, hi=10_000_000, unit="flows"),
    Key("userspace", "prefix4", _I, 24, "Prefix length that groups IPv4 sources for the "
        "per-prefix half-open cap.", lo=0, hi=32, unit="bits"),
    Key("userspace", "prefix6", _I, 64, "Prefix length that groups IPv6 sources for the "
        "per-prefix half-open cap.", lo=0, hi=128, unit="bits"),
    Key("userspace", "syn_cookies", _B, True, "Past the half-open caps, answer SYNs with SYN "
        "cookies (no state kept); false: answer them with an RST. A cookie connection keeps "
        "only its MSS (no window scale, SACK or timestamps).", rfc="RFC 4987 §3.6"),
    Key("userspace", "synack_retries", _I, 5, "SYN-ACK retransmissions before a silent "
        "half-open flow ends (5: about 63 s).", lo=1, hi=10),
    Key("userspace", "memory_budget", _I, 1 << 30, "Bytes buffered across all terminated "
        "flows before back-pressure (receive windows not reopened) sets in.",
        lo=1 << 20, hi=1 << 40, unit="bytes"),
    Key("inspect", "options", (dict,), None, "Settings of `module:Class` inspectors, by the "
        "names they declare.", example="{ block_window = 8192 }"),
)

SPEC: dict[str, Key] = {k.path: k for k in KEYS}


def section_keys(section: str) -> frozenset[str]:
    """The names of one section's keys."""
    return frozenset(k.name for k in KEYS if k.section == section)


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class Reader:
    """Pops keys out of TOML tables by the table above, recording errors with their path.

    `read` is the set of table paths taken (tests compare it with `SPEC`).
    """

    __slots__ = ("file", "errors", "seen_bad", "read")

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        self.seen_bad: set[str] = set()  # key paths already reported
        self.read: set[str] = set()

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message, self.file))
        self.seen_bad.add(path)

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        """Pop the top-level table `key` ({} when absent or not a table)."""
        value = data.pop(key, {})
        if not isinstance(value, dict):
            self.error(key, "must be a table")
            return {}
        return value

    def take(self, data: dict[str, Any], spec: str, prefix: str) -> Any:
        """Pop key `spec` ("peers.keepalive") from `data`, checked by its table entry.

        Returns the value, or the entry's default when absent or wrong (the error recorded
        under `prefix` + name). A `spec` not in the table raises KeyError.
        """
        key = SPEC[spec]
        self.read.add(spec)
        if key.name not in data:
            return key.default
        value = data.pop(key.name)
        path = f"{prefix}.{key.name}" if prefix else key.name
        kinds = key.types
        if isinstance(value, bool) and bool not in kinds:
            self.error(path, f"must be {_kind_name(kinds)}, not a boolean")
            return key.default
        if not isinstance(value, kinds):
            self.error(path, f"must be {_kind_name(kinds)}, not {type(value).__name__}")
            return key.default
        if key.choices and isinstance(value, str) and value not in key.choices:
            choices = " | ".join(repr(c) for c in key.choices)
            self.error(path, f"{value!r} is not one of {choices}")
            return key.default
        if isinstance(value, int | float) and not isinstance(value, bool):
            if key.lo is not None and key.hi is not None and not key.lo <= value <= key.hi:
                unit = f" ({key.unit})" if key.unit else ""
                self.error(path, f"{value} out of range {_num(key.lo)}..{_num(key.hi)}{unit}")
                return key.default
        return value

    def take_raw(self, data: dict[str, Any], spec: str) -> tuple[bool, Any]:
        """Pop key `spec` unchecked, for parsers of their own (bridge/secure/keys.py):
        (present, value)."""
        key = SPEC[spec]
        self.read.add(spec)
        if key.name not in data:
            return False, None
        return True, data.pop(key.name)

    def unknown(self, data: dict[str, Any], prefix: str, section: str) -> None:
        """Report every key left in `data` as unknown, with the nearest known name."""
        names = sorted(section_keys(section))
        for k in data:
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            self.error(f"{prefix}.{k}" if prefix else str(k), f"unknown key{hint}")
