"""Secure peers in the lab (issue 12): two-sites-plain with `grebe up` on both gateways,
`security = "authenticated"` or `"encrypted"`, keys written with the genkey helper into the
lab's state dir.

In both modes ping (v4 and v6 inside) and a curl download pass; the attacker on the WAN
replays datagrams captured on gw-b's WAN interface (handshakes and data), sends them with
bits flipped and with forged counters, floods forged handshake initiations and sends plain
GRE-in-UDP from gw-a's address: nothing reaches site B, each is counted under its reason in
`grebe status`, forwarding goes on. A gateway killed with SIGKILL and started again is
heard again at once. Waits are wait-for-condition (Lab.wait_for), never bare sleeps.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bridge import HTTP_PORT, SERVER4, SERVER6, TOPO, Gateways, _capture, download, ping

from bridge.lab.netlink import Lab
from bridge.lab.topology import load
from bridge.secure.keys import write_private_key

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
]

BLOB_MB = 20


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(load("two-sites-plain"), instance=f"sec{os.getpid()}", start=False)
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def pubs(lab: Lab) -> dict[str, str]:
    """Key pairs of both gateways from the genkey helper, in the lab state dir."""
    return {n: write_private_key(str(lab.state_dir / f"{n}.key")) for n in ("gw-a", "gw-b")}


def secure_configs(lab: Lab, pubs: dict[str, str], mode: str) -> tuple[Path, Path]:
    """The two-sites GRE configs with security = `mode`."""
    d = lab.state_dir
    out = []
    for node, other, ep in (("gw-a", "gw-b", "198.18.0.2"), ("gw-b", "gw-a", "198.18.0.1")):
        text = (TOPO / "two-sites" / f"{node}.toml").read_text()
        assert f'endpoint = "{ep}:4754"' in text
        text = text.replace(f'endpoint = "{ep}:4754"', f'endpoint = "{ep}"')
        text += (f'security = "{mode}"\nprivate_key_file = "{d / (node + ".key")}"\n'
                 f'public_key = "{pubs[other]}"\n')
        p = d / f"{mode}-{node}.toml"
        p.write_text(text)
        out.append(p)
    return out[0], out[1]


@pytest.fixture(scope="module")
def blob(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("www-secure")
    data = os.urandom(BLOB_MB << 20)
    (d / "blob").write_bytes(data)
    lab.popen("server", ["python", "-m", "http.server", str(HTTP_PORT), "--bind", "::",
                         "--directory", str(d)], log=str(lab.state_dir / "http.log"))
    lab.wait_for(lambda: lab.run("server", ["curl", "-sfI", f"http://127.0.0.1:{HTTP_PORT}/blob"],
                                 check=False).returncode == 0, timeout=15, what="http.server")
    return hashlib.sha256(data).hexdigest()


ATTACK = r"""
import sys
from scapy.all import GRE, IP, UDP, Raw, rdpcap, send
peer, gwb = "198.18.0.1", "198.18.0.2"
case, pcap = sys.argv[1], sys.argv[2]
caught = [bytes(p[UDP].payload) for p in rdpcap(pcap)
          if UDP in p and p[IP].src == peer and p[UDP].dport == 24754]
assert caught, "nothing captured"
def out(payload, dport=24754):
    send(IP(src=peer, dst=gwb) / UDP(sport=24754, dport=dport) / payload, verbose=0)
if case == "replay":
    for d in caught:
        out(d)
elif case == "flip":
    for d in caught:
        if d[0] in (4, 5) and len(d) > 40:
            out(d[:30] + bytes([d[30] ^ 1]) + d[31:])
elif case == "forged_counter":
    for d in caught:
        if d[0] in (4, 5):
            c = int.from_bytes(d[8:16], "big") + 10**6
            out(d[:8] + c.to_bytes(8, "big") + d[16:])
elif case == "flood":
    for i in range(200):
        out(bytes([1, 0, 0, 0]) + i.to_bytes(4, "big") + bytes(144))
elif case == "plain":
    inner = bytes(IP(src="198.18.1.10", dst="198.18.2.10") / UDP(sport=7, dport=9999)
                  / b"HOSTILE")
    out(bytes(GRE(key_present=1, key=42, seqnum_present=1, seqence_number=0xF0000000,
                  proto=0x0800) / Raw(inner)), dport=4754)
print(len(caught))
"""

EXPECTED = {  # case: a drop reason of gw-b's `grebe status` (secure ones under "secure")
    "replay": ("secure", "replay"),
    "flip": ("secure", "replay"),  # an old counter: the window refuses it before the tag
    "forged_counter": ("secure", "bad_mac"),
    "flood": ("secure", "bad_mac1"),
    "plain": ("bridge", "unknown_peer"),
}


def _drops(gw: Gateways, where: str, reason: str) -> int:
    st = gw.status("gw-b")
    assert st is not None
    return int(st["secure"]["drops"][reason] if where == "secure" else st["drops"][reason])


def _sealed_markers(pcap: str) -> int:
    """Datagrams in `pcap` from gw-a of a sealed marker's size: inner 20 + 8 + 6, GRE
    with key and sequence 12, secure overhead 32."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    try:
        pkts = rdpcap(pcap)
    except Exception:  # not written yet, or a packet half written
        return 0
    return sum(1 for p in pkts if UDP in p and p[IP].src == "198.18.0.1"
               and len(p[UDP].payload) == 34 + 12 + 32)


