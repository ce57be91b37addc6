"""Flow selection: `[[inspect]]` rules, the FlowSelector and the per-flow verdict cache.

Rules of this module
- Pure: no sockets, no clock, no logging on the packet path. `now` is always passed in.
- A rule is chosen **once per flow, on its first SYN** (RFC 9293 §3.5: a connection starts with a
  SYN without ACK). The verdict is cached in `FlowTable` under both directions of the 4-tuple so
  the reply direction (SYN-ACK, data, FIN) finds the same decision with one dict lookup.
- A flow whose first packet we see is not a SYN is FORWARD and is never cached: connections that
  started before a rule existed (or before grebe started) pass untouched.
- FORWARD decisions are not stored either (the absence of an entry *is* FORWARD), so a flood of
  forwarded flows can never evict the entry of an inspected one from the bounded table.
- Packets are parsed by the caller (the terminator): this table sees flow keys and TCP flags,
  never packet bytes; nothing that arrives from the network raises here. The rules come
  validated from bridge/inspect/rules.py (`parse_rules`, errors name the key path).
- Rules are first-match in file order. `action = "inspect"` (default) gives INSPECT, `"forward"`
  carves out an exception before a broader rule, `"drop"` gives DROP: the flow's SYN is answered
  with an RST, as a closed port would (RFC 9293 §3.10.7.1), by whichever backend owns the rule.
- `iif` (kernel backend) limits a rule to packets arriving on those interfaces (the LAN side);
  `idle_timeout` (seconds, default 7200, Linux's keep-alive idle time, RFC 9293 §3.8.4 MUST-28)
  ends a terminated flow idle in both directions; `connect_first` (userspace) keeps the
  deferred accept (bridge/userspace/splice.py).

Theory of operation
An `InspectRule` is one `[[inspect]]` table, validated. `FlowSelector`
matches a `FlowKey` = (ip version, src bytes, dst bytes, sport, dport) against them: prefixes are
kept as (network int, mask int) pairs per family, ports as inclusive ranges. `FlowTable` wraps a
selector for the data plane: `classify(key, flags, now)` takes the key and TCP flags the
terminator read from the packet (its one header parse), looks the key up once, and only on a
pure SYN asks the selector. Entries live in an OrderedDict kept in last-seen order: a hit moves
the entry to the end, `expire(now)` pops idle ones from the front, and inserting past `max_flows`
evicts the least recently used flow (counted). An RST removes the entry after it is classified
(RFC 9293 §3.10.7: the connection is gone); a FIN shortens its idle timeout to `fin_timeout`.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

# (version, src address bytes, dst address bytes, src port, dst port): a plain tuple for speed.
FlowKey = tuple[int, bytes, bytes, int, int]

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

DEFAULT_IDLE_TIMEOUT = 7200.0
# Bytes a flow buffers per direction. 16 MiB: in each direction the receiving userspace leg's
# window autotunes up to three quarters (12 MiB) and the sending leg's send buffer up to a
# quarter (4 MiB, Linux's tcp_wmem[2]). Linux autotunes a receive window up to tcp_rmem[2]
# (32 MiB on current kernels); a 2 %-loss WAN at a gigabit keeps several MB above a hole
# for a round trip, and a 2 MiB window held such a server back a fifth of its busy time.
# Past [userspace] memory_budget all splices are held back (bridge/userspace/bounds.py).
DEFAULT_MAX_BUFFER = 16 << 20
# The kernel backend's relay (bridge/kernel/relay.py) keeps 1 MiB: kernel TCP autotunes its
# own windows, and a larger relay buffer only lets a fast server finish long before a slow client.
KERNEL_MAX_BUFFER = 1 << 20


@dataclass(frozen=True, slots=True)
class SpliceLimits:
    """The endpoint's `[userspace]` limits (bridge/config.py parses them;
    bridge/userspace/bounds.py enforces them)."""

    max_splices: int = 10_000
    max_half_open: int = 2048
    max_half_open_per_prefix: int = 512
    prefix4: int = 24
    prefix6: int = 64
    syn_cookies: bool = True
    synack_retries: int = 5  # client leg: SYN-ACK retransmissions before a half-open ends
    memory_budget: int = 1 << 30  # bytes buffered in all splices together (back-pressure)


class Verdict(Enum):
    """What the data plane does with a TCP flow."""

    FORWARD = "forward"
    INSPECT = "inspect"
    DROP = "drop"


class Backend(Enum):
    """Where an inspected flow is terminated."""

    USERSPACE = "userspace"   # grebe's own TCP stack (stack/), on the TUN path
    KERNEL = "kernel"         # nftables TPROXY + kernel sockets (bridge/kernel/relay.py)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class InspectRule:
    """One `[[inspect]]` table, validated (bridge/inspect/rules.py `parse_rules`)."""

    name: str
    src: tuple[Network, ...] = ()
    dst: tuple[Network, ...] = ()
    dst_ports: tuple[tuple[int, int], ...] = ()
    inspectors: tuple[str, ...] = ()
    fail_open: bool = True
    backend: Backend = Backend.USERSPACE
    action: Verdict = Verdict.INSPECT
    max_buffer: int = DEFAULT_MAX_BUFFER
    iif: tuple[str, ...] = ()               # kernel backend: intercept only on these interfaces
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # no byte either way for this long: reset
    connect_first: bool = False  # userspace: open the server leg before answering the SYN
    congestion: str = "cubic"               # userspace legs: "cubic" (RFC 9438) or "newreno"
    # every setting of the rule's inspectors: the values of the options they declare (parsed,
    # defaults filled in; bridge/inspect/options.py) and the rule's `options` table as written
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def matches(self, key: FlowKey) -> bool:
        """True when `key` falls inside this rule's src, dst and dst_ports (empty = any)."""
        version, src, dst, _sport, dport = key
        if self.dst_ports and not any(lo <= dport <= hi for lo, hi in self.dst_ports):
            return False
        return _in_any(version, src, self.src) and _in_any(version, dst, self.dst)


