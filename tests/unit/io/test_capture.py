"""`grebe capture` (bridge/io/capture.py, bridge/pcapng.py): a tap on a running Engine pair
over the fakes writes a pcapng file that tshark reads: the outer GRE-in-UDP datagrams and
the inner ICMP, both directions, only the chosen peer's, and nothing once the tap is over."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP

from bridge import pcapng
from bridge.config import loads_config
from bridge.io.capture import Tap, _counts, _spec, arm
from bridge.io.fake import MemoryNet, MemoryTun, drive
from bridge.io.loop import Engine
from bridge.pipeline import Bridge

TSHARK = shutil.which("tshark")


def _cfg(me: str, peer: str, name: str, prefix: str, encap: str) -> str:
    key = "key = 7\n" if encap == "gre" else ""
    return f"""
[tun]
name = "gb-{name}"
mtu = 1400
[listen]
address = "{me}"
[[peers]]
name = "site-{name}"
endpoint = "{peer}:4754"
prefixes = ["{prefix}"]
encapsulation = "{encap}"
{key}
[[peers]]
name = "other"
endpoint = "198.18.0.9:4754"
prefixes = ["198.18.9.0/24"]
encapsulation = "{encap}"
{key}"""


def _pair(encap: str) -> tuple[Engine, Engine, Any]:
    net = MemoryNet()
    ca = loads_config(_cfg("198.18.0.1", "198.18.0.2", "b", "198.18.2.0/24", encap))
    cb = loads_config(_cfg("198.18.0.2", "198.18.0.1", "a", "198.18.1.0/24", encap))
    ea = Engine(Bridge(ca, 1.0), MemoryTun("a"), net.endpoint("198.18.0.1"), time.monotonic)
    eb = Engine(Bridge(cb, 1.0), MemoryTun("b"), net.endpoint("198.18.0.2"), time.monotonic)
    return ea, eb, ca


def _ping(ea: Engine, eb: Engine, n: int) -> None:
    for i in range(n):
        ea.tun.inject(bytes(IP(src="198.18.1.5", dst="198.18.2.5") /  # type: ignore[attr-defined]
                            ICMP(type=8, id=9, seq=i)))
        drive([ea, eb])
        eb.tun.take()  # type: ignore[attr-defined]
        eb.tun.inject(bytes(IP(src="198.18.2.5", dst="198.18.1.5") /  # type: ignore[attr-defined]
                            ICMP(type=0, id=9, seq=i)))
        drive([ea, eb])
        ea.tun.take()  # type: ignore[attr-defined]
    # traffic for the other peer must not show up
    ea.tun.inject(bytes(IP(src="198.18.1.5", dst="198.18.9.5") / ICMP()))  # type: ignore[attr-defined]
    drive([ea, eb])


def _capture(tmp_path: Path, encap: str, count: int = 100) -> tuple[Path, Engine]:
    ea, eb, ca = _pair(encap)
    path = tmp_path / "c.pcapng"
    path.write_bytes(pcapng.header())
    spec = _spec({"peer": "site-b", "path": str(path), "count": count, "duration": 30}, ca)
    assert "error" not in spec, spec
    assert arm(ea, spec) == {"ok": True}
    assert isinstance(ea.tap, Tap)
    _ping(ea, eb, 3)
    arm(ea, {"stop": True})
    assert ea.tap is None
    return path, ea


def test_blocks_are_well_formed(tmp_path: Path) -> None:
    path, _ = _capture(tmp_path, "gre")
    blocks = pcapng.read_blocks(path.read_bytes())
    assert [k for k, _ in blocks[:3]] == [pcapng.SHB, pcapng.IDB, pcapng.IDB]
    assert struct.unpack_from("<I", blocks[0][1])[0] == 0x1A2B3C4D
    assert _counts(str(path)) == (3, 3, 6)  # 3 echo requests out, 3 replies in, all inner


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
@pytest.mark.parametrize("encap", ["gre", "ipip"])
def test_tshark_decodes_outer_and_inner_both_ways(tmp_path: Path, encap: str) -> None:
    path, _ = _capture(tmp_path, encap)
    decode = "gre" if encap == "gre" else "ip"
    fields = ["frame.interface_name", "frame.packet_flags", "ip.src", "udp.dstport", "gre.key",
              "icmp.type"]
    argv = [str(TSHARK), "-r", str(path), "-d", f"udp.port==4754,{decode}", "-T", "fields",
            "-E", "separator=;", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    rows = [dict(zip(fields, ln.split(";"), strict=True)) for ln in res.stdout.splitlines()]
    outer = [r for r in rows if r["frame.interface_name"] == "outer"]
    inner = [r for r in rows if r["frame.interface_name"] == "inner"]
    assert len(outer) == 6 and len(inner) == 6, res.stdout
    # outer: GRE (or IPIP) in UDP to port 4754 carrying the ICMP, the outer then inner source
    for r in outer:
        assert r["udp.dstport"] == "4754"
        assert r["ip.src"].split(",")[0] in ("198.18.0.1", "198.18.0.2")
        assert r["icmp.type"] in ("8", "0")
        if encap == "gre":
            assert int(r["gre.key"], 0) == 7
    sent = [r for r in outer if r["ip.src"].startswith("198.18.0.1")]
    got = [r for r in outer if r["ip.src"].startswith("198.18.0.2")]
    assert {r["icmp.type"] for r in sent} == {"8"} and {r["icmp.type"] for r in got} == {"0"}
    assert {r["frame.packet_flags"] for r in sent} == {"0x00000002"}  # outbound
    assert {r["frame.packet_flags"] for r in got} == {"0x00000001"}  # inbound
    assert sorted(r["icmp.type"] for r in inner) == ["0"] * 3 + ["8"] * 3
    # tshark finds nothing wrong (checksums of the rebuilt headers included)
    res = subprocess.run([str(TSHARK), "-r", str(path), "-o", "ip.check_checksum:TRUE",
                          "-o", "udp.check_checksum:TRUE", "-d", f"udp.port==4754,{decode}",
                          "-Y", "_ws.expert.severity >= warning"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert res.stdout.strip() == ""


def test_count_and_duration_bound_the_tap(tmp_path: Path) -> None:
    path, _ = _capture(tmp_path, "gre", count=2)
    assert _counts(str(path)) == (2, 2, 4)
    ea, eb, ca = _pair("gre")
    path2 = tmp_path / "d.pcapng"
    path2.write_bytes(pcapng.header())
    spec = _spec({"peer": "site-b", "path": str(path2), "count": 10, "duration": 0.01}, ca)
    arm(ea, spec)
    time.sleep(0.02)  # the tap's own deadline, not a wait for a condition
    _ping(ea, eb, 1)
    assert ea.tap is None and _counts(str(path2)) == (0, 0, 0)


def test_requests_are_checked(tmp_path: Path) -> None:
    _, _, ca = _pair("gre")
    assert "no peer 'x'" in _spec({"peer": "x", "path": "/tmp/a"}, ca)["error"]
    assert "absolute" in _spec({"peer": "site-b", "path": "rel"}, ca)["error"]
    assert "count" in _spec({"peer": "site-b", "path": "/a", "count": 0}, ca)["error"]
    not_pcap = tmp_path / "victim"
    not_pcap.write_text("keep me")
    ea, _, _ = _pair("gre")
    spec = _spec({"peer": "site-b", "path": str(not_pcap)}, ca)
    assert "pcapng header" in arm(ea, spec)["error"]
    assert not_pcap.read_text() == "keep me" and ea.tap is None
    real = tmp_path / "real.pcapng"
    real.write_bytes(pcapng.header())
    link = tmp_path / "link.pcapng"
    link.symlink_to(real)
    assert "error" in arm(ea, _spec({"peer": "site-b", "path": str(link)}, ca))
    assert ea.tap is None


def test_a_gro_batch_is_captured_datagram_by_datagram(tmp_path: Path) -> None:
    """UDP GRO hands the core runs of datagrams glued together (bridge/gso.py GroBatch): the
    tap writes each one, and ignores what another host sent."""
    from bridge.gro import GroBatch

    path = tmp_path / "g.pcapng"
    path.write_bytes(pcapng.header())
    inner = bytes(IP(src="198.18.2.5", dst="198.18.1.5") / ICMP(type=0) / bytes(32))
    dg = b"\x00\x00\x08\x00" + inner  # GRE without options, IPv4 inside
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND)
    tap = Tap(fd, "198.18.0.2", ("198.18.0.2", 4754), True, ("198.18.0.1", 4754), 10,
              time.monotonic() + 30)
    peer, stranger = ("198.18.0.2", 50000), ("198.18.0.66", 4754)
    assert tap.received([(GroBatch(bytearray(dg * 3), len(dg)), peer), (dg, stranger)])
    tap.close()
    assert _counts(str(path)) == (3, 0, 3)
    epbs = [b for k, b in pcapng.read_blocks(path.read_bytes()) if k == pcapng.EPB]
    assert inner in epbs[1]  # the inner interface's block holds the packet itself
