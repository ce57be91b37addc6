"""The library floor of the secure modes: one `cryptography` AEAD call per datagram, in µs.

    .venv/bin/python tests/sim/bench_aead_floor.py [--size 1400] [--reps 20000] [--rounds 7]

What a secure datagram cannot cost less than, measured in this process with perf_counter:
AES-256-GCM and ChaCha20-Poly1305 encrypt/decrypt of `--size` bytes (with the 16-byte
transport header as associated data, and without), with bytes, bytearray and memoryview
inputs, the allocating calls against `encrypt_into`/`decrypt_into`, and the
authenticated mode's construction (the whole datagram as associated data, an empty
plaintext: GMAC, RFC 4543) against the same with ChaCha20-Poly1305 and HMAC-SHA256. A
0-byte call shows the fixed cost of crossing into the library. Then the pieces of the
Python around the call (nonce packing, header packing, the replay window, slicing) so that
the per-datagram cost of the core (tests/sim/bench_secure_core.py) can be read against
them. The library calls run from C-level loops (map), so each line is the call alone. CPU
time (process time), min and median over `--rounds` rounds of `--reps` calls; the cases
take turns round after round so that a neighbour's load hits them alike (wall time on a
shared machine reads up to twice these). No assertions on time: a tool, not a test.
"""

from __future__ import annotations

import argparse
import hmac
import statistics
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat

from cryptography import __version__ as crypto_version
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bridge.secure.replay import ReplayWindow

HDR = 16
TAG = 16
_NONCE = struct.Struct("!4xQ")
_TRANSPORT = struct.Struct("!B3xIQ")
_drain = deque(maxlen=0).extend  # runs an iterator to its end, keeping nothing

Run = Callable[[int], None]


def calls(f: Callable[..., object], *args: object) -> Run:
    """`reps` calls f(*args) from a C-level loop (map): only the call is measured."""
    def run(reps: int) -> None:
        _drain(map(f, *(repeat(a, reps) for a in args)))
    return run


def loop(f: Callable[[], object]) -> Run:
    """`reps` calls of a Python closure (for the pieces that are Python code)."""
    def run(reps: int) -> None:
        for _ in range(reps):
            f()
    return run


def aead_cases(size: int) -> list[tuple[str, Run]]:
    key = bytes(range(32))
    out: list[tuple[str, Run]] = []
    for cname, cls in (("aes-gcm", AESGCM), ("chacha", ChaCha20Poly1305)):
        c = cls(key)
        n0 = _NONCE.pack(1)
        pt = bytes(size)
        hdr = _TRANSPORT.pack(5, 7, 1)
        ct = c.encrypt(n0, pt, hdr)
        ct_noaad = c.encrypt(n0, pt, None)
        mv = memoryview(bytearray(hdr + ct))
        obuf = memoryview(bytearray(HDR + size + TAG))
        pmv = memoryview(bytearray(size))
        # authenticated: header + payload as associated data, empty plaintext (GMAC)
        amsg = bytearray(hdr + pt)
        amsg += c.encrypt(n0, b"", bytes(amsg))
        amv = memoryview(amsg)
        out += [
            (f"{cname} encrypt 0 B (the call's fixed cost)", calls(c.encrypt, n0, b"", None)),
            (f"{cname} encrypt bytes, no aad", calls(c.encrypt, n0, pt, None)),
            (f"{cname} encrypt bytes, aad 16", calls(c.encrypt, n0, pt, hdr)),
            (f"{cname} encrypt bytearray, aad 16", calls(c.encrypt, n0, bytearray(pt), hdr)),
            (f"{cname} encrypt memoryview, aad 16",
             calls(c.encrypt, n0, memoryview(bytearray(pt)), hdr)),
            (f"{cname} encrypt_into memoryview, aad 16",
             calls(c.encrypt_into, n0, memoryview(bytearray(pt)), hdr, obuf[HDR:])),
            (f"{cname} decrypt bytes, no aad", calls(c.decrypt, n0, ct_noaad, None)),
            (f"{cname} decrypt memoryview, aad 16", calls(c.decrypt, n0, mv[HDR:], mv[:HDR])),
            (f"{cname} decrypt_into memoryview, aad 16",
             calls(c.decrypt_into, n0, mv[HDR:], mv[:HDR], pmv)),
            (f"{cname} auth seal: aad {HDR + size}, 0 B (into)",
             calls(c.encrypt_into, n0, b"", amv[:HDR + size], obuf[:TAG])),
            (f"{cname} auth seal: aad {HDR + size}, 0 B (alloc)",
             calls(c.encrypt, n0, b"", amv[:HDR + size])),
            (f"{cname} auth open: aad {HDR + size}, tag only",
             calls(c.decrypt, n0, amv[HDR + size:], amv[:HDR + size])),
        ]
    mac_key = bytes(32)
    data = bytes(HDR + size)
    out += [
        (f"hmac-sha256 of {HDR + size} B (for comparison)",
         loop(lambda: hmac.digest(mac_key, data, "sha256"))),
    ]
    return out


def python_cases(size: int) -> list[tuple[str, Run]]:
    """The pieces of Python around each call in bridge/secure/session.py's loops."""
    win = ReplayWindow()
    ctr = [0]

    def window() -> None:
        c = ctr[0] = ctr[0] + 1
        if c <= win.top and not win.check(c):
            raise AssertionError
        win.accept(c)

    buf = bytearray(HDR + size + TAG)
    bmv = memoryview(buf)
    src = bytes(size)
    return [
        ("py: nonce(counter) (struct pack)", calls(_NONCE.pack, 12345)),
        ("py: TRANSPORT.pack_into", calls(_TRANSPORT.pack_into, buf, 0, 5, 7, 9)),
        ("py: TRANSPORT.unpack_from", calls(_TRANSPORT.unpack_from, buf)),
        ("py: one memoryview slice", calls(bmv.__getitem__, slice(HDR, HDR + size))),
        ("py: replay window check + accept", loop(window)),
        (f"py: copy {size} B into a bytearray",
         calls(bmv.__setitem__, slice(HDR, HDR + size), src)),
        (f"py: bytearray({HDR + size + TAG})", calls(bytearray, HDR + size + TAG)),
        ("py: an empty Python call in a loop", loop(lambda: None)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    cs = aead_cases(a.size) + python_cases(a.size)
    times: dict[str, list[float]] = {name: [] for name, _ in cs}
    for r in range(a.rounds + 1):
        for name, run in (cs if r % 2 else cs[::-1]):
            t0 = time.process_time()
            run(a.reps)
            if r:  # round 0 warms up
                times[name].append((time.process_time() - t0) / a.reps * 1e6)
    print(f"cryptography {crypto_version}; {a.size}-byte payload; CPU µs per call (process "
          f"time), min and median of {a.rounds} rounds x {a.reps} calls")
    for name, _ in cs:
        t = times[name]
        print(f"  {name:46} {min(t):7.3f} {statistics.median(t):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
