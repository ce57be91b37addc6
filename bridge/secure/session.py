"""Per-peer session state: keypairs (current, next, retired), the pending handshake, timers.

Rules:
- Keypair slots after WireGuard (whitepaper §6.2, wireguard-go device/keypair.go):
  `current` is what we send with; `next` is a responder's new keypair that it may not
  send with until the initiator proves it has it: the first transport datagram that
  verifies under `next` confirms it (current is retired, next becomes current). An
  initiator's new keypair becomes `current` as soon as the response verifies (the response
  proves the responder has it), and the initiator sends at once (a keepalive if nothing is
  staged), so the responder confirms within one one-way trip.
- One change from WireGuard, which keeps a single `previous` and deletes the current
  keypair when an initiator completes while a `next` is pending (both sides rekeying at
  once): here every displaced keypair is *retired*, still accepted on receive, up to
  RETIRED_MAX of them (oldest forgotten first) and each only until its reject time, so a
  datagram in flight across any rekey, crossed ones included, is not lost.
- A keypair is refused, in both directions, `reject_after_time` after its handshake or at
  `reject_after_messages`; a new handshake starts before, at `rekey_after_time` (initiator;
  the responder `responder_rekey_delay` later, so both do not rekey at once) or at
  `rekey_after_messages`. No counter value is ever sent twice under one key: `send_n` only
  grows and sealing stops at the reject limit.
- Our own pending initiation and keypairs created as responder live in separate slots, so
  consuming an initiation (even a replayed one after a restart, which the timestamp check
  cannot catch then) never destroys the handshake we are waiting on.
- Outbound datagrams arriving while no keypair can send are staged (at most `staged_max`,
  oldest dropped and counted) and sealed when a keypair becomes current.

Theory of operation: `Keypair.seal_into` writes header + protected payload into a caller's
buffer with one AEAD call (`encrypt_into`), so a batch of equal-size datagrams becomes one
bytearray with no per-datagram objects. `PeerSession.deadline()` is the earliest time the
endpoint's `handle_timer` has work for this peer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.secure.keys import PeerSpec
from bridge.secure.limits import Limits
from bridge.secure.noise import Handshake, Identity, dh, mac1_key
from bridge.secure.replay import ReplayWindow
from bridge.secure.wire import HEADER_LEN, MSG_AUTHENTICATED, OVERHEAD, TAG_LEN, TRANSPORT, nonce

__all__ = ["Keypair", "Pending", "PeerSession", "RETIRED_MAX"]

RETIRED_MAX = 3

Addr = tuple[str, int]
_INF = float("inf")


class Keypair:
    """One session: a key and counter per direction, the receive window."""

    __slots__ = ("send", "recv", "recv_key", "send_n", "local", "remote", "created",
                 "expires", "initiator", "msg_type", "window", "peer_fresh")

    def __init__(self, send_key: bytes, recv_key: bytes, local: int, remote: int,
                 created: float, initiator: bool, msg_type: int, expires: float) -> None:
        self.send = AESGCM(send_key)
        self.recv = AESGCM(recv_key)
        self.recv_key = recv_key  # handed to a receiving process (bridge/secure/mirror.py)
        self.send_n = 0
        self.local = local  # our receiver index (what the peer writes in its header)
        self.remote = remote  # the peer's receiver index (what we write)
        self.created = created
        self.expires = expires  # created + reject_after_time: refused from then on
        self.initiator = initiator
        self.msg_type = msg_type
        self.window = ReplayWindow()
        self.peer_fresh = False  # the peer said FLAG_FRESH in this keypair's handshake

    def seal_into(self, payload: bytes | bytearray | memoryview, out: memoryview, at: int,
                  counter: int) -> int:
        """Write header + protected `payload` at out[at:]; return the bytes written."""
        n = len(payload)
        end = at + HEADER_LEN + n
        TRANSPORT.pack_into(out, at, self.msg_type, self.remote, counter)
        if self.msg_type == MSG_AUTHENTICATED:
            out[at + HEADER_LEN:end] = payload
            self.send.encrypt_into(nonce(counter), b"", out[at:end], out[end:end + TAG_LEN])
        else:
            self.send.encrypt_into(nonce(counter), payload, out[at:at + HEADER_LEN],
                                   out[at + HEADER_LEN:end + TAG_LEN])
        return HEADER_LEN + n + TAG_LEN

    def seal_run(self, src: memoryview, seg: int, out: memoryview, first: int) -> None:
        """`seal_into` for every `seg`-byte datagram of `src` (the last may be shorter),
        counters first, first + 1, ...; out has room for len(src) + OVERHEAD per datagram.
        Per datagram: one struct pack_into for the header (0.1 µs; numpy rows cost 6.5 µs
        per batch of 8, more than packing them up to ~60 rows) and the AEAD call, the calls
        made by one `map` over lists of slices (no Python loop body around them).
        Authenticated: the payloads are copied with one numpy copy and the tags (GMAC of
        header + payload, made as bytes: one output slice fewer per datagram) put in place
        with another. The per-datagram cost of a 64 KB run is then little more than the
        primitive's (tests/sim/bench_aead_floor.py)."""
        total = len(src)
        t = self.msg_type
        remote = self.remote
        pack = TRANSPORT.pack_into
        full = total // seg
        row = seg + OVERHEAD
        ctr = first
        for at in range(0, full * row, row):  # the headers first
            pack(out, at, t, remote, ctr)
            ctr += 1
        ats = range(0, full * row, row)
        nonces = map(nonce, range(first, first + full))
        if t == MSG_AUTHENTICATED and full:
            rows = np.frombuffer(out, np.uint8, full * row).reshape(full, row)
            rows[:, HEADER_LEN:HEADER_LEN + seg] = np.frombuffer(
                src, np.uint8, full * seg).reshape(full, seg)
            inner = HEADER_LEN + seg
            tags = b"".join(map(self.send.encrypt, nonces, repeat(b"", full),
                                [out[at:at + inner] for at in ats]))
            rows[:, inner:] = np.frombuffer(tags, np.uint8).reshape(full, TAG_LEN)
        elif full:  # one `map` of AEAD calls: no Python loop body per datagram
            for _ in map(self.send.encrypt_into, nonces,
                         [src[off:off + seg] for off in range(0, full * seg, seg)],
                         [out[at:at + HEADER_LEN] for at in ats],
                         [out[at + HEADER_LEN:at + row] for at in ats]):
                pass
        if full * seg < total:  # the shorter last one
            self.seal_into(src[full * seg:], out, full * row, first + full)

    def seal_rows(self, buf: memoryview, row: int, first: int) -> None:
        """Authenticated mode, in place: `buf` holds rows of `row` bytes (the last may be
        shorter), each a datagram with HEADER_LEN free bytes before it and TAG_LEN after
        (bridge/gso.py `UdpRun.head`); write each row's header (counters first, first +
        1, ...) and tag, so the rows become the datagrams `seal_run` would make of the
        payloads, with no second buffer and no payload copy."""
        total = len(buf)
        full = total // row
        t = self.msg_type
        remote = self.remote
        pack = TRANSPORT.pack_into
        ctr = first
        for at in range(0, total, row):  # the headers first, the short last row's too
            pack(buf, at, t, remote, ctr)
            ctr += 1
        ad = row - TAG_LEN
        if full:
            tags = b"".join(map(self.send.encrypt, map(nonce, range(first, first + full)),
                                repeat(b"", full), [buf[at:at + ad] for at in
                                                    range(0, full * row, row)]))
            np.frombuffer(buf, np.uint8, full * row).reshape(full, row)[:, ad:] = \
                np.frombuffer(tags, np.uint8).reshape(full, TAG_LEN)
        if full * row < total:  # the shorter last one
            buf[total - TAG_LEN:] = self.send.encrypt(nonce(first + full), b"",
                                                      buf[full * row:total - TAG_LEN])

    def open_run(self, src: memoryview, seg: int, out: memoryview, reject: int) -> int:
        """Verify and open the transport datagrams of `seg` bytes back to back in `src` (a
        UDP GRO batch; the last may be shorter) into `out`, payloads back to back (seg -
        OVERHEAD each). Every datagram must carry the first one's type and receiver index
        (this keypair's: the caller checked the first). Stops, having changed nothing for
        it, at the first that is not, is too short, is at or over the `reject` counter, is
        a replay (the window) or fails its tag: the per-datagram path then takes it from
        there and counts it. Returns how many were opened (the window accepted them). For
        encrypted mode `decrypt_into` writes the plaintext in place: no copy per datagram."""
        total = len(src)
        head = bytes(src[:8])  # type, three zero bytes, receiver index
        win = self.window
        auth = self.msg_type == MSG_AUTHENTICATED
        dec = self.recv.decrypt
        dec_into = self.recv.decrypt_into
        unpack = TRANSPORT.unpack_from
        done = at = start = 0
        first = unpack(src, 0)[2]
        full = total // seg
        if full > 1 and first > win.top and first + full <= reject:
            # in order and all new (the usual batch): counters first, first + 1, ... are
            # assumed, and each tag proves it, since the header (its counter included) is
            # associated data and the nonce is the assumed counter's: a datagram with any
            # other counter, index or type fails here and the loop below takes it
            # one `map` over the AEAD call: no Python loop body per datagram but a count;
            # the first InvalidTag ends it with `done` the number that verified
            inner = seg - OVERHEAD
            offs = range(0, full * seg, seg)
            nonces = map(nonce, range(first, first + full))
            try:
                if auth:
                    ad = seg - TAG_LEN
                    for _ in map(dec, nonces, [src[o + ad:o + seg] for o in offs],
                                 [src[o:o + ad] for o in offs]):
                        done += 1
                else:
                    for _ in map(dec_into, nonces, [src[o + HEADER_LEN:o + seg] for o in offs],
                                 [src[o:o + HEADER_LEN] for o in offs],
                                 [out[o:o + inner] for o in range(0, full * inner, inner)]):
                        done += 1
            except InvalidTag:
                pass
            at = done * inner
            if done:
                win.accept_run(first, first + done - 1)
            start = done * seg
        for off in range(start, total, seg):
            n = seg if off + seg <= total else total - off
            if n <= OVERHEAD or src[off:off + 8] != head:
                break
            ctr = unpack(src, off)[2]
            if ctr >= reject or (ctr <= win.top and not win.check(ctr)):
                break
            end = at + n - OVERHEAD
            try:
                if auth:  # the tag covers header and payload as associated data
                    dec(nonce(ctr), src[off + n - TAG_LEN:off + n], src[off:off + n - TAG_LEN])
                else:
                    dec_into(nonce(ctr), src[off + HEADER_LEN:off + n],
                             src[off:off + HEADER_LEN], out[at:end])
            except InvalidTag:
                break
            win.accept(ctr)
            at = end
            done += 1
        if auth and done:  # the payloads of what verified, with one numpy copy
            full = min(done, total // seg)
            inner = seg - OVERHEAD
            if full:
                np.frombuffer(out, np.uint8, full * inner).reshape(full, inner)[:] = \
                    np.frombuffer(src, np.uint8, full * seg).reshape(full, seg)[
                        :, HEADER_LEN:seg - TAG_LEN]
            if done > full:  # the shorter last one
                off = full * seg
                out[full * inner:at] = src[off + HEADER_LEN:total - TAG_LEN]
        return done


@dataclass(frozen=True, slots=True)
class Pending:
    """Our initiation in flight."""

    state: Handshake
    ephemeral: X25519PrivateKey
    local: int
    sent_at: float
    identity: Identity
    remote_public: bytes


class PeerSession:
    """Everything the endpoint knows about one non-plain peer."""

    __slots__ = ("index", "name", "msg_type", "identities", "remote_publics", "psks",
                 "endpoint", "current", "retired", "next", "last_ts", "pending",
                 "next_attempt", "last_mac1", "last_mac1_public", "cookie", "cookie_at",
                 "staged", "ss_cache", "mac1_keys", "last_rx", "keepalive_at", "unanswered_at",
                 "fresh")

    def __init__(self, spec: PeerSpec, now: float) -> None:
        sec = spec.security
        self.index = spec.index
        self.name = spec.name
        self.msg_type = sec.mode.msg_type
        self.identities = tuple(Identity(X25519PrivateKey.from_private_bytes(k))
                                for k in sec.private_keys)
        self.remote_publics = sec.public_keys
        self.psks = sec.psks or (bytes(32),)
        self.endpoint: Addr | None = spec.endpoint
        self.current: Keypair | None = None
        self.retired: list[Keypair] = []  # displaced, still accepted; oldest first
        self.next: Keypair | None = None
        self.last_ts = b""  # greatest TAI64N accepted from this peer
        self.pending: Pending | None = None
        self.next_attempt = now  # a fresh session initiates at once (restart: issue 12)
        self.last_mac1: bytes | None = None  # mac1 of our last handshake message to it
        self.last_mac1_public = b""  # the public key that message was sent to
        self.cookie: bytes | None = None
        self.cookie_at = 0.0
        self.staged: deque[bytes] = deque()
        self.ss_cache: dict[tuple[bytes, bytes], bytes] = {}
        self.mac1_keys = {pub: mac1_key(pub) for pub in self.remote_publics}
        self.last_rx = -_INF
        self.keepalive_at = _INF  # armed by received data, disarmed by anything we send
        self.unanswered_at = _INF  # armed by data we send, disarmed by anything verified
        self.fresh = True  # no session with this peer since we started (FLAG_FRESH)

    def ss(self, me: Identity, remote: bytes) -> bytes:
        """DH(our static, its static), computed once per pair (at most 4 per peer)."""
        key = (me.public, remote)
        v = self.ss_cache.get(key)
        if v is None:
            v = self.ss_cache[key] = dh(me.private, remote)
        return v

    def keypairs(self) -> tuple[Keypair, ...]:
        return tuple(k for k in (self.current, self.next, *self.retired) if k is not None)

    def sendable(self, now: float, limits: Limits, count: int = 1) -> Keypair | None:
        """The current keypair if `count` more datagrams may be sealed with it now."""
        kp = self.current
        if kp is None or now >= kp.expires:
            return None
        if kp.send_n + count > limits.reject_after_messages:
            return None
        return kp

    def rekey_due(self, now: float, limits: Limits) -> bool:
        """True if a new handshake should start now (none is in flight)."""
        if self.pending is not None or self.endpoint is None:
            return False
        kp = self.current
        if kp is None or now >= kp.expires:
            return now >= self.next_attempt
        if kp.send_n >= limits.rekey_after_messages:
            return True
        # the same expression as deadline(): a due timer always finds its work
        return now >= kp.created + self.rekey_age(kp, limits)

    @staticmethod
    def rekey_age(kp: Keypair, limits: Limits) -> float:
        return limits.rekey_after_time + (0.0 if kp.initiator else limits.responder_rekey_delay)

    def deadline(self, limits: Limits) -> float:
        """The earliest time `handle_timer` has work for this peer (inf: none)."""
        t = _INF
        if self.pending is not None:
            t = self.pending.sent_at + limits.retry_after
        elif self.endpoint is not None:
            kp = self.current
            if kp is None:
                t = self.next_attempt
            else:
                t = kp.created + self.rekey_age(kp, limits)
        for kp in self.keypairs():
            t = min(t, kp.expires)
        return min(t, self.keepalive_at, self.unanswered_at + limits.silence_after)

    def verified(self, now: float, limits: Limits) -> None:
        """Data datagrams of the current keypair verified at `now` (`Keypair.open_run`):
        what `SecureEndpoint` does for each one (heard; answer with a keepalive if we
        send nothing within keepalive_after)."""
        self.last_rx = now
        self.unanswered_at = _INF
        if self.keepalive_at == _INF:
            self.keepalive_at = now + limits.keepalive_after

    def stage(self, payload: bytes | bytearray | memoryview, limits: Limits) -> bool:
        """Hold one datagram for later; False if the oldest had to be dropped for it."""
        dropped = len(self.staged) >= limits.staged_max
        if dropped:
            self.staged.popleft()
        self.staged.append(bytes(payload))
        return not dropped
