"""The handshake: Noise IKpsk2 over X25519, AES-256-GCM and SHA-256, as WireGuard uses it.

Rules:
- Pattern IKpsk2 (Noise Protocol Framework rev. 34, §7.5 and §9): the initiator knows the
  responder's static key beforehand (`<- s`); message 1 `-> e, es, s, ss` carries the
  initiator's ephemeral key, its static key encrypted, and an encrypted payload (TAI64N
  timestamp, security mode, flags); message 2 `<- e, ee, se, psk` carries the responder's
  ephemeral key and a 4-byte encrypted payload (flags; WireGuard's is empty). Both sides
  contribute a fresh ephemeral
  X25519 key, so every session key is new (nothing recorded before can be decrypted or
  accepted under it) and compromise of the static keys later does not reveal past traffic
  (forward secrecy).
- Protocol name "Noise_IKpsk2_25519_AESGCM_SHA256"; prologue/identifier IDENTIFIER binds
  the keys to grebe v1. HKDF is RFC 5869 with SHA-256, salt = chaining key, empty info: that
  is exactly the Noise HKDF (extract = HMAC(ck, ikm); T(1), T(2), T(3)).
- The final chaining key gives two transport keys, one per direction (initiator-to-responder
  first), each used with its own counter: per-direction keys.
- The psk (32 zero bytes if none) is mixed in last (psk2): without it the handshake is
  still authenticated by the static keys; with it, an attacker must also hold the psk.
- Primitives only from `cryptography`: X25519, AESGCM, HKDF, HMAC and Hash (SHA-256).
  A DH result that is all zero (a low-order public key) raises in `cryptography`; callers
  treat every exception of this module's consume functions as a failed handshake.
- mac1 (keyed by SHA-256("mac1----" || receiver's static public key)) lets a receiver drop
  handshake messages from anyone who does not know its public key with one HMAC, before any
  DH; mac2 (keyed by a cookie) proves the sender receives at its source address
  (docs/SECURE.md §5). MACs are HMAC-SHA256 truncated to 16 bytes.

Theory of operation: `Handshake` is the symmetric state (chaining key, hash) in Noise terms,
immutable per step; `initiation()` / `consume_initiation()` / `response()` /
`consume_response()` each take what they need and return the new state plus message
fields. The caller (bridge/secure/session.py) owns indices, timers and MAC fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bridge.secure.wire import KEY_LEN, MAC_LEN, nonce

__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "Identity",
    "Handshake",
    "hash_",
    "mac",
    "full_mac",
    "kdf",
    "aead_seal",
    "aead_open",
    "public_bytes",
    "dh",
    "mac1_key",
    "cookie_key",
    "initial_state",
    "initiation",
    "consume_initiation",
    "consume_initiation_payload",
    "response",
    "consume_response",
]

CONSTRUCTION = b"Noise_IKpsk2_25519_AESGCM_SHA256"
IDENTIFIER = b"grebe v1 secure tunnel"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"


def hash_(*parts: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of the concatenation of `parts`."""
    h = hashes.Hash(hashes.SHA256())
    for p in parts:
        h.update(bytes(p))
    return h.finalize()


def mac(key: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA256(key, parts) truncated to MAC_LEN bytes."""
    m = hmac.HMAC(key, hashes.SHA256())
    for p in parts:
        m.update(bytes(p))
    return m.finalize()[:MAC_LEN]


def full_mac(key: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA256(key, parts), 32 bytes (subkey derivation)."""
    m = hmac.HMAC(key, hashes.SHA256())
    for p in parts:
        m.update(bytes(p))
    return m.finalize()


def kdf(ck: bytes, ikm: bytes, n: int) -> tuple[bytes, ...]:
    """Noise HKDF: n 32-byte outputs of RFC 5869 HKDF-SHA256(salt=ck, ikm, info="")."""
    out = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN * n, salt=ck, info=b"").derive(ikm)
    return tuple(out[i * KEY_LEN:(i + 1) * KEY_LEN] for i in range(n))


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce(counter), plaintext, ad)


def aead_open(key: bytes, counter: int, ciphertext: bytes | memoryview, ad: bytes) -> bytes:
    """Raises cryptography.exceptions.InvalidTag when the tag does not verify."""
    return AESGCM(key).decrypt(nonce(counter), ciphertext, ad)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: bytes | memoryview) -> bytes:
    """X25519; raises ValueError for a malformed or low-order public key."""
    return private.exchange(X25519PublicKey.from_public_bytes(bytes(public)))


_CK0 = hash_(CONSTRUCTION)
_H0 = hash_(_CK0, IDENTIFIER)


