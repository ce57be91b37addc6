"""The http inspector: h11 mirrors of both directions (keep-alive, pipelining, garbage)."""

from __future__ import annotations

import itertools

import pytest
from helpers_inspect import chunks, flow

from bridge.inspect.api import C2S, S2C
from bridge.inspect.http import HttpInspector

REQS = (b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n"
        b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
RESPS = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde"
         b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
         b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n")


def run(c2s: list[bytes], s2c: list[bytes], order: str = "interleave") -> dict:  # type: ignore[type-arg]
    h = HttpInspector()
    f = flow()
    if order == "c2s-first":
        steps = [(C2S, c) for c in c2s] + [(S2C, c) for c in s2c]
    else:
        steps = [x for pair in itertools.zip_longest([(C2S, c) for c in c2s],
                                                     [(S2C, c) for c in s2c]) for x in pair if x]
    for d, c in steps:
        assert h.data(f, d, c) is None        # read-only
    h.eof(f, C2S)
    h.eof(f, S2C)
    return f.metadata


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_pipelined_keepalive_chunked_and_head(size: int) -> None:
    md = run(chunks(REQS, size), chunks(RESPS, size), order="c2s-first")
    ex = md["http"]
    assert [e["method"] for e in ex] == ["GET", "HEAD", "POST"]
    assert [e["target"] for e in ex] == ["/a", "/b", "/c"]
    assert [e["status"] for e in ex] == [200, 200, 201]
    assert ex[0]["headers"] == [["host", "x"], ["user-agent", "t"]]
    assert [e["response_body"] for e in ex] == [5, 0, 3]     # HEAD has no body despite length
    assert ex[2]["request_body"] == 11
    assert "http_stopped" not in md


def test_keepalive_request_response_alternating() -> None:
    h, f = HttpInspector(), flow()
    for i in range(5):
        h.data(f, C2S, b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        h.data(f, S2C, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    assert [e["target"] for e in f.metadata["http"]] == [f"/{i}" for i in range(5)]
    assert all(e["status"] == 404 for e in f.metadata["http"])


def test_response_bytes_before_request_are_held() -> None:
    h, f = HttpInspector(), flow()
    h.data(f, S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.data(f, C2S, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert f.metadata["http"][0]["status"] == 200


def test_http10_close_delimited_body() -> None:
    md = run([b"GET /old HTTP/1.0\r\n\r\n"],
             [b"HTTP/1.0 200 OK\r\n\r\n", b"body until close"], order="c2s-first")
    ex = md["http"][0]
    assert ex["version"] == "1.0" and ex["status"] == 200
    assert ex["response_body"] == len(b"body until close")


def test_informational_100_continue() -> None:
    md = run([b"PUT /u HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
              b"abc"],
             [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"],
             order="c2s-first")
    ex = md["http"][0]
    assert ex["informational"] == [100] and ex["status"] == 204 and ex["request_body"] == 3


@pytest.mark.parametrize("junk", [
    b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x00" * 100_000,
])
def test_garbage_stops_parsing_and_notes_it(junk: bytes) -> None:
    h, f = HttpInspector(), flow()
    for c in chunks(junk, 1000):
        assert h.data(f, C2S, c) is None
    h.eof(f, C2S)
    assert "http_stopped" in f.metadata
    # and keeps ignoring the flow afterwards without raising
    assert h.data(f, S2C, b"HTTP/1.1 200 OK\r\n\r\n") is None


def test_server_garbage() -> None:
    h, f = HttpInspector(), flow()
    h.data(f, C2S, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.data(f, S2C, b"SSH-2.0-nope\r\n\r\n")
    assert f.metadata["http_stopped"].startswith("s2c")


def test_upgrade_101_stops() -> None:
    h, f = HttpInspector(), flow()
    h.data(f, C2S, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\n")
    h.data(f, S2C, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\n\x81\x05hello")
    assert f.metadata["http"][0]["informational"] == [101]
    assert "101" in f.metadata["http_stopped"]


def test_connection_close_then_more_requests_is_noted() -> None:
    h, f = HttpInspector(), flow()
    h.data(f, C2S, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h.data(f, S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nz")
    h.data(f, C2S, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(f.metadata["http"]) == 1
    assert f.metadata["http"][0]["status"] == 200


@pytest.mark.parametrize("size", [1000, 7001, 300_000])
def test_large_bodies_are_counted_and_keepalive_continues(size: int) -> None:
    big = 200_000
    reqs = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    resps = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"z" * big
             + b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!")
    for order in ("c2s-first", "interleave"):
        md = run(chunks(reqs, size), chunks(resps, size), order=order)
        ex = md["http"]
        assert [(e["target"], e["status"], e["response_body"]) for e in ex] == \
            [("/big", 200, big), ("/next", 404, 3)], order
        assert "http_stopped" not in md


def test_large_body_then_connection_close() -> None:
    md = run([b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
             [b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"y" * 100_000],
             order="c2s-first")
    assert md["http"][0]["response_body"] == 100_000 and "http_stopped" not in md


def test_ssh_is_recognised_at_once() -> None:
    h, f = HttpInspector(), flow(22)
    h.data(f, S2C, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    assert "status line" in f.metadata["http_stopped"]
