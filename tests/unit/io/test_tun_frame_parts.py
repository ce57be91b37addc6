"""TunFrameParts (bridge/tunframe.py): a client-leg frame whose payload is not joined.

The Terminator's framer gives the same frame in two pieces as joined (every byte, the
IPv4 identification numbering included); the coalescer passes the pieces through in order;
the TUN adapter writes them as ONE frame with writev (a TUN takes one frame per write: two
writes would be two broken packets), checked here on a SOCK_SEQPACKET pair, which keeps
write boundaries as a TUN does.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from bridge.io.offload import coalesce
from bridge.io.tun import TunDevice
from bridge.tunframe import TunFrame, TunFrameParts, joined
from bridge.userspace.legwire import LegFramer
from stack.wire.tcp import ACK, PSH, TcpSegment

ADDRS = {v: (ipaddress.ip_address(s).packed, ipaddress.ip_address(d).packed)
         for v, s, d in ((4, "198.18.20.7", "198.18.10.5"),
                         (6, "2001:db8:2::7", "2001:db8:1::5"))}


def _seg(n: int) -> TcpSegment:
    data = os.urandom(n + 100)
    return TcpSegment(80, 40001, 12345, 678, ACK | PSH, 500, memoryview(data)[100:], 0,
                      None, None, False, (11, 22), (), 2)


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("n", [0, 1000, 60_000])
def test_parts_join_to_the_frame_of_the_joined_form(v: int, n: int) -> None:
    src, dst = ADDRS[v]
    whole, split = LegFramer(), LegFramer()
    for _ in range(3):  # the IPv4 identification advances alike in both
        seg = _seg(n)
        f = whole.frame(src, dst, seg, 1448)
        p = split.frame(src, dst, seg, 1448, parts=True)
        assert type(f) is TunFrame
        if n <= 1448:  # one segment or an ACK: joined, a TunFrameParts would cost more
            assert type(p) is TunFrame and p == f
        else:
            assert type(p) is TunFrameParts
            assert p.payload is seg.payload            # not copied
            assert len(p) == len(f) - n                # the headers alone
            assert joined(p) == f and type(joined(p)) is TunFrame
        assert whole.ident == split.ident


def test_coalesce_passes_parts_through_in_order() -> None:
    src, dst = ADDRS[4]
    lf = LegFramer()
    a = lf.frame(src, dst, _seg(3000), 1448, parts=True)
    b = lf.frame(src, dst, _seg(10), 1448)
    c = lf.frame(src, dst, _seg(5000), 1448, parts=True)
    out: list[bytes] = []
    assert coalesce([a, b, c], out, 1500) == 3
    assert out[0] is a and out[1] is b and out[2] is c


def test_tun_writes_parts_as_one_frame() -> None:
    src, dst = ADDRS[4]
    lf = LegFramer()
    p = lf.frame(src, dst, _seg(30_000), 1448, parts=True)
    f = lf.frame(src, dst, _seg(500), 1448)
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with r, w:
        tun = TunDevice.__new__(TunDevice)  # the write path only: no device opened
        tun.fd, tun.vnet_hdr, tun.mtu, tun.write_errors = w.fileno(), True, 1500, {}
        assert tun.write_packets([p, f]) == 2
        assert r.recv(1 << 17) == joined(p)      # one write, both parts
        assert r.recv(1 << 17) == f
        assert tun.write_errors == {}
