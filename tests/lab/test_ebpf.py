"""The eBPF fast path (issue 14) in the lab, beyond what tests/lab/test_bridge.py runs for
both datapaths: a `grebe up` killed with SIGKILL leaves nothing that forwards and the next
start removes its filters; an endpoint without CAP_BPF falls back to the Python path and
says so; an [[inspect]] flow still reaches the Python path while other flows do not; IPIP
and an IPv6 underlay through the program. Waits are wait-for-condition, never sleeps."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.ebpf.attach import filter_name, ours
from bridge.lab.netlink import Lab
from bridge.lab.topology import load

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
]

TOPO = Path(__file__).resolve().parents[2] / "topologies"
CLIENT4, SERVER4 = "198.18.1.10", "198.18.2.10"
SERVER6 = "2001:db8:2::10"
GRE = ("two-sites/gw-a.toml", "two-sites/gw-b.toml")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(load("two-sites-plain"), instance=f"eb{os.getpid()}", start=False)
    try:
        yield lab
    finally:
        lab.destroy()


class Endpoint:
    """One `grebe up` on a lab node (config from topologies/, datapath set on top)."""

    def __init__(self, lab: Lab, node: str, cfg: str, datapath: str = "ebpf",
                 prefix: tuple[str, ...] = (), tag: str = "") -> None:
        self.lab, self.node = lab, node
        src = TOPO / cfg
        self.cfg = lab.state_dir / f"eb-{tag}{datapath}-{src.parent.name}-{src.name}"
        self.cfg.write_text(f'datapath = "{datapath}"\n' + src.read_text())
        self.logfile = lab.state_dir / f"eb-{tag}{node}.log"
        self.proc = lab.popen(node, [*prefix, "grebe", "up", "-c", str(self.cfg)],
                              log=str(self.logfile))
        lab.wait_for(lambda: self.alive() and self.status(check=False) is not None,
                     timeout=20, what=f"grebe control socket on {node}")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"grebe on {self.node} exited {self.proc.returncode}: "
                                 f"{self.log()}")
        return True

    def log(self) -> str:
        return self.logfile.read_text()

    def status(self, check: bool = True) -> dict[str, Any] | None:
        cp = self.lab.run(self.node, ["grebe", "status", "--json"], check=check)
        return json.loads(cp.stdout) if cp.returncode == 0 else None

    def ebpf(self) -> dict[str, Any]:
        st = self.status()
        assert st is not None and st["datapath"] == "ebpf", st
        e: dict[str, Any] = st["ebpf"]
        return e

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def pings(lab: Lab, src: str, dst: str, count: int = 2) -> bool:
    cp = lab.run(src, ["ping", "-c", str(count), "-i", "0.2", "-W", "1", dst], check=False,
                 timeout=30)
    return cp.returncode == 0


def our_filters(lab: Lab, node: str) -> int:
    with lab.iproute(node) as ipr:
        return sum(len(ours(ipr, link["index"], filter_name("grebe0")))
                   for link in ipr.get_links())


def grebe_pids(lab: Lab, node: str) -> list[int]:
    out = []
    for pid, ns in lab.pids().items():
        try:
            if ns == lab.ns_path(node) and b"grebe" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def test_sigkill_leaves_no_forwarding_program_and_the_next_start_cleans_up(lab: Lab) -> None:
    a = Endpoint(lab, "gw-a", GRE[0], tag="k")
    b = Endpoint(lab, "gw-b", GRE[1], tag="k")
    try:
        assert pings(lab, "client", SERVER4) and pings(lab, "server", CLIENT4)
        assert a.ebpf()["encap"] > 0 and a.ebpf()["decap"] > 0
        assert our_filters(lab, "gw-a") == 2  # lan0 and wan0 ingress
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=10)
        lab.wait_for(lambda: not grebe_pids(lab, "gw-a"), timeout=10, what="gw-a's grebe gone")
        assert our_filters(lab, "gw-a") == 2  # netlink gives a tc filter no owner
        # ... but it forwards nothing, in either direction: gw-b still encapsulates toward
        # gw-a, whose stale program must not decapsulate for a dead endpoint
        assert not pings(lab, "client", SERVER4)
        assert not pings(lab, "server", CLIENT4)
        a2 = Endpoint(lab, "gw-a", GRE[0], tag="k2")
        try:
            assert "removed 2 stale eBPF filter(s)" in a2.log()
            assert our_filters(lab, "gw-a") == 2
            lab.wait_for(lambda: pings(lab, "client", SERVER4), timeout=20,
                         what="forwarding again after the restart")
        finally:
            assert a2.stop() == 0
        assert our_filters(lab, "gw-a") == 0  # a clean stop removes them
    finally:
        b.stop()


def test_without_cap_bpf_auto_falls_back_to_python_with_a_log_line(lab: Lab) -> None:
    # root without CAP_BPF and CAP_SYS_ADMIN in its bounding set: bpf() is refused
    drop = ("setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon", "--")
    a = Endpoint(lab, "gw-a", GRE[0], datapath="auto", prefix=drop, tag="c")
    b = Endpoint(lab, "gw-b", GRE[1], datapath="auto", tag="c")
    try:
        st = a.status()
        assert st is not None and st["datapath"] == "python" and "ebpf" not in st
        assert "datapath auto: eBPF fast path unavailable (" in a.log()
        assert "Operation not permitted" in a.log() and "using the Python path" in a.log()
        assert b.status()["datapath"] == "ebpf"  # type: ignore[index]
        assert pings(lab, "client", SERVER4) and pings(lab, "client", SERVER6)
        assert our_filters(lab, "gw-a") == 0
    finally:
        assert a.stop() == 0
        b.stop()
    # datapath "ebpf" without the capability is an error, not a silent fallback
    cfg = lab.state_dir / "eb-forced.toml"
    cfg.write_text('datapath = "ebpf"\n' + (TOPO / GRE[0]).read_text())
    cp = lab.run("gw-a", [*drop, "grebe", "up", "-c", str(cfg)], check=False, timeout=30)
    assert cp.returncode == 1 and "datapath ebpf: the eBPF fast path cannot start" in cp.stderr


def test_inspected_flow_reaches_python_other_flows_stay_in_the_kernel(lab_factory: Any) -> None:
    """two-sites-inspect's gw-a terminates TCP to the server's port 80 in stack/: with the
    fast path on, that flow's packets pass to the Python path (both directions) and the
    flow shows in `grebe flows`; a flow to another port is encapsulated by the program
    (or held for the wire's order, see below). In a lab of its own since session 4; the
    order dependence that caused that is explained below and no longer asserted against."""
    lab: Lab = lab_factory("two-sites-plain", start=False)
    www = lab.state_dir / "www-eb"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("grebe inspected page\n")
    (www / "big").write_bytes(os.urandom(4 << 20))
    http80 = lab.popen("server", ["python", "-m", "http.server", "80", "--bind", "::",
                                  "--directory", str(www)], log=str(lab.state_dir / "h80.log"))
    http81 = lab.popen("server", ["python", "-m", "http.server", "81", "--bind", "::",
                                  "--directory", str(www)], log=str(lab.state_dir / "h81.log"))
    a = Endpoint(lab, "gw-a", "two-sites-inspect/gw-a.toml", tag="i")
    b = Endpoint(lab, "gw-b", GRE[1], tag="i")
    try:
        lab.wait_for(lambda: lab.run("client", ["curl", "-sf", "--max-time", "3",
                                                f"http://{SERVER4}:81/index.html"],
                                     check=False).returncode == 0, timeout=20,
                     what="http on port 81 through the tunnel")
        before = a.ebpf()
        cp = lab.run("client", ["curl", "-sf", "--max-time", "20", f"http://{SERVER4}/big",
                                "-o", "/dev/null", "-w", "%{size_download}"])
        assert cp.stdout == str(4 << 20)
        mid = a.ebpf()
        assert mid["pass_inspect"] > before["pass_inspect"] + 10  # both directions
        flow_log = lab.state_dir / "inspect-gw-a.jsonl"  # the rule's log inspector
        lab.wait_for(lambda: flow_log.exists() and SERVER4 in flow_log.read_text(),
                     timeout=10, what="the inspected flow in gw-a's flow log")
        cp = lab.run("client", ["curl", "-sf", "--max-time", "20", f"http://{SERVER4}:81/big",
                                "-o", "/dev/null", "-w", "%{size_download}"])
        assert cp.stdout == str(4 << 20)
        after = a.ebpf()
        # port 81's download is not the inspected flow's: its packets are not passed to the
        # Python path as inspected (the data, GSO with GRE sequence numbers, comes through
        # gw-b's Python path: grebe_tc.c passes it). The client's ACKs (~70: the client
        # gets GSO super-packets) are encapsulated by gw-a's program, or, while gw-a's
        # Python path has just taken sequence numbers for the peer, passed to it to keep
        # one order on the wire (SEQ_HOLD). That hold renews itself: the Python path takes
        # a number for each ACK it was passed, so once a keepalive (every 2 s) or another
        # Python-path packet lands in the download, every ACK 5 ms apart or less goes to
        # Python until a gap. That was the order dependence (after the module's other
        # tests, 34 of 67 ACKs held; the phase of the keepalive timer decides), not the
        # lab. So the two together are counted, and each ACK is one or the other.
        acks = after["encap"] - mid["encap"]
        held = after["pass_seq_order"] - mid["pass_seq_order"]
        assert acks + held > 20, (mid, after)
        assert after["pass_inspect"] - mid["pass_inspect"] < 5
    finally:
        assert a.stop() == 0
        b.stop()
        for p in (http80, http81):
            p.terminate()
            p.wait(timeout=10)


@pytest.mark.parametrize(("dp_a", "dp_b"), [("ebpf", "ebpf"), ("python", "ebpf"),
                                            ("auto", "ebpf"), ("ebpf", "python")])
def test_downloads_with_tso_from_a_program_are_byte_exact(lab_factory: Any, dp_a: str,
                                                          dp_b: str) -> None:
    """gw-b's program encapsulates the server's TSO super-packets whole (sequence "off":
    no GRE sequence numbers to keep it from GSO) and leaves the inner TCP checksum to the
    egress device (CHECKSUM_PARTIAL); over the lab's veth nothing segments or completes
    it, and gw-a's UDP socket gets one datagram up to 64 KB with an unfilled checksum. gw-a
    terminates the flow in stack/ (on its program, which passes the flow, or on the Python
    path alone): before bridge/userspace/legwire.py completed_partial, the stack dropped
    every such segment as "bad_checksum" and the download stalled after ~0.5 MB. "auto"
    runs the program also on an endpoint with [[inspect]] rules (bridge/ebpf/hook.py).
    A download on port 81 (not inspected) crosses a Python-path gateway's TUN the same
    way: before bridge/io/offload.py wrote such packets with NEEDS_CSUM (and GSO), nothing
    of it arrived (the client's, or the server's, kernel dropped every segment)."""
    lab: Lab = lab_factory("two-sites-plain", start=False)
    www = lab.state_dir / "www-tso"
    www.mkdir(exist_ok=True)
    body = os.urandom(32 << 20)
    (www / "big").write_bytes(body)
    http = [lab.popen("server", ["python", "-m", "http.server", port, "--bind", "::",
                                 "--directory", str(www)], log=str(lab.state_dir / f"h{port}.log"))
            for port in ("80", "81")]
    no_seq = 'sequence = "off"\n'
    cfgs = {}
    for node, src in (("gw-a", "two-sites-inspect/gw-a.toml"), ("gw-b", GRE[1])):
        cfgs[node] = lab.state_dir / f"tso-{node}.toml"
        cfgs[node].write_text((TOPO / src).read_text().replace('sequence = "drop-late"\n',
                                                               no_seq))
        assert no_seq in cfgs[node].read_text()
    a = Endpoint(lab, "gw-a", str(cfgs["gw-a"]), datapath=dp_a, tag="t")
    b = Endpoint(lab, "gw-b", str(cfgs["gw-b"]), datapath=dp_b, tag="t")
    got = lab.state_dir / "got"
    try:
        assert pings(lab, "client", SERVER4)
        cp = lab.run("client", ["curl", "-s", "--max-time", "90", f"http://{SERVER4}/big",
                                "-o", str(got), "-w", "%{size_download}"], check=False,
                     timeout=120)
        st = a.status()
        assert st is not None
        assert cp.returncode == 0 and got.read_bytes() == body, (
            cp.returncode, cp.stdout, st["inspect"])
        assert st["inspect"]["flow_table"]["inspect"] == 1  # the flow was terminated
        assert st["datapath"] == ("python" if dp_a == "python" else "ebpf")
        if dp_b == "ebpf":  # TSO super-packets with partial checksums came
            assert st["inspect"]["counters"]["checksum_completed"] > 0
        got.unlink()
        cp = lab.run("client", ["curl", "-s", "--max-time", "90", f"http://{SERVER4}:81/big",
                                "-o", str(got), "-w", "%{size_download}"], check=False,
                     timeout=120)
        assert cp.returncode == 0 and got.read_bytes() == body, (cp.returncode, cp.stdout)
        if dp_b == "ebpf":  # the server's data went through gw-b's program
            assert b.ebpf()["encap"] > 100
        else:  # the client's requests and ACKs through gw-a's
            assert a.ebpf()["encap"] > 20
    finally:
        assert a.stop() == 0
        b.stop()
        for h in http:
            h.terminate()
            h.wait(timeout=10)


@pytest.mark.parametrize("cfgs", [("two-sites-ipip/gw-a.toml", "two-sites-ipip/gw-b.toml"),
                                  ("two-sites/gw-a-v6.toml", "two-sites/gw-b-v6.toml"),
                                  ("two-sites-ipip/gw-a-v6.toml",
                                   "two-sites-ipip/gw-b-v6.toml")],
                         ids=["ipip-v4underlay", "gre-v6underlay", "ipip-v6underlay"])
def test_ipip_and_ipv6_underlay_through_the_program(lab: Lab, cfgs: tuple[str, str]) -> None:
    a = Endpoint(lab, "gw-a", cfgs[0], tag="u")
    b = Endpoint(lab, "gw-b", cfgs[1], tag="u")
    try:
        for dst in (SERVER4, SERVER6):
            assert pings(lab, "client", dst, count=3)
        ea, eb = a.ebpf(), b.ebpf()
        # pings and their replies: encapsulated by one program, decapsulated by the other
        # (with drop-late, a peer's first sequenced packet starts the windows on the Python
        # path: pass_seq_start)
        assert ea["encap"] >= 6 and eb["encap"] >= 6
        assert eb["decap"] + eb["pass_seq_start"] >= 6 and ea["decap"] + ea["pass_seq_start"] >= 6
        assert eb["decap"] >= 4 and ea["decap"] >= 4
        st = a.status()
        assert st is not None and st["peers"][0]["rx_packets"] >= 6
        assert sum(st["drops"].values()) - st["drops"]["link_local"] == 0, st["drops"]
    finally:
        assert a.stop() == 0
        b.stop()


FORGE = """
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x6762, 1) + b"forged-seq" * 4)
icmp[2:4] = struct.pack("!H", csum(bytes(icmp)))
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                           socket.inet_aton("198.18.2.10"), socket.inet_aton("198.18.1.10")))
ip[10:12] = struct.pack("!H", csum(bytes(ip)))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: a zero UDP checksum, as the program sends
s.bind(("198.18.0.2", 0))
for seq in map(int, sys.argv[1:]):
    gre = struct.pack("!HHII", 0x3000, 0x0800, 42, seq)
    s.sendto(gre + bytes(ip) + bytes(icmp), ("198.18.0.1", 4754))