def _masks(nets: tuple[Network, ...]) -> tuple[tuple[int, int, int], ...]:
    """(version, netmask, network) as ints, for FlowSelector."""
    return tuple((n.version, int(n.netmask), int(n.network_address)) for n in nets)


def _in_any(version: int, addr: bytes, nets: tuple[Network, ...]) -> bool:
    if not nets:
        return True
    value = int.from_bytes(addr, "big")
    for net in nets:
        if net.version == version and value & int(net.netmask) == int(net.network_address):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Selection and the verdict cache
# ---------------------------------------------------------------------------------------------

SelectHook = Callable[[FlowKey, Verdict, "InspectRule | None"],
                      "tuple[Verdict, InspectRule | None]"]


class FlowSelector:
    """First-match rule lookup.

    `hook`, if given, may override each decision (mitmproxy's next_layer).
    """

    __slots__ = ("rules", "hook", "_match")

    def __init__(self, rules: tuple[InspectRule, ...], hook: SelectHook | None = None) -> None:
        self.rules = rules
        self.hook = hook
        # each rule's ports and prefixes as plain ints, once (InspectRule.matches reads the
        # ipaddress objects' properties on every call: ~1 µs per prefix on a new flow's SYN)
        self._match = tuple((r, r.dst_ports, _masks(r.src), _masks(r.dst)) for r in rules)

    def classify(self, key: FlowKey) -> tuple[Verdict, InspectRule | None]:
        """Return (verdict, matching rule or None). No rule matching -> (FORWARD, None)."""
        verdict, found = Verdict.FORWARD, None
        version, src, dst, _sport, dport = key
        s = d = -1
        for rule, ports, srcs, dsts in self._match:
            if ports and not any(lo <= dport <= hi for lo, hi in ports):
                continue
            if srcs:
                if s < 0:
                    s = int.from_bytes(src, "big")
                if not any(v == version and s & m == n for v, m, n in srcs):
                    continue
            if dsts:
                if d < 0:
                    d = int.from_bytes(dst, "big")
                if not any(v == version and d & m == n for v, m, n in dsts):
                    continue
            verdict, found = rule.action, rule
            break
        if self.hook is not None:
            verdict, found = self.hook(key, verdict, found)
        return verdict, found

    def covers(self, version: int, src: bytes, dst: bytes) -> bool:
        """True when a rule that does not forward (inspect or drop, either backend) covers
        these addresses whatever the ports: for packets whose ports cannot be read
        (bridge/mss.py `uninspectable`). Forward carve-outs are not trusted without ports."""
        s, d = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
        for rule, _ports, srcs, dsts in self._match:
            if rule.action is Verdict.FORWARD:
                continue
            if srcs and not any(v == version and s & m == n for v, m, n in srcs):
                continue
            if dsts and not any(v == version and d & m == n for v, m, n in dsts):
                continue
            return True
        return False


def selector_for(rules: tuple[InspectRule, ...], backend: Backend,
                 hook: SelectHook | None = None) -> FlowSelector:
    """A selector for one termination backend.

    Rules of the other backend keep their place in the first-match order but become FORWARD
    carve-outs: the userspace pipeline must forward (not terminate) the flows the kernel TPROXY
    backend terminates, including the kernel relay's own upstream connections, and the kernel
    backend must leave the userspace rules' flows alone.
    """
    mine = tuple(r if r.backend is backend or r.action is Verdict.FORWARD
                 else replace(r, action=Verdict.FORWARD) for r in rules)
    return FlowSelector(mine, hook)


