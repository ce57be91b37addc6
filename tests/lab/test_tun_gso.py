"""The TUN's GSO cap in the lab (bridge/io/tun.py `fit_gso`, knob GREBE_TUN_GSO_SEGS).

Lab `two-sites-plain` with `grebe up` on both gateways (the two-sites GRE configs: key and
sequence numbers over IPv4, TUN MTU 1460, 1,472-byte datagrams, 44 per UDP GSO send).

- With GREBE_TUN_GSO_SEGS=auto gw-a's TUN shows gso_max_segs 44 (`ip -d link`), and TCP that
  gw-a itself sends through the tunnel comes as TSO frames of at most 44 segments: one UDP
  send per TUN read (udp_sends <= 1.1 x tun_reads; without the cap it is ~2x).
- Why the cap is off by default: a FORWARDED frame (client -> server) was sized by the
  client's device, and with more segments than the cap the kernel cuts it into single
  packets before the TUN; shown here as reads of packets, not frames. Without the cap the
  same transfer reaches the TUN as whole frames.
Transfers are iperf3 runs of 2 s; waits are wait-for-condition.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bridge.io.tun import gso_max_segs
from bridge.lab.netlink import Lab

TOPO = Path(__file__).resolve().parents[2] / "topologies"
SERVER4 = "198.18.2.10"
GRE_KEY_SEQ = 12  # two-sites: GRE with key and sequence number (RFC 2890 §2)


def _status(lab: Lab, node: str, check: bool = True) -> dict[str, Any] | None:
    cp = lab.run(node, ["grebe", "status", "--json"], check=check)
    return json.loads(cp.stdout) if cp.returncode == 0 else None


@contextmanager
def gateways(lab: Lab, knob: str | None) -> Iterator[None]:
    """grebe on gw-a (GREBE_TUN_GSO_SEGS=`knob`, None: unset) and gw-b; SIGTERM at the end."""
    env = {k: v for k, v in os.environ.items() if k != "GREBE_TUN_GSO_SEGS"}
    if knob is not None:
        env["GREBE_TUN_GSO_SEGS"] = knob
    procs: list[subprocess.Popen[Any]] = []
    try:
        for node in ("gw-a", "gw-b"):
            cfg = str(TOPO / f"two-sites/{node}.toml")
            procs.append(lab.popen(node, ["grebe", "up", "-c", cfg],
                                   log=str(lab.state_dir / f"grebe-{node}.log"), env=env))
        for node in ("gw-a", "gw-b"):
            lab.wait_for(lambda n=node: _status(lab, n, check=False), 15, f"grebe on {node}")
        lab.wait_for(lambda: lab.run("client", ["ping", "-c1", "-W1", SERVER4],
                                     check=False).returncode == 0, 15, "the tunnel")
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=15)


@pytest.fixture(scope="module")
def lab(two_sites_plain: Lab) -> Lab:
    two_sites_plain.popen("server", ["iperf3", "-s", "-B", SERVER4],
                          log=str(two_sites_plain.state_dir / "iperf3.log"))
    two_sites_plain.wait_for(
        lambda: ":5201" in two_sites_plain.run("server", ["ss", "-ltn"]).stdout, 10,
        "iperf3 server")
    return two_sites_plain


def transfer(lab: Lab, src: str) -> tuple[int, int, int]:
    """2 s of single-stream iperf3 from `src` to the server: (bytes, gw-a tun_reads,
    gw-a udp_sends) during it."""
    before = _status(lab, "gw-a")
    cp = lab.run(src, ["iperf3", "-c", SERVER4, "-t", "2", "-J"], timeout=30)
    after = _status(lab, "gw-a")
    assert before is not None and after is not None
    sent = int(json.loads(cp.stdout)["end"]["sum_sent"]["bytes"])
    return (sent, after["io"]["tun_reads"] - before["io"]["tun_reads"],
            after["io"]["udp_sends"] - before["io"]["udp_sends"])


def tun_gso_max_segs(lab: Lab) -> int:
    link = lab.run("gw-a", ["ip", "-d", "link", "show", "grebe0"]).stdout
    return int(link.split("gso_max_segs ")[1].split()[0])


def test_capped_tun_sends_each_local_tso_frame_in_one_udp_send(lab: Lab) -> None:
    with gateways(lab, "auto"):
        st = _status(lab, "gw-a")
        assert st is not None and st["tun"]["mtu"] == 1460
        want = gso_max_segs(1460, [(GRE_KEY_SEQ, False)])
        assert want == 44 and tun_gso_max_segs(lab) == want
        sent, reads, sends = transfer(lab, "gw-a")
        print(f"capped, gw-a -> server: {sent / reads:.0f} B per TUN read, "
              f"{sends / reads:.2f} UDP sends per TUN read")
        assert sent > 20_000_000 and sent / reads > 16_000, (sent, reads)  # TSO frames
        assert sends <= 1.1 * reads, (reads, sends)
        # forwarded frames above the cap are cut into packets before the TUN (why it is off)
        sent, reads, sends = transfer(lab, "client")
        print(f"capped, client -> server: {sent / reads:.0f} B per TUN read")
        assert sent > 5_000_000 and sent / reads < 4_000, (sent, reads)


def test_off_by_default_forwarded_frames_reach_the_tun_whole(lab: Lab) -> None:
    with gateways(lab, None):
        assert tun_gso_max_segs(lab) == 65535  # the kernel's default, left alone
        sent, reads, sends = transfer(lab, "client")
        print(f"uncapped, client -> server: {sent / reads:.0f} B per TUN read, "
              f"{sends / reads:.2f} UDP sends per TUN read")
        assert sent > 20_000_000 and sent / reads > 16_000, (sent, reads)