"""


def received(lab: Lab, count: int) -> int:
    cp = lab.run("client", ["ping", "-c", str(count), "-i", "0.1", "-W", "2", SERVER4],
                 check=False, timeout=30)
    for part in cp.stdout.split(","):
        if part.strip().endswith("received"):
            return int(part.split()[0])
    raise AssertionError(cp.stdout + cp.stderr)


def test_forged_far_ahead_sequence_numbers_do_not_move_the_programs_window(lab: Lab) -> None:
    """drop-late on the program (issue 14, the Python path's rule of bridge/seqpolicy.py):
    a number JUMP_MAX or more ahead of the window goes to the Python path, which drops a
    forged one; two in a row (a run short of CONFIRM) move nothing. Before the rule the
    program took any number ahead, every real packet after it counted late: the pings'
    replies were dropped until RESYNC_TIME had passed."""
    a = Endpoint(lab, "gw-a", GRE[0], tag="f")
    b = Endpoint(lab, "gw-b", GRE[1], tag="f")
    try:
        lab.wait_for(lambda: pings(lab, "client", SERVER4) and a.ebpf()["decap"] > 0,
                     timeout=20, what="replies decapsulated by gw-a's program")
        before, drops = a.ebpf(), a.status()
        assert drops is not None
        # gw-b's counter started at 0 and has sent a few dozen numbers: these are far ahead
        lab.run("gw-b", ["python", "-c", FORGE, str(0x10000000), str(0x10000001)])
        assert received(lab, 5) == 5
        after, st = a.ebpf(), a.status()
        assert st is not None
        assert after["pass_seq_jump"] - before["pass_seq_jump"] == 2
        assert st["drops"]["sequence"] - drops["drops"]["sequence"] == 2
        assert after["decap"] >= before["decap"] + 5  # the replies stayed on the program
    finally:
        assert a.stop() == 0
        b.stop()


def test_new_connections_after_a_bulk_transfer_lose_no_syn_to_the_window(lab_factory: Any
                                                                       ) -> None:
    """drop-late with both paths sending for one peer: a SYN (passed to the Python path for
    MSS clamping) after a download the programs carried is ~1,000 numbers ahead of the
    receiving Python path's window. It must be taken (the numbers in between were the
    program's stream): before SeededSeqReceiver._catch_up each new connection lost two SYNs
    ("sequence" drops, "seq_resync") and connected after 2 s. In a lab of its own: it once
    failed after the module's other tests, and on a loaded CI host, because the program's
    sequence hold renewed itself and kept the ACKs on the Python path (now released)."""
    lab: Lab = lab_factory("two-sites-plain", start=False)
    www = lab.state_dir / "www-syn"
    www.mkdir(exist_ok=True)
    (www / "big").write_bytes(os.urandom(8 << 20))
    (www / "small").write_bytes(b"small\n")
    http = lab.popen("server", ["python", "-m", "http.server", "81", "--bind", "::",
                                "--directory", str(www)], log=str(lab.state_dir / "hs.log"))
    a = Endpoint(lab, "gw-a", GRE[0], tag="y")
    b = Endpoint(lab, "gw-b", GRE[1], tag="y")
    try:
        lab.wait_for(lambda: lab.run("client", ["curl", "-sf", "--max-time", "3",
                                                f"http://{SERVER4}:81/small"],
                                     check=False).returncode == 0, timeout=20,
                     what="http on port 81 through the tunnel")
        before = {n: e.status() for n, e in (("a", a), ("b", b))}
        for _ in range(2):
            lab.run("client", ["curl", "-sf", "--max-time", "30", f"http://{SERVER4}:81/big",
                               "-o", "/dev/null"], timeout=60)
            for _ in range(2):
                lab.run("client", ["curl", "-sf", "--max-time", "10",
                                   f"http://{SERVER4}:81/small", "-o", "/dev/null"])
        # both paths sent: the client's ACKs went out by gw-a's program (their count falls
        # when a loaded host coalesces more: 92 in one run, so the bound is loose)
        assert a.ebpf()["encap"] > 20 and b.ebpf()["pass_syn"] >= 4
        # and the ACKs stayed there: before the Python path released the program's sequence
        # hold after each send, every ACK passed for order renewed it (175 passed, 104 sent
        # by the program in one run; 3 sent on a loaded CI host). With it: 0 and 319.
        ea = a.ebpf()
        assert ea["pass_seq_order"] * 4 < ea["encap"], ea
        for n, e in (("a", a), ("b", b)):
            st, st0 = e.status(), before[n]
            assert st is not None and st0 is not None
            # the regression dropped 2 SYNs per new connection (12 here) and resynchronised;
            # a packet of the program's stream that the receiving program passes to the
            # Python path (an inner checksum to complete) can still make one of the Python
            # stream's, sent a moment earlier, late there: seen once on a loaded host now
            # that both paths send for the whole transfer
            assert st["drops"]["sequence"] - st0["drops"]["sequence"] <= 1, (n, st["drops"])
            assert st["events"]["seq_resync"] == st0["events"]["seq_resync"], n
    finally:
        assert a.stop() == 0
        b.stop()
        http.terminate()
        http.wait(timeout=10)


def test_auto_steps_aside_for_netfilter_chains(lab: Lab) -> None:
    """Packets the program forwards never meet the gateway's nftables: under "auto" it
    suspends while a base chain exists (not grebe's own), the Python path then forwarding
    through the chain, and resumes when it is gone; at start-up it is not loaded at all."""
    a = Endpoint(lab, "gw-a", GRE[0], datapath="auto", tag="n")
    b = Endpoint(lab, "gw-b", GRE[1], tag="n")
    try:
        assert pings(lab, "client", SERVER4)
        lab.nft("gw-a", "table inet gbeb_fw {\n chain forward_filter {\n"
                        "  type filter hook forward priority 0; policy accept;\n"
                        "  ip daddr 198.18.2.10 icmp type echo-request counter drop\n }\n}\n")
        try:
            lab.wait_for(lambda: a.ebpf()["suspended"], timeout=10, what="the program suspended")
            assert "inet gbeb_fw/forward_filter" in a.ebpf()["suspended"]
            assert not pings(lab, "client", SERVER4)  # the firewall's drop rule holds
        finally:
            lab.run("gw-a", ["nft", "delete", "table", "inet", "gbeb_fw"])
        lab.wait_for(lambda: not a.ebpf()["suspended"], timeout=10, what="the program back")
        before = a.ebpf()["encap"]
        assert pings(lab, "client", SERVER4) and a.ebpf()["encap"] > before
        assert "eBPF fast path suspended" in a.log() and "eBPF fast path resumed" in a.log()
    finally:
        assert a.stop() == 0
        b.stop()


def test_grebe_status_shows_the_datapath(lab: Lab) -> None:
    a = Endpoint(lab, "gw-a", GRE[0], tag="s")
    try:
        out = lab.run("gw-a", ["grebe", "status"]).stdout
        assert "datapath ebpf" in out, out
    finally:
        assert a.stop() == 0
