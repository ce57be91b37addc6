"""SecureEndpoint: the sans-I/O secure layer of one grebe endpoint (all its non-plain peers).

Rules (the wire and the reasons are in docs/SECURE.md):
- Receive, cheapest test first: prefix and exact length ("malformed"); for transport
  datagrams the receiver index ("unknown_session"), the mode ("wrong_mode"), age and counter
  limits ("expired_session"), the replay window ("replay"), then one AEAD ("bad_mac"); only
  a datagram that verified updates the window, confirms a `next` keypair or moves the peer's
  endpoint (roaming, event `Roamed`). For handshakes: mac1 (one HMAC per local identity,
  "bad_mac1"), then the load rule (mac2 or a cookie reply, "cookie_required"; per-source
  token bucket, "rate_limited"), then the DHs ("bad_handshake", "unknown_peer",
  "stale_handshake", "mode_mismatch").
- An initiation is answered at the address it came from, but that address is not learned:
  an initiation can be a replay (after a restart of ours, when no timestamp is stored), so
  only a response (bound to our fresh ephemeral key) or a transport datagram moves the
  endpoint. Cookie replies never move it (boringtun PR #489).
- Nothing a peer sends raises: every branch ends in a counted drop, a delivery, or a
  handshake step; the cryptography calls that can raise on hostile input are wrapped.
- Every drop increments exactly one `drops[reason]`; `events[name]` counts the rest.

Theory of operation: `indices` maps our 32-bit receiver indices (random) to (peer, keypair),
or (peer, None) for our pending initiation; a peer holds at most current, next,
RETIRED_MAX retired keypairs and one pending handshake, so the table is bounded by
(3 + RETIRED_MAX) x peers, and only a handshake authenticated by a configured key adds to
it. Output datagrams (handshakes, cookie replies, staged data sealed late, keepalives)
queue in `out` for `datagrams_to_send`. The load rule and cookies are bridge/secure/cookie.py's
`Guard`, which shares the counters and the output queue. The handshake steps are
bridge/secure/handshakes.py's `Handshakes`, a mixin over this state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from bridge.secure import noise
from bridge.secure.cookie import Guard
from bridge.secure.handshakes import Handshakes
from bridge.secure.keys import PeerSpec
from bridge.secure.limits import DROP_REASONS, EVENTS, Limits, new_counts
from bridge.secure.session import RETIRED_MAX, Keypair, PeerSession
from bridge.secure.wire import (
    HEADER_LEN,
    MSG_AUTHENTICATED,
    MSG_COOKIE,
    MSG_ENCRYPTED,
    MSG_INITIATION,
    MSG_RESPONSE,
    OVERHEAD,
    TAG_LEN,
    TRANSPORT,
    nonce,
)

__all__ = ["SecureEndpoint", "Roamed", "SessionStarted", "PeerRestarted", "Event"]

Addr = tuple[str, int]
Buf = bytes | bytearray | memoryview
_INF = float("inf")


@dataclass(frozen=True, slots=True)
class Roamed:
    """A verified datagram of `peer` came from `addr`: send to it from now on."""

    peer: int
    addr: Addr


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A new keypair with `peer` is in use (after a handshake, either role)."""

    peer: int
    initiator: bool


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """`peer` started afresh (its handshake said FLAG_FRESH) and the new session is
    confirmed: reset per-peer state keyed to its old life (the GRE sequence receiver).
    A replayed handshake cannot produce it: confirmation needs the new keys."""

    peer: int


Event = Roamed | SessionStarted | PeerRestarted