class Identity:
    """One local static key pair and the values derived from it once."""

    __slots__ = ("private", "public", "mac1_key", "cookie_key", "h_resp")

    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private
        self.public = public_bytes(private)
        self.mac1_key = hash_(LABEL_MAC1, self.public)  # keys mac1 of messages TO us
        self.cookie_key = hash_(LABEL_COOKIE, self.public)  # keys our cookie replies
        self.h_resp = hash_(_H0, self.public)  # handshake hash after "<- s" with us as s


def mac1_key(public: bytes) -> bytes:
    """The mac1 key of messages sent to the holder of `public`."""
    return hash_(LABEL_MAC1, public)


def cookie_key(public: bytes) -> bytes:
    """The key that decrypts cookie replies from the holder of `public`."""
    return hash_(LABEL_COOKIE, public)


@dataclass(frozen=True, slots=True)
class Handshake:
    """Noise symmetric state: chaining key and handshake hash."""

    ck: bytes
    h: bytes


def initial_state(responder_public: bytes) -> Handshake:
    return Handshake(_CK0, hash_(_H0, responder_public))


def initiation(me: Identity, responder_public: bytes, ss: bytes, ephemeral: X25519PrivateKey,
               payload: bytes) -> tuple[Handshake, bytes, bytes, bytes]:
    """Message 1: returns (state, ephemeral public, encrypted static, encrypted payload)."""
    st = initial_state(responder_public)
    e_pub = public_bytes(ephemeral)
    (ck,) = kdf(st.ck, e_pub, 1)
    h = hash_(st.h, e_pub)
    ck, k = kdf(ck, dh(ephemeral, responder_public), 2)
    enc_static = aead_seal(k, 0, me.public, h)
    h = hash_(h, enc_static)
    ck, k = kdf(ck, ss, 2)
    enc_payload = aead_seal(k, 0, payload, h)
    h = hash_(h, enc_payload)
    return Handshake(ck, h), e_pub, enc_static, enc_payload


def consume_initiation(me: Identity, e_pub: bytes, enc_static: bytes,
                       ) -> tuple[Handshake, bytes]:
    """First half of consuming message 1: returns (state, initiator's static public).

    The caller looks the static key up among its peers, computes ss, then calls
    `consume_initiation_payload`. Raises on a bad tag or a bad key.
    """
    (ck,) = kdf(_CK0, e_pub, 1)
    h = hash_(me.h_resp, e_pub)
    ck, k = kdf(ck, dh(me.private, e_pub), 2)
    static = aead_open(k, 0, enc_static, h)
    h = hash_(h, enc_static)
    return Handshake(ck, h), static


def consume_initiation_payload(st: Handshake, ss: bytes, enc_payload: bytes,
                               ) -> tuple[Handshake, bytes]:
    ck, k = kdf(st.ck, ss, 2)
    payload = aead_open(k, 0, enc_payload, st.h)
    return Handshake(ck, hash_(st.h, enc_payload)), payload


def response(st: Handshake, initiator_e: bytes, initiator_static: bytes,
             ephemeral: X25519PrivateKey, psk: bytes, payload: bytes,
             ) -> tuple[bytes, bytes, bytes, bytes]:
    """Message 2 from the responder's state after message 1.

    Returns (ephemeral public, encrypted payload, key responder->initiator,
    key initiator->responder).
    """
    e_pub = public_bytes(ephemeral)
    (ck,) = kdf(st.ck, e_pub, 1)
    h = hash_(st.h, e_pub)
    (ck,) = kdf(ck, dh(ephemeral, initiator_e), 1)
    (ck,) = kdf(ck, dh(ephemeral, initiator_static), 1)
    ck, tau, k = kdf(ck, psk, 3)
    h = hash_(h, tau)
    enc = aead_seal(k, 0, payload, h)
    t_i2r, t_r2i = kdf(ck, b"", 2)
    return e_pub, enc, t_r2i, t_i2r


def consume_response(st: Handshake, me: Identity, ephemeral: X25519PrivateKey, e_pub: bytes,
                     enc: bytes, psks: tuple[bytes, ...]) -> tuple[bytes, bytes, bytes]:
    """Consume message 2 trying each psk in turn (rotation: two may be configured).

    Returns (key initiator->responder, key responder->initiator, payload). Raises if none
    verifies.
    """
    (ck,) = kdf(st.ck, e_pub, 1)
    h = hash_(st.h, e_pub)
    (ck,) = kdf(ck, dh(ephemeral, e_pub), 1)
    (ck,) = kdf(ck, dh(me.private, e_pub), 1)
    last: Exception = ValueError("no pre-shared key")
    for psk in psks:
        ck2, tau, k = kdf(ck, psk, 3)
        try:
            payload = aead_open(k, 0, enc, hash_(h, tau))
        except Exception as exc:  # InvalidTag: try the next psk
            last = exc
            continue
        t_i2r, t_r2i = kdf(ck2, b"", 2)
        return t_i2r, t_r2i, payload
    raise last