def _send_udp(lab: Lab, text: str) -> None:
    lab.run("client", ["python", "-c", "import socket; s=socket.socket(2, 2); "
                       f"s.sendto(b'{text}', ('{SERVER4}', 9999))"])


@pytest.mark.parametrize("mode", ["authenticated", "encrypted"])
def test_ping_download_and_attacks(lab: Lab, pubs: dict[str, str], blob: str, mode: str
                                   ) -> None:
    gw = Gateways(lab, *secure_configs(lab, pubs, mode))
    d = lab.state_dir
    try:
        ping(lab, SERVER4)
        ping(lab, SERVER6)
        assert download(lab, SERVER4) == blob
        st = gw.status("gw-a")
        assert st is not None and st["peers"][0]["security"] == mode
        assert st["peers"][0]["rx_bytes"] > BLOB_MB * 1_000_000
        assert sum(st["secure"]["drops"].values()) == 0
        # record what the attacker will replay: the markers, as gw-b's WAN sees them
        wan = str(d / f"wan-b-{mode}.pcap")
        cap = _capture(lab, "gw-b", "wan0", "udp port 24754", wan, 1000)
        for _ in range(5):  # one at a time: a burst leaves gw-a as one UDP GSO packet,
            _send_udp(lab, "MARKER")  # which tcpdump records unsegmented
        lab.wait_for(lambda: _sealed_markers(wan) >= 5, timeout=10,
                     what="the sealed markers in the capture")
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
        lan = str(d / f"lan-b-{mode}.pcap")
        lan_cap = _capture(lab, "gw-b", "lan0", "udp port 9999", lan, 100)
        script = str(d / "attack.py")
        if mode == "authenticated":  # in clear on the wire, and still refused when replayed
            assert b"MARKER" in Path(wan).read_bytes()
        Path(script).write_text(ATTACK)
        for case, (where, reason) in EXPECTED.items():
            n0 = _drops(gw, where, reason)
            lab.run("attacker", ["python", script, case, wan], timeout=120)
            lab.wait_for(lambda w=where, r=reason, n=n0: _drops(gw, w, r) > n,
                         timeout=10, what=f"{case} counted as {reason}")
        # the tunnel still forwards: the legitimate packet is the only one on lan0
        _send_udp(lab, "LEGIT")
        ping(lab, SERVER4, count=2)
        lab.wait_for(lambda: Path(lan).exists() and b"LEGIT" in Path(lan).read_bytes(),
                     timeout=10, what="the legitimate packet on gw-b lan0")
        lan_cap.send_signal(signal.SIGINT)
        lan_cap.wait(timeout=10)
        data = Path(lan).read_bytes()
        assert b"MARKER" not in data and b"HOSTILE" not in data
        st = gw.status("gw-b")
        assert st is not None and st["drops"]["sequence"] == 0
        assert st["io"]["internal_errors"] == 0
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}


def test_a_gateway_killed_and_started_again_is_heard_at_once(lab: Lab, pubs: dict[str, str]
                                                             ) -> None:
    configs = secure_configs(lab, pubs, "encrypted")
    gw = Gateways(lab, *configs)
    try:
        ping(lab, SERVER4)
        old = gw.procs["gw-b"]
        old.send_signal(signal.SIGKILL)
        old.wait(timeout=10)
        log = str(lab.state_dir / "grebe-gw-b-restarted.log")
        gw.procs["gw-b"] = lab.popen("gw-b", ["grebe", "up", "-c", str(configs[1])], log=log)
        lab.wait_for(lambda: gw.status("gw-b", check=False), timeout=15,
                     what="the restarted gw-b's control socket")
        t0 = time.monotonic()
        while True:
            cp = lab.run("client", ["ping", "-c", "1", "-W", "1", SERVER4], check=False,
                         timeout=10)
            if cp.returncode == 0:
                break
            assert time.monotonic() - t0 < 10, "no ping through the tunnel 10 s after restart"
        elapsed = time.monotonic() - t0
        print(f"first ping through the tunnel {elapsed:.2f} s after the restart")
        assert elapsed < 2.0
        st = gw.status("gw-a")
        assert st is not None and st["secure"]["events"]["peer_restarted"] >= 1
    finally:
        codes = gw.stop()
        assert codes["gw-a"] == 0


