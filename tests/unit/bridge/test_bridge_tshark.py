"""Dissector cross-check: what the Bridge sends, as Wireshark's dissectors read it (tshark).

Reading a pcap needs no privileges. The outer Ethernet/IP/UDP headers are scapy's (the
kernel builds them in production); the UDP payload is exactly what Bridge put in out.udp.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from grebe_sites import Pair, v4, v6
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

FIELDS = ["gre.flags.checksum", "gre.flags.key", "gre.flags.sequence_number",
          "gre.flags.version", "gre.key", "gre.sequence_number", "gre.checksum.status",
          "gre.proto", "ip.src", "ipv6.src", "ip.ttl", "ipv6.hlim"]


def _tshark(tmp: Path, extra: str, v6_underlay: bool, decode: str) -> list[dict[str, str]]:
    pair = Pair(extra, v6_underlay=v6_underlay)
    oa, _ = pair.a_to_b([v4(ttl=30), v6(hlim=30), v4(ttl=30)])
    outer = (IPv6(src=pair.a_addr[0], dst=pair.b_addr[0]) if v6_underlay
             else IP(src=pair.a_addr[0], dst=pair.b_addr[0]))
    frames = [Ether() / outer / UDP(sport=4754, dport=4754) / bytes(d)
              for d in oa.udp[pair.b_addr]]
    path = tmp / "w.pcap"
    wrpcap(str(path), frames)
    argv = [str(TSHARK), "-r", str(path), "-d", f"udp.port==4754,{decode}", "-T", "fields",
            "-E", "separator=;", "-E", "occurrence=l"]
    for f in FIELDS:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    rows = [dict(zip(FIELDS, line.split(";"), strict=True))
            for line in res.stdout.splitlines() if line]
    assert len(rows) == 3
    return rows


@pytest.mark.parametrize("v6_underlay", [False, True])
def test_gre_key_seq_csum_as_tshark_reads_it(tmp_path: Path, v6_underlay: bool) -> None:
    rows = _tshark(tmp_path, 'key = 42\nsequence = "drop-late"\nchecksum = true', v6_underlay,
                   "gre")
    for seq, row in enumerate(rows):
        assert (row["gre.flags.checksum"], row["gre.flags.key"],
                row["gre.flags.sequence_number"], row["gre.flags.version"]) == (
            "1", "1", "1", "0")
        assert int(row["gre.key"], 0) == 42 and int(row["gre.sequence_number"]) == seq
        assert row["gre.checksum.status"] == "1"  # Wireshark: checksum good
    assert [int(r["gre.proto"], 16) for r in rows] == [0x0800, 0x86DD, 0x0800]
    assert rows[0]["ip.src"] == "198.18.10.5" and rows[0]["ip.ttl"] == "29"
    assert rows[1]["ipv6.src"] == "2001:db8:10::5" and rows[1]["ipv6.hlim"] == "29"


def test_plain_gre(tmp_path: Path) -> None:
    rows = _tshark(tmp_path, "", False, "gre")
    for row in rows:
        assert (row["gre.flags.checksum"], row["gre.flags.key"],
                row["gre.flags.sequence_number"]) == ("0", "0", "0")


def test_ipip_fou_inner_v4(tmp_path: Path) -> None:
    rows = _tshark(tmp_path, 'encapsulation = "ipip"', False, "ip")
    assert rows[0]["ip.src"] == "198.18.10.5" and rows[0]["ip.ttl"] == "29"
    assert rows[2]["ip.ttl"] == "29"
