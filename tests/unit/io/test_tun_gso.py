"""The TUN's GSO cap (bridge/io/tun.py): gso_max_segs() table, the UDP adapter's own rule on
loopback, and how TunDevice applies it (a fake pyroute2 IPRoute records the netlink calls)."""

from __future__ import annotations

import logging
from typing import Any

import pyroute2  # type: ignore[import-untyped]
import pytest

from bridge.gso import UdpRun
from bridge.io import tun as tun_mod
from bridge.io.tun import (
    GSO_AUTO,
    UDP_MAX_PAYLOAD_V4,
    UDP_MAX_PAYLOAD_V6,
    TunDevice,
    gso_knob,
    gso_max_segs,
)
from bridge.io.udp import UdpEndpoint

V4, V6 = False, True

# (mtu, [(encapsulation header, underlay IPv6)], expected, why)
TABLE = [
    (1460, [(12, V4)], 44, "two-sites: GRE key+seq over IPv4, 1,472-byte datagrams"),
    (1472, [(0, V4)], 44, "IPIP over IPv4: the same 1,472 bytes"),
    (1456, [(16, V4)], 44, "GRE csum+key+seq over IPv4"),
    (1468, [(4, V4)], 44, "plain GRE over IPv4"),
    (1440, [(12, V6)], 45, "GRE key+seq over IPv6: 1,452 x 45 = 65,340 <= 65,527"),
    (1452, [(0, V6)], 45, "IPIP over IPv6"),
    (1456, [(0, V4)], 44, "45 x 1,456 = 65,520: fits IPv6 (65,527), not IPv4 (65,507)"),
    (1456, [(0, V6)], 45, "... the IPv6 side of it"),
    (1456, [(0, V6), (0, V4)], 44, "a dual-stack endpoint: the IPv4 peer is the worst"),
    (1424, [(0, V4)], 46, "46 x 1,424 = 65,504"),
    (1424, [(0, V4), (4, V4)], 45, "a GRE peer beside an IPIP one: 46 x 1,428 > 65,507"),
    (1360, [(12, V4)], 47, "after a path MTU of 1,400: 47 x 1,372 = 64,484"),
    (576, [(4, V4)], 64, "small datagrams: the 64-segment limit binds"),
    (1000, [], 64, "no peers: nothing to fit"),
    (9000, [(16, V6)], 7, "jumbo frames"),
    (65535, [(0, V4)], 1, "never below 1"),
]


@pytest.mark.parametrize(("mtu", "encap", "want", "why"), TABLE, ids=[t[3] for t in TABLE])
def test_gso_max_segs_table(mtu: int, encap: list[tuple[int, bool]], want: int,
                            why: str) -> None:
    assert gso_max_segs(mtu, encap) == want, why


def test_gso_max_segs_refuses_our_misuse() -> None:
    with pytest.raises(ValueError):
        gso_max_segs(67, [(0, V4)])
    with pytest.raises(ValueError):
        gso_max_segs(1500, [(-4, V4)])


@pytest.mark.parametrize(("host", "v6"), [("127.0.0.1", V4), ("::1", V6)])
@pytest.mark.parametrize(("mtu", "header"), [(1460, 12), (1440, 12), (1456, 0), (1424, 4),
                                             (576, 4), (9000, 16)])
