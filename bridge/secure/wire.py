"""Wire formats of the secure modes: four message types, one header, sizes, TAI64N.

Rules (docs/SECURE.md §3 has the byte diagrams):
- Every message starts with a 4-byte prefix: type (1 byte) and 3 reserved bytes that MUST be
  zero when sent and are checked on receipt ("malformed" otherwise), so a later version can
  use them without being mistaken for this one.
- Handshake messages have one exact length each; anything else is "malformed" before any
  cryptography runs (the cheapest drop first).
- Transport messages: type, reserved, receiver index (the receiver's own 32-bit handle for
  the session, chosen at random by the receiver, as in WireGuard), a 64-bit counter, then
  the protected payload and a 16-byte AEAD tag. The counter is sent in full (64 bits): IPsec
  ESP sends the low 32 bits of an extended sequence number and infers the high half
  (RFC 4303 §2.2.1, Appendix A), which a long loss burst can desynchronise; 4 bytes more per
  datagram buy no inference at all.
- The AEAD nonce is 32 zero bits then the 64-bit counter, big-endian (the Noise Protocol
  Framework's AESGCM nonce rule), so a counter never reused under one key means a nonce
  never reused.
- Integers are in network byte order (big-endian).
- Both handshake messages carry an encrypted flags byte; FLAG_FRESH says the sender has
  had no session with this peer since it started (a restart), so the receiver can reset
  per-peer state (the GRE sequence receiver) once the new session is confirmed.
- TAI64N (the handshake timestamp, as in WireGuard): 8 bytes of 2**62 + seconds and 4 bytes
  of nanoseconds, big-endian; byte-wise comparison is time order.

Theory of operation: one `struct.Struct` per fixed part, declared once; `peek_type` and the
`unpack_from` calls take memoryviews, so the receive path parses without copies. Builders
return bytearrays the caller finishes in place (the MAC fields are appended last).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = [
    "SECURE_PORT",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "MSG_COOKIE",
    "MSG_AUTHENTICATED",
    "MSG_ENCRYPTED",
    "HEADER_LEN",
    "TAG_LEN",
    "OVERHEAD",
    "KEY_LEN",
    "MAC_LEN",
    "INITIATION_LEN",
    "RESPONSE_LEN",
    "COOKIE_LEN",
    "COOKIE_NONCE_LEN",
    "INIT_MAC1_AT",
    "FLAG_FRESH",
    "RESP_MAC1_AT",
    "TRANSPORT",
    "INIT_HEAD",
    "RESP_HEAD",
    "COOKIE_HEAD",
    "PREFIX",
    "nonce",
    "tai64n",
    "peek_type",
]

# Not an IANA assignment (grebe has none). 4754 is GRE-in-UDP (RFC 8086 §3.3) and a receiver
# there parses our header as GRE; 4755 is GRE-in-UDP over DTLS (RFC 8086 §7) and ours is not
# DTLS. Chosen below 32768 so that it is outside Linux's default ephemeral range (32768-60999)
# and outside the 49152-65535 range RFC 8086 §3.2.1 source ports (and our send-only source
# port sockets) use, so binding it never collides with either; configurable per listener.
SECURE_PORT = 24754

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE = 3
MSG_AUTHENTICATED = 4  # transport: payload in clear, covered by the tag
MSG_ENCRYPTED = 5  # transport: payload encrypted and covered by the tag

KEY_LEN = 32  # X25519 public keys, symmetric keys, hashes (SHA-256)
TAG_LEN = 16  # AES-GCM tag
MAC_LEN = 16  # mac1 / mac2 / cookie: HMAC-SHA256 truncated to 128 bits
TS_LEN = 12  # TAI64N
COOKIE_NONCE_LEN = 24

# type(1) reserved(3)
PREFIX = struct.Struct("!B3x")
# type, reserved, receiver index, counter
TRANSPORT = struct.Struct("!B3xIQ")
HEADER_LEN = TRANSPORT.size  # 16
OVERHEAD = HEADER_LEN + TAG_LEN  # 32 bytes in front of and behind the GRE/IPIP payload

# Initiation: type, reserved, sender index, ephemeral(32), static(32+16),
# {timestamp(12) flags(4)}+16, mac1, mac2
INIT_HEAD = struct.Struct("!B3xI")
INIT_EPH_AT = INIT_HEAD.size  # 8
INIT_STATIC_AT = INIT_EPH_AT + KEY_LEN  # 40
INIT_TS_AT = INIT_STATIC_AT + KEY_LEN + TAG_LEN  # 88
INIT_PAYLOAD_LEN = TS_LEN + 4  # timestamp, mode (1 byte), flags (1 byte), 2 zero bytes
INIT_MAC1_AT = INIT_TS_AT + INIT_PAYLOAD_LEN + TAG_LEN  # 120
INITIATION_LEN = INIT_MAC1_AT + 2 * MAC_LEN  # 152

# Response: type, reserved, sender index, receiver index, ephemeral(32),
# {flags (1 byte), 3 zero bytes}+16, mac1, mac2
RESP_HEAD = struct.Struct("!B3xII")
RESP_EPH_AT = RESP_HEAD.size  # 12
RESP_PAYLOAD_AT = RESP_EPH_AT + KEY_LEN  # 44
RESP_PAYLOAD_LEN = 4
RESP_MAC1_AT = RESP_PAYLOAD_AT + RESP_PAYLOAD_LEN + TAG_LEN  # 64
RESPONSE_LEN = RESP_MAC1_AT + 2 * MAC_LEN  # 96

# Handshake flags (initiation byte 13 and response byte 0 of the encrypted payloads)
FLAG_FRESH = 0x01  # the sender has had no session with this peer since it started

# Cookie reply: type, reserved, receiver index, nonce(24), {cookie(16)}+16
COOKIE_HEAD = struct.Struct("!B3xI")
COOKIE_NONCE_AT = COOKIE_HEAD.size  # 8
COOKIE_BOX_AT = COOKIE_NONCE_AT + COOKIE_NONCE_LEN  # 32
COOKIE_LEN = COOKIE_BOX_AT + MAC_LEN + TAG_LEN  # 64

_NONCE = struct.Struct("!4xQ")
_TAI = struct.Struct("!QI")
_TAI_BASE = 1 << 62


# nonce(counter) -> the 96-bit AEAD nonce of a 64-bit counter (32 zero bits, counter
# big-endian); the bound method itself, so the hot path pays no extra Python call
nonce: Callable[[int], bytes] = _NONCE.pack


def tai64n(seconds: float) -> bytes:
    """TAI64N label of a UNIX time (leap seconds ignored, as WireGuard does)."""
    whole = int(seconds)
    if whole < 0:
        whole = 0
    nanos = int((seconds - whole) * 1e9) if seconds >= 0 else 0
    return _TAI.pack(_TAI_BASE + whole, min(max(nanos, 0), 999_999_999))


def peek_type(data: bytes | bytearray | memoryview) -> int:
    """The message type, or -1 if the 4-byte prefix is missing or its reserved bytes are not
    zero (a receiver drops such a datagram as "malformed")."""
    if len(data) < 4 or data[1] or data[2] or data[3]:
        return -1
    return data[0]
