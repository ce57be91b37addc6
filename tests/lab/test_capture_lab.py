"""`grebe capture` for real: a running `grebe up` (two processes, split directions) mirrors
one peer's datagrams while a ping crosses, and tshark reads the pcapng file: GRE-in-UDP on the
outer interface (key 42), the ICMP echo request and reply inside, both directions, on both
the outer and the inner interface. Waits are wait-for-condition (Lab.wait_for)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from test_bridge import SERVER4, VARIANTS, Gateways, ping

from bridge.lab.netlink import Lab
from bridge.lab.topology import load

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed"),
]

FIELDS = ["frame.interface_name", "frame.packet_flags", "ip.src", "ip.dst", "udp.dstport",
          "gre.key", "icmp.type"]


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(load("two-sites-plain"), instance=f"cap{os.getpid()}", start=False,
                 progress=PROGRESS.append)
    try:
        yield lab
    finally:
        lab.destroy()


def test_lab_bring_up_says_what_it_does(lab: Lab) -> None:
    """Lab.up(progress=...) (`./netns-lab.sh up`, bench): each step as it begins."""
    steps = [m.split(": ", 1)[1] for m in PROGRESS]
    assert all(m.startswith(f"lab {lab.instance}: ") for m in PROGRESS)
    assert steps[0].startswith("creating 6 namespaces: client, gw-a")
    assert "waiting for carrier on every interface" in steps
    assert steps[-1].startswith("up in ") and steps[-1].endswith(" s")


def test_capture_a_ping_and_tshark_reads_it(lab: Lab) -> None:
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"], datapath="python")
    try:
        st = gw.status("gw-a")
        assert st is not None and st["io"]["processes"] == 2  # both processes are tapped
        path = lab.state_dir / "site-b.pcapng"
        log = lab.state_dir / "capture.log"
        cap = lab.popen("gw-a", ["grebe", "capture", "--peer", "site-b", "--count", "1000",
                                 "--duration", "6", "-w", str(path)], log=str(log))
        lab.wait_for(lambda: "capturing peer site-b" in log.read_text(), timeout=10,
                     what="grebe capture armed")
        ping(lab, SERVER4, count=3)
        assert cap.wait(timeout=30) == 0, log.read_text()
        assert "datagrams received" in log.read_text()
        argv = ["tshark", "-r", str(path), "-d", "udp.port==4754,gre", "-T", "fields",
                "-E", "separator=;", "-E", "occurrence=a", "-E", "aggregator=,"]
        for f in FIELDS:
            argv += ["-e", f]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        rows = [dict(zip(FIELDS, ln.split(";"), strict=True)) for ln in out.stdout.splitlines()]
        outer = [r for r in rows if r["frame.interface_name"] == "outer"]
        inner = [r for r in rows if r["frame.interface_name"] == "inner"]

        def icmp(rs: list[dict[str, str]], kind: str, flags: str) -> int:
            return sum(1 for r in rs if r["icmp.type"] == kind and r["frame.packet_flags"] == flags)

        # outbound (flags 2): the echo requests gw-a sends; inbound (1): the replies it gets
        assert icmp(outer, "8", "0x00000002") >= 3 and icmp(outer, "0", "0x00000001") >= 3, rows
        assert icmp(inner, "8", "0x00000002") >= 3 and icmp(inner, "0", "0x00000001") >= 3, rows
        for r in outer:  # every outer packet: GRE-in-UDP between the gateways, key 42
            assert r["udp.dstport"] == "4754" and int(r["gre.key"], 0) == 42, r
            assert {r["ip.src"].split(",")[0], r["ip.dst"].split(",")[0]} == \
                {"198.18.0.1", "198.18.0.2"}, r
        # the endpoint let go of the file: nothing is appended after the client is done
        size = path.stat().st_size
        ping(lab, SERVER4, count=2)
        assert path.stat().st_size == size
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
