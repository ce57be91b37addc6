"""An endpoint runs as an unprivileged user holding only CAP_NET_ADMIN (README "Two real
hosts"): `grebe up` as uid 65534 (nobody) with CAP_NET_ADMIN as its one ambient capability
creates its TUN, addresses and routes, joins the two sites, and answers `grebe status`.

/dev/net/tun is mode 0666 on the distributions (udev); on this test machine it is 0600, so
each gateway runs in a private mount namespace where a 0666 node of the same device is bound
over it: the host's /dev is not changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CAP_NET_ADMIN = 1 << 12  # linux/capability.h
# private mount namespace: a 0666 /dev/net/tun, as on a stock distribution; then drop to nobody
UNPRIV = r"""
set -e
d="$GREBE_LAB_DIR/tun-$GREBE_LAB_NODE"
mkdir -p "$d"
mount -t tmpfs none "$d"
mknod "$d/tun" c 10 200
chmod 666 "$d/tun"
mount --bind "$d/tun" /dev/net/tun
exec setpriv --reuid=65534 --regid=65534 --clear-groups \
    --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin -- "$@"
"""


def _caps(pid: int) -> tuple[int, int]:
    """(effective uid, effective capability set) of a process."""
    text = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+\d+\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    cap = int(re.search(r"^CapEff:\s+([0-9a-f]+)", text, re.M).group(1), 16)  # type: ignore[union-attr]
    return uid, cap


def test_grebe_up_as_nobody_with_cap_net_admin_only(lab_factory: Any) -> None:
    lab = lab_factory("two-sites-plain")
    procs = {}
    for gw in ("gw-b", "gw-a"):
        cfg = ROOT / "topologies" / "two-sites" / f"{gw}.toml"
        procs[gw] = lab.popen(gw, ["unshare", "-m", "sh", "-c", UNPRIV, "unpriv",
                                   "grebe", "up", "-c", str(cfg)],
                              log=str(lab.state_dir / f"{gw}-unpriv.log"))
    lab.wait_for(lambda: lab.run("client", ["ping", "-c", "1", "-W", "1", "198.18.2.10"],
                                 check=False).returncode == 0, 30, "ping through the tunnel")
    lab.run("client", ["ping", "-c", "3", "-i", "0.2", "2001:db8:2::10"])
    for gw, p in procs.items():
        assert p.poll() is None, Path(lab.state_dir / f"{gw}-unpriv.log").read_text()
        assert _caps(p.pid) == (65534, CAP_NET_ADMIN)
        st = json.loads(lab.run(gw, ["grebe", "status", "--json"]).stdout)
        assert st["peers"][0]["up"] is True
