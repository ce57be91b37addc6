"""Counters of the data plane: drops by reason, per-peer traffic, events; Prometheus text.

Rules:
- A misbehaving peer never raises: every dropped packet increments exactly one drop reason
  (RFC 2890 §1.1: a silently discarded packet SHOULD be counted).
- Counters are plain ints in preallocated lists indexed by module-level constants, so the
  hot path does `counters.drops[R_TTL] += 1` and allocates nothing per packet.
- Per-peer counters are lists indexed by the peer's index in the configuration.
- `snapshot()` returns a JSON-able dict; `prometheus()` renders the Prometheus text
  exposition format 0.0.4 (`# HELP`, `# TYPE`, `name{label="v"} value`).

Theory of operation: the pipeline owns one `Counters`. Reasons and events are fixed tuples
here; their index constants (R_*, E_*) are what the pipeline uses. Rendering walks the lists
once; label values are escaped per the exposition format (backslash, quote, newline).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DROP_REASONS",
    "EVENTS",
    "EVENT_METRICS",
    "Counters",
    "R_MALFORMED",
    "R_BAD_VERSION",
    "R_BAD_FLAGS",
    "R_BAD_PROTO",
    "R_UNKNOWN_PEER",
    "R_WRONG_KEY",
    "R_SPOOFED_SOURCE",
    "R_SEQUENCE",
    "R_CHECKSUM",
    "R_TTL",
    "R_TOO_BIG",
    "R_NO_ROUTE",
    "R_LOOP",
    "R_PEER_DOWN",
    "R_LINK_LOCAL",
    "R_UNINSPECTABLE",
    "R_BAD_DESTINATION",
    "R_HAIRPIN",
    "R_INTERNAL_ERROR",
    "R_SCRUB_DENIED",
    "R_SCRUB_RATE",
    "E_ICMP_SENT",
    "E_ICMP_RATE_LIMITED",
    "E_KEEPALIVE_TX",
    "E_KEEPALIVE_RX",
    "E_FRAGMENTED",
    "E_MSS_CLAMPED",
    "E_REORDER_HELD",
    "E_REORDER_FLUSHED",
    "E_PEER_UP",
    "E_PEER_DOWN",
    "E_SEQ_RESYNC",
]

# Drop reasons; the index of each is its R_* constant below.
DROP_REASONS: tuple[str, ...] = (
    "malformed",  # truncated / inconsistent IP or GRE header, wrong inner version
    "bad_version",  # GRE version != 0 (RFC 2784 §2.3.1)
    "bad_flags",  # GRE reserved0 bits 1-5 set: R, s, recursion bit 5 (RFC 2784 §2.5)
    "bad_proto",  # GRE protocol type neither 0x0800 nor 0x86DD (nor keepalive 0)
    "unknown_peer",  # datagram from an address no peer is configured with
    "wrong_key",  # GRE K bit / key value does not match the peer's key_in (RFC 2890 §2.1)
    "spoofed_source",  # inner source outside the peer's prefixes (WireGuard AllowedIPs)
    "sequence",  # late / duplicate / missing S bit under a sequence policy (RFC 2890 §2.2)
    "checksum",  # GRE checksum wrong, or C bit presence differs from the config
    "ttl",  # TTL / hop limit exhausted (RFC 2003 §3.1)
    "too_big",  # larger than the tunnel MTU and not fragmentable (RFC 4459)
    "no_route",  # no peer prefix covers the destination
    "loop",  # destination is a tunnel endpoint (RFC 2003 §4)
    "peer_down",  # peer is down and its down_action is "withdraw"
    "link_local",  # no route, link-scope destination (the kernel's own RS/MLD on the TUN)
    "uninspectable",  # IPv6 chain not walkable to its end, addresses an [[inspect]] rule covers
    # inner destination from a peer that is no unicast host of a site: multicast, broadcast,
    # loopback, unspecified, link-local, reserved (bridge/peers.py `martian`)
    "bad_destination",
    "hairpin",  # inner destination from a peer routes back to that same peer
    # a bug raised out of the core during a batch (counted by the I/O loop, never the core):
    # each datagram / TUN packet of that batch; those handled before the exception are
    # also counted under their own outcome, the rest were lost
    "internal_error",
    "scrub_denied",  # a [[scrub]] deny rule matched (bridge/scrub.py)
    "scrub_rate",  # over a [[scrub]] allow rule's rate (token bucket, bridge/scrub.py)
)
(
    R_MALFORMED,
    R_BAD_VERSION,
    R_BAD_FLAGS,
    R_BAD_PROTO,
    R_UNKNOWN_PEER,
    R_WRONG_KEY,
    R_SPOOFED_SOURCE,
    R_SEQUENCE,
    R_CHECKSUM,
    R_TTL,
    R_TOO_BIG,
    R_NO_ROUTE,
    R_LOOP,
    R_PEER_DOWN,
    R_LINK_LOCAL,
    R_UNINSPECTABLE,
    R_BAD_DESTINATION,
    R_HAIRPIN,
    R_INTERNAL_ERROR,
    R_SCRUB_DENIED,
    R_SCRUB_RATE,
) = range(len(DROP_REASONS))

# Things that happen and are worth counting, but are not drops.
EVENTS: tuple[str, ...] = (
    "icmp_sent",
    "icmp_rate_limited",
    "keepalive_tx",
    "keepalive_rx",
    "fragmented",
    "mss_clamped",
    "reorder_held",
    "reorder_flushed",
    "peer_up",
    "peer_down",
    "seq_resync",  # a peer's numbering started anew (bridge/seqpolicy.py: a restart)
)
(
    E_ICMP_SENT,
    E_ICMP_RATE_LIMITED,
    E_KEEPALIVE_TX,
    E_KEEPALIVE_RX,
    E_FRAGMENTED,
    E_MSS_CLAMPED,
    E_REORDER_HELD,
    E_REORDER_FLUSHED,
    E_PEER_UP,
    E_PEER_DOWN,
    E_SEQ_RESYNC,
) = range(len(EVENTS))

# Prometheus: one meaning per metric. Each event is a sample of the metric that says what it
# counts (the label, when there is one, tells the two sides of one meaning apart); every
# event is in exactly one (tests/unit/bridge/test_metrics_names.py).
EVENT_METRICS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "grebe_icmp_errors_sent_total": (
        "ICMP errors (unreachable, fragmentation needed, packet too big) sent toward the TUN.",
        (("icmp_sent", ""),)),
    "grebe_icmp_errors_rate_limited_total": (
        "ICMP errors not sent because of the rate limit (pmtu.icmp_rate).",
        (("icmp_rate_limited", ""),)),
    "grebe_keepalives_total": (
        "GRE keepalives, by direction.",
        (("keepalive_tx", 'direction="sent"'), ("keepalive_rx", 'direction="received"'))),
    "grebe_fragmented_packets_total": (
        "Inner IPv4 packets fragmented before encapsulation (RFC 4459 §3).",
        (("fragmented", ""),)),
    "grebe_mss_clamped_segments_total": (
        "TCP SYN and SYN-ACK segments whose MSS option was lowered.",
        (("mss_clamped", ""),)),
    "grebe_reorder_held_packets_total": (
        "Packets held by sequence = \"reorder\" waiting for a gap (RFC 2890 §2.2).",
        (("reorder_held", ""),)),
    "grebe_reorder_flushes_total": (
        "Reorder buffer flushes (a gap given up on after outoforder_timer_ms).",
        (("reorder_flushed", ""),)),
    "grebe_peer_transitions_total": (
        "Peer liveness changes, by the state entered.",
        (("peer_up", 'state="up"'), ("peer_down", 'state="down"'))),
    "grebe_sequence_resyncs_total": (
        "Peers whose GRE sequence numbering started anew (a restart).",
        (("seq_resync", ""),)),
}

_PEER_METRICS = (
    ("rx_packets", "grebe_peer_rx_packets_total", "Inner packets received from the peer"),
    ("rx_bytes", "grebe_peer_rx_bytes_total", "UDP payload bytes received from the peer"),
    ("tx_packets", "grebe_peer_tx_packets_total", "Datagrams sent to the peer"),
    ("tx_bytes", "grebe_peer_tx_bytes_total", "UDP payload bytes sent to the peer"),
)


_LISTS = ("drops", "events", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counters:
    """Preallocated counters. Mutate the lists directly on the hot path."""

    __slots__ = ("drops", "events", "peer_names", "rx_packets", "rx_bytes", "tx_packets",
                 "tx_bytes")

    def __init__(self, peer_names: list[str] | tuple[str, ...]) -> None:
        self.drops: list[int] = [0] * len(DROP_REASONS)
        self.events: list[int] = [0] * len(EVENTS)
        self.peer_names: tuple[str, ...] = tuple(peer_names)
        n = len(self.peer_names)
        self.rx_packets: list[int] = [0] * n
        self.rx_bytes: list[int] = [0] * n
        self.tx_packets: list[int] = [0] * n
        self.tx_bytes: list[int] = [0] * n

    def drop(self, reason: str) -> int:
        """Return the count of one drop reason by name. Raises KeyError for unknown names."""
        try:
            return self.drops[DROP_REASONS.index(reason)]
        except ValueError:
            raise KeyError(reason) from None

    def event(self, name: str) -> int:
        """Return the count of one event by name. Raises KeyError for unknown names."""
        try:
            return self.events[EVENTS.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def export(self) -> dict[str, list[int]]:
        """The raw lists, JSON-able (bridge/io/split.py sends them between processes)."""
        return {k: list(getattr(self, k)) for k in _LISTS}

    def merged(self, other: dict[str, list[int]]) -> Counters:
        """A new Counters: these plus `other` (an `export()` of the same peers)."""
        m = Counters(self.peer_names)
        for k in _LISTS:
            mine: list[int] = getattr(self, k)
            theirs = other.get(k) or []
            setattr(m, k, [a + (theirs[i] if i < len(theirs) else 0)
                           for i, a in enumerate(mine)])
        return m

    @property
    def total_drops(self) -> int:
        return sum(self.drops)

    def snapshot(self) -> dict[str, Any]:
        """Return {"drops": {reason: n}, "events": {...}, "peers": {name: {...}}}."""
        peers = {
            name: {
                "rx_packets": self.rx_packets[i],
                "rx_bytes": self.rx_bytes[i],
                "tx_packets": self.tx_packets[i],
                "tx_bytes": self.tx_bytes[i],
            }
            for i, name in enumerate(self.peer_names)
        }
        return {
            "drops": dict(zip(DROP_REASONS, self.drops, strict=True)),
            "events": dict(zip(EVENTS, self.events, strict=True)),
            "peers": peers,
        }

    def prometheus(self, peer_up: list[bool] | None = None,
                   last_seen: list[float | None] | None = None) -> str:
        """Render the Prometheus text exposition (format 0.0.4), ending in a newline.

        `peer_up`, if given (one bool per peer), adds the `grebe_peer_up` gauge (0 until the
        peer is first heard); `last_seen` (Unix time of the last datagram per peer, None
        when never heard) adds `grebe_peer_last_seen_timestamp_seconds` for heard peers.
        """
        lines = [
            "# HELP grebe_drops_total Packets dropped by the data plane, by reason.",
            "# TYPE grebe_drops_total counter",
        ]
        lines += [f'grebe_drops_total{{reason="{r}"}} {n}'
                  for r, n in zip(DROP_REASONS, self.drops, strict=True)]
        for metric, (help_text, members) in EVENT_METRICS.items():
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} counter")
            for event, labels in members:
                n = self.events[EVENTS.index(event)]
                lines.append(f"{metric}{{{labels}}} {n}" if labels else f"{metric} {n}")
        for attr, metric, help_text in _PEER_METRICS:
            values: list[int] = getattr(self, attr)
            lines.append(f"# HELP {metric} {help_text}.")
            lines.append(f"# TYPE {metric} counter")
            lines += [f'{metric}{{peer="{_label(name)}"}} {values[i]}'
                      for i, name in enumerate(self.peer_names)]
        if peer_up is not None:
            lines.append("# HELP grebe_peer_up 1 if the peer was heard from within dead_after"
                         " (0 until it is first heard).")
            lines.append("# TYPE grebe_peer_up gauge")
            lines += [f'grebe_peer_up{{peer="{_label(name)}"}} {int(peer_up[i])}'
                      for i, name in enumerate(self.peer_names)]
        if last_seen is not None:
            lines.append("# HELP grebe_peer_last_seen_timestamp_seconds Unix time of the last "
                         "datagram from the peer (absent until it is first heard).")
            lines.append("# TYPE grebe_peer_last_seen_timestamp_seconds gauge")
            lines += [f'grebe_peer_last_seen_timestamp_seconds{{peer="{_label(name)}"}} '
                      f"{last_seen[i]:.3f}"
                      for i, name in enumerate(self.peer_names) if last_seen[i] is not None]
        return "\n".join(lines) + "\n"
