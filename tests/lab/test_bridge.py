"""grebe for real, in the lab: two-sites-plain with `grebe up` started on both gateways.

Covers: ping and a 100 MB HTTP download (sha256 checked) over IPv4 and IPv6 inside, for GRE
and IPIP, over an IPv4 and an IPv6 underlay; the wire format seen by tshark and scapy; hostile
datagrams from the attacker (each dropped, counted by reason, none reaching site B's LAN,
forwarding unharmed); PMTU with a narrowed WAN; SIGTERM cleanup; a second instance refused;
SIGHUP and `grebe reload` never stop an endpoint (a bad file refused, exit 2).
Waits are wait-for-condition (Lab.wait_for), never bare sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.netlink import Lab
from bridge.lab.topology import load

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
]

TOPO = Path(__file__).resolve().parents[2] / "topologies"
CLIENT4, SERVER4 = "198.18.1.10", "198.18.2.10"
CLIENT6, SERVER6 = "2001:db8:1::10", "2001:db8:2::10"
BLOB_MB = 100
HTTP_PORT = 8080

VARIANTS = {  # name: (config of gw-a, config of gw-b)
    "gre-v4underlay": ("two-sites/gw-a.toml", "two-sites/gw-b.toml"),
    "gre-v6underlay": ("two-sites/gw-a-v6.toml", "two-sites/gw-b-v6.toml"),
    "ipip-v4underlay": ("two-sites-ipip/gw-a.toml", "two-sites-ipip/gw-b.toml"),
    "ipip-v6underlay": ("two-sites-ipip/gw-a-v6.toml", "two-sites-ipip/gw-b-v6.toml"),
}


DATAPATHS = ["python", "ebpf"]  # issue 14: each test below that takes `datapath` runs on both


def with_datapath(lab: Lab, cfg: str | Path, datapath: str) -> Path:
    """A copy of `cfg` (relative to topologies/) with `datapath = ...` on top."""
    src = TOPO / cfg
    p = lab.state_dir / f"{datapath}-{src.parent.name}-{src.name}"
    p.write_text(f'datapath = "{datapath}"\n' + src.read_text())
    return p


class Gateways:
    """`grebe up` on gw-a and gw-b of a lab; stop() sends SIGTERM and checks exit 0.
    `datapath` (issue 14) sets the configs' datapath key; None keeps the files' own."""

    def __init__(self, lab: Lab, cfg_a: str | Path, cfg_b: str | Path,
                 extra: tuple[str, ...] = (), datapath: str | None = None) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        if datapath is not None:
            cfg_a, cfg_b = with_datapath(lab, cfg_a, datapath), with_datapath(lab, cfg_b, datapath)
        for node, cfg in (("gw-a", cfg_a), ("gw-b", cfg_b)):
            log = str(lab.state_dir / f"grebe-{node}.log")
            self.procs[node] = lab.popen(node, ["grebe", "up", "-c", str(TOPO / cfg), *extra],
                                         log=log)
        for node in self.procs:
            lab.wait_for(lambda n=node: self._alive(n) and self.status(n, check=False),
                         timeout=15, what=f"grebe control socket on {node}")
            if datapath is not None:
                st = self.status(node)
                assert st is not None and st["datapath"] == datapath, self.log(node)

    def _alive(self, node: str) -> bool:
        p = self.procs[node]
        if p.poll() is not None:
            raise AssertionError(f"grebe on {node} exited {p.returncode}: {self.log(node)}")
        return True

    def log(self, node: str) -> str:
        return (self.lab.state_dir / f"grebe-{node}.log").read_text()

    def status(self, node: str, check: bool = True) -> dict[str, Any] | None:
        cp = self.lab.run(node, ["grebe", "status", "--json"], check=check)
        return json.loads(cp.stdout) if cp.returncode == 0 else None

    def stop(self) -> dict[str, int]:
        codes = {}
        for node, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            codes[node] = p.wait(timeout=15)
        return codes


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(load("two-sites-plain"), instance=f"br{os.getpid()}", start=False)
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def blob(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 100 MB random file served over HTTP (v4 and v6) by the server; returns its sha256."""
    d = tmp_path_factory.mktemp("www")
    h = hashlib.sha256()
    with open(d / "blob", "wb") as f:
        for _ in range(BLOB_MB):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    lab.popen("server", ["python", "-m", "http.server", str(HTTP_PORT), "--bind", "::",
                         "--directory", str(d)], log=str(lab.state_dir / "http.log"))
    lab.wait_for(lambda: lab.run("server", ["curl", "-sfI", f"http://127.0.0.1:{HTTP_PORT}/blob"],
                                 check=False).returncode == 0, timeout=15, what="http.server")
    return h.hexdigest()


