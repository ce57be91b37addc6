"""The kernel termination backend (bridge/kernel/) end to end, in a plain routed two-sites lab.

gw-a intercepts, with nftables TPROXY on its LAN side, TCP from the client to the server's ports
80 and 22 (log + http), 8080 (log + http + replace) and 9000 (log); port 8081 is not selected.
The gateways route the other site over the WAN (the bench's `plain` variant), so this tests
the backend alone, without grebe. Real peers: nginx, curl, OpenSSH, plus small Python sockets
for aborts. Every flow and the server's view of the client address are checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root and /dev/net/tun"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nft", "nginx", "curl", "sshd")),
                       reason="needs nft, nginx, curl and sshd"),
]

ROOT = Path(__file__).resolve().parents[2]
SERVER, SERVER6, CLIENT = "198.18.2.10", "2001:db8:2::10", "198.18.1.10"
BIG = 100 * 1024 * 1024

RULES = """
[[inspect]]
name = "web"
backend = "kernel"
dst = ["198.18.2.0/24", "2001:db8:2::/64"]
dst_ports = [80, 22]
inspectors = ["log", "http"]
log_path = "{state}/flows.jsonl"

[[inspect]]
name = "tls"
backend = "kernel"
dst = ["198.18.2.0/24"]
dst_ports = [443]
inspectors = ["log", "tls"]
log_path = "{state}/flows.jsonl"

[[inspect]]
name = "raw"
backend = "kernel"
dst = ["198.18.2.0/24"]
dst_ports = [9000]
inspectors = ["pcap", "log"]
log_path = "{state}/flows.jsonl"
pcap_path = "{state}/raw.pcap"

[[inspect]]
name = "rewrite"
backend = "kernel"
dst = ["198.18.2.0/24"]
dst_ports = [8080]
inspectors = ["log", "http", "replace"]
replace = [["Welcome to nginx!", "Welcome to grebe!"]]
log_path = "{state}/flows.jsonl"
"""

NGINX = """
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft;
    uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;
    server {{
        listen 80; listen [::]:80; listen 8080; listen 8081;
        root {d}/www;
        keepalive_requests 10000;
    }}
}}
"""

SSHD = """
Port 22
ListenAddress 198.18.2.10
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""

ABORT_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.2.10", 9000)); s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    mode = c.recv(5)
    if mode == b"abort":                       # the client will RST: report what we see
        try:
            while c.recv(65536):
                pass
            print("eof", peer[0], flush=True)
        except ConnectionResetError:
            print("reset", peer[0], flush=True)
    elif mode == b"echo ":                     # echo until EOF (a long-lived connection)
        try:
            while data := c.recv(65536):
                c.sendall(data)
        except ConnectionResetError:
            pass
    elif mode == b"close":                     # we close: the client must see data then EOF
        c.sendall(b"bye")
        c.close()
        continue
    c.close()
"""

ABORT_CLIENT = r"""
import socket, struct, sys, time
mode = sys.argv[1]
c = socket.create_connection(("198.18.2.10", 9000), timeout=10)
c.sendall(mode.encode())
if mode == "abort":
    time.sleep(0.2)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    print("aborted")
else:
    data = b""
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    print("got", data.decode(), "eof")
"""

PRE_CLIENT = r"""
import os, socket, sys, time
ready, go, out = sys.argv[1:4]
c = socket.create_connection(("198.18.2.10", 9000), timeout=30)
c.sendall(b"echo a\n")
assert c.recv(100) == b"a\n"
open(ready, "w").close()                       # established before the backend starts
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    c.sendall(b"after\n")
    res = "ok" if c.recv(100) == b"after\n" else "wrong"
except OSError as exc:
    res = repr(exc)
with open(out, "w") as f:
    f.write(res)
