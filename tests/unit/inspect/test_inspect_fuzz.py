"""A misbehaving peer never makes an inspector raise: random and mutated streams (hypothesis)."""

from __future__ import annotations

import os

from helpers_inspect import flow
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.inspect.api import C2S, S2C
from bridge.inspect.http import HttpInspector
from bridge.inspect.tls import TlsInspector

HELLO = open(os.path.join(os.path.dirname(__file__), "data", "clienthello_openssl.bin"),
             "rb").read()
HTTP = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")

chunks = st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_http_random_streams(steps: list[tuple[bool, bytes]]) -> None:
    h, f = HttpInspector(), flow()
    for c2s, data in steps:
        assert h.data(f, C2S if c2s else S2C, data) is None
    h.eof(f, C2S)
    h.eof(f, S2C)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(HTTP[0]) - 1), st.integers(0, 255), chunks)
def test_http_mutated_then_random(pos: int, byte: int, steps: list[tuple[bool, bytes]]) -> None:
    h, f = HttpInspector(), flow()
    req = bytearray(HTTP[0])
    req[pos] = byte
    h.data(f, C2S, bytes(req))
    h.data(f, S2C, HTTP[1])
    for c2s, data in steps:
        h.data(f, C2S if c2s else S2C, data)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255), st.integers(1, 64))
def test_tls_mutated_hello(pos: int, byte: int, size: int) -> None:
    t, f = TlsInspector(), flow(443)
    hello = bytearray(HELLO)
    hello[pos] = byte
    for i in range(0, len(hello), size):
        t.data(f, C2S, bytes(hello[i:i + size]))
    md = f.metadata.get("tls")
    assert md is None or "error" in md or "sni" in md


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_tls_random_bytes(data: bytes) -> None:
    t, f = TlsInspector(), flow(443)
    t.data(f, C2S, b"\x16\x03\x01" + data)
