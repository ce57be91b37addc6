"""[[scrub]] rules in the lab (issue 12, bridge/scrub.py): two-sites with `grebe up`, rules
on gw-b for what comes out of the tunnel.

A UDP flood from the client to the server (3000 datagrams in about 3 s) meets an allow
rule with a rate of 100/s and a burst of 20 for the server's /32: most of it is dropped
and counted "scrub_rate" in `grebe status` and the metrics, while a ping to gw-b's own LAN
address (another prefix, not rate limited) during the flood loses nothing (under
sequence = "drop-late": the dropped flood must not make later packets look far ahead);
a deny rule for the server's IPv6 address stops ping6 and counts "scrub_denied". Waits
are wait-for-condition, never bare sleeps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bridge import SERVER4, SERVER6, TOPO, Gateways

from bridge.lab.netlink import Lab
from bridge.lab.topology import load

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
]

RULES = f"""
[[scrub]]
direction = "in"
dst = ["{SERVER6}/128"]
action = "deny"

[[scrub]]
direction = "in"
peer = "site-a"
dst = ["{SERVER4}/32"]
action = "allow"
rate = 100
burst = 20
"""
FLOOD = f"""
import socket, time
s = socket.socket(2, 2)
t0 = time.monotonic()
for i in range(3000):
    s.sendto(b"flood" * 20, ("{SERVER4}", 9998))
    if i % 100 == 99:  # about 1000 per second: a flood, not a test of the socket buffers
        time.sleep(max(0.0, t0 + (i + 1) / 1000 - time.monotonic()))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(load("two-sites-plain"), instance=f"scr{os.getpid()}", start=False)
    try:
        yield lab
    finally:
        lab.destroy()


def test_flood_is_rate_limited_and_legit_traffic_passes(lab: Lab) -> None:
    d = lab.state_dir
    cfg_b = d / "scrub-gw-b.toml"
    cfg_b.write_text((TOPO / "two-sites" / "gw-b.toml").read_text() + RULES)
    gw = Gateways(lab, TOPO / "two-sites" / "gw-a.toml", cfg_b)
    try:
        lab.run("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER4], timeout=30)
        st = gw.status("gw-b")
        assert st is not None and [r["action"] for r in st["scrub"]] == ["deny", "allow"]
        flood = lab.popen("client", ["python3", "-c", FLOOD], log=str(d / "flood.log"))
        # during the flood: 30 pings to gw-b's LAN address, another prefix, all answered
        cp = lab.run("client", ["ping", "-c", "30", "-i", "0.1", "-W", "2", "198.18.2.1"],
                     check=False, timeout=60)
        assert flood.wait(timeout=60) == 0
        assert " 0% packet loss" in cp.stdout, (cp.stdout, gw.status("gw-b"))
        st = gw.status("gw-b")
        assert st is not None
        limited = st["drops"]["scrub_rate"]
        # at most burst + rate * duration pass: the rest of the 3000 is dropped
        assert limited >= 3000 - 20 - 100 * 10, st["drops"]
        rule = st["scrub"][1]
        assert rule["dropped"] == limited and rule["matched"] >= 3000 + 3
        # under the rate nothing is lost: 10 pings at 5/s to the limited server
        cp = lab.run("client", ["ping", "-c", "10", "-i", "0.2", "-W", "2", SERVER4],
                     check=False, timeout=30)
        assert " 0% packet loss" in cp.stdout, cp.stdout
        # the deny rule: ping6 to the server gets nothing back, and is counted
        cp = lab.run("client", ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", SERVER6],
                     check=False, timeout=30)
        assert cp.returncode != 0
        st = gw.status("gw-b")
        assert st is not None and st["drops"]["scrub_denied"] >= 2
        metrics = lab.run("gw-b", ["curl", "-sf", "http://127.0.0.1:9108/metrics"]).stdout
        m = re.search(r'grebe_drops_total\{reason="scrub_rate"\} (\d+)', metrics)
        assert m and int(m.group(1)) >= limited, metrics[:2000]
        assert 'grebe_scrub_dropped_total{rule="0"}' in metrics
        assert Path(d / "flood.log").read_text() == ""
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