"""

MANY_CLIENT = r"""
import asyncio, sys
N = int(sys.argv[1])
async def one(i, gate):
    r, w = await asyncio.open_connection("198.18.2.10", 80)
    await gate.wait()                          # all N connections are open at once
    w.write(b"GET /small.txt HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    data = await r.read()
    w.close()
    return data.startswith(b"HTTP/1.1 200") and data.endswith(b"small file\n")
async def main():
    gate = asyncio.Event()
    tasks = [asyncio.create_task(one(i, gate)) for i in range(N)]
    await asyncio.sleep(1.0)
    gate.set()
    res = await asyncio.gather(*tasks, return_exceptions=True)
    print(sum(1 for x in res if x is True), "ok of", N)
asyncio.run(main())
"""


def _instance() -> str:
    return f"insk{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from bridge.lab.netlink import Lab

    d = tmp_path_factory.mktemp("inspect-kernel")
    lab = Lab.up(ROOT / "topologies" / "two-sites-plain.toml", instance=_instance())
    lab.tmp = d
    try:
        _plain_routes(lab)
        _start_servers(lab, d)
        # a connection that exists before the backend starts must survive it
        (d / "pre_client.py").write_text(PRE_CLIENT)
        lab.popen("client", [sys.executable, str(d / "pre_client.py"), str(d / "pre.ready"),
                             str(d / "pre.go"), str(d / "pre.out")], log=str(d / "pre.log"))
        lab.wait_for(lambda: (d / "pre.ready").exists(), 20, "pre-existing connection")
        conf = d / "gw-a.toml"
        conf.write_text(RULES.format(state=d))
        lab.tproxy = lab.popen(
            "gw-a", [sys.executable, "-m", "bridge.kernel", "-c", str(conf), "--iif", "lan0",
                     "--ready-file", str(d / "tproxy.ready")],
            log=str(d / "tproxy.log"), cwd=str(ROOT))
        lab.wait_for(lambda: (d / "tproxy.ready").exists(), 20, "tproxy listening")
        yield lab
    finally:
        lab.destroy()


def _plain_routes(lab: Any) -> None:
    for gw, dsts, vias in (("gw-a", ("198.18.2.0/24", "2001:db8:2::/64"),
                            ("198.18.0.2", "2001:db8::2")),
                           ("gw-b", ("198.18.1.0/24", "2001:db8:1::/64"),
                            ("198.18.0.1", "2001:db8::1"))):
        with lab.iproute(gw) as ipr:
            for dst, via in zip(dsts, vias, strict=True):
                ipr.route("add", dst=dst, gateway=via, family=AF_INET6 if ":" in dst else AF_INET)


def write_www(d: Path) -> None:
    """nginx's document root d/www: big.bin (BIG random bytes), index.html, small.txt."""
    www = d / "www"
    www.mkdir()
    with open(www / "big.bin", "wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    (www / "index.html").write_text("<html><h1>Welcome to nginx!</h1></html>\n")
    (www / "small.txt").write_text("a small file\n")


def big_sha256(d: Path) -> str:
    return hashlib.sha256((d / "www" / "big.bin").read_bytes()).hexdigest()


def make_ssh_keys(d: Path) -> None:
    """d/host_key for sshd, d/client_key for ssh, and the client's key authorized."""
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")


def start_abort_server(lab: Any, d: Path) -> None:
    """ABORT_SERVER on the server node, port 9000; what it sees goes to lab.abort_log."""
    (d / "abort_server.py").write_text(ABORT_SERVER)
    lab.abort_log = d / "abort_server.log"
    lab.popen("server", [sys.executable, "-u", str(d / "abort_server.py")],
              log=str(lab.abort_log))


def _start_servers(lab: Any, d: Path) -> None:
    write_www(d)
    (d / "nginx.conf").write_text(NGINX.format(d=d))
    lab.popen("server", ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
              log=str(d / "nginx.out"))
    make_ssh_keys(d)
    lab.sshd = start_sshd(lab, "server", d)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=secure.example.test",
                    "-days", "1", "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt")],
                   check=True, capture_output=True)
    lab.popen("server", ["openssl", "s_server", "-quiet", "-accept", "198.18.2.10:443",
                         "-cert", str(d / "tls.crt"), "-key", str(d / "tls.key"), "-www"],
              log=str(d / "s_server.log"))
    start_abort_server(lab, d)
    for port in (80, 8080, 8081, 22, 9000, 443):
        lab.wait_for(lambda p=port: listening(lab, "server", p), 20, f"server port {port}")