def test_the_udp_adapter_sends_that_many_in_one_call_and_no_more(
        host: str, v6: bool, mtu: int, header: int) -> None:
    """The same rule as UdpEndpoint._send_udprun, checked on a real socket: a run of
    gso_max_segs() full-size datagrams is one sendmsg the kernel takes, one more is two
    (unless the 64-segment limit binds, where the rule is that limit)."""
    a = UdpEndpoint(host, 0)
    b = UdpEndpoint(host, 0, gro=False)
    try:
        assert a.max_payload == (UDP_MAX_PAYLOAD_V6 if v6 else UDP_MAX_PAYLOAD_V4)
        dest = b.sock.getsockname()[:2]
        seg = mtu + header
        segs = gso_max_segs(mtu, [(header, v6)])

        def run(n: int) -> UdpRun:
            r = UdpRun(bytes(seg * n))
            r.seg = seg
            return r

        assert a.send_datagrams(dest, [run(segs)]) == 1
        assert a.send_datagrams(dest, [run(segs + 1)]) == 2
        assert a.send_errors == {} and a.gso
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(("text", "want"), [
    (None, None), ("", None), ("0", None), ("off", None), ("-3", None),
    ("auto", GSO_AUTO), (" AUTO ", GSO_AUTO), ("44", 44), ("100000", 65535),
])
def test_knob(text: str | None, want: int | None) -> None:
    assert gso_knob(text) == want


# -- TunDevice applying it ------------------------------------------------------------------

class FakeIPRoute:
    calls: list[dict[str, Any]] = []
    refuse = False

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def link(self, cmd: str, **kw: Any) -> None:
        assert cmd == "set"
        if "gso_max_segs" in kw and FakeIPRoute.refuse:
            raise OSError(95, "Operation not supported")
        FakeIPRoute.calls.append(kw)


@pytest.fixture
def dev(monkeypatch: pytest.MonkeyPatch) -> TunDevice:
    """A TunDevice past configure() (index 7, MTU 1460) without /dev/net/tun."""
    monkeypatch.setattr(pyroute2, "IPRoute", FakeIPRoute)
    FakeIPRoute.calls = []
    FakeIPRoute.refuse = False
    d = TunDevice.__new__(TunDevice)
    d.name, d.vnet_hdr, d.index, d.mtu = "t0", True, 7, 1460
    d.gso_segs, d._encap, d._gso_refused = None, None, False
    return d


def segs_set() -> list[int]:
    return [c["gso_max_segs"] for c in FakeIPRoute.calls if "gso_max_segs" in c]


def test_off_by_default(dev: TunDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GREBE_TUN_GSO_SEGS", raising=False)
    assert dev.fit_gso([(12, V4)]) is None
    dev.set_mtu(1360)
    assert segs_set() == [] and FakeIPRoute.calls == [{"index": 7, "mtu": 1360}]


def test_auto_sets_it_and_follows_the_mtu(dev: TunDevice,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREBE_TUN_GSO_SEGS", "auto")
    assert dev.fit_gso([(12, V4), (0, V4)]) == 44  # the GRE peer is the worst
    assert FakeIPRoute.calls == [{"index": 7, "gso_max_segs": 44}]
    dev.set_mtu(1360)  # a smaller path MTU: more segments fit
    assert FakeIPRoute.calls[1:] == [{"index": 7, "mtu": 1360}, {"index": 7, "gso_max_segs": 47}]
    dev.set_mtu(1361)  # the same count: no second netlink call for it
    assert segs_set() == [44, 47] and dev.gso_segs == 47


def test_a_number_is_taken_as_it_is(dev: TunDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREBE_TUN_GSO_SEGS", "20")
    assert dev.fit_gso([(12, V4)]) == 20
    dev.set_mtu(1000)
    assert segs_set() == [20]


def test_without_vnet_header_nothing(dev: TunDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREBE_TUN_GSO_SEGS", "auto")
    dev.vnet_hdr = False  # no TSO frames come from such a TUN
    assert dev.fit_gso([(12, V4)]) is None and FakeIPRoute.calls == []


def test_a_refusing_kernel_is_logged_once(dev: TunDevice, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("GREBE_TUN_GSO_SEGS", "auto")
    FakeIPRoute.refuse = True
    with caplog.at_level(logging.INFO, logger=tun_mod.log.name):
        assert dev.fit_gso([(12, V4)]) is None
        dev.set_mtu(1360)
        dev.set_mtu(1300)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.INFO
    assert dev.gso_segs is None and [c.get("mtu") for c in FakeIPRoute.calls] == [1360, 1300]