class SecureEndpoint(Handshakes):
    """All secure peers of one endpoint; one UDP port. Pure: no sockets, no clock."""

    def __init__(self, peers: Sequence[PeerSpec], now: float, wall_offset: float = 0.0,
                 limits: Limits | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.limits = limits or Limits()
        self.wall_offset = wall_offset  # UNIX time minus `now`, for TAI64N timestamps
        self.rng = rng
        self.peers: dict[int, PeerSession] = {}
        self.by_public: dict[bytes, PeerSession] = {}
        self.identities: dict[bytes, noise.Identity] = {}
        for spec in peers:
            p = PeerSession(spec, now)
            if not p.identities or not p.remote_publics or not p.msg_type:
                raise ValueError(f"peer {spec.name}: not a secure peer with keys")
            self.peers[spec.index] = p
            for pub in p.remote_publics:
                if pub in self.by_public:
                    raise ValueError(f"peer {spec.name}: public key used by two peers")
                self.by_public[pub] = p
            for ident in p.identities:
                self.identities.setdefault(ident.public, ident)
        self.indices: dict[int, tuple[PeerSession, Keypair | None]] = {}
        self.out: list[tuple[bytes | bytearray, Addr]] = []
        self.events_q: list[Event] = []
        self.drops = new_counts(DROP_REASONS)
        self.events = new_counts(EVENTS)
        lim = self.limits
        self.reject_msgs = lim.reject_after_messages
        self.guard = Guard(lim, now, rng, self.drops, self.events, self.out)

    @property
    def force_load(self) -> bool:
        """Set by the Bridge to require cookies at once (e.g. its receive queue is long)."""
        return self.guard.force_load

    @force_load.setter
    def force_load(self, value: bool) -> None:
        self.guard.force_load = value

    # ---- the API the Bridge calls -----------------------------------------------------

    def receive_datagram(self, data: Buf, addr: Addr, now: float) -> tuple[int, Buf] | None:
        """One datagram from the secure port. Returns (peer index, inner payload) for a
        transport datagram that verified (payload b"" for a keepalive; for authenticated
        mode a memoryview into `data`), else None (a handshake step or a counted drop)."""
        n = len(data)
        if n < 4 or data[1] or data[2] or data[3]:
            self.drops["malformed"] += 1
            return None
        t = data[0]
        if t == MSG_ENCRYPTED or t == MSG_AUTHENTICATED:
            return self._transport(data, n, t, addr, now)
        if t == MSG_INITIATION:
            self._initiation(data, addr, now)
        elif t == MSG_RESPONSE:
            self._response(data, addr, now)
        elif t == MSG_COOKIE:
            self._cookie_reply(data, now)
        else:
            self.drops["malformed"] += 1
        return None

    def seal(self, peer: int, payload: Buf, now: float) -> bytearray | None:
        """Protect one datagram for `peer`; send it to `endpoint(peer)`. None: no session
        yet, the datagram is staged (it comes out of `datagrams_to_send` later)."""
        p = self.peers[peer]
        kp = p.current
        if kp is None or now >= kp.expires or kp.send_n >= self.reject_msgs:
            self._stage(p, payload, now)
            return None
        n = kp.send_n
        kp.send_n = n + 1
        buf = bytearray(len(payload) + OVERHEAD)
        kp.seal_into(payload, memoryview(buf), 0, n)
        p.keepalive_at = _INF
        if p.unanswered_at == _INF and len(payload):
            p.unanswered_at = now
        if n + 1 == self.limits.rekey_after_messages:
            self._rekey(p, now)
        return buf

    def seal_batch(self, peer: int, run: Buf, seg: int, now: float,
                   alloc: Callable[[int], bytearray] = bytearray,
                   ) -> tuple[bytearray, int] | None:
        """Protect equal-size datagrams of `seg` bytes back to back in `run` (the last may
        be shorter: a UdpRun). Returns (datagrams of seg + OVERHEAD bytes back to back,
        that new segment size), or None if they were staged for lack of a session.
        `alloc(n)` makes the output buffer (e.g. `lambda n: UdpRun(n, seg + OVERHEAD)`, so
        the result is sent with UDP GSO as it is, without a copy)."""
        total = len(run)
        if seg <= 0 or seg > total:
            seg = max(total, 1)  # one datagram
        count = (total + seg - 1) // seg
        p = self.peers[peer]
        kp = p.sendable(now, self.limits, count)
        src = memoryview(run)
        if kp is None or count == 0:
            for off in range(0, total, seg):
                self._stage(p, src[off:off + seg], now)
            return None
        out = alloc(total + OVERHEAD * count)
        dst = memoryview(out)
        first = kp.send_n
        kp.send_n = first + count
        kp.seal_run(src, seg, dst, first)
        self._sent(p, first, count, now)
        return out, seg + OVERHEAD

    def seal_rows(self, peer: int, run: bytearray, row: int, now: float) -> bool:
        """`seal_batch` in place for an authenticated peer: `run` holds rows of `row`
        bytes (the last may be shorter), each a datagram with HEADER_LEN free bytes
        before it and TAG_LEN after (bridge/gso.py `UdpRun.head`); on True they are
        the sealed datagrams (what `seal_batch` returns for the datagrams alone). False:
        no session, each datagram was staged (copied out)."""
        total = len(run)
        count = -(-total // row)
        p = self.peers[peer]
        kp = p.sendable(now, self.limits, count)
        buf = memoryview(run)
        if kp is None or kp.msg_type != MSG_AUTHENTICATED or count == 0:
            for off in range(0, total, row):
                self._stage(p, buf[off + HEADER_LEN:min(off + row, total) - TAG_LEN], now)
            return False
        first = kp.send_n
        kp.send_n = first + count
        kp.seal_rows(buf, row, first)
        self._sent(p, first, count, now)
        return True

    def _sent(self, p: PeerSession, first: int, count: int, now: float) -> None:
        """After sealing counters first .. first + count - 1 for `p`: no keepalive is due;
        an answer is awaited; a rekey starts at rekey_after_messages."""
        p.keepalive_at = _INF
        if p.unanswered_at == _INF:
            p.unanswered_at = now
        lim = self.limits.rekey_after_messages
        if first < lim <= first + count:
            self._rekey(p, now)

    def endpoint(self, peer: int) -> Addr | None:
        """Where datagrams for `peer` go now (configured, or learned from a verified one)."""
        return self.peers[peer].endpoint

    def datagrams_to_send(self, now: float) -> list[tuple[bytes | bytearray, Addr]]:
        """Handshake messages, cookie replies, keepalives and late-sealed staged datagrams
        produced since the last call, with their destinations."""
        out = list(self.out)
        self.out.clear()  # the same list object: the guard appends cookie replies to it
        return out

    def next_event(self) -> Event | None:
        return self.events_q.pop(0) if self.events_q else None

    def get_timer(self) -> float | None:
        t = min((p.deadline(self.limits) for p in self.peers.values()), default=float("inf"))
        return None if t == float("inf") else t

    def handle_timer(self, now: float) -> None:
        lim = self.limits
        for p in self.peers.values():
            self._expire(p, now)
            if now >= p.keepalive_at:
                self._keepalive(p, now)
            if now >= p.unanswered_at + lim.silence_after:
                p.unanswered_at = _INF
                if p.pending is None and p.endpoint is not None:
                    self.events["silence_handshake"] += 1
                    self._initiate(p, now)
                    continue
            pend = p.pending
            if pend is not None:
                if now >= pend.sent_at + lim.retry_after:
                    self._initiate(p, now)
            elif p.rekey_due(now, lim):
                if p.current is not None:
                    self.events["rekey"] += 1
                self._initiate(p, now)

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """Counters and table sizes for `grebe status` / metrics (JSON-able). With `now`,
        each peer also shows the age of its session and of the last verified datagram
        (seconds, None if never), as `wg show` shows "latest handshake"."""
        def age(t: float) -> float | None:
            return None if now is None or t == -_INF else round(now - t, 3)

        return {
            "drops": dict(self.drops),
            "events": dict(self.events) | {"ratelimit_evicted": self.guard.ratelimit.evicted},
            "tables": {"indices": len(self.indices), "ratelimit": len(self.guard.ratelimit),
                       "staged": sum(len(p.staged) for p in self.peers.values())},
            "peers": {p.name: {"endpoint": p.endpoint, "session": p.current is not None,
                               "session_age": age(p.current.created) if p.current else None,
                               "last_rx_age": age(p.last_rx),
                               "handshake_pending": p.pending is not None}
                      for p in self.peers.values()},
        }

    def prometheus(self, prefix: str = "grebe_secure", more: dict[str, dict[str, int]] | None
                   = None) -> str:
        """Prometheus text (format 0.0.4) of the drop and event counters (plus `more`:
        a receiving process's "drops" and "events", bridge/io/split.py)."""
        m = more or {}
        snap_events = {k: v + m.get("events", {}).get(k, 0) for k, v in self.events.items()
                       } | {"ratelimit_evicted": self.guard.ratelimit.evicted}
        drops = {k: v + m.get("drops", {}).get(k, 0) for k, v in self.drops.items()}
        lines = [f"# HELP {prefix}_drops_total Secure-mode datagrams dropped, by reason.",
                 f"# TYPE {prefix}_drops_total counter"]
        lines += [f'{prefix}_drops_total{{reason="{k}"}} {v}' for k, v in drops.items()]
        lines += [f"# HELP {prefix}_events_total Secure-mode events that are not drops.",
                  f"# TYPE {prefix}_events_total counter"]
        lines += [f'{prefix}_events_total{{event="{k}"}} {v}' for k, v in snap_events.items()]
        return "\n".join(lines) + "\n"

    def renumber(self, sessions: Mapping[int, PeerSession]) -> None:
        """A reload (bridge/reconfig.py): `sessions` maps the new peer indices to sessions,
        kept ones (their keypairs, receiver indices and windows stay valid) or new ones.
        Each session takes its new index; the receiver indices of sessions not kept are
        forgotten; the public-key and identity tables are rebuilt. ValueError, with
        nothing changed, if two sessions share a public key."""
        by_public: dict[bytes, PeerSession] = {}
        for p in sessions.values():
            for pub in p.remote_publics:
                if by_public.setdefault(pub, p) is not p:
                    raise ValueError(f"peer {p.name}: public key used by two peers")
        for i, p in sessions.items():
            p.index = i
        live = set(map(id, sessions.values()))
        self.indices = {k: v for k, v in self.indices.items() if id(v[0]) in live}
        self.peers = dict(sessions)
        self.by_public = by_public
        self.identities = {}
        for p in sessions.values():
            for ident in p.identities:
                self.identities.setdefault(ident.public, ident)

    def set_keypairs(self, p: PeerSession, current: Keypair | None, nxt: Keypair | None,
                     retired: Sequence[Keypair]) -> None:
        """Put these keypairs in `p`'s slots (a receiving process copying its parent's,
        bridge/secure/mirror.py): the receiver indices of `p`'s keypairs not among them
        are forgotten, theirs lead to `p`."""
        keep = {kp.local for kp in (current, nxt, *retired) if kp is not None}
        for kp in p.keypairs():
            if kp.local not in keep:
                self.indices.pop(kp.local, None)
        p.current, p.next, p.retired = current, nxt, list(retired)
        for kp in p.keypairs():
            self.indices[kp.local] = (p, kp)

    # ---- transport --------------------------------------------------------------------

    def _transport(self, data: Buf, n: int, t: int, addr: Addr, now: float,
                   ) -> tuple[int, Buf] | None:
        drops = self.drops
        if n < OVERHEAD:
            drops["malformed"] += 1
            return None
        _, idx, ctr = TRANSPORT.unpack_from(data)
        entry = self.indices.get(idx)
        kp = entry[1] if entry is not None else None
        if kp is None or entry is None:
            drops["unknown_session"] += 1
            return None
        p = entry[0]
        if kp.msg_type != t:
            drops["wrong_mode"] += 1
            return None
        if now >= kp.expires or ctr >= self.reject_msgs:
            drops["expired_session"] += 1
            return None
        win = kp.window
        if ctr <= win.top and not win.check(ctr):  # in order: no call
            drops["replay"] += 1
            return None
        mv = memoryview(data)
        payload: Buf
        try:
            if t == MSG_ENCRYPTED:
                payload = kp.recv.decrypt(nonce(ctr), mv[HEADER_LEN:], mv[:HEADER_LEN])
            else:
                kp.recv.decrypt(nonce(ctr), mv[n - TAG_LEN:], mv[:n - TAG_LEN])
                payload = mv[HEADER_LEN:n - TAG_LEN]
        except InvalidTag:
            drops["bad_mac"] += 1
            return None
        win.accept(ctr)
        if kp is not p.current:
            self._received_on(p, kp, now)
        p.last_rx = now
        p.unanswered_at = _INF
        if addr != p.endpoint:
            self._roam(p, addr)
        if not len(payload):
            self.events["keepalive_rx"] += 1
            return p.index, b""
        if p.keepalive_at == _INF:
            p.keepalive_at = now + self.limits.keepalive_after
        return p.index, payload

    def _received_on(self, p: PeerSession, kp: Keypair, now: float) -> None:
        if kp is p.next:  # the initiator proved it holds the new keys: switch to them
            self.retire(p, p.current)
            p.current = kp
            p.next = None
            self.events["session_confirmed"] += 1
            self._established(p, kp, False)
            self.flush(p, now)

    def _established(self, p: PeerSession, kp: Keypair, initiator: bool) -> None:
        self.events_q.append(SessionStarted(p.index, initiator))
        if kp.peer_fresh:
            self.events["peer_restarted"] += 1
            self.events_q.append(PeerRestarted(p.index))
        p.fresh = False

    def _roam(self, p: PeerSession, addr: Addr) -> None:
        p.endpoint = addr
        self.events["roamed"] += 1
        self.events_q.append(Roamed(p.index, addr))

    def _stage(self, p: PeerSession, payload: Buf, now: float) -> None:
        if p.stage(payload, self.limits):
            self.events["staged"] += 1
        else:
            self.drops["tx_no_session"] += 1
        if p.pending is None and p.endpoint is not None:
            self._initiate(p, now)

    def flush(self, p: PeerSession, now: float) -> None:
        """Seal what was staged (the keypair is now current); a keepalive if nothing."""
        dest = p.endpoint
        if dest is None:
            return
        while p.staged:
            dgram = self.seal(p.index, p.staged.popleft(), now)
            if dgram is None:  # cannot happen right after a switch; never loop forever
                break
            self.out.append((dgram, dest))

    def _keepalive(self, p: PeerSession, now: float) -> None:
        p.keepalive_at = _INF
        if p.endpoint is None or p.sendable(now, self.limits) is None:
            return
        dgram = self.seal(p.index, b"", now)
        if dgram is not None:
            self.out.append((dgram, p.endpoint))
            self.events["keepalive_tx"] += 1

    def _forget(self, kp: Keypair | None) -> None:
        if kp is not None:
            self.indices.pop(kp.local, None)

    def retire(self, p: PeerSession, kp: Keypair | None) -> None:
        if kp is not None:
            p.retired.append(kp)
            if len(p.retired) > RETIRED_MAX:
                self._forget(p.retired.pop(0))

    def _expire(self, p: PeerSession, now: float) -> None:
        if p.current is not None and now >= p.current.expires:
            self._forget(p.current)
            p.current = None
        if p.next is not None and now >= p.next.expires:
            self._forget(p.next)
            p.next = None
        for kp in [k for k in p.retired if now >= k.expires]:
            self._forget(kp)
            p.retired.remove(kp)
