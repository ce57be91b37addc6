"""Issue 11 #8 in the lab: 10,000 abandoned handshakes against a userspace-inspected port.

Lab `two-sites` with gw-a running grebe with tests/lab/userspace-synflood/gw-a.toml (port 80
terminated in userspace, half-open caps 256 total / 128 per /24, SYN-ACK give-up after 2
retries). From the client namespace, tests/lab/userspace-synflood/synflood.py sends 10,000
SYNs at 2,000/s over a raw socket: half from the client's own address on ports where nothing
listens (its kernel answers our SYN-ACK with a RST), half from addresses on the client's LAN
that nobody holds (silent after their SYN). Meanwhile curl downloads 100 MB from nginx through
the inspected port. Checked: the download is byte-exact; the server's TCP accepted only a
handful of connections (its PassiveOpens counter: the flood never reached it); grebe counted
SYN cookies; and once the timeouts ran, grebe holds no flow and no half-open entry, and the
server has no connection on port 80 left. Bounded: 10,000 packets, about 5 s of flood.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_inspect_kernel import BIG, CLIENT, NGINX, SERVER, listening, write_www

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root and /dev/net/tun"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nginx", "curl", "ss")),
                       reason="needs nginx, curl and ss"),
]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "userspace-synflood"
FLOOD, RATE = 10_000, 2_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from bridge.lab.netlink import Lab

    d = tmp_path_factory.mktemp("userspace-synflood")
    lab = Lab.up("two-sites", instance=f"ussf{os.getpid() % 100000}", start=False)
    lab.tmp = d
    try:
        conf = d / "gw-a.toml"
        conf.write_text((HERE / "gw-a.toml").read_text().replace("{state}", str(d)))
        for node, cfg in (("gw-a", conf), ("gw-b", ROOT / "topologies/two-sites/gw-b.toml")):
            lab.popen(node, [sys.executable, "-m", "bridge", "up", "-c", str(cfg)],
                      log=str(d / f"{node}.log"), cwd=str(ROOT))
        write_www(d)
        (d / "nginx.conf").write_text(NGINX.format(d=d))
        lab.popen("server", ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                  log=str(d / "nginx.out"))
        lab.wait_for(lambda: listening(lab, "server", 80), 20, "nginx on port 80")
        lab.wait_for(lambda: lab.run("client", ["curl", "-sS", "--max-time", "2", "-o",
                                                "/dev/null", f"http://{SERVER}/index.html"],
                                     check=False).returncode == 0, 30, "HTTP through grebe")
        yield lab
    finally:
        lab.destroy()


def _passive_opens(lab: Any) -> int:
    lines = [ln.split() for ln in lab.run("server", ["cat", "/proc/net/snmp"]).stdout
             .splitlines() if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("PassiveOpens")])


def _grebe(lab: Any) -> dict[str, Any]:
    cp = lab.run("gw-a", [sys.executable, "-m", "bridge", "flows", "--json"], timeout=20,
                 cwd=str(ROOT))
    answer: dict[str, Any] = json.loads(cp.stdout)
    return answer


def test_ten_thousand_abandoned_handshakes_leave_nothing_behind(lab: Any) -> None:
    d: Path = lab.tmp
    want = hashlib.sha256((d / "www" / "big.bin").read_bytes()).hexdigest()
    opens_before = _passive_opens(lab)
    dl = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("client"), "sh", "-c",
         f"curl -sS --max-time 120 --limit-rate 20M http://{SERVER}/big.bin | sha256sum"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        flood = lab.run("client", [sys.executable, str(HERE / "synflood.py"), SERVER, "80",
                                   str(FLOOD), str(RATE), CLIENT, "198.18.1.0"], timeout=60)
        assert int(flood.stdout.strip()) == FLOOD
        st = _grebe(lab)["inspect"]
        assert st["admission"]["cookies_sent"] > 0, st           # the caps were reached
        assert st["admission"]["half_open_peak"] <= 256, st
        out, err = dl.communicate(timeout=120)
    finally:
        if dl.poll() is None:
            dl.kill()
            dl.wait()
    assert out.split()[0] == want, err                          # the download completed
    # the flood never reached the server: the download, the readiness probe, no more
    assert _passive_opens(lab) - opens_before <= 3

    def nothing_left() -> bool:
        g = _grebe(lab)
        return not g["flows"] and g["inspect"]["half_open"] == 0

    lab.wait_for(nothing_left, 45, "grebe to hold no flow (SYN-ACK give-up, TIME-WAIT)")
    st = _grebe(lab)["inspect"]
    print(f"\nflood of {FLOOD} SYNs at {RATE}/s during a {BIG >> 20} MB download: "
          f"half-open peak {st['admission']['half_open_peak']}, cookies sent "
          f"{st['admission']['cookies_sent']}, ended {st['ended']}")
    left = lab.run("server", ["ss", "-Htn", "state", "connected", "sport = :80"]).stdout
    assert not [ln for ln in left.splitlines() if "TIME-WAIT" not in ln], left
