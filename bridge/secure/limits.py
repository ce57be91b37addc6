"""Timers, limits, counters and the bounded per-source rate limiter of the secure layer.

Rules:
- Every constant a test may want to shrink lives in `Limits` (frozen): tests drive `now`
  and set small message limits instead of sending 2**22 datagrams.
- Message limits follow the AEAD, not WireGuard: WireGuard's 2**60 is for
  ChaCha20-Poly1305; for AES-GCM, RFC 9001 §6.6 (QUIC) sets a confidentiality limit of
  2**23 packets per key and RFC 8446 §5.5 (TLS 1.3) about 2**24.5 records. A sender rekeys
  at REKEY_AFTER_MESSAGES = 2**22 and never sends past REJECT_AFTER_MESSAGES = 2**23; a
  receiver refuses counters at or past it.
- Times follow WireGuard (whitepaper §6.1 / wireguard-go device/constants.go): rekey after
  120 s, refuse a keypair 180 s after its handshake. One deliberate change: a handshake is
  retried after 1 s, not 5 s (REKEY_TIMEOUT), so that a restarted peer is reachable again
  within 2 s (issue 12) even if the first initiation is lost; the price is one 152-byte
  datagram per second towards a peer that is down.
- Liveness (WireGuard's passive keepalive and "new handshake" timers, whitepaper §6.5,
  with shorter times): a peer that received data and sent nothing for `keepalive_after`
  sends an empty transport message; a peer that sent data and verified nothing for
  `silence_after` starts a new handshake. So when the other side restarted (and lost its
  keys) a handshake starts within `silence_after` of the first unanswered datagram, even if
  the restarted side cannot initiate (it does not know our address). The 1 s between the
  two is the slack for loss and round-trip time; a sparse one-way flow that loses a
  datagram may start a spare handshake, which costs two DHs and loses nothing.
- Load: a responder that handled more than `load_handshakes` handshake messages in the last
  second is under load for `load_hold` seconds; then an initiation or response without a
  valid mac2 gets a cookie reply instead of a DH (WireGuard's rule, whitepaper §5.3).
- Every table keyed by attacker-chosen input has a cap, an eviction rule and a counter:
  the rate limiter below is the only such table (keyed by source host); session indices are
  created only after a handshake authenticated by a configured static key.

Theory of operation: `RateLimiter` is a token bucket per source host in a dict that keeps
insertion order; when full it evicts the oldest entry (counted "ratelimit_evicted").
`DROP_REASONS` and `EVENTS` name every counter the endpoint keeps, so `grebe status` shows
zeros for the ones that never happened.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "RateLimiter", "DROP_REASONS", "EVENTS", "new_counts"]

DROP_REASONS: tuple[str, ...] = (
    "malformed",  # wrong length, non-zero reserved bytes, unknown type
    "bad_mac",  # transport tag did not verify (forged, flipped or truncated)
    "replay",  # counter left of the window or already received (RFC 6479)
    "unknown_session",  # receiver index names no live session (expired, old, restarted)
    "expired_session",  # keypair older than reject_after_time / counter past the limit
    "wrong_mode",  # transport type is not the mode negotiated for that session
    "bad_mac1",  # handshake mac1 wrong: sender does not know our public key
    "cookie_required",  # under load and mac2 missing/invalid: cookie reply sent instead
    "rate_limited",  # under load, too many handshakes from one source host
    "bad_handshake",  # handshake AEAD/DH failed (forged, corrupted, wrong psk)
    "unknown_peer",  # initiation from a static key no peer is configured with
    "stale_handshake",  # initiation timestamp not newer than the last one (replay)
    "mode_mismatch",  # initiation asks for another security mode than configured
    "bad_cookie",  # cookie reply that does not decrypt
    "tx_no_session",  # outbound: staged queue full while no session (datagram dropped)
)

EVENTS: tuple[str, ...] = (
    "handshake_initiated",
    "handshake_responded",
    "handshake_completed",  # as initiator: response consumed
    "session_confirmed",  # as responder: first transport datagram on the new session
    "cookie_sent",
    "cookie_suppressed",  # cookie replies over the global budget (not sent)
    "cookie_received",
    "rekey",  # a handshake started because a keypair aged or hit the message limit
    "silence_handshake",  # a handshake started because sent data went unanswered
    "roamed",
    "peer_restarted",  # a confirmed new session whose handshake said FLAG_FRESH
    "keepalive_rx",
    "keepalive_tx",
    "staged",
    "ratelimit_evicted",
    "under_load",  # entered the under-load state
)


def new_counts(names: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@dataclass(frozen=True, slots=True)
class Limits:
    rekey_after_messages: int = 1 << 22
    reject_after_messages: int = 1 << 23
    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    responder_rekey_delay: float = 10.0  # the responder rekeys only if the initiator did not
    retry_after: float = 1.0  # handshake retry (WireGuard REKEY_TIMEOUT is 5 s)
    cookie_secret_age: float = 120.0  # responder's cookie secret rotates this often
    cookie_valid: float = 110.0  # initiator uses a received cookie this long
    load_handshakes: int = 64  # handshake messages per second before "under load"
    load_hold: float = 1.0
    per_source_rate: float = 20.0  # handshakes per second per source host, under load
    per_source_burst: float = 5.0
    ratelimit_entries: int = 4096
    cookie_replies_per_second: float = 2000.0
    staged_max: int = 128  # datagrams held per peer while a handshake is in flight
    keepalive_after: float = 0.5  # received data, sent nothing this long: send a keepalive
    silence_after: float = 1.5  # sent data, heard nothing verified this long: new handshake


class RateLimiter:
    """Token buckets per source host, bounded to `cap` entries (oldest evicted)."""

    __slots__ = ("rate", "burst", "cap", "buckets", "evicted")

    def __init__(self, rate: float, burst: float, cap: int) -> None:
        self.rate = rate
        self.burst = burst
        self.cap = cap
        self.buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, last)
        self.evicted = 0

    def allow(self, host: str, now: float) -> bool:
        b = self.buckets.pop(host, None)  # pop + insert keeps the dict in recency order
        if b is None:
            tokens = self.burst
            if len(self.buckets) >= self.cap:
                del self.buckets[next(iter(self.buckets))]
                self.evicted += 1
        else:
            tokens, last = b
            tokens = min(self.burst, tokens + (now - last) * self.rate) if now > last else tokens
        ok = tokens >= 1.0
        self.buckets[host] = (tokens - 1.0 if ok else tokens, now)
        return ok

    def __len__(self) -> int:
        return len(self.buckets)
