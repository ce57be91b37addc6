"""The kernel termination backend on a grebe gateway: topologies/two-sites-inspect-kernel.toml.

gw-a runs only `grebe up` (the only route to site B is the grebe TUN), which runs the kernel
backend for its `backend = "kernel"` rules itself: TPROXY on the LAN side diverts the client's
TCP to the server's port 80 into the relay, whose upstream leg (bound to the client's address)
is routed into the TUN like any other packet, and whose replies come back out of the TUN to the
transparent socket. `grebe flows` shows the live relayed flow with the kernel's TCP_INFO, the
drop rule (port 8088) refuses at once, `grebe status` and the metrics carry the backend's
counters, and SIGTERM to grebe leaves no nft table or policy rule behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
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
        (state / "small.txt").write_text("a small file\n")
        lab.wait_for(lambda: "grebe_tproxy" in lab.run("gw-a", ["nft", "list", "tables"]).stdout,
                     30, "grebe up's kernel backend on gw-a")
        # something listens on 8088, so only the drop rule can refuse a connection to it
        lab.popen("server", ["python", "-m", "http.server", "8088", "--bind", "::",
                             "--directory", str(state)], log=str(state / "server-8088.log"))
        lab.wait_for(lambda: lab.run("server", ["ss", "-Htln", "sport = :8088"]).stdout.strip(),
                     20, "server on 8088")
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
                             f"http://[{SERVER6}]/small.txt"]).stdout
    assert out == "200"
    rec = lab.wait_for(lambda: next((f for f in flows(lab) if f["dst"] == SERVER6), None), 20,
                       "IPv6 log line")
    assert rec["src"] == "2001:db8:1::10" and rec["http"][0]["status"] == 200


def grebe_json(lab: Any, cmd: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(lab.run("gw-a", ["grebe", cmd, "--json"]).stdout)
    return out


def test_grebe_flows_shows_the_live_kernel_flow_with_tcp_info(lab: Any) -> None:
    # a rate-limited download keeps one relayed flow open for ~20 s
    curl = lab.popen("client", ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "1M",
                                f"http://{SERVER}/big.bin"])
    try:
        def live() -> dict[str, Any] | None:
            return next((f for f in grebe_json(lab, "flows")["flows"]
                         if f.get("backend") == "kernel" and f["bytes_s2c"] > 100_000), None)

        f = lab.wait_for(live, 20, "a live kernel flow in grebe flows")
        assert f["src"] == "198.18.1.10" and f["dst"] == SERVER and f["dport"] == 80
        assert f["rule"] == "server-web-ssh" and f["phase"] == "open" and f["age"] > 0
        assert set(f["inspectors"]) == {"LogInspector", "HttpInspector"}, f["inspectors"]
        # the relay may have read the whole file and shut down its write half while the
        # client leg's kernel socket still holds bytes for the rate-limited client: FIN-WAIT-1;
        # or the client's kernel already took every byte and the FIN into its receive buffer
        # (curl's rate limit only paces its reads): FIN-WAIT-2
        leg_states = ("ESTABLISHED", "FIN-WAIT-1", "FIN-WAIT-2")
        assert f["client_leg"]["state"] in leg_states, f
        assert f["server_leg"]["state"] in ("ESTABLISHED", "CLOSE-WAIT"), f
        for leg in ("client_leg", "server_leg"):
            info = f[leg]
            assert info["srtt"] > 0 and info["rto"] >= 0.2 and info["cwnd"] > 0, f
            assert info["retransmissions"] >= 0
        assert f["client_leg"]["bytes_out"] > 100_000      # what the client acked so far
        table = lab.run("gw-a", ["grebe", "flows"]).stdout
        assert "kernel" in table and any(f"client leg (kernel TCP_INFO): {s}" in table
                                         for s in leg_states), table
        assert "198.18.1.10:" in table and f"{SERVER}:80" in table
        st = grebe_json(lab, "status")["inspect_kernel"]["summary"]
        assert st["active"] >= 1 and st["accepted"] >= 1
    finally:
        curl.kill()
        curl.wait(10)


def test_drop_rule_refuses_at_once(lab: Any) -> None:
    before = grebe_json(lab, "status")["inspect_kernel"]["summary"]["rejected"]
    t0 = time.monotonic()
    cp = lab.run("client", ["curl", "-sS", "-m", "10", f"http://{SERVER}:8088/small.txt"],
                 check=False)
    took = time.monotonic() - t0
    assert cp.returncode == 7, cp.stderr            # curl: couldn't connect
    assert took < 3, took               # an RST, not a silently dropped SYN retried for 10 s
    for addr in (SERVER, SERVER6):      # what connect() says: ECONNREFUSED, as a closed port
        probe = (f"import socket\ntry:\n socket.create_connection(('{addr}', 8088), timeout=10)"
                 "\nexcept ConnectionRefusedError:\n print('refused')\n")
        assert lab.run("client", ["python", "-c", probe]).stdout.strip() == "refused"
    after = grebe_json(lab, "status")["inspect_kernel"]["summary"]["rejected"]
    assert after >= before + 2
    # the port is open on the server: only gw-a's drop rule refused the client
    assert lab.run("server", ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://{SERVER}:8088/small.txt"]).stdout == "200"


def test_status_table_and_metrics_carry_the_kernel_counters(lab: Any) -> None:
    lab.run("client", ["curl", "-sS", "-m", "20", "-o", "/dev/null", f"http://{SERVER}/small.txt"])
    text = lab.run("gw-a", ["grebe", "status"]).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("inspect kernel (tproxy):"))
    assert "accepted=" in line and "relay_errors=" in line and "bytes_s2c=" in line
    st = grebe_json(lab, "status")["inspect_kernel"]["summary"]
    assert st["accepted"] >= 1 and st["bytes_s2c"] > 0
    metrics = lab.run("gw-a", ["curl", "-sS", "-m", "10", "http://127.0.0.1:9108/metrics"]).stdout
    assert "grebe_tproxy_active_flows " in metrics
    assert 'grebe_tproxy_flows_total{outcome="accepted"}' in metrics


def _grebe_up(lab: Any, node: str = "gw-a") -> subprocess.Popen[Any]:
    """The topology's `grebe up` process on `node` (started by the lab, so ours to signal)."""
    for p, t in zip(lab._popens, lab.processes, strict=True):
        if (t.node == node and len(t.argv) > 1 and os.path.basename(t.argv[0]) == "grebe"
                and t.argv[1] == "up"):
            return p    # type: ignore[no-any-return]
    raise AssertionError(f"no grebe up on {node}")


