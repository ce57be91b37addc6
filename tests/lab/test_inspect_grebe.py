"""The kernel termination backend on a grebe gateway: topologies/two-sites-inspect-kernel.toml.

gw-a runs grebe (the only route to site B is the grebe TUN) and `python -m bridge.tproxy`:
TPROXY on the LAN side diverts the client's TCP to the server's port 80 into the relay, whose
upstream leg (bound to the client's address) is routed into the TUN like any other packet, and
whose replies come back out of the TUN to the transparent socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root and /dev/net/tun"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nft", "curl")),
                       reason="needs nft and curl"),
]

ROOT = Path(__file__).resolve().parents[2]
SERVER, SERVER6 = "198.18.2.10", "2001:db8:2::10"
SIZE = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from bridge.lab.netlink import Lab

    lab = Lab.up(ROOT / "topologies" / "two-sites-inspect-kernel.toml",
                 instance=f"insg{os.getpid() % 100000}")
    try:
        state = Path(lab.state_dir)
        with open(state / "big.bin", "wb") as f:
            for _ in range(SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        lab.wait_for(lambda: (state / "gw-a-tproxy.ready").exists(), 30, "tproxy on gw-a")
        lab.wait_for(lambda: lab.run("client", ["curl", "-s", "-o", "/dev/null", "-m", "2",
                                                f"http://{SERVER}/"], check=False)
                     .returncode == 0, 30, "HTTP through grebe")
        yield lab
    finally:
        lab.destroy()


def flows(lab: Any) -> list[dict[str, Any]]:
    path = Path(lab.state_dir) / "inspect-gw-a.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_download_through_tproxy_and_grebe(lab: Any) -> None:
    want = hashlib.sha256((Path(lab.state_dir) / "big.bin").read_bytes()).hexdigest()
    out = lab.run("client", ["sh", "-c", f"curl -sS --max-time 120 http://{SERVER}/big.bin"
                             " | sha256sum"], timeout=150).stdout.split()[0]
    assert out == want
    rec = lab.wait_for(lambda: next((f for f in flows(lab) if any(
        h.get("target") == "/big.bin" for h in f.get("http", []))), None), 20, "log line")
    assert rec["rule"] == "server-web-ssh" and rec["src"] == "198.18.1.10"
    assert rec["close"] == "closed" and rec["http"][0]["response_body"] == SIZE
    # the server saw the client's own address, not gw-a's
    server_log = (Path(lab.state_dir) / "server.run0.log").read_text()
    assert "198.18.1.10 - - " in server_log and '"GET /big.bin HTTP/1.1" 200' in server_log
    # the upstream leg went through the tunnel: grebe's TUN carried at least the file
    with lab.iproute("gw-a") as ipr:
        link = ipr.link("get", index=ipr.link_lookup(ifname="grebe0")[0])[0]
        stats = link.get_attr("IFLA_STATS64")
    assert stats["rx_bytes"] >= SIZE


def test_ipv6_through_tproxy_and_grebe(lab: Any) -> None:
    out = lab.run("client", ["curl", "-sS", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://[{SERVER6}]/gw-a-tproxy.ready"]).stdout
    assert out == "200"
    rec = lab.wait_for(lambda: next((f for f in flows(lab) if f["dst"] == SERVER6), None), 20,
                       "IPv6 log line")
    assert rec["src"] == "2001:db8:1::10" and rec["http"][0]["status"] == 200
