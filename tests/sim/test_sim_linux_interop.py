"""Interop with real Linux TCP through a TUN in a private namespace (needs root).

The kernel negotiates its usual options (MSS, SACK-permitted, timestamps, window scale 7),
so these runs exercise every option path against an independent implementation, with and
without seeded packet loss.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator

import pytest
from linux_peer import (
    KERNEL,
    KERNEL6,
    KERNEL6_ADDR,
    KERNEL_ADDR,
    STACK,
    STACK6,
    STACK6_ADDR,
    STACK_ADDR,
    LinuxPeer,
    available,
)
from replay import CLIENT, Echo
from tcp_demux import TcpDemux

from stack.events import Closed, ConnectionReset, DataReceived, PeerFinished
from stack.tcp_config import TcpConfig

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not available(), reason="needs root and /dev/net/tun"),
]

SIZE = 3_000_000

# CLIENT (replay.py): a Linux client that sends SIZE bytes, half-closes and checks the echo.

# A Linux echo server for our active open: echoes until EOF, then closes.
SERVER = r"""
import socket, sys
ls = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], 9000))
ls.listen(1)
print("LISTENING", flush=True)
c, _ = ls.accept()
c.settimeout(60)
while chunk := c.recv(1 << 20):
    c.sendall(chunk)
c.close()
"""


CFG = TcpConfig(recv_buffer=1 << 20, send_buffer=1 << 20, rto_min=0.2, delayed_ack=0.04)


@pytest.fixture(params=[0.0, 0.02], ids=["clean", "2pct-loss"])
def loss(request: pytest.FixtureRequest) -> Iterator[float]:
    yield request.param


def linux_client_to_echo(addr: str, seed: int, loss: float = 0.0) -> tuple[Echo, bytes, bytes]:
    """The Linux CLIENT sends SIZE bytes to our stack's Echo on `addr` port 8080 and checks
    the echo; returns our one accepted Echo app and the client's stdout and stderr."""
    demux = TcpDemux(CFG)
    demux.listen(8080)
    peer = LinuxPeer(demux, loss=loss, seed=seed)
    try:
        client = peer.popen([sys.executable, "-c", CLIENT, str(SIZE), addr])
        apps: list[Echo] = []

        def step(now: float) -> None:
            while (c := demux.accept()) is not None:
                apps.append(Echo(c))
            for app in apps:
                app.step()

        peer.pump(step, lambda: client.poll() is not None, timeout=120)
        out, err = client.communicate(timeout=10)
        print(f"\npackets in {peer.packets_in} out {peer.packets_out} dropped {peer.dropped}")
    finally:
        peer.close()
    [app] = apps
    return app, out, err


def test_linux_client_to_our_server_echo(loss: float) -> None:
    app, out, err = linux_client_to_echo(STACK_ADDR, 11, loss)
    info = app.conn.info()
    print(f"Linux client -> stack, loss {loss}: {info}")
    assert out.startswith(b"OK"), (out, err)
    assert app.received == SIZE and not app.reset
    assert info["ts"] and info["sack"] and info["wscale"] is not None


def test_our_client_to_linux_server_echo(loss: float) -> None:
    demux = TcpDemux(CFG)
    peer = LinuxPeer(demux, loss=loss, seed=12)
    try:
        server = peer.popen([sys.executable, "-u", "-c", SERVER, KERNEL_ADDR])
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"LISTENING"
        import time

        conn = demux.connect((STACK, 40000), (KERNEL, 9000), time.monotonic())
        import random

        data = random.Random(9).randbytes(SIZE)
        state = {"sent": 0, "got": bytearray(), "fin": False, "closed": False}

        def step(now: float) -> None:
            sent = state["sent"]
            assert isinstance(sent, int)
            if str(conn.state) in ("ESTABLISHED", "CLOSE-WAIT") and sent < SIZE:
                sent += conn.send(memoryview(data)[sent:])
                state["sent"] = sent
                if sent == SIZE:
                    conn.close()
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    got = state["got"]
                    assert isinstance(got, bytearray)
                    got += ev.data
                elif isinstance(ev, PeerFinished):
                    state["fin"] = True
                elif isinstance(ev, (Closed, ConnectionReset)):
                    state["closed"] = True

        peer.pump(step, lambda: bool(state["fin"]) or bool(state["closed"]), timeout=120)
        got = state["got"]
        assert isinstance(got, bytearray)
        print(f"\nstack -> Linux server, loss {loss}: {conn.info()}")
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert str(conn.state) == "TIME-WAIT"  # we closed first, then took their FIN
    finally:
        peer.close()


def test_linux_client_to_our_server_ipv6() -> None:
    app, out, err = linux_client_to_echo(STACK6_ADDR, 13)
    print(f"Linux client -> stack over IPv6: {app.conn.info()}")
    assert out.startswith(b"OK"), (out, err)
    assert app.conn.local[0] == STACK6 and app.conn.remote[0] == KERNEL6
    assert app.conn.send_mss == 1440 - 12  # 1500 - 60 (MSS option) - 12 (TSopt)
    assert app.conn.info()["rcv_mss"] == 1440  # what we advertised for IPv6


def test_our_client_to_linux_server_ipv6() -> None:
    demux = TcpDemux(CFG)
    peer = LinuxPeer(demux, seed=14)
    try:
        server = peer.popen([sys.executable, "-u", "-c", SERVER, KERNEL6_ADDR])
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"LISTENING"
        conn = demux.connect((STACK6, 40001), (KERNEL6, 9000), time.monotonic())
        got = bytearray()
        done = []

        def step(now: float) -> None:
            if str(conn.state) == "ESTABLISHED":
                conn.send(b"ping over IPv6")  # (close() in SYN-SENT would delete the TCB)
                conn.close()
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    got.extend(ev.data)
                elif isinstance(ev, (PeerFinished, Closed, ConnectionReset)):
                    done.append(ev)

        peer.pump(step, lambda: bool(done), timeout=60)
        assert bytes(got) == b"ping over IPv6" and isinstance(done[0], PeerFinished)
    finally:
        peer.close()