def test_sighup_reloads_the_kernel_rules_and_grebe_keeps_running(lab: Any) -> None:
    grebe = _grebe_up(lab)
    log = Path(lab.state_dir) / "gw-a.run0.log"
    grebe.send_signal(signal.SIGHUP)
    lab.wait_for(lambda: "tproxy: reloaded 2 rule(s)" in log.read_text(), 10, "reload logged")
    assert grebe.poll() is None
    before = grebe_json(lab, "status")["inspect_kernel"]["summary"]
    assert before["reloads"] >= 1
    # the reloaded rules are in force: the new nft table still diverts and still refuses
    assert lab.run("client", ["curl", "-sS", "-m", "20", f"http://{SERVER}/small.txt"]
                   ).stdout == "a small file\n"
    after = grebe_json(lab, "status")["inspect_kernel"]["summary"]
    assert after["accepted"] == before["accepted"] + 1
    assert lab.run("client", ["curl", "-sS", "-m", "10", f"http://{SERVER}:8088/"],
                   check=False).returncode == 7


def test_standalone_tool_stands_by_beside_grebe(lab: Any) -> None:
    """`python -m bridge.kernel` (still started by older scripts, e.g. the bench) must not
    replace or, failing to bind, delete the interception grebe up runs."""
    d = Path(lab.state_dir)
    tool = lab.popen("gw-a", ["python", "-m", "bridge.kernel", "-c",
                              "./two-sites-inspect-kernel/gw-a.toml", "--ready-file",
                              str(d / "standby.ready")], cwd=str(ROOT / "topologies"),
                     log=str(d / "standby.log"))
    lab.wait_for(lambda: (d / "standby.ready").exists(), 20, "the standalone tool ready")
    assert "standing by" in (d / "standby.log").read_text()
    tool.send_signal(signal.SIGTERM)
    assert tool.wait(20) == 0
    assert "grebe_tproxy" in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    before = grebe_json(lab, "status")["inspect_kernel"]["summary"]["accepted"]
    assert lab.run("client", ["curl", "-sS", "-m", "20", f"http://{SERVER}/small.txt"]
                   ).stdout == "a small file\n"
    assert grebe_json(lab, "status")["inspect_kernel"]["summary"]["accepted"] == before + 1