def ping(lab: Lab, dst: str, count: int = 3) -> None:
    lab.run("client", ["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst], timeout=30)


def download(lab: Lab, host: str, limit: int = 120) -> str:
    url = f"http://[{host}]:{HTTP_PORT}/blob" if ":" in host else f"http://{host}:{HTTP_PORT}/blob"
    cp = lab.run("client", ["sh", "-c", f"curl -gsf --max-time {limit} {url} | sha256sum"],
                 timeout=limit + 10)
    return cp.stdout.split()[0]


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ping_and_100mb_download(lab: Lab, blob: str, variant: str, datapath: str) -> None:
    gw = Gateways(lab, *VARIANTS[variant], datapath=datapath)
    try:
        ping(lab, SERVER4)
        ping(lab, SERVER6)
        assert download(lab, SERVER4) == blob
        assert download(lab, SERVER6) == blob
        st = gw.status("gw-a")  # the downloads came from site B: gw-a received them
        assert st is not None
        peer = st["peers"][0]
        assert peer["up"] and peer["rx_bytes"] > 2 * BLOB_MB * 1_000_000
        assert st["io"]["internal_errors"] == 0
        if datapath == "ebpf":  # the program carried traffic both ways
            assert st["ebpf"]["encap"] > 0 and st["ebpf"]["decap"] > 0, st["ebpf"]
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}


def with_gre_checksum(lab: Lab) -> tuple[Path, Path]:
    """The two-sites GRE configs with the GRE checksum turned on (written to the lab dir)."""
    out = []
    for cfg in VARIANTS["gre-v4underlay"]:
        text = (TOPO / cfg).read_text()
        assert "\nchecksum = false" in text
        p = lab.state_dir / ("csum-" + Path(cfg).name)
        p.write_text(text.replace("\nchecksum = false", "\nchecksum = true"))
        out.append(p)
    return out[0], out[1]


def _capture(lab: Lab, node: str, iface: str, bpf: str, path: str,
             count: int) -> subprocess.Popen[Any]:
    log = str(lab.state_dir / f"tcpdump-{node}-{iface}.log")
    p = lab.popen(node, ["tcpdump", "-i", iface, "-n", "-U", "-c", str(count), "-w", path, bpf],
                  log=log)
    lab.wait_for(lambda: "listening on" in Path(log).read_text(), timeout=10,
                 what=f"tcpdump on {node}:{iface}")
    return p


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_wire_format_tshark_and_scapy(lab_factory: Any, datapath: str) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import GRE
    from scapy.utils import rdpcap

    # a lab of its own: after the Python variant in the module's lab, the eBPF variant's
    # capture at gw-b sometimes saw none of the program's datagrams (not understood yet)
    lab: Lab = lab_factory("two-sites-plain", start=False)

    # the eBPF path leaves GRE checksums to the Python path: its wire is tested without
    csum = datapath == "python"
    gw = Gateways(lab, *(with_gre_checksum(lab) if csum else VARIANTS["gre-v4underlay"]),
                  datapath=datapath)
    pcap = str(lab.state_dir / "wire.pcap")
    try:
        # GRE protocol type IPv4 (keepalives carry none)
        cap = _capture(lab, "gw-b", "wan0", "udp port 4754 and src host 198.18.0.1 "
                       "and udp[10:2] = 0x0800", pcap, 4)
        ping(lab, SERVER4, count=4)
        cap.wait(timeout=20)
        if datapath == "ebpf":
            assert gw.status("gw-a")["ebpf"]["encap"] >= 4  # type: ignore[index]
    finally:
        gw.stop()
    fields = ["gre.flags.checksum", "gre.flags.key", "gre.flags.sequence_number",
              "gre.flags.version", "gre.key", "gre.sequence_number", "gre.checksum.status",
              "gre.proto", "ip.src", "ip.dst"]
    cp = subprocess.run(["tshark", "-r", pcap, "-d", "udp.port==4754,gre", "-T", "fields",
                         "-E", "separator=/t", *[x for f in fields for x in ("-e", f)]],
                        capture_output=True, text=True, timeout=60, check=True)
    rows = [dict(zip(fields, line.split("\t"), strict=True)) for line in cp.stdout.splitlines()]
    assert len(rows) == 4
    seqs = []
    for r in rows:
        assert r["gre.flags.checksum"] in (("1", "True") if csum else ("0", "False"))
        assert r["gre.flags.key"] in ("1", "True")
        assert r["gre.flags.version"] == "0"
        assert int(r["gre.key"], 0) == 42
        if csum:
            assert r["gre.checksum.status"] in ("1", "Good")
        assert int(r["gre.proto"], 0) == 0x0800
        # outer, then inner addresses
        assert r["ip.src"] == f"198.18.0.1,{CLIENT4}"
        assert r["ip.dst"] == f"198.18.0.2,{SERVER4}"
        seqs.append(int(r["gre.sequence_number"]))
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    # scapy reads the same capture
    for pkt in rdpcap(pcap):
        udp = pkt[UDP]
        assert udp.dport == 4754
        gre = GRE(bytes(udp.payload))
        assert (gre.chksum_present, gre.key_present, gre.seqnum_present) == (int(csum), 1, 1)
        assert gre.key == 42 and gre.proto == 0x0800
        inner = gre[IP]
        assert (inner.src, inner.dst) == (CLIENT4, SERVER4)


HOSTILE = r"""
import random, sys
from scapy.all import GRE, IP, UDP, Raw, send
peer, gwb, srv = "198.18.0.1", "198.18.0.2", "198.18.2.10"
def inner(src="198.18.1.10"):
    return bytes(IP(src=src, dst=srv) / UDP(sport=7, dport=9999) / b"HOSTILE")
# argv[2] "plain": no GRE checksum and a zero UDP checksum (RFC 8086 §3.2.2 allows it over
# IPv4), which is what the eBPF path parses itself (tests of datapath "ebpf")
plain = sys.argv[2:] == ["plain"]
def gre(**kw):  # a sequence number 2**28 behind: late, never moves the receiver's window
    return GRE(**{"chksum_present": 0 if plain else 1, "key_present": 1, "seqnum_present": 1,
                  "key": 42, "seqence_number": 0xF0000000, "proto": 0x0800, **kw})
def out(payload, src=peer):
    udp = UDP(sport=4754, dport=4754, chksum=0) if plain else UDP(sport=4754, dport=4754)
    send(IP(src=src, dst=gwb) / udp / payload, verbose=0)
case = sys.argv[1]
if case == "non_peer":
    out(bytes(gre() / Raw(inner())), src="198.18.0.66")
elif case == "truncated":
    out(b"\x20")
elif case == "bad_version":
    out(bytes(gre(version=1) / Raw(inner())))
elif case == "bad_flags":
    out(bytes(gre(routing_present=1) / Raw(inner())))
elif case == "wrong_key":
    out(bytes(gre(key=43) / Raw(inner())))
elif case == "spoofed_source":
    out(bytes(gre() / Raw(inner("198.18.9.9"))))
elif case == "random":
    rnd = random.Random(7)
    for _ in range(20):
        out(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 200))))
elif case == "oversized":
    out(bytes(gre() / Raw(inner() + bytes(8000))))
"""

EXPECTED = {  # case: drop reason in `grebe status --json` of gw-b
    "non_peer": "unknown_peer",
    "truncated": "malformed",
    "bad_version": "bad_version",
    "bad_flags": "bad_flags",
    "wrong_key": "wrong_key",
    "spoofed_source": "spoofed_source",
}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_hostile_datagrams_are_dropped_and_counted(lab: Lab, datapath: str) -> None:
    # eBPF: no GRE checksum and zero UDP checksums, so the program itself judges each one
    plain = ["plain"] if datapath == "ebpf" else []
    gw = Gateways(lab, *(VARIANTS["gre-v4underlay"] if plain else with_gre_checksum(lab)),
                  datapath=datapath)
    script = str(lab.state_dir / "hostile.py")
    Path(script).write_text(HOSTILE)
    pcap = str(lab.state_dir / "lan-b.pcap")
    try:
        ping(lab, SERVER4, count=1)
        cap = _capture(lab, "gw-b", "lan0", "udp port 9999", pcap, 50)
        for case, reason in EXPECTED.items():
            before = gw.status("gw-b")["drops"][reason]  # type: ignore[index]
            lab.run("attacker", ["python", script, case, *plain], timeout=60)
            lab.wait_for(lambda r=reason, b=before: gw.status("gw-b")["drops"][r] > b,  # type: ignore[index]
                         timeout=10, what=f"{case} counted as {reason}")
            if plain:  # dropped by the program, under the same reason
                assert gw.status("gw-b")["ebpf"]["drops"].get(reason, 0) > 0, reason  # type: ignore[index]
        total = sum(gw.status("gw-b")["drops"].values())  # type: ignore[index]
        for case in ("random", "oversized"):
            lab.run("attacker", ["python", script, case, *plain], timeout=60)
        lab.wait_for(lambda: sum(gw.status("gw-b")["drops"].values()) >= total + 20,  # type: ignore[index]
                     timeout=10, what="random datagrams counted")
        # the bridge keeps forwarding; a legitimate packet is the only one to reach lan0
        lab.run("client", ["python", "-c", "import socket; s=socket.socket(2, 2); "
                           f"s.sendto(b'LEGIT', ('{SERVER4}', 9999))"])
        ping(lab, SERVER4, count=2)
        lab.wait_for(lambda: Path(pcap).exists() and b"LEGIT" in Path(pcap).read_bytes(),
                     timeout=10, what="the legitimate packet on gw-b lan0")
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
        data = Path(pcap).read_bytes()
        assert b"HOSTILE" not in data
        st = gw.status("gw-b")
        assert st is not None and st["io"]["internal_errors"] == 0
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_pmtu_with_a_narrow_wan(lab: Lab, blob: str, datapath: str) -> None:
    for node in ("client", "server"):  # forget PMTUs learned in earlier tests of this lab
        lab.run(node, ["ip", "route", "flush", "cache"])
        lab.run(node, ["ip", "-6", "route", "flush", "cache"])
    with lab.iproute("gw-a") as ipr_a, lab.iproute("gw-b") as ipr_b:
        for ipr in (ipr_a, ipr_b):
            ipr.link("set", index=ipr.link_lookup(ifname="wan0")[0], mtu=1400)
    try:
        gw = Gateways(lab, *VARIANTS["gre-v4underlay"], datapath=datapath)
        try:
            st = gw.status("gw-a")
            assert st is not None
            mtu = st["tun"]["mtu"]
            assert mtu == 1400 - 20 - 8 - 12  # IPv4 + UDP + GRE with key and sequence number
            assert "route to 198.18.0.2" in st["tun"]["mtu_source"]
            assert download(lab, SERVER4) == blob  # MSS clamped: no black hole
            assert gw.status("gw-b")["events"]["mss_clamped"] >= 1  # type: ignore[index]
            cp = lab.run("client", ["ping", "-c", "2", "-M", "do", "-s", "1400", "-W", "2",
                                    SERVER4], check=False)
            assert re.search(rf"mtu\s*=\s*{mtu}\b", cp.stdout + cp.stderr), cp.stdout
            cp = lab.run("client", ["ping", "-c", "2", "-M", "do", "-s", "1400", "-W", "2",
                                    SERVER6], check=False)
            assert re.search(rf"mtu\s*=\s*{mtu}\b", cp.stdout + cp.stderr), cp.stdout
        finally:
            assert gw.stop() == {"gw-a": 0, "gw-b": 0}
    finally:
        with lab.iproute("gw-a") as ipr_a, lab.iproute("gw-b") as ipr_b:
            for ipr in (ipr_a, ipr_b):
                ipr.link("set", index=ipr.link_lookup(ifname="wan0")[0], mtu=1500)


def _tun_and_routes(lab: Lab) -> tuple[bool, list[str]]:
    with lab.iproute("gw-a") as ipr:
        has_tun = bool(ipr.link_lookup(ifname="grebe0"))
        routes = [f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for fam in (2, 10)
                  for r in ipr.get_routes(family=fam) if r.get_attr("RTA_DST")
                  and r.get_attr("RTA_DST").startswith(("198.18.2.", "2001:db8:2:"))]
    return has_tun, routes


def test_sigterm_cleans_up_and_a_second_instance_fails(lab: Lab) -> None:
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"])
    try:
        has_tun, routes = _tun_and_routes(lab)
        assert has_tun and sorted(routes) == ["198.18.2.0/24", "2001:db8:2::/64"]
        cp = lab.run("gw-a", ["grebe", "up", "-c", str(TOPO / VARIANTS["gre-v4underlay"][0])],
                     check=False, timeout=30)
        assert cp.returncode != 0
        assert "grebe: TUN grebe0 is already in use by another process" in cp.stderr
        ping(lab, SERVER4, count=1)  # the first instance is unharmed
        # the same counters in Prometheus text on metrics_listen
        metrics = lab.run("gw-a", ["curl", "-sf", "http://127.0.0.1:9108/metrics"]).stdout
        assert 'grebe_drops_total{reason="wrong_key"} 0' in metrics
        assert re.search(r'grebe_peer_tx_packets_total\{peer="site-b"\} [1-9]', metrics)
        assert 'grebe_udp_offload_enabled{feature="gso"} 1' in metrics
        assert re.search(r"^grebe_tun_mtu_bytes \d+$", metrics, re.M)
        assert re.search(r'^grebe_build_info\{version="[^"]+",python="[^"]+"\} 1$', metrics, re.M)
        assert re.search(r'^grebe_peer_last_seen_timestamp_seconds\{peer="site-b"\} 1\d{9}\.',
                         metrics, re.M)
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
    assert _tun_and_routes(lab) == (False, [])
    assert "grebe down" in gw.log("gw-a")


def _grebe_pids(lab: Lab, node: str) -> list[int]:
    pids = []
    for pid, ns in lab.pids().items():
        with contextlib.suppress(OSError):
            if ns == lab.ns_path(node) and b"grebe" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def test_split_directions_two_processes_one_view(lab: Lab) -> None:
    """bridge/io/split.py: UDP->TUN runs in a child of `grebe up`; status and the metrics
    show what both processes counted; a SIGTERM to the parent ends both. (On the Python
    path: with the eBPF program the pings would not pass through either process.)"""
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"], datapath="python")
    try:
        pids = _grebe_pids(lab, "gw-a")
        parent = gw.procs["gw-a"].pid
        assert len(pids) == 2 and parent in pids, pids
        child = next(p for p in pids if p != parent)
        assert int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
            == parent
        ping(lab, SERVER4, count=3)
        st = gw.status("gw-a")
        assert st is not None and st["io"]["processes"] == 2
        peer = st["peers"][0]
        assert peer["rx_packets"] >= 3 and peer["tx_packets"] >= 3  # child's and parent's
        assert st["io"]["udp_recvs"] >= 3 and st["io"]["tun_reads"] >= 3
        metrics = lab.run("gw-a", ["curl", "-sf", "http://127.0.0.1:9108/metrics"]).stdout
        assert re.search(r'grebe_peer_rx_packets_total\{peer="site-b"\} [1-9]', metrics)
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
    lab.wait_for(lambda: not _grebe_pids(lab, "gw-a"), timeout=10, what="no grebe left")


def test_sighup_and_reload_never_stop_the_endpoint(lab: Lab, tmp_path: Path) -> None:
    """SIGHUP to both processes of `grebe up` (split directions) and `grebe reload`: the
    endpoint keeps forwarding; a bad file is refused with its error and exit 2; a good one
    with a change the running endpoint cannot take says so (needs a restart)."""
    text = (TOPO / VARIANTS["gre-v4underlay"][0]).read_text()
    cfg = tmp_path / "gw-a.toml"
    cfg.write_text(text)
    gw = Gateways(lab, cfg, VARIANTS["gre-v4underlay"][1])
    try:
        pids = _grebe_pids(lab, "gw-a")
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGHUP)
        lab.wait_for(lambda: "no change" in gw.log("gw-a"), timeout=10, what="reload logged")
        ping(lab, SERVER4, count=2)
        cfg.write_text("colour = 1\n" + text)
        cp = lab.run("gw-a", ["grebe", "reload"], check=False)
        assert cp.returncode == 2, cp
        assert "colour: unknown key" in cp.stderr and "running configuration stays" in cp.stderr
        cfg.write_text(text.replace("keepalive = 2", "keepalive = 3").replace(
            'metrics_listen = "127.0.0.1:9108"', 'metrics_listen = "127.0.0.1:9109"'))
        cp = lab.run("gw-a", ["grebe", "reload"])
        assert "applied: peers[site-b].keepalive\n" in cp.stdout, cp.stdout
        assert "restart to apply: metrics_listen" in cp.stdout
        assert sorted(_grebe_pids(lab, "gw-a")) == sorted(pids)
        ping(lab, SERVER4, count=2)
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}