# sshd's privilege separation directory /run/sshd is compiled in; it must exist, owned by root.
# sshd runs in a mount namespace of its own (unshare -m: private propagation), with tmpfs on
# /run (for /run/sshd, utmp) and /var/log (wtmp, lastlog): nothing lands on the host's disk.
SSHD_PRIVATE_MOUNTS = (
    "mount -t tmpfs -o mode=0755,size=1m grebe-sshd-run /run && mkdir -m 0755 /run/sshd"
    " && mount -t tmpfs -o mode=0755,size=1m grebe-sshd-log /var/log"
    ' && exec "$0" -D -e -f "$1"'
)


def start_sshd(lab: Any, node: str, d: Path) -> subprocess.Popen[Any]:
    """Start OpenSSH's sshd (config SSHD, files in `d`) in `node`, in its own mount namespace."""
    (d / "sshd_config").write_text(SSHD.format(d=d))
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    return lab.popen(node, ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            SSHD_PRIVATE_MOUNTS, sshd, str(d / "sshd_config")],
                     log=str(d / "sshd.log"))


def assert_sshd_mounts_private(p: subprocess.Popen[Any]) -> None:
    """sshd (the pid itself, after exec) sees tmpfs on /run in another mount namespace."""
    assert os.readlink(f"/proc/{p.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.path.basename(os.readlink(f"/proc/{p.pid}/exe")) == "sshd"
    theirs = Path(f"/proc/{p.pid}/mountinfo").read_text().splitlines()
    on_run = [ln.split(" - ")[1].split()[:2] for ln in theirs if ln.split()[4] == "/run"]
    assert on_run and on_run[-1] == ["tmpfs", "grebe-sshd-run"]  # the last one is what it sees
    assert "grebe-sshd" not in Path("/proc/self/mountinfo").read_text()  # not in ours


def listening(lab: Any, node: str, port: int) -> bool:
    out = lab.run(node, ["ss", "-Htln", f"sport = :{port}"]).stdout
    return bool(out.strip())


def flows(lab: Any) -> list[dict[str, Any]]:
    """The log inspector's lines so far (lab.tmp/flows.jsonl)."""
    path = lab.tmp / "flows.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_flow(lab: Any, pred: Any, what: str) -> dict[str, Any]:
    found: dict[str, Any] = lab.wait_for(
        lambda: next((f for f in flows(lab) if pred(f)), None), 20, what)
    return found


def curl(lab: Any, url: str, *extra: str, timeout: float = 120,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return lab.run("client", ["curl", "-sS", "--max-time", str(int(timeout)), *extra, url],
                   timeout=timeout + 10, check=check)


def small_gets_logged(lab: Any) -> int:
    """How many logged flows carried a GET of /small.txt."""
    return sum(1 for f in flows(lab) if any(h.get("target") == "/small.txt"
                                            for h in f.get("http", [])))


def check_abort_then_close(lab: Any, d: Path) -> dict[str, Any]:
    """A client's RST reaches the server (and is logged as client_reset, 5 bytes sent), then
    the server's data + FIN reach the client; returns the log line of that closed flow."""
    (d / "abort_client.py").write_text(ABORT_CLIENT)
    out = lab.run("client", [sys.executable, str(d / "abort_client.py"), "abort"]).stdout
    assert "aborted" in out
    lab.wait_for(lambda: f"reset {CLIENT}" in lab.abort_log.read_text(), 10,
                 "the server to see the client's RST")
    rec = wait_flow(lab, lambda f: f["dport"] == 9000 and f["close"] == "client_reset",
                    "client_reset log line")
    assert rec["bytes_c2s"] == 5
    out = lab.run("client", [sys.executable, str(d / "abort_client.py"), "close"]).stdout
    assert out.strip() == "got bye eof"
    return wait_flow(lab, lambda f: f["dport"] == 9000 and f["close"] == "closed",
                     "closed log line")


def check_ssh(lab: Any, d: Path) -> dict[str, Any]:
    """`ssh root@SERVER echo ok` works (sshd in its private mount namespace); returns the log
    line of its flow."""
    cp = lab.run("client", ["ssh", "-i", str(d / "client_key"), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "ConnectTimeout=10", f"root@{SERVER}", "echo", "ok"],
                 timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "ok"
    assert_sshd_mounts_private(lab.sshd)
    return wait_flow(lab, lambda f: f["dport"] == 22, "ssh flow log line")


def check_concurrent_gets(lab: Any, d: Path, n: int) -> None:
    """n connections open at once, then each GETs /small.txt: all succeed and are logged."""
    (d / "many.py").write_text(MANY_CLIENT)
    before = small_gets_logged(lab)
    out = lab.run("client", [sys.executable, str(d / "many.py"), str(n)], timeout=120).stdout
    assert out.strip() == f"{n} ok of {n}"
    lab.wait_for(lambda: small_gets_logged(lab) >= before + n, 20, f"{n} log lines")


# --------------------------------------------------------------------------------------------


def test_connection_from_before_the_backend_passes_untouched(lab: Any) -> None:
    d: Path = lab.tmp
    (d / "pre.go").touch()
    lab.wait_for(lambda: (d / "pre.out").exists(), 30, "the old connection's echo")
    assert (d / "pre.out").read_text() == "ok"


def test_100mb_download_sha256_and_http_log(lab: Any) -> None:
    d: Path = lab.tmp
    want = big_sha256(d)
    t0 = time.monotonic()
    # curl writes binary: hash it inside the client node
    out = lab.run("client", ["sh", "-c", f"curl -sS --max-time 120 http://{SERVER}/big.bin"
                             " | sha256sum"], timeout=150).stdout.split()[0]
    elapsed = time.monotonic() - t0
    assert out == want
    rec = wait_flow(lab, lambda f: any(h.get("target") == "/big.bin" for h in f.get("http", [])),
                     "log line of the 100 MB download")
    assert rec["rule"] == "web" and rec["backend"] == "kernel" and rec["close"] == "closed"
    assert rec["src"] == CLIENT and rec["dst"] == SERVER and rec["dport"] == 80
    assert rec["bytes_s2c"] > BIG
    ex = rec["http"][0]
    assert (ex["method"], ex["target"], ex["version"], ex["status"]) == \
        ("GET", "/big.bin", "1.1", 200)
    assert ex["response_body"] == BIG
    # the server saw the client's own address (transparent upstream)
    access = (d / "nginx-access.log").read_text()
    assert f'{CLIENT} - - ' in access and "GET /big.bin" in access
    print(f"\n100 MB through the TPROXY relay (log+http): {BIG / elapsed / 1e6:.0f} MB/s "
          f"(first transfer, curl -o -)")


def test_replace_changes_the_response(lab: Any) -> None:
    direct = curl(lab, f"http://{SERVER}:8081/index.html").stdout    # not selected
    rewritten = curl(lab, f"http://{SERVER}:8080/index.html").stdout
    assert "Welcome to nginx!" in direct
    assert "Welcome to grebe!" in rewritten and "nginx!" not in rewritten
    rec = wait_flow(lab, lambda f: f["rule"] == "rewrite", "log line of the rewritten flow")
    assert rec["replaced"] == 1


def test_ipv6_flow_is_inspected(lab: Any) -> None:
    out = curl(lab, f"http://[{SERVER6}]/small.txt").stdout
    assert out == "a small file\n"
    rec = wait_flow(lab, lambda f: f["dst"] == SERVER6, "log line of the IPv6 flow")
    assert rec["http"][0]["target"] == "/small.txt" and rec["src"] == "2001:db8:1::10"


def test_unselected_flow_passes_untouched(lab: Any) -> None:
    d: Path = lab.tmp
    want = big_sha256(d)
    before = len(flows(lab))
    out = lab.run("client", ["sh", "-c", f"curl -sS --max-time 120 http://{SERVER}:8081/big.bin"
                             " | sha256sum"], timeout=150).stdout.split()[0]
    assert out == want
    # no relay ever saw it: no socket on gw-a for port 8081, and no log line
    ss = lab.run("gw-a", ["ss", "-Htn", "state", "all",
                          "( dport = :8081 or sport = :8081 )"]).stdout
    assert ss.strip() == ""
    assert all(f["dport"] != 8081 for f in flows(lab)) and len(flows(lab)) >= before


def test_client_abort_reaches_server_and_server_close_reaches_client(lab: Any) -> None:
    d: Path = lab.tmp
    rec = check_abort_then_close(lab, d)
    # the pcap inspector's synthesized packets: Wireshark follows the stream of this flow
    pcap = d / "raw.pcap"
    lab.wait_for(lambda: pcap.exists() and pcap.stat().st_size > 24, 10, "pcap flushed")
    ends = f"{CLIENT}:{rec['sport']},{SERVER}:9000"
    out = subprocess.run(["tshark", "-r", str(pcap), "-q", "-z", f"follow,tcp,ascii,{ends}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "close" in out and "bye" in out


def test_tls_client_hello_sni_and_alpn(lab: Any) -> None:
    cp = lab.run("client", ["curl", "-sSk", "--max-time", "20", "--resolve",
                            f"secure.example.test:443:{SERVER}",
                            "https://secure.example.test/"], check=False)
    assert cp.returncode == 0, cp.stderr
    rec = wait_flow(lab, lambda f: f["rule"] == "tls", "tls flow log line")
    assert rec["tls"]["sni"] == "secure.example.test"
    assert "http/1.1" in rec["tls"]["alpn"] and rec["close"] in ("closed", "client_reset")


def test_ssh_through_inspected_flow(lab: Any) -> None:
    rec = check_ssh(lab, lab.tmp)
    assert rec["close"] == "closed" and "not HTTP" in rec["http_stopped"]


def test_200_concurrent_inspected_connections(lab: Any) -> None:
    check_concurrent_gets(lab, lab.tmp, 200)


def test_sighup_reloads_rules_and_refuses_a_bad_file(lab: Any) -> None:
    d: Path = lab.tmp
    conf = d / "gw-a.toml"
    good = conf.read_text()
    conf.write_text("[[inspect]]\nname = 'broken'\nsrc = ['not an address']\n")
    lab.tproxy.send_signal(signal.SIGHUP)
    lab.wait_for(lambda: "reload of" in (d / "tproxy.log").read_text(), 10, "refusal logged")
    assert "Welcome to grebe!" in curl(lab, f"http://{SERVER}:8080/index.html").stdout
    conf.write_text(good.replace("Welcome to grebe!", "Welcome to GREBE!"))
    lab.tproxy.send_signal(signal.SIGHUP)
    lab.wait_for(lambda: "Welcome to GREBE!" in curl(lab, f"http://{SERVER}:8080/index.html")
                 .stdout, 10, "the reloaded replace rule")
    conf.write_text(good)
    lab.tproxy.send_signal(signal.SIGHUP)


def test_bench_relay_vs_direct(lab: Any) -> None:
    """Benchmark (prints, never asserts on time): 100 MB direct vs through the relay."""
    def speed(port: int) -> float:
        out = lab.run("client", ["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w",
                                 "%{speed_download}", f"http://{SERVER}:{port}/big.bin"],
                      timeout=150).stdout
        return float(out) / 1e6

    direct = max(speed(8081) for _ in range(3))
    relayed = max(speed(80) for _ in range(3))
    print(f"\n100 MB GET, best of 3: direct {direct:.0f} MB/s, TPROXY relay (log+http) "
          f"{relayed:.0f} MB/s, ratio relay/direct {relayed / direct:.2f}")
    assert relayed > 0 and direct > 0


def test_zz_exit_removes_interception(lab: Any) -> None:
    """Last: SIGTERM to the backend removes its nft table, policy rules and routes."""
    assert "grebe_tproxy" in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    lab.tproxy.send_signal(signal.SIGTERM)
    assert lab.tproxy.wait(20) == 0
    assert "grebe_tproxy" not in lab.run("gw-a", ["nft", "list", "tables"]).stdout
    rules = lab.run("gw-a", ["ip", "rule"]).stdout + lab.run("gw-a", ["ip", "-6", "rule"]).stdout
    assert "0x4754" not in rules
    # and the network still works, now without the relay
    assert curl(lab, f"http://{SERVER}/small.txt").stdout == "a small file\n"
