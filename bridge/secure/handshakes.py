"""The handshake half of SecureEndpoint (a mixin: bridge/secure/endpoint.py owns the state).

Rules (the messages and their checks are in docs/SECURE.md):
- An initiation is taken only after mac1 (one HMAC per local identity), the load rule
  (bridge/secure/cookie.py `Guard`: mac2 or a cookie reply, a per-source token bucket) and
  the Noise IK steps (bridge/secure/noise.py); its TAI64N timestamp must be newer than the
  peer's last one, so a replayed initiation is "stale_handshake".
- A response is taken only for our pending initiation (its receiver index) and binds our
  fresh ephemeral key: only it, never an initiation, moves a peer's endpoint.
- Receiver indices are random 32-bit numbers not already in `indices` (`_new_index`).
- Nothing a peer sends raises: the cryptography calls that can raise on hostile input are
  wrapped, and every failure is one counted drop.

Theory of operation: `_initiate` builds and queues an initiation (and a fresh pending
state), `_initiation` answers one with a response and installs the responder's `next`
keypair (confirmed by the first transport datagram, endpoint.py `_received_on`),
`_response` completes ours and makes the keypair current, `_cookie_reply` stores a cookie
for the next mac2. The endpoint calls them from `receive_datagram` and its timers.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.constant_time import bytes_eq

from bridge.secure import noise
from bridge.secure.cookie import Guard, open_cookie_reply
from bridge.secure.limits import Limits
from bridge.secure.session import Keypair, PeerSession, Pending
from bridge.secure.wire import (
    COOKIE_HEAD,
    COOKIE_LEN,
    FLAG_FRESH,
    INIT_EPH_AT,
    INIT_HEAD,
    INIT_MAC1_AT,
    INIT_STATIC_AT,
    INIT_TS_AT,
    INITIATION_LEN,
    MAC_LEN,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESP_EPH_AT,
    RESP_HEAD,
    RESP_MAC1_AT,
    RESP_PAYLOAD_AT,
    RESPONSE_LEN,
    tai64n,
)

__all__ = ["Handshakes"]

Addr = tuple[str, int]
Buf = bytes | bytearray | memoryview

_ZERO_MAC = bytes(MAC_LEN)
_INF = float("inf")


class Handshakes:
    """SecureEndpoint's handshake methods; the attributes are the endpoint's."""

    limits: Limits
    wall_offset: float
    rng: Callable[[int], bytes]
    by_public: dict[bytes, PeerSession]
    identities: dict[bytes, noise.Identity]
    indices: dict[int, tuple[PeerSession, Keypair | None]]
    out: list[tuple[bytes | bytearray, Addr]]
    drops: dict[str, int]
    events: dict[str, int]
    guard: Guard

    # the endpoint's (bridge/secure/endpoint.py)
    def _established(self, p: PeerSession, kp: Keypair, initiator: bool) -> None:
        raise NotImplementedError

    def _forget(self, kp: Keypair | None) -> None:
        raise NotImplementedError

    def _keepalive(self, p: PeerSession, now: float) -> None:
        raise NotImplementedError

    def _roam(self, p: PeerSession, addr: Addr) -> None:
        raise NotImplementedError

    def flush(self, p: PeerSession, now: float) -> None:
        raise NotImplementedError

    def retire(self, p: PeerSession, kp: Keypair | None) -> None:
        raise NotImplementedError

    def _new_index(self, p: PeerSession, kp: Keypair | None) -> int:
        while True:
            idx = int.from_bytes(self.rng(4), "big")
            if idx not in self.indices:
                self.indices[idx] = (p, kp)
                return idx

    def _rekey(self, p: PeerSession, now: float) -> None:
        if p.pending is None and p.endpoint is not None:
            self.events["rekey"] += 1
            self._initiate(p, now)

    def _initiate(self, p: PeerSession, now: float) -> None:
        dest = p.endpoint
        if dest is None:
            return
        if p.pending is not None:
            self.indices.pop(p.pending.local, None)
            p.pending = None
        me = p.identities[0]
        remote = p.remote_publics[0]
        eph = X25519PrivateKey.generate()
        flags = FLAG_FRESH if p.fresh else 0
        payload = tai64n(now + self.wall_offset) + bytes((p.msg_type, flags, 0, 0))
        st, e_pub, enc_static, enc_payload = noise.initiation(me, remote, p.ss(me, remote), eph,
                                                              payload)
        local = self._new_index(p, None)
        msg = bytearray(INIT_HEAD.pack(MSG_INITIATION, local))
        msg += e_pub
        msg += enc_static
        msg += enc_payload
        self._macs(p, msg, remote, now)
        p.pending = Pending(st, eph, local, now, me, remote)
        p.next_attempt = now + self.limits.retry_after
        self.out.append((msg, dest))
        self.events["handshake_initiated"] += 1

    def _macs(self, p: PeerSession, msg: bytearray, remote: bytes, now: float) -> None:
        """Append mac1 (and mac2 if we hold a fresh cookie from that peer)."""
        m1 = noise.mac(p.mac1_keys.get(remote) or noise.mac1_key(remote), msg)
        msg += m1
        p.last_mac1 = m1
        p.last_mac1_public = remote
        cookie = p.cookie
        if cookie is not None and now - p.cookie_at < self.limits.cookie_valid:
            msg += noise.mac(cookie, msg)
        else:
            msg += _ZERO_MAC

    def _mac1_identity(self, mv: memoryview, at: int) -> noise.Identity | None:
        got = mv[at:at + MAC_LEN]
        for ident in self.identities.values():
            if bytes_eq(noise.mac(ident.mac1_key, mv[:at]), bytes(got)):
                return ident
        return None

    def _initiation(self, data: Buf, addr: Addr, now: float) -> None:
        drops = self.drops
        if len(data) != INITIATION_LEN:
            drops["malformed"] += 1
            return
        mv = memoryview(data)
        ident = self._mac1_identity(mv, INIT_MAC1_AT)
        if ident is None:
            drops["bad_mac1"] += 1
            return
        sender = INIT_HEAD.unpack_from(mv)[1]
        if not self.guard.admit(mv, INIT_MAC1_AT, sender, ident, addr, now):
            return
        e_i = bytes(mv[INIT_EPH_AT:INIT_STATIC_AT])
        try:
            st, static = noise.consume_initiation(ident, e_i, bytes(mv[INIT_STATIC_AT:INIT_TS_AT]))
        except (InvalidTag, ValueError):
            drops["bad_handshake"] += 1
            return
        p = self.by_public.get(static)
        if p is None or ident not in p.identities:
            drops["unknown_peer"] += 1
            return
        try:
            st, payload = noise.consume_initiation_payload(
                st, p.ss(ident, static), bytes(mv[INIT_TS_AT:INIT_MAC1_AT]))
        except (InvalidTag, ValueError):
            drops["bad_handshake"] += 1
            return
        ts, mode, flags = payload[:12], payload[12], payload[13]
        if ts <= p.last_ts:
            drops["stale_handshake"] += 1
            return
        if mode != p.msg_type:
            drops["mode_mismatch"] += 1
            return
        p.last_ts = ts
        eph = X25519PrivateKey.generate()
        try:
            e_r, enc, k_send, k_recv = noise.response(
                st, e_i, static, eph, p.psks[0], bytes((FLAG_FRESH if p.fresh else 0, 0, 0, 0)))
        except ValueError:
            drops["bad_handshake"] += 1
            return
        kp = Keypair(k_send, k_recv, 0, sender, now, False, p.msg_type,
                     now + self.limits.reject_after_time)
        kp.local = self._new_index(p, kp)
        kp.peer_fresh = bool(flags & FLAG_FRESH)
        self._forget(p.next)
        p.next = kp
        msg = bytearray(RESP_HEAD.pack(MSG_RESPONSE, kp.local, sender))
        msg += e_r
        msg += enc
        self._macs(p, msg, static, now)
        self.out.append((msg, addr))
        self.events["handshake_responded"] += 1

    def _response(self, data: Buf, addr: Addr, now: float) -> None:
        drops = self.drops
        if len(data) != RESPONSE_LEN:
            drops["malformed"] += 1
            return
        mv = memoryview(data)
        _, sender, receiver = RESP_HEAD.unpack_from(mv)
        entry = self.indices.get(receiver)
        p = entry[0] if entry is not None and entry[1] is None else None
        pend = p.pending if p is not None else None
        if p is None or pend is None or pend.local != receiver:
            drops["unknown_session"] += 1
            return
        if not bytes_eq(noise.mac(pend.identity.mac1_key, mv[:RESP_MAC1_AT]),
                        bytes(mv[RESP_MAC1_AT:RESP_MAC1_AT + MAC_LEN])):
            drops["bad_mac1"] += 1
            return
        if not self.guard.admit(mv, RESP_MAC1_AT, sender, pend.identity, addr, now):
            return
        try:
            k_send, k_recv, payload = noise.consume_response(
                pend.state, pend.identity, pend.ephemeral,
                bytes(mv[RESP_EPH_AT:RESP_PAYLOAD_AT]), bytes(mv[RESP_PAYLOAD_AT:RESP_MAC1_AT]),
                p.psks)
        except (InvalidTag, ValueError):
            drops["bad_handshake"] += 1
            return
        kp = Keypair(k_send, k_recv, receiver, sender, now, True, p.msg_type,
                     now + self.limits.reject_after_time)
        self.indices[receiver] = (p, kp)
        p.pending = None
        p.last_rx = now
        p.unanswered_at = _INF
        self.retire(p, p.current)
        self.retire(p, p.next)  # a crossed rekey: the peer may still send on it
        p.next = None
        p.current = kp
        kp.peer_fresh = bool(payload[:1]) and bool(payload[0] & FLAG_FRESH)
        self.events["handshake_completed"] += 1
        self._established(p, kp, True)
        if addr != p.endpoint:
            self._roam(p, addr)
        if p.staged:
            self.flush(p, now)
        else:
            self._keepalive(p, now)

    def _cookie_reply(self, data: Buf, now: float) -> None:
        if len(data) != COOKIE_LEN:
            self.drops["malformed"] += 1
            return
        mv = memoryview(data)
        entry = self.indices.get(COOKIE_HEAD.unpack_from(mv)[1])
        mac1 = entry[0].last_mac1 if entry is not None else None
        if entry is None or mac1 is None:
            self.drops["unknown_session"] += 1
            return
        p = entry[0]
        cookie = open_cookie_reply(mv, p.last_mac1_public, mac1)
        if cookie is None:
            self.drops["bad_cookie"] += 1
            return
        p.cookie = cookie
        p.cookie_at = now
        self.events["cookie_received"] += 1
