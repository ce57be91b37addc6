"""Keys and per-peer security settings: key files, `genkey`, and the config parser.

Rules:
- A key is 32 bytes written as standard base64 (44 characters), one per file, as `wg genkey`
  writes it; a private key file must not be readable by group or others (checked, like
  OpenSSH does for identity files), a pre-shared key file likewise.
- `security = "plain"` (default) keeps today's wire format; "authenticated" and "encrypted"
  need `private_key_file` (our static X25519 key for this peer) and `public_key` (the peer's
  static public key). `preshared_key_file` is optional.
- Rotation: `private_key_file`, `public_key` and `preshared_key_file` each take a string or
  a list of two. For our private key the first is used to initiate and both are accepted as
  responder; for the peer's public key both identify the peer and the first is the one we
  initiate to; for the psk the first is used when responding and both are tried when
  consuming a response (docs/SECURE.md §7 has the order of steps).
- Parsing never raises for bad input: it returns (None, [messages]) so `grebe check` can
  report every problem at once, as bridge/config.py does.

What each option protects (and does not) is in docs/SECURE.md §8; in short: the static keys
authenticate the peers and the ephemeral keys give forward secrecy; a psk adds a second,
symmetric secret (post-quantum hedging, as in WireGuard) but a psk alone is not an option
here: without static keys there would be no identity and no forward secrecy against a psk
leak.

Theory of operation: `parse_security(table, read)` reads one `[[peer]]` TOML table (a dict)
and returns a `PeerSecurity`; `read` reads a file (injectable for tests). `genkey()` and
`public_key_of()` are the `grebe genkey` / `grebe pubkey` helpers; `write_private_key(path)`
creates a key file the way the loader wants it (0600, never overwriting one).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bridge.secure.noise import public_bytes
from bridge.secure.wire import KEY_LEN, MSG_AUTHENTICATED, MSG_ENCRYPTED

__all__ = ["SecurityMode", "PeerSecurity", "PeerSpec", "parse_security", "decode_key",
           "genkey", "write_private_key", "public_key_of", "read_key_file",
           "check_permissions"]


class SecurityMode(Enum):
    PLAIN = "plain"
    AUTHENTICATED = "authenticated"
    ENCRYPTED = "encrypted"

    @property
    def msg_type(self) -> int:
        """The transport message type of this mode (0 for plain: not ours)."""
        if self is SecurityMode.AUTHENTICATED:
            return MSG_AUTHENTICATED
        if self is SecurityMode.ENCRYPTED:
            return MSG_ENCRYPTED
        return 0


@dataclass(frozen=True, slots=True)
class PeerSecurity:
    mode: SecurityMode = SecurityMode.PLAIN
    private_keys: tuple[bytes, ...] = ()  # raw 32 bytes; first = current
    public_keys: tuple[bytes, ...] = ()
    psks: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What the secure endpoint needs of one non-plain peer."""

    index: int  # the peer's index in the Bridge configuration
    name: str
    security: PeerSecurity
    endpoint: tuple[str, int] | None  # configured address; None: learn it (roaming only)


def decode_key(text: str) -> bytes | None:
    """32 raw bytes from base64 text, or None if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def genkey() -> tuple[str, str]:
    """A new static key pair as base64 (private, public), like `wg genkey | wg pubkey`."""
    key = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode(), base64.b64encode(public_bytes(key)).decode()


def write_private_key(path: str) -> str:
    """`grebe genkey PATH`: create PATH (mode 0600, must not exist) holding a new private
    key in base64; return the public key (base64) to give to the peer. Raises OSError."""
    priv, pub = genkey()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(priv + "\n")
    return pub


def public_key_of(private_b64: str) -> str | None:
    """The base64 public key of a base64 private key (`wg pubkey`), or None if invalid."""
    raw = decode_key(private_b64)
    if raw is None:
        return None
    return base64.b64encode(public_bytes(X25519PrivateKey.from_private_bytes(raw))).decode()


def check_permissions(path: str) -> str | None:
    """An error message if `path` is readable or writable by group/others, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path}: key file is accessible by group/others (chmod 600 it)"
    return None


def read_key_file(path: str) -> tuple[bytes | None, str | None]:
    """(key, None) or (None, error) for one base64 key file (permissions checked)."""
    err = check_permissions(path)
    if err is not None:
        return None, err
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: {exc}"
    key = decode_key(text)
    if key is None:
        return None, f"{path}: not a base64 32-byte key"
    return key, None


def _usable_public(raw: bytes) -> bool:
    """False for public keys X25519 refuses (low order: the shared secret would be zero)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def _one_or_two(value: Any, what: str, errors: list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and 1 <= len(value) <= 2 and all(isinstance(v, str)
                                                                for v in value):
        return tuple(value)
    errors.append(f"{what}: expected a string or a list of one or two strings")
    return ()


def parse_security(table: dict[str, Any],
                   read: Callable[[str], tuple[bytes | None, str | None]] = read_key_file,
                   ) -> tuple[PeerSecurity | None, list[str]]:
    """Parse the security keys of one `[[peer]]` table. Returns (settings, errors)."""
    errors: list[str] = []
    raw_mode = table.get("security", "plain")
    try:
        mode = SecurityMode(raw_mode)
    except ValueError:
        return None, [f"security: expected one of plain, authenticated, encrypted, "
                      f"got {raw_mode!r}"]
    keys = ("private_key_file", "public_key", "preshared_key_file")
    if mode is SecurityMode.PLAIN:
        extra = [k for k in keys if k in table]
        if extra:
            return None, [f"{', '.join(extra)}: only with security = \"authenticated\" or "
                          "\"encrypted\""]
        return PeerSecurity(), []
    for k in keys[:2]:
        if k not in table:
            errors.append(f"{k}: required with security = {mode.value!r}")
    privs: list[bytes] = []
    for path in _one_or_two(table.get("private_key_file", []), "private_key_file", errors):
        key, err = read(path)
        if key is None:
            errors.append(f"private_key_file: {err}")
        else:
            privs.append(key)
    pubs: list[bytes] = []
    for text in _one_or_two(table.get("public_key", []), "public_key", errors):
        raw = decode_key(text)
        if raw is None or not _usable_public(raw):
            errors.append(f"public_key: {text!r} is not a usable base64 X25519 public key")
        else:
            pubs.append(raw)
    psks: list[bytes] = []
    if "preshared_key_file" in table:
        for path in _one_or_two(table["preshared_key_file"], "preshared_key_file", errors):
            key, err = read(path)
            if key is None:
                errors.append(f"preshared_key_file: {err}")
            else:
                psks.append(key)
    if errors:
        return None, errors
    own = {public_bytes(X25519PrivateKey.from_private_bytes(k)) for k in privs}
    if own & set(pubs):
        return None, ["public_key: is our own public key (a peer needs its own key pair)"]
    return PeerSecurity(mode, tuple(privs), tuple(pubs), tuple(psks)), []
