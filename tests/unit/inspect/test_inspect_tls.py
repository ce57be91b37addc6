"""The tls inspector: SNI/ALPN from a real openssl ClientHello, fragmented, and from garbage."""

from __future__ import annotations

import os
import struct

import pytest
from helpers_inspect import chunks, flow

from bridge.inspect.api import C2S, S2C
from bridge.inspect.tls import TlsInspector

# Captured from `openssl s_client -servername www.example.test -alpn h2,http/1.1` (OpenSSL 3).
HELLO = open(os.path.join(os.path.dirname(__file__), "data", "clienthello_openssl.bin"),
             "rb").read()


def feed(pieces: list[bytes]) -> dict:  # type: ignore[type-arg]
    t, f = TlsInspector(), flow(443)
    for p in pieces:
        assert t.data(f, C2S, p) is None
    return f.metadata


@pytest.mark.parametrize("size", [1, 2, 5, 6, 100, len(HELLO)])
def test_real_client_hello_any_fragmentation(size: int) -> None:
    md = feed(chunks(HELLO, size))
    assert md["tls"]["sni"] == "www.example.test"
    assert md["tls"]["alpn"] == ["h2", "http/1.1"]
    assert "0x0304" in md["tls"]["versions"]


def test_handshake_split_across_records() -> None:
    body = HELLO[5:]     # the handshake message, re-cut into 3 records of 50, 50 and the rest
    recs = b""
    for i in range(0, len(body), 50):
        part = body[i:i + 50]
        recs += struct.pack("!BHH", 22, 0x0301, len(part)) + part
    md = feed(chunks(recs, 7))
    assert md["tls"]["sni"] == "www.example.test"


def test_server_direction_is_ignored() -> None:
    t, f = TlsInspector(), flow(443)
    t.data(f, S2C, b"\x00" * 10)
    assert "tls" not in f.metadata


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\x00",                                  # zero-length record
    b"\x16\x03\x01\xff\xff" + b"\x00" * 10,                    # record too long
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",              # ServerHello first
    HELLO[:5] + b"\x01\x00\x01\x4b\x03\x03" + b"\xff" * (len(HELLO) - 11),  # lengths lie
])
def test_garbage_is_noted_never_raises(junk: bytes) -> None:
    md = feed([junk])
    assert "error" in md["tls"]


def test_truncated_hello_waits_then_nothing() -> None:
    md = feed([HELLO[:100]])
    assert "tls" not in md        # still waiting for the rest


def test_hello_without_sni() -> None:
    # A minimal ClientHello built by hand: no extensions at all.
    body = struct.pack("!H", 0x0303) + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    md = feed([struct.pack("!BHH", 22, 0x0301, len(hs)) + hs])
    assert md["tls"] == {"sni": None, "alpn": [], "versions": [], "legacy_version": "0x0303"}