def flow_key(src: str, dst: str, sport: int, dport: int) -> FlowKey:
    """Build a FlowKey from textual addresses (for adapters that have sockets, not packets)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("src and dst must be the same IP version")
    return (s.version, s.packed, d.packed, sport, dport)


def reverse_key(key: FlowKey) -> FlowKey:
    """The key of the reply direction."""
    return (key[0], key[2], key[1], key[4], key[3])


class FlowTable:
    """Verdict cache for the data plane. Entries are [verdict, rule, last_seen, timeout, key]."""

    def __init__(self, selector: FlowSelector, *, max_flows: int = 65536,
                 idle_timeout: float = 300.0, fin_timeout: float = 30.0) -> None:
        if max_flows < 1 or idle_timeout <= 0 or fin_timeout <= 0:
            raise ValueError("max_flows, idle_timeout and fin_timeout must be positive")
        self.selector = selector
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.fin_timeout = fin_timeout
        self._table: OrderedDict[FlowKey, list[Any]] = OrderedDict()
        self.counters: dict[str, int] = dict.fromkeys(
            ("syn_classified", "forward", "inspect", "drop", "midstream", "expired", "evicted",
             "reset"), 0)

    def __len__(self) -> int:
        """Number of cached flows (each flow is stored under both directions)."""
        return len(self._table) // 2

    def set_selector(self, selector: FlowSelector) -> None:
        """Hot reload: new SYNs use the new rules; cached flows keep their decision."""
        self.selector = selector

    def lookup(self, key: FlowKey) -> tuple[Verdict, InspectRule | None] | None:
        """The cached decision for a flow (either direction), or None when not cached."""
        entry = self._table.get(key)
        return None if entry is None else (entry[0], entry[1])

    def classify(self, key: FlowKey, flags: int, now: float) -> Verdict:
        """Decide for one TCP segment of flow `key` with TCP `flags`. See the module docstring."""
        entry = self._table.get(key)
        if entry is not None:
            return self._hit(key, entry, flags, now)
        if flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN:
            self.counters["midstream"] += 1
            return Verdict.FORWARD
        return self._new(key, now)

    def _hit(self, key: FlowKey, entry: list[Any], flags: int, now: float) -> Verdict:
        table = self._table
        entry[2] = now
        table.move_to_end(key)
        table.move_to_end(reverse_key(key))
        if flags & TCP_RST:
            self._remove(entry)
            self.counters["reset"] += 1
        elif flags & TCP_FIN:
            entry[3] = self.fin_timeout
        verdict: Verdict = entry[0]
        return verdict

    def _new(self, key: FlowKey, now: float) -> Verdict:
        table = self._table
        self.counters["syn_classified"] += 1
        verdict, rule = self.selector.classify(key)
        if verdict is Verdict.FORWARD:
            self.counters["forward"] += 1
            return verdict
        self.counters[verdict.value] += 1
        self.expire(now)
        while len(table) >= 2 * self.max_flows:
            _, oldest = table.popitem(last=False)
            self._remove(oldest)
            self.counters["evicted"] += 1
        entry = [verdict, rule, now, self.idle_timeout, key]
        table[key] = entry
        table[reverse_key(key)] = entry
        return verdict

    def expire(self, now: float) -> int:
        """Drop entries idle past their timeout; returns how many flows expired."""
        table = self._table
        gone = 0
        while table:
            entry = next(iter(table.values()))
            if entry[2] + entry[3] > now:
                # Entries with the short FIN timeout may hide behind a younger one: they go
                # when they reach the front, which bounds the table all the same.
                break
            self._remove(entry)
            gone += 1
        self.counters["expired"] += gone
        return gone

    def next_expiry(self) -> float | None:
        """When `expire` next has work (the oldest entry's deadline), or None if empty."""
        if not self._table:
            return None
        entry = next(iter(self._table.values()))
        deadline: float = entry[2] + entry[3]
        return deadline

    def remove(self, key: FlowKey) -> None:
        """Forget a flow (both directions); unknown keys are ignored."""
        entry = self._table.get(key)
        if entry is not None:
            self._remove(entry)

    def _remove(self, entry: list[Any]) -> None:
        key = entry[4]
        self._table.pop(key, None)
        self._table.pop(reverse_key(key), None)

    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-able list of cached flows, one per connection, for `grebe flows`."""
        out = []
        for key, entry in self._table.items():
            if key != entry[4]:
                continue
            version, src, dst, sport, dport = key
            out.append({
                "src": str(ipaddress.ip_address(src)), "sport": sport,
                "dst": str(ipaddress.ip_address(dst)), "dport": dport, "ip": version,
                "verdict": entry[0].value, "rule": entry[1].name if entry[1] else None,
                "last_seen": entry[2],
            })
        return out
