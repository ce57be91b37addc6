"""Scrubbing at the edge: ordered allow / deny / rate-limit rules on inner packets.

Rules:
- `[[scrub]]` tables are an ordered list; the first rule whose match fields all match a
  packet decides it (as an ACL or an nftables chain does); a packet no rule matches passes
  (end the list with a bare `action = "deny"` for a default deny).
- Match fields, each optional (absent: any): `direction` ("in": peer -> TUN, after
  decapsulation and after every check of the receive path; "out": TUN -> peer, before
  routing's TTL/MTU decisions and before encapsulation; "both", the default), `peer` (the
  peer the packet came from, or the peer its destination routes to), `src` and `dst`
  (lists of inner prefixes; a packet of the other address family does not match a list
  that has none of its family).
- `action = "deny"`: dropped, counted "scrub_denied". `action = "allow"`: passes; with
  `rate` (packets per second) and `burst` (packets, default one second's worth), only
  what conforms to a token bucket (RFC 2697's committed-rate bucket, packets for bytes)
  passes; the excess is dropped, counted "scrub_rate". One bucket per rule and peer
  (`bucket = "peer"`, the default: each peer gets the rate), one for the rule
  (`bucket = "rule"`: all peers share it), or one per inner source address (`bucket =
  "source"`: each source gets the rate), from a fixed table of `buckets` buckets per rule
  indexed by a keyed hash of the source (IPv4: the address; IPv6: its /64, which one host
  can fill with addresses, RFC 4291 §2.5.4), so a source that changes its address does not
  get a new bucket per address. Sources whose hashes collide share a bucket (and its
  rate): with n busy sources and b buckets a given source shares with about n / b others;
  the hash key is random per Scrubber, so an outsider cannot aim at another's bucket
  without seeing the drops. Buckets are preallocated (rules x (peers + 1), or `buckets`
  for a per-source rule): nothing an attacker sends creates state.
- Inbound, the rules see what a peer's sequence policy (bridge/seqpolicy.py, RFC 2890
  §2.2) delivers, in the order it delivers it: a dropped packet has still taken its place
  in the sequence, so a rate limit never makes the packets after it look late or far
  ahead (which would make drop-late discard legitimate traffic and resynchronise).
  With rules, each peer's sequence receiver is a bridge/seqpolicy.py `FilteredReceiver`
  whose filter is `Scrubber.passes_in`.
- A TSO super-packet (bridge/gso.py) is decided on its header and weighs its segment count
  in a bucket; if the bucket lacks that many tokens the whole super-packet is dropped.
- Cost: a Bridge without `[[scrub]]` has `scrub = None` and pays one branch per batch
  outbound and nothing per packet inbound (its peers keep their plain sequence receivers).
  With rules, the receive GRO fast path steps aside (every datagram takes the per-packet
  path, whose delivery the `FilteredReceiver` filters).
- Sans-I/O: `now` comes in; no clock, no per-packet objects (ints and preallocated lists).

Theory of operation: `parse_scrub` turns the TOML list into `ScrubRule`s (errors as
(key path, message) pairs, as bridge/config.py reports them); `Scrubber` compiles them into
tuples of ints (prefix value, mask) per family and evaluates them in order per packet:
`outbound` filters a batch from the TUN; `passes_in` decides what a peer's sequence
policy delivers (from a datagram, or from its reorder buffer on the timer).
Counters per rule (matched, dropped) are shown by `status()` and `prometheus()`; with one
process per direction (bridge/io/split.py) the receiving process's are added (`export`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bridge import counters as C
from bridge.configkeys import section_keys
from bridge.gso import SuperPacket

__all__ = ["Action", "Bucket", "Direction", "ScrubRule", "Scrubber", "parse_scrub"]

Buf = bytes | bytearray | memoryview
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
# one compiled prefix list per family: None = any; () = none of this family (no match)
Nets = tuple[tuple[int, int], ...] | None


class Action(Enum):
    ALLOW = "allow"
    DENY = "deny"


class Direction(Enum):
    BOTH = "both"
    IN = "in"  # peer -> TUN, after decapsulation
    OUT = "out"  # TUN -> peer, before encapsulation


class Bucket(Enum):
    PEER = "peer"  # one token bucket per rule and peer
    RULE = "rule"  # one token bucket per rule, shared by all peers
    SOURCE = "source"  # a fixed table per rule, indexed by a hash of the inner source


BUCKETS = 1024  # default table size of a `bucket = "source"` rule
BUCKETS_MAX = 1 << 20
_W = 128  # the multiply-shift hash works on 128-bit words (an IPv6 address)
_WMASK = (1 << _W) - 1


@dataclass(frozen=True, slots=True)
class ScrubRule:
    action: Action
    direction: Direction = Direction.BOTH
    peer: str | None = None
    src: tuple[IPNet, ...] | None = None
    dst: tuple[IPNet, ...] | None = None
    rate: float | None = None  # packets per second; None: no limit
    burst: int = 0  # bucket depth in packets (0 with no rate)
    bucket: Bucket = Bucket.PEER
    buckets: int = BUCKETS  # table size of a per-source rule (a power of two)


_KEYS = tuple(sorted(section_keys("scrub")))  # documented in bridge/configkeys.py


def _enum(t: dict[str, Any], key: str, kind: type[Enum], default: Any,
          errors: list[tuple[str, str]], p: str) -> Any:
    v = t.get(key, default.value if default is not None else None)
    if v is None:
        return None
    try:
        return kind(v)
    except ValueError:
        allowed = " | ".join(repr(e.value) for e in kind)
        errors.append((f"{p}.{key}", f"{v!r}: expected {allowed}"))
        return default


def _prefixes(t: dict[str, Any], key: str, errors: list[tuple[str, str]],
              p: str) -> tuple[IPNet, ...] | None:
    v = t.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        errors.append((f"{p}.{key}", "expected a non-empty list of prefixes"))
        return None
    nets: list[IPNet] = []
    for s in v:
        try:
            nets.append(ipaddress.ip_network(s, strict=True))
        except (ValueError, TypeError) as e:
            errors.append((f"{p}.{key}", f"{s!r}: {e}"))
    return tuple(nets)


def parse_scrub(raw: Any, peers: Sequence[str]) -> tuple[tuple[ScrubRule, ...],
                                                         list[tuple[str, str]]]:
    """The `[[scrub]]` list -> rules, and the errors as (key path, message)."""
    errors: list[tuple[str, str]] = []
    if raw is None:
        return (), errors
    if not isinstance(raw, list):
        return (), [("scrub", "must be a list of tables ([[scrub]])")]
    rules: list[ScrubRule] = []
    for i, t in enumerate(raw):
        p = f"scrub[{i}]"
        if not isinstance(t, dict):
            errors.append((p, "must be a table ([[scrub]])"))
            continue
        for k in t:
            if k not in _KEYS:
                errors.append((f"{p}.{k}", f"unknown key (known: {', '.join(_KEYS)})"))
        if "action" not in t:
            errors.append((f"{p}.action", "missing (\"allow\" | \"deny\")"))
        action = _enum(t, "action", Action, Action.ALLOW, errors, p)
        direction = _enum(t, "direction", Direction, Direction.BOTH, errors, p)
        bucket = _enum(t, "bucket", Bucket, Bucket.PEER, errors, p)
        peer = t.get("peer")
        if peer is not None and (not isinstance(peer, str) or peer not in peers):
            errors.append((f"{p}.peer", f"{peer!r}: no [[peers]] table has that name"))
            peer = None
        rate = t.get("rate")
        burst = t.get("burst")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
                errors.append((f"{p}.rate", f"{rate!r}: expected packets per second > 0"))
                rate = None
            elif action is Action.DENY:
                errors.append((f"{p}.rate", "only an allow rule has a rate"))
        if burst is not None:
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                errors.append((f"{p}.burst", f"{burst!r}: expected an integer >= 1"))
                burst = None
            elif rate is None:
                errors.append((f"{p}.burst", "burst needs a rate"))
        buckets = t.get("buckets", BUCKETS)
        if "buckets" in t:
            if isinstance(buckets, bool) or not isinstance(buckets, int) \
                    or not 1 <= buckets <= BUCKETS_MAX or buckets & (buckets - 1):
                errors.append((f"{p}.buckets", f"{buckets!r}: expected a power of two from 1 "
                                               f"to {BUCKETS_MAX}"))
                buckets = BUCKETS
            elif bucket is not Bucket.SOURCE or rate is None:
                errors.append((f"{p}.buckets", 'buckets needs a rate and bucket = "source"'))
        rules.append(ScrubRule(
            action=action, direction=direction, peer=peer,
            src=_prefixes(t, "src", errors, p), dst=_prefixes(t, "dst", errors, p),
            rate=float(rate) if rate is not None else None,
            burst=(burst or max(1, int(rate))) if rate is not None else 0, bucket=bucket,
            buckets=buckets))
    return tuple(rules), errors


def _compile(nets: tuple[IPNet, ...] | None, version: int) -> Nets:
    if nets is None:
        return None
    bits = 32 if version == 4 else 128
    return tuple((int(n.network_address), ((1 << n.prefixlen) - 1) << (bits - n.prefixlen))
                 for n in nets if n.version == version)


def _hit(nets: Nets, value: int) -> bool:
    if nets is None:
        return True
    for net, mask in nets:
        if value & mask == net:
            return True
    return False


class Scrubber:
    """The compiled `[[scrub]]` rules of one Bridge, their buckets and counters."""

    __slots__ = ("rules", "compiled", "npeers", "tokens", "stamps", "matched", "dropped",
                 "drops", "hash_mul", "hash_add")

    def __init__(self, rules: Sequence[ScrubRule], peer_names: Sequence[str], now: float,
                 drops: list[int], rng: Callable[[int], bytes] = os.urandom) -> None:
        self.rules = tuple(rules)
        self.npeers = len(peer_names)
        index = {n: i for i, n in enumerate(peer_names)}
        # the per-source hash: multiply-shift with a random odd multiplier (Dietzfelbinger
        # et al. 1997), keyed per Scrubber
        self.hash_mul = int.from_bytes(rng(_W // 8), "big") | 1
        self.hash_add = int.from_bytes(rng(_W // 8), "big")
        # (in?, out?, peer or -1, src4, src6, dst4, dst6, deny?, rate or 0, burst,
        #  bucket kind, first slot, hash shift); kinds 0 peer, 1 rule, 2 source
        compiled = []
        tokens: list[float] = []
        for r in self.rules:
            kind = (Bucket.PEER, Bucket.RULE, Bucket.SOURCE).index(r.bucket)
            width = (self.npeers + 1, 1, r.buckets)[kind] if r.rate else 0
            compiled.append(
                (r.direction is not Direction.OUT, r.direction is not Direction.IN,
                 index[r.peer] if r.peer is not None else -1,
                 _compile(r.src, 4), _compile(r.src, 6), _compile(r.dst, 4),
                 _compile(r.dst, 6), r.action is Action.DENY, r.rate or 0.0, float(r.burst),
                 kind, len(tokens), _W - (r.buckets.bit_length() - 1)))
            tokens += [float(r.burst)] * width  # peer kind: the +1 is outbound, no route
        self.compiled = tuple(compiled)
        self.tokens = tokens
        self.stamps = [now] * len(tokens)
        self.matched = [0] * len(self.rules)
        self.dropped = [0] * len(self.rules)
        self.drops = drops  # the Bridge's Counters.drops

    def decide(self, inbound: bool, peer: int, pkt: Buf, off: int, weight: int,
               now: float) -> int:
        """-1 if the inner packet at pkt[off:] (peer index `peer`, -1 for none) passes,
        else the drop reason (counted here). `weight`: packets it stands for."""
        v = pkt[off] >> 4
        if v == 4:
            src = int.from_bytes(pkt[off + 12:off + 16], "big")
            dst = int.from_bytes(pkt[off + 16:off + 20], "big")
        else:
            src = int.from_bytes(pkt[off + 8:off + 24], "big")
            dst = int.from_bytes(pkt[off + 24:off + 40], "big")
        for k, (rin, rout, rpeer, s4, s6, d4, d6, deny, rate, burst, kind, base, shift) in \
                enumerate(self.compiled):
            if not (rin if inbound else rout):
                continue
            if rpeer >= 0 and rpeer != peer:
                continue
            if not _hit(s4 if v == 4 else s6, src) or not _hit(d4 if v == 4 else d6, dst):
                continue
            self.matched[k] += weight
            if deny:
                self.dropped[k] += weight
                self.drops[C.R_SCRUB_DENIED] += weight
                return C.R_SCRUB_DENIED
            if rate:
                if kind == 0:
                    slot = base + peer + 1
                elif kind == 1:
                    slot = base
                else:
                    slot = base + self._hash(src if v == 4 else src >> 64, shift)
                tokens = self.tokens[slot] + (now - self.stamps[slot]) * rate
                if tokens > burst:
                    tokens = burst
                self.stamps[slot] = now
                if tokens < weight:
                    self.tokens[slot] = tokens
                    self.dropped[k] += weight
                    self.drops[C.R_SCRUB_RATE] += weight
                    return C.R_SCRUB_RATE
                self.tokens[slot] = tokens - weight
            return -1
        return -1

    def _hash(self, key: int, shift: int) -> int:
        """Multiply-shift: the top bits of (mul * key + add) mod 2**128."""
        return ((self.hash_mul * key + self.hash_add) & _WMASK) >> shift

    def source_bucket(self, k: int, pkt: Buf, off: int = 0) -> int:
        """Which bucket of per-source rule `k`'s table the inner packet at pkt[off:] uses
        (IPv6: by its source's /64). For `status` readers and tests."""
        shift = self.compiled[k][12]
        if pkt[off] >> 4 == 4:
            return self._hash(int.from_bytes(pkt[off + 12:off + 16], "big"), shift)
        return self._hash(int.from_bytes(pkt[off + 8:off + 16], "big"), shift)

    def passes_in(self, peer: int, pkt: Buf, now: float) -> bool:
        """True if the inner packet `pkt` from peer index `peer` may go to the TUN."""
        return self.decide(True, peer, pkt, 0, 1, now) < 0

    def outbound(self, packets: Iterable[Buf | SuperPacket], now: float,
                 route: Callable[[bytes], int]) -> list[Buf | SuperPacket]:
        """The packets of a batch from the TUN that pass, in order. `route(dst)` is the
        peer index a destination routes to (negative: none)."""
        kept: list[Buf | SuperPacket] = []
        decide = self.decide
        for pkt in packets:
            weight = 1
            if type(pkt) is SuperPacket:
                hdr: Buf = pkt.packet()
                weight = _segments(hdr, pkt.gso_size)
            else:
                hdr = pkt
            if len(hdr) < 20 or (hdr[0] >> 4 == 6 and len(hdr) < 40) \
                    or hdr[0] >> 4 not in (4, 6):
                kept.append(pkt)  # malformed: the pipeline counts it
                continue
            v6 = hdr[0] >> 4 == 6
            peer = route(bytes(hdr[24:40] if v6 else hdr[16:20]))
            if decide(False, peer if peer >= 0 else -1, hdr, 0, weight, now) < 0:
                kept.append(pkt)
        return kept

    def export(self) -> dict[str, list[int]]:
        """The per-rule counters, for another process to add (bridge/io/split.py)."""
        return {"matched": list(self.matched), "dropped": list(self.dropped)}

    def _plus(self, other: dict[str, list[int]] | None) -> tuple[list[int], list[int]]:
        m, d = list(self.matched), list(self.dropped)
        for mine, key in ((m, "matched"), (d, "dropped")):
            for k, v in enumerate((other or {}).get(key, [])[:len(mine)]):
                mine[k] += int(v)
        return m, d

    def status(self, other: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
        """Per rule: what it matches and its counters (for `grebe status`), plus `other`
        (`export()` of the receiving process's Scrubber, when split)."""
        matched, dropped = self._plus(other)
        out: list[dict[str, Any]] = []
        for k, r in enumerate(self.rules):
            d: dict[str, Any] = {"action": r.action.value, "direction": r.direction.value}
            if r.peer is not None:
                d["peer"] = r.peer
            if r.src is not None:
                d["src"] = [str(n) for n in r.src]
            if r.dst is not None:
                d["dst"] = [str(n) for n in r.dst]
            if r.rate is not None:
                d.update(rate=r.rate, burst=r.burst, bucket=r.bucket.value)
                if r.bucket is Bucket.SOURCE:
                    d["buckets"] = r.buckets
            d.update(matched=matched[k], dropped=dropped[k])
            out.append(d)
        return out

    def prometheus(self, other: dict[str, list[int]] | None = None,
                   prefix: str = "grebe_scrub") -> str:
        matched, dropped = self._plus(other)
        lines = [f"# HELP {prefix}_matched_total Packets a [[scrub]] rule matched.",
                 f"# TYPE {prefix}_matched_total counter"]
        lines += [f'{prefix}_matched_total{{rule="{k}"}} {v}'
                  for k, v in enumerate(matched)]
        lines += [f"# HELP {prefix}_dropped_total Packets a [[scrub]] rule dropped.",
                  f"# TYPE {prefix}_dropped_total counter"]
        lines += [f'{prefix}_dropped_total{{rule="{k}"}} {v}'
                  for k, v in enumerate(dropped)]
        return "\n".join(lines) + "\n"


def _segments(hdr: Buf, gso: int) -> int:
    """The number of segments of a TSO super-packet whose header packet is `hdr`."""
    if gso <= 0:
        return 1
    if hdr[0] >> 4 == 4:
        ihl = (hdr[0] & 15) * 4
        total = int.from_bytes(hdr[2:4], "big") or len(hdr)
    else:
        ihl = 40
        total = 40 + int.from_bytes(hdr[4:6], "big")
    total = max(total, len(hdr))
    if len(hdr) < ihl + 13:
        return 1
    doff = (hdr[ihl + 12] >> 4) * 4
    return max(1, -(-(total - ihl - doff) // gso))