def test_split_child_death_stops_the_endpoint_cleanly(lab: Lab) -> None:
    """If the UDP->TUN process dies, `grebe up` does not run on half-deaf: it stops with
    exit code 1 and removes its routes and TUN, for its supervisor to restart it."""
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"])
    try:
        parent = gw.procs["gw-a"].pid
        child = next(p for p in _grebe_pids(lab, "gw-a") if p != parent)
        os.kill(child, signal.SIGKILL)
        assert gw.procs["gw-a"].wait(timeout=15) == 1
        assert "the UDP->TUN process ended" in gw.log("gw-a")
        assert _tun_and_routes(lab) == (False, [])
    finally:
        codes = gw.stop()
    assert codes == {"gw-a": 1, "gw-b": 0}


SEND_UDP = r"""
import socket, sys
dst, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
socks = []
for p in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", p))
    socks.append(s)
for i in range(5):  # interleaved: the two flows alternate
    for s in socks:
        s.sendto(b"flow-hash %d" % i, (dst, 9))
"""


def test_flow_hash_source_ports_on_the_wire(lab: Lab) -> None:
    """RFC 8086 §3.2.1 with source_port = "flow-hash": two inner flows leave gw-a from two
    different UDP source ports in 49152-65535, each flow always from the same one."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import GRE
    from scapy.utils import rdpcap

    from bridge.encap import flow_source_port
    from bridge.io.udp import SPORT_POOL

    cfgs = []
    for cfg in VARIANTS["gre-v4underlay"]:
        text = (TOPO / cfg).read_text()
        assert "\ndead_after = 6" in text
        p = lab.state_dir / ("fh-" + Path(cfg).name)
        p.write_text(text.replace("\ndead_after = 6",
                                  '\ndead_after = 6\nsource_port = "flow-hash"'))
        cfgs.append(p)

    def slot(port: int) -> int:  # the pool socket a flow lands on (bridge/io/udp.py)
        inner = bytes(IP(src=CLIENT4, dst=SERVER4, ttl=63) / UDP(sport=port, dport=9))
        return flow_source_port(inner) % SPORT_POOL

    ports = [40001]
    ports.append(next(p for p in range(40002, 41000) if slot(p) != slot(40001)))
    gw = Gateways(lab, *cfgs)
    pcap = str(lab.state_dir / "flowhash.pcap")
    try:
        cap = _capture(lab, "gw-b", "wan0", "udp dst port 4754 and src host 198.18.0.1 "
                       "and udp[10:2] = 0x0800", pcap, 10)
        lab.run("client", ["python", "-c", SEND_UDP, SERVER4, *map(str, ports)])
        cap.wait(timeout=20)
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
    outer_by_flow: dict[int, set[int]] = {}
    for pkt in rdpcap(pcap):
        inner = GRE(bytes(pkt[UDP].payload))[IP]
        outer_by_flow.setdefault(inner[UDP].sport, set()).add(pkt[UDP].sport)
    assert sorted(outer_by_flow) == sorted(ports)
    assert all(len(v) == 1 for v in outer_by_flow.values()), outer_by_flow  # stable
    outer = [next(iter(v)) for v in outer_by_flow.values()]
    assert len(set(outer)) == 2 and all(49152 <= p <= 65535 for p in outer), outer


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("dst,src", [(SERVER4, "198.18.100.2"), (SERVER6, "2001:db8:100::2")])
def test_icmp_errors_of_the_remote_gateway_reach_the_client(lab: Lab, dst: str,
                                                            src: str, datapath: str) -> None:
    """gw-b's kernel answers a packet whose TTL runs out there (traceroute's third hop) with
    ICMP Time Exceeded from its TUN address. That source is inside site-b's prefixes only
    because the topology lists gw-b's tunnel address among them, as WireGuard's AllowedIPs
    must list a peer's: without it the inner-source check drops the error as spoofed.
    The eBPF path must take off the same hops (TTL - 2 at encapsulation, - 1 after)."""
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"], datapath=datapath)
    try:
        ping(lab, dst)
        cp = lab.run("client", ["ping", "-c", "1", "-W", "3", "-t", "3", dst], check=False,
                     timeout=15)
        assert f"From {src}" in cp.stdout and "exceeded" in cp.stdout, cp.stdout
        st = gw.status("gw-a")
        assert st is not None and st["drops"].get("spoofed_source", 0) == 0, st["drops"]
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}


def test_path_mtu_shrinks_while_running(lab: Lab, blob: str) -> None:
    """RFC 1191 / RFC 8201 soft state: the WAN narrows under a running tunnel. The next big
    send meets EMSGSIZE (or, for a GSO batch, EINVAL: udp(7)); grebe asks the kernel for the
    new path MTU and lowers the peer's tunnel MTU and the TUN's, so a download on a new
    connection completes, and GSO stays on."""
    for node in ("client", "server"):  # forget PMTUs learned in earlier tests of this lab
        lab.run(node, ["ip", "route", "flush", "cache"])
        lab.run(node, ["ip", "tcp_metrics", "flush", "all"], check=False)
    gw = Gateways(lab, *VARIANTS["gre-v4underlay"])
    try:
        before = gw.status("gw-b")
        assert before is not None
        assert before["tun"]["mtu"] == 1500 - 20 - 8 - 12
        assert download(lab, SERVER4) == blob
        for node in ("gw-a", "gw-b"):
            with lab.iproute(node) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="wan0")[0], mtu=1400)
        assert download(lab, SERVER4) == blob
        st = gw.status("gw-b")
        assert st is not None
        assert st["io"]["pmtu_updates"] >= 1 and st["io"]["udp_gso"], st["io"]
        assert st["tun"]["mtu"] == 1400 - 20 - 8 - 12
        with lab.iproute("gw-b") as ipr:
            assert ipr.link("get", ifname="grebe0")[0].get_attr("IFLA_MTU") == 1360
        # (the server learns the smaller MTU from gw-b's kernel now, which forwards into a
        # TUN of 1360; segments already on their way got grebe's ICMP, or a retransmission)
    finally:
        try:
            assert gw.stop() == {"gw-a": 0, "gw-b": 0}
        finally:
            for node in ("gw-a", "gw-b"):
                with lab.iproute(node) as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname="wan0")[0], mtu=1500)


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ", re.M)


@pytest.mark.parametrize("sequence", ["off", "drop-late", "reorder"])
def test_a_peer_killed_and_restarted_is_heard_again_within_two_seconds(
        lab: Lab, sequence: str) -> None:
    """Issue 12: `kill -9` of gw-b's grebe during a ping, then the same `grebe up` again:
    gw-a still expects gw-b's old sequence numbers, the restarted gw-b counts from 0; the
    pings come back within 2 s of gw-b being up (drop-late took 33.7 s before)."""
    cfgs = []
    for node in ("gw-a", "gw-b"):
        text = (TOPO / f"two-sites/{node}.toml").read_text()
        path = lab.state_dir / f"restart-{node}-{sequence}.toml"
        path.write_text(text.replace('sequence = "drop-late"', f'sequence = "{sequence}"'))
        cfgs.append(path)
    gw = Gateways(lab, *cfgs)
    pinglog = lab.state_dir / f"restart-ping-{sequence}.log"
    pinger = lab.popen("client", ["ping", "-D", "-O", "-n", "-i", "0.1", "-W", "1", SERVER4],
                       log=str(pinglog))
    try:
        lab.wait_for(lambda: len(_REPLY.findall(pinglog.read_text())) >= 10, timeout=20,
                     what="10 ping replies before the kill")
        # gw-b's numbers reach 1000 and more: its restart's will be late for a long time
        lab.run("client", ["ping", "-f", "-q", "-c", "1000", "-W", "1", SERVER4], timeout=60)
        for pid in _grebe_pids(lab, "gw-b"):  # the endpoint and its UDP->TUN child
            os.kill(pid, signal.SIGKILL)
        assert gw.procs["gw-b"].wait(timeout=10) == -signal.SIGKILL
        lab.wait_for(lambda: not _grebe_pids(lab, "gw-b"), timeout=10, what="gw-b dead")
        launched = time.time()
        gw.procs["gw-b"] = lab.popen("gw-b", ["grebe", "up", "-c", str(cfgs[1])],
                                     log=str(lab.state_dir / "grebe-gw-b.log"))
        lab.wait_for(lambda: gw._alive("gw-b") and gw.status("gw-b", check=False),
                     timeout=15, what="gw-b's grebe up again")
        up = time.time()  # its TUN, routes and socket exist: it forwards from here on
        lab.wait_for(lambda: any(float(t) > up for t in _REPLY.findall(pinglog.read_text())),
                     timeout=15, what="a ping reply after the restart")
        back = min(float(t) for t in _REPLY.findall(pinglog.read_text()) if float(t) > up)
        st = gw.status("gw-a")
        assert st is not None
        # every echo reply of the restarted gw-b that gw-a dropped cost one 0.1 s interval:
        # the time it was black-holed although it forwarded again (its start-up, which may
        # take seconds on a loaded machine, is not the sequence policy's)
        holed = st["drops"]["sequence"] * 0.1
        print(f"sequence {sequence}: restarted gw-b black-holed {holed:.1f} s "
              f"({st['drops']['sequence']} replies dropped at gw-a as 'sequence', "
              f"{st['events']['seq_resync']} resync); pings back {back - up:.2f} s after its "
              f"control socket answered, {back - launched:.2f} s after `grebe up`")
        assert holed <= 2.0 and back - up <= 2.0
        if st.get("datapath") != "ebpf":  # the eBPF program resyncs in its own window
            assert st["events"]["seq_resync"] == (0 if sequence == "off" else 1)
    finally:
        pinger.terminate()
        pinger.wait(timeout=10)
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
