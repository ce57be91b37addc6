"""The bench end to end in a real lab (root): two variants, --quick, then nothing left behind.

Bounded: two variants of three 3-second iperf3 runs and 20 pings each (about 30 s). It checks
what must hold on any machine (both rows measured, the kernel path faster than userspace
WireGuard, the JSON equal to the table's rows), never absolute speeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.lab import bench
from bridge.lab.netlink import lab_namespaces

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
    pytest.mark.timeout(240),
]

NEEDED = ("iperf3", "curl", "nginx", "ss", "wireguard-go", "wg")


@pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                    reason=f"needs {', '.join(NEEDED)} (netns-lab.sh installs them)")
def test_quick_bench_measures_and_leaves_nothing_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        lab_instance_names: Callable[[], str]) -> None:
    instance = lab_instance_names()  # tests/conftest.py: unique to this run, leak-checked
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--only", "plain", "wireguard-go", "--json", str(out),
                     "--instance", instance])
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["tunnels"]}
    assert rc == 0, (table, rows)
    assert rows["plain"]["status"] == "ok" and rows["wireguard-go"]["status"] == "ok"
    for r in rows.values():
        assert r["mbps_1"] > 0 and r["mbps_4"] > 0 and r["mbps_rev"] > 0 and r["rtt_ms"] > 0
    assert rows["plain"]["cpu_pct"] is None and rows["wireguard-go"]["cpu_pct"] > 0
    # The kernel's routed path is ~30x userspace WireGuard here; 2x survives any contention.
    assert doc["tunnel_ratios"]["plain"]["wireguard-go"]["mbps_1"] > 2
    assert f"{rows['plain']['mbps_1']:,.0f}" in table
    # torn down: no namespace, no wireguard-go of ours, no UAPI socket
    assert lab_namespaces(instance) == []
    wg = zlib.crc32(f"gb-{instance}-client".encode()) & 0xFFFF  # Bench.wg_name's tag
    ps = subprocess.run(["pgrep", "-af", f"wireguard-go gbw{wg:04x}"], capture_output=True,
                        text=True)
    assert ps.stdout == ""
    assert not any(Path("/var/run/wireguard").glob(f"gbw{wg:04x}*.sock"))