@pytest.mark.parametrize("mode", ["authenticated", "encrypted"])
def test_replays_after_a_restart_of_either_gateway_deliver_nothing(lab: Lab, pubs: dict[str, str],
                                                                   mode: str) -> None:
    """Traffic recorded on the WAN, replayed after gw-a was killed and started again, then
    after gw-b was: 0 replayed markers reach site B, and the legitimate datagrams sent
    after each replay all do (each exactly once)."""
    configs = secure_configs(lab, pubs, mode)
    gw = Gateways(lab, *configs)
    d = lab.state_dir
    script = str(d / "attack.py")
    Path(script).write_text(ATTACK)
    lan = str(d / f"lan-b-restart-{mode}.pcap")
    lan_cap = None
    try:
        ping(lab, SERVER4)
        wan = str(d / f"wan-b-restart-{mode}.pcap")
        cap = _capture(lab, "gw-b", "wan0", "udp port 24754", wan, 1000)
        for _ in range(5):
            _send_udp(lab, "MARKER")
        lab.wait_for(lambda: _sealed_markers(wan) >= 5, timeout=10,
                     what="the sealed markers in the capture")
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
        lan_cap = _capture(lab, "gw-b", "lan0", "udp port 9999", lan, 1000)
        legit = 0
        for node, cfg in (("gw-a", configs[0]), ("gw-b", configs[1])):
            old = gw.procs[node]
            old.send_signal(signal.SIGKILL)
            old.wait(timeout=10)
            gw.procs[node] = lab.popen(node, ["grebe", "up", "-c", str(cfg)],
                                       log=str(d / f"grebe-{node}-replay-{mode}.log"))
            lab.wait_for(lambda n=node: gw.status(n, check=False), timeout=15,
                         what=f"the restarted {node}'s control socket")
            ping(lab, SERVER4, count=2)
            n0 = _drops(gw, "secure", "replay") + _drops(gw, "secure", "unknown_session")
            lab.run("attacker", ["python", script, "replay", wan], timeout=120)
            lab.wait_for(lambda n=n0: _drops(gw, "secure", "replay")
                         + _drops(gw, "secure", "unknown_session") > n, timeout=10,
                         what=f"the replay after restarting {node} counted")
            for _ in range(3):
                _send_udp(lab, "LEGIT")
                legit += 1
        lab.wait_for(lambda: Path(lan).exists() and Path(lan).read_bytes().count(b"LEGIT")
                     >= legit, timeout=10, what="every legitimate datagram on gw-b lan0")
        lan_cap.send_signal(signal.SIGINT)
        lan_cap.wait(timeout=10)
        data = Path(lan).read_bytes()
        assert data.count(b"MARKER") == 0 and data.count(b"LEGIT") == legit
        st = gw.status("gw-b")
        assert st is not None and st["io"]["internal_errors"] == 0
    finally:
        if lan_cap is not None and lan_cap.poll() is None:
            lan_cap.send_signal(signal.SIGINT)
        codes = gw.stop()
        assert codes["gw-a"] == 0 and codes["gw-b"] == 0


@pytest.mark.parametrize("mode", ["authenticated", "encrypted"])
def test_split_gateways_pass_traffic_both_ways_across_rekeys(lab: Lab, pubs: dict[str, str],
                                                             blob: str, mode: str) -> None:
    """split_directions with secure peers (bridge/io/split.py, bridge/secure/mirror.py):
    each gateway opens in its child and handshakes in its parent; sessions of 2 s
    (GREBE_REKEY_AFTER) make pings both ways and a download cross several rekeys, in both
    roles, with nothing lost and nothing refused."""
    configs = secure_configs(lab, pubs, mode)
    gw = Gateways.__new__(Gateways)
    gw.lab, gw.procs = lab, {}
    for node, cfg in zip(("gw-a", "gw-b"), configs, strict=True):
        env = lab.env(node) | {"GREBE_REKEY_AFTER": "2"}
        gw.procs[node] = lab.popen(node, ["grebe", "up", "-c", str(cfg)], env=env,
                                   log=str(lab.state_dir / f"grebe-{node}-rekey.log"))
    try:
        for node in gw.procs:
            lab.wait_for(lambda n=node: gw.status(n, check=False), timeout=15,
                         what=f"grebe control socket on {node}")
            st = gw.status(node)
            assert st is not None and st["io"].get("processes") == 2, st.get("io")
        cp = lab.run("client", ["ping", "-c", "40", "-i", "0.2", "-W", "1", SERVER4],
                     check=False, timeout=60)
        assert " 0% packet loss" in cp.stdout, cp.stdout
        assert download(lab, SERVER4) == blob
        events = {"rekey": 0, "handshake_completed": 0, "session_confirmed": 0}
        for node in gw.procs:
            st = gw.status(node)
            assert st is not None
            sec = st["secure"]
            print(node, sec["events"], sec["drops"])
            for k in events:
                events[k] += sec["events"][k]
            assert sec["drops"]["replay"] == sec["drops"]["bad_mac"] == 0
            assert st["drops"]["sequence"] == 0
            assert st["io"]["internal_errors"] == 0
        assert events["rekey"] >= 3 and events["handshake_completed"] >= 3
        assert events["session_confirmed"] >= 3  # responders confirmed in their child
    finally:
        assert gw.stop() == {"gw-a": 0, "gw-b": 0}
