"""The load rule: when handshakes need a cookie, how cookies are made, sent and opened.

Rules (WireGuard whitepaper §5.3, docs/SECURE.md §4.3 and §5):
- Every handshake message that passed mac1 counts towards load; more than
  `load_handshakes` of them within one second puts the endpoint under load for `load_hold`
  seconds (event "under_load" on entry). The Bridge may also force it (`force_load`).
- Under load a message must carry mac2 = MAC(cookie, message up to mac2), where
  cookie = MAC(secret, source host | source port) and the secret is replaced every
  `cookie_secret_age` seconds: a flood from spoofed addresses never gets a usable cookie.
  Without a valid mac2: a cookie reply (64 bytes, smaller than what triggered it) and the
  drop "cookie_required"; never a DH. Cookie replies share one token bucket
  (`cookie_replies_per_second`); over it they are not sent ("cookie_suppressed").
- With a valid mac2, a token bucket per source host (bridge/secure/limits.py RateLimiter,
  bounded) decides ("rate_limited").
- A cookie reply is encrypted under a key derived from a 24-byte random nonce and the
  sender's cookie key, with the triggering message's mac1 as associated data: only the
  sender of that message (who knows the receiver's public key and its own mac1) can use it.

Theory of operation: `Guard` holds the secret, the load window and the buckets; `admit()`
is the one call the endpoint makes per handshake message, after mac1. It shares the
endpoint's `drops` / `events` dicts and appends cookie replies to the endpoint's `out`.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.constant_time import bytes_eq

from bridge.secure import noise
from bridge.secure.limits import Limits, RateLimiter
from bridge.secure.wire import (
    COOKIE_BOX_AT,
    COOKIE_HEAD,
    COOKIE_NONCE_AT,
    MAC_LEN,
    MSG_COOKIE,
)

__all__ = ["Guard", "open_cookie_reply"]

Addr = tuple[str, int]
_ZERO12 = bytes(12)


class Guard:
    """Load detection, mac2 checks and cookie replies of one endpoint."""

    def __init__(self, limits: Limits, now: float, rng: Callable[[int], bytes],
                 drops: dict[str, int], events: dict[str, int],
                 out: list[tuple[bytes | bytearray, Addr]]) -> None:
        self.limits = limits
        self.rng = rng
        self.drops = drops
        self.events = events
        self.out = out
        self.ratelimit = RateLimiter(limits.per_source_rate, limits.per_source_burst,
                                     limits.ratelimit_entries)
        self.cookie_secret = rng(32)
        self.cookie_secret_at = now
        self.load_start = now
        self.load_count = 0
        self.load_until = -1.0
        self.force_load = False
        self.cookie_tokens = limits.cookie_replies_per_second
        self.cookie_tokens_at = now

    def admit(self, mv: memoryview, mac1_at: int, sender: int, ident: noise.Identity,
              addr: Addr, now: float) -> bool:
        """True if the handshake message in `mv` (its mac1 verified) may cost a DH now."""
        lim = self.limits
        if now - self.load_start >= 1.0:
            self.load_start = now
            self.load_count = 0
        self.load_count += 1
        if self.load_count > lim.load_handshakes:
            if now >= self.load_until:
                self.events["under_load"] += 1
            self.load_until = now + lim.load_hold
        if not (self.force_load or now < self.load_until):
            return True
        mac2_at = mac1_at + MAC_LEN
        cookie = self.cookie_for(addr, now)
        if not bytes_eq(noise.mac(cookie, mv[:mac2_at]), bytes(mv[mac2_at:mac2_at + MAC_LEN])):
            self.drops["cookie_required"] += 1
            self.send_cookie(cookie, bytes(mv[mac1_at:mac2_at]), sender, ident, addr, now)
            return False
        if not self.ratelimit.allow(addr[0], now):
            self.drops["rate_limited"] += 1
            return False
        return True

    def cookie_for(self, addr: Addr, now: float) -> bytes:
        if now - self.cookie_secret_at >= self.limits.cookie_secret_age:
            self.cookie_secret = self.rng(32)
            self.cookie_secret_at = now
        return noise.mac(self.cookie_secret, f"{addr[0]}|{addr[1]}".encode())

    def send_cookie(self, cookie: bytes, mac1: bytes, sender: int, ident: noise.Identity,
                    addr: Addr, now: float) -> None:
        rate = self.limits.cookie_replies_per_second
        self.cookie_tokens = min(rate, self.cookie_tokens + (now - self.cookie_tokens_at) * rate)
        self.cookie_tokens_at = now
        if self.cookie_tokens < 1.0:
            self.events["cookie_suppressed"] += 1
            return
        self.cookie_tokens -= 1.0
        rnd = self.rng(COOKIE_BOX_AT - COOKIE_NONCE_AT)
        box = AESGCM(noise.full_mac(ident.cookie_key, rnd)).encrypt(_ZERO12, cookie, mac1)
        self.out.append((COOKIE_HEAD.pack(MSG_COOKIE, sender) + rnd + box, addr))
        self.events["cookie_sent"] += 1


def open_cookie_reply(mv: memoryview, sender_public: bytes, mac1: bytes) -> bytes | None:
    """The cookie in a (64-byte) cookie reply from the holder of `sender_public` answering
    our message with `mac1`; None if it does not decrypt."""
    key = noise.full_mac(noise.cookie_key(sender_public), mv[COOKIE_NONCE_AT:COOKIE_BOX_AT])
    try:
        return AESGCM(key).decrypt(_ZERO12, bytes(mv[COOKIE_BOX_AT:]), mac1)
    except InvalidTag:
        return None