def test_zz_sigterm_removes_the_interception(lab: Any) -> None:
    """Last: SIGTERM to grebe up removes its nft table, policy rules and local routes."""
    grebe = _grebe_up(lab)
    assert "grebe_tproxy" in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    # a live relayed download: grebe resets it toward both ends before the tunnel goes
    curl = lab.popen("client", ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "500K",
                                f"http://{SERVER}/big.bin"])

    def server_conns() -> str:
        out: str = lab.run("server", ["ss", "-Htn", "state", "established",
                                      "( sport = :80 )"]).stdout
        return out.strip()

    lab.wait_for(lambda: "198.18.1.10" in server_conns(), 20, "the download at the server")
    grebe.send_signal(signal.SIGTERM)
    assert grebe.wait(30) == 0
    assert curl.wait(20) != 0           # reset, not finished
    # the server got the relay's RST through the tunnel (else: ESTABLISHED for minutes)
    lab.wait_for(lambda: "198.18.1.10" not in server_conns(), 10, "the server's socket reset")
    assert "grebe_tproxy" not in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    rules = lab.run("gw-a", ["ip", "rule"]).stdout + lab.run("gw-a", ["ip", "-6", "rule"]).stdout
    assert "0x4754" not in rules and "lookup 4754" not in rules
    for fam in ("-4", "-6"):
        assert not lab.run("gw-a", ["ip", fam, "route", "show", "table", "4754"],
                           check=False).stdout.strip()


def _speed(lab: Any) -> float:
    out = lab.run("client", ["curl", "-sS", "--max-time", "60", "-o", "/dev/null", "-w",
                             "%{speed_download}", f"http://{SERVER}/big.bin"], timeout=90).stdout
    return float(out) / 1e6


def _stop(*procs: subprocess.Popen[Any]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(30) == 0


def _measure(lab: Any, argvs: list[list[str]]) -> float:
    # gw-b restarts too: a peer that outlived gw-a drops the restarted gw-a's low GRE sequence
    # numbers (drop-late) for a while, which would measure the tunnel's recovery, not the relay
    topo = ROOT / "topologies"
    procs = [lab.popen(node, argv, cwd=str(topo),
                       log=str(Path(lab.state_dir) / f"bench-{argv[-1].replace('/', '_')}.log"))
             for node, argv in (("gw-b", ["grebe", "up", "-c", "./two-sites/gw-b.toml"]),
                                *(("gw-a", a) for a in argvs))]
    try:
        lab.wait_for(lambda: "grebe_tproxy" in lab.run("gw-a", ["nft", "list", "tables"]).stdout,
                     30, "the kernel backend")
        lab.wait_for(lambda: lab.run("client", ["curl", "-s", "-o", "/dev/null", "-m", "2",
                                                f"http://{SERVER}/small.txt"], check=False)
                     .returncode == 0, 30, "HTTP through the relay")
        before = grebe_json(lab, "status").get("inspect_kernel")
        speeds = [_speed(lab) for _ in range(3)]
        if before is not None:      # in-process: the downloads went through grebe's backend
            after = grebe_json(lab, "status")["inspect_kernel"]["summary"]
            assert after["accepted"] >= before["summary"]["accepted"] + 3
        return max(speeds)
    finally:
        _stop(*procs)


def test_zzz_bench_backend_in_grebe_vs_separate_process(lab: Any) -> None:
    """Benchmark (prints, never asserts on time): the kernel backend on a thread of grebe up
    (one GIL with the data plane) against `python -m bridge.kernel` beside a grebe without
    inspect rules, 20 MB GETs through the relay and the tunnel, best of 3 each."""
    for node in ("gw-a", "gw-b"):       # gw-a's is gone unless this test runs alone (-k)
        topo_grebe = _grebe_up(lab, node)
        if topo_grebe.poll() is None:
            _stop(topo_grebe)
    separate = _measure(lab, [
        ["grebe", "up", "-c", "./two-sites/gw-a.toml"],
        ["python", "-m", "bridge.kernel", "-c", "./two-sites-inspect-kernel/gw-a.toml"]])
    inside = _measure(lab, [["grebe", "up", "-c", "./two-sites-inspect-kernel/gw-a.toml"]])
    print(f"\n20 MB GET through TPROXY relay + grebe tunnel, best of 3: separate process "
          f"{separate:.0f} MB/s, thread of grebe up {inside:.0f} MB/s, ratio "
          f"thread/separate {inside / separate:.2f}")
    assert inside > 0 and separate > 0
