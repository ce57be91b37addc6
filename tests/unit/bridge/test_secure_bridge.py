"""Two Bridges with secure peers (issue 12), wired only through the Bridge's own API:
`from_tun` / `from_udp` / `from_secure` / `handle_timer`, `Output.secure` carried between
them as the secure sockets would. Data both ways (IPv4 and IPv6 inner, GRE and IPIP, TSO
super-packets), replays and forgeries dropped and counted, plain datagrams from a secure
peer's address refused, a restarted side talking again within 2 s, status and metrics.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from bridge.config import loads_config
from bridge.errors import ConfigErrors
from bridge.gso import SuperPacket, UdpRun
from bridge.io import offload as ol
from bridge.pipeline import Bridge, Output
from bridge.secure import OVERHEAD, SECURE_PORT
from bridge.secure.keys import write_private_key
from stack.wire import vnet
from stack.wire.checksum import pseudo_sum_v4

HOST = {"a": "198.18.0.1", "b": "198.18.0.2"}
NET = {"a": ("198.18.10.0/24", "2001:db8:10::/48"), "b": ("198.18.20.0/24", "2001:db8:20::/48")}
OTHER = {"a": "b", "b": "a"}
WALL = 1.8e9

SITE = """
[tun]
name = "sec{side}"
addresses = ["198.18.100.{n}/30"]
[listen]
address = "{me}"
[[peers]]
name = "peer"
endpoint = "{other}"
prefixes = ["{p4}", "{p6}"]
keepalive = 5
security = "{mode}"
private_key_file = "{priv}"
public_key = "{pub}"
{extra}
"""


def _keys(tmp: str) -> dict[str, str]:
    return {side: write_private_key(os.path.join(tmp, f"{side}.key")) for side in "ab"}


def _config(side: str, mode: str, tmp: str, pubs: dict[str, str], extra: str = "") -> str:
    o = OTHER[side]
    return SITE.format(side=side, n=1 if side == "a" else 2, me=HOST[side], other=HOST[o],
                       p4=NET[o][0], p6=NET[o][1], mode=mode,
                       priv=os.path.join(tmp, f"{side}.key"), pub=pubs[o], extra=extra)


class Sites:
    """Two Bridges and the wire between their secure ports (a list per receiver)."""

    def __init__(self, mode: str, tmp: str, extra: str = "") -> None:
        self.mode, self.tmp, self.extra = mode, tmp, extra
        self.pubs = _keys(tmp)
        self.br = {s: self.build(s, 0.0) for s in "ab"}
        self.tun: dict[str, list[bytes]] = {"a": [], "b": []}
        self.wire: list[tuple[str, bytes]] = []  # every datagram carried: (receiver, bytes)

    def build(self, side: str, now: float) -> Bridge:
        return Bridge(loads_config(_config(side, self.mode, self.tmp, self.pubs, self.extra)),
                      now, wall_offset=WALL)

    def carry(self, side: str, out: Output) -> list[bytes]:
        """What `side` produced: TUN packets kept, secure datagrams returned."""
        self.tun[side] += [bytes(p) for p in out.tun]
        assert not out.udp  # nothing for a secure peer leaves on the plain port
        dgs: list[bytes] = []
        for addr, items in out.secure.items():
            assert addr == (HOST[OTHER[side]], SECURE_PORT)
            for it in items:
                dgs += it.datagrams() if isinstance(it, UdpRun) else [bytes(it)]
        return dgs

    def deliver(self, to: str, dgs: list[bytes], now: float) -> list[bytes]:
        out = Output()
        self.wire += [(to, d) for d in dgs]
        self.br[to].from_secure([(d, (HOST[OTHER[to]], SECURE_PORT)) for d in dgs], now, out)
        return self.carry(to, out)

    def pump(self, now: float, pending: dict[str, list[bytes]] | None = None) -> None:
        """Timers due, then datagrams both ways until nothing moves."""
        pending = pending or {"a": [], "b": []}
        for s in "ab":
            t = self.br[s].get_timer()
            if t is not None and t <= now:
                out = Output()
                self.br[s].handle_timer(now, out)
                pending[OTHER[s]] += self.carry(s, out)
        for _ in range(20):
            if not pending["a"] and not pending["b"]:
                return
            for to in "ab":
                dgs, pending[to] = pending[to], []
                pending[OTHER[to]] += self.deliver(to, dgs, now)
        raise AssertionError("datagrams kept bouncing")

    def send(self, side: str, pkts: list[Any], now: float) -> None:
        out = Output()
        self.br[side].from_tun(pkts, now, out)
        self.pump(now, {"a": [], "b": [], OTHER[side]: self.carry(side, out)})


def _ping(src: str, dst: str, i: int, v6: bool = False) -> bytes:
    if v6:
        return bytes(IPv6(src=src, dst=dst, hlim=64) / ICMPv6EchoRequest(seq=i)
                     / (bytes([i % 256]) * 100))
    return bytes(IP(src=src, dst=dst, ttl=64, id=i) / ICMP(seq=i) / (bytes([i % 256]) * 100))


MODES = ["authenticated", "encrypted"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("extra", ['key = 9\nsequence = "drop-late"', 'sequence = "reorder"',
                                   'encapsulation = "ipip"'])
def test_data_both_ways_v4_and_v6(tmp_path: Any, mode: str, extra: str) -> None:
    s = Sites(mode, str(tmp_path), extra)
    s.pump(0.0)
    for i in range(20):
        s.send("a", [_ping("198.18.10.5", "198.18.20.7", i)], 0.1 + i * 0.01)
        s.send("b", [_ping("2001:db8:20::7", "2001:db8:10::5", i, v6=True)], 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 20 and len(s.tun["a"]) == 20
    assert IP(s.tun["b"][3]).ttl == 63 and IPv6(s.tun["a"][3]).hlim == 63
    for side in "ab":
        st = s.br[side].status(1.0)
        assert st["drops"] == {k: 0 for k in st["drops"]}
        assert sum(st["secure"]["drops"].values()) == 0
        assert st["peers"][0]["security"] == mode and st["peers"][0]["up"]
        assert st["peers"][0]["mtu"] == 1500 - s.br[side].peers[0].overhead
    # the wire carries sealed transport datagrams: inner readable only in authenticated
    carried = [d for to, d in s.wire if to == "b" and d[0] in (4, 5)]
    assert carried and all(d[0] == (4 if mode == "authenticated" else 5) for d in carried)
    marker = bytes([7]) * 100
    assert any(marker in d for d in carried) == (mode == "authenticated")


def test_tunnel_mtu_is_32_bytes_smaller_than_plain(tmp_path: Any) -> None:
    s = Sites("encrypted", str(tmp_path))
    plain = Bridge(loads_config(_config("a", "plain", str(tmp_path), s.pubs)
                                .replace('private_key_file', '#').replace('public_key', '#')),
                   0.0)
    assert plain.peers[0].mtu - s.br["a"].peers[0].mtu == OVERHEAD


def _tso_frame(rows: int, mss: int = 1000) -> SuperPacket:
    data = bytes(range(256)) * (rows * mss // 256 + 1)
    pkt = bytearray(bytes(IP(src="198.18.10.5", dst="198.18.20.7", flags="DF", id=1)
                          / TCP(sport=40000, dport=80, seq=1, ack=1, flags="A", window=500)
                          / data[:rows * mss]))
    pkt[36:38] = pseudo_sum_v4(pkt[12:16], pkt[16:20], 6, 0).to_bytes(2, "big")
    frame = vnet.build_vnet(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 40, mss, 20, 16) + bytes(pkt)
    return SuperPacket(frame, vnet.VNET_HDR_LEN, mss, ol.split_frame)


@pytest.mark.parametrize("mode", MODES)
def test_tso_super_packets_are_sealed_as_one_batch(tmp_path: Any, mode: str) -> None:
    s = Sites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    out = Output()
    s.br["a"].from_tun([_tso_frame(20), _tso_frame(7)], 0.5, out)
    runs = out.secure[(HOST["b"], SECURE_PORT)]
    assert all(isinstance(r, UdpRun) and r.seg == len(r) // (len(r) // r.seg) for r in runs)
    s.pump(0.5, {"a": [], "b": s.carry("a", out)})
    assert len(s.tun["b"]) == 27
    assert all(len(p) == 1040 for p in s.tun["b"])
    assert s.br["b"].counters.total_drops == 0


def test_replays_forgeries_and_plain_datagrams_never_reach_the_tun(tmp_path: Any) -> None:
    s = Sites("encrypted", str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    for i in range(40):
        s.send("a", [_ping("198.18.10.5", "198.18.20.7", i)], 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 40
    recorded = [d for to, d in s.wire if to == "b"]
    b = s.br["b"]
    # replays of everything recorded, handshakes included: nothing delivered
    s.deliver("b", recorded, 1.0)
    # forgeries of fresh datagrams (counters not seen yet): a bit flipped, truncated
    out = Output()
    s.br["a"].from_tun([_ping("198.18.10.5", "198.18.20.7", 50 + i) for i in range(10)],
                       1.0, out)
    fresh = s.carry("a", out)
    flipped = [d[:20] + bytes([d[20] ^ 1]) + d[21:] for d in fresh]
    cut = [d[:-1] for d in fresh]
    s.deliver("b", flipped + cut, 1.0)
    # the same inner traffic as plain GRE-in-UDP, from A's address to B's plain port
    plain = Output()
    b.from_udp([(b"\x20\x00\x08\x00" + (9).to_bytes(4, "big")
                 + _ping("198.18.10.5", "198.18.20.7", 99), (HOST["a"], 4754))], 1.0, plain)
    assert len(s.tun["b"]) == 40 and not plain.tun
    snap = b.status(1.0)
    assert snap["secure"]["drops"]["replay"] >= 40
    assert snap["secure"]["drops"]["bad_mac"] == 20
    assert b.counters.drop("unknown_peer") == 1
    metrics = b.metrics_text()
    assert 'grebe_secure_drops_total{reason="replay"}' in metrics
    # the genuine ones still arrive after their forgeries: 0 legitimate packets lost
    s.deliver("b", fresh, 1.0)
    assert len(s.tun["b"]) == 50
    assert b.counters.drop("sequence") == 0
    # and the tunnel still forwards
    s.send("a", [_ping("198.18.10.5", "198.18.20.7", 41)], 1.1)
    assert len(s.tun["b"]) == 51


@pytest.mark.parametrize("mode", MODES)
def test_a_restarted_side_is_heard_again_within_2_s(tmp_path: Any, mode: str) -> None:
    s = Sites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    for i in range(50):
        s.send("a", [_ping("198.18.10.5", "198.18.20.7", i)], 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 50
    s.br["a"] = s.build("a", 10.0)  # kill -9 and start again: sequence numbers from 0
    now = 10.0
    got_at = None
    while now < 12.0 and got_at is None:
        s.send("a", [_ping("198.18.10.5", "198.18.20.7", 7)], now)
        s.send("b", [_ping("198.18.20.7", "198.18.10.5", 7)], now)
        if len(s.tun["b"]) > 50 and s.tun["a"]:
            got_at = now
        now += 0.1
    assert got_at is not None and got_at - 10.0 <= 2.0
    assert s.br["b"].counters.drop("sequence") == 0
    assert s.br["b"].status(now)["secure"]["events"]["peer_restarted"] >= 1


def test_a_peer_that_only_sends_keepalives_stays_up_only_when_they_verify(tmp_path: Any
                                                                          ) -> None:
    s = Sites("authenticated", str(tmp_path), "dead_after = 12")
    s.pump(0.0)
    t = 0.0
    while t < 40.0:  # only timers: keepalives both ways, sealed
        t += 1.0
        s.pump(t)
    assert s.br["b"].peers[0].up
    # A goes silent; forged "keepalives" from its address do not keep it up
    ka = [d for to, d in s.wire if to == "b" and d[0] == 4][-1]
    forged = bytearray(ka)
    forged[-1] ^= 0xFF
    b = s.br["b"]
    for k in range(20):
        b.handle_timer(41.0 + k, Output())
        b.from_secure([(bytes(forged), (HOST["a"], SECURE_PORT)), (ka, (HOST["a"],
                                                                        SECURE_PORT))],
                      41.0 + k, Output())
    assert not b.peers[0].up


def test_config_errors_name_their_keys(tmp_path: Any) -> None:
    pubs = _keys(str(tmp_path))
    text = _config("a", "encrypted", str(tmp_path), pubs).replace(
        pubs["b"], "not-a-key").replace("a.key", "missing.key")
    with pytest.raises(ConfigErrors) as e:
        loads_config(text)
    paths = {err.path for err in e.value.errors}
    assert {"peers[0].private_key_file", "peers[0].public_key"} <= paths
    with pytest.raises(ConfigErrors) as e:
        loads_config(_config("a", "sealed", str(tmp_path), pubs))
    assert "peers[0].security" in {err.path for err in e.value.errors}
    cfg = loads_config(_config("a", "encrypted", str(tmp_path), pubs))
    assert cfg.peers[0].port == SECURE_PORT and cfg.listen.secure_port == SECURE_PORT
    assert cfg.peers[0].secure
    rel = _config("a", "encrypted", str(tmp_path), pubs).replace(
        os.path.join(str(tmp_path), "a.key"), "a.key")
    path = os.path.join(str(tmp_path), "site.toml")
    with open(path, "w") as f:
        f.write(rel)
    from bridge.config import load_config
    assert load_config(path).peers[0].secure  # key paths relative to the file


def test_grebe_status_text_shows_the_secure_section(tmp_path: Any) -> None:
    from bridge.ctl import format_status

    s = Sites("authenticated", str(tmp_path))
    s.pump(0.0)
    s.deliver("b", [b"\x05\x00\x00\x00" + bytes(60)], 0.5)  # a forgery: unknown_session
    text = format_status(s.br["b"].status(1.0))
    assert "secure peer: authenticated, session up" in text
    assert "secure drops: unknown_session=1" in text
    assert "handshake_responded=1" in text


@pytest.mark.parametrize("mode", MODES)
def test_a_gro_batch_of_sealed_datagrams_becomes_one_tun_frame(tmp_path: Any, mode: str
                                                                ) -> None:
    """A GRO batch from the secure socket: every datagram verified on its own, then the
    inner datagrams glued again so the receive fast path makes one TunFrame of the run, as
    for a plain peer; the bytes into the TUN are those of the per-datagram path."""
    from bridge.gro import GroBatch
    from bridge.tunframe import TunFrame

    s = Sites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    tun: dict[bool, bytes] = {}
    for glued in (False, True):
        out = Output()
        s.br["a"].from_tun([_tso_frame(20)], 0.5, out)
        (run,) = out.secure[(HOST["b"], SECURE_PORT)]
        assert isinstance(run, UdpRun)
        src = (HOST["a"], SECURE_PORT)
        got = Output()
        rx = s.br["b"].counters.rx_packets[0]
        if glued:
            s.br["b"].from_secure([(GroBatch(bytearray(run), run.seg), src)], 0.5, got)
            assert len(got.tun) == 1  # one TunFrame: the fast path took the whole run
            assert type(got.tun[0]) is TunFrame
            tun[glued] = bytes(got.tun[0])[vnet.VNET_HDR_LEN + 40:]  # the TCP payload
        else:
            s.br["b"].from_secure([(d, src) for d in run.datagrams()], 0.5, got)
            assert len(got.tun) == 20
            tun[glued] = b"".join(bytes(p)[40:] for p in got.tun)
        assert s.br["b"].counters.rx_packets[0] - rx == 20
    assert tun[True] == tun[False] and len(tun[True]) == 20 * 1000  # the same TCP payload
    assert s.br["b"].counters.total_drops == 0
    sec = s.br["b"].secure
    assert sec is not None and sum(sec.ep.drops.values()) == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_gro_batch_with_a_replayed_or_damaged_datagram_delivers_the_rest_once(
        tmp_path: Any, mode: str) -> None:
    """The batched open (bridge/securelink.py `_open_fast`, `Keypair.open_run`) stops at a
    replay or a bad tag inside a GRO batch; the per-datagram path counts it and delivers
    the rest; nothing is delivered twice, the same datagrams again are all replays."""
    from bridge.gro import GroBatch

    s = Sites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    out = Output()
    s.br["a"].from_tun([_tso_frame(10)], 0.5, out)
    (run,) = out.secure[(HOST["b"], SECURE_PORT)]
    assert isinstance(run, UdpRun)
    dgs = run.datagrams()
    seg = run.seg
    src = (HOST["a"], SECURE_PORT)
    b = s.br["b"]
    sec = b.secure
    assert sec is not None
    got = Output()
    b.from_secure([(GroBatch(bytearray(b"".join(dgs[:3])), seg), src)], 0.5, got)
    assert b.counters.rx_packets[0] == 3
    bad = bytearray(dgs[5])
    bad[-1] ^= 1
    # 3 and 4 new, 1 a replay inside the batch, then a damaged one, then 6..9 new
    glued = b"".join([dgs[3], dgs[4], dgs[1], bytes(bad), *dgs[6:]])
    got = Output()
    b.from_secure([(GroBatch(bytearray(glued), seg), src)], 0.5, got)
    assert b.counters.rx_packets[0] == 3 + 2 + 4
    assert sec.ep.drops["replay"] == 1 and sec.ep.drops["bad_mac"] == 1
    got = Output()
    b.from_secure([(GroBatch(bytearray(b"".join(dgs)), seg), src)], 0.6, got)
    # all replays but the undamaged 5, never seen: it verifies, and drop-late finds it late
    assert not got.tun and b.counters.rx_packets[0] == 9
    assert sec.ep.drops["replay"] == 1 + 9
    assert {k: v for k, v in b.counters.snapshot()["drops"].items() if v} == {"sequence": 1}


@pytest.mark.parametrize("rows", [7, 20, 44])
def test_an_authenticated_run_sealed_in_place_is_the_seal_batch_run(tmp_path: Any,
                                                                    rows: int) -> None:
    """Authenticated peers' TSO runs are built with room for header and tag and sealed
    in place (bridge/gso.py `UdpRun.head`, SecureEndpoint.seal_rows): the datagrams are
    byte for byte what `seal_batch` makes of the GRE datagrams under the same counters,
    no room is left, tx_bytes counts the GRE datagrams as for any peer, and b opens them."""
    from bridge.secure.session import Keypair

    s = Sites("authenticated", str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    sec = s.br["a"].secure
    assert sec is not None
    kp = sec.ep.peers[0].current
    assert kp is not None
    first = kp.send_n
    tx = s.br["a"].counters.tx_bytes[0]
    out = Output()
    s.br["a"].from_tun([_tso_frame(rows)], 0.5, out)
    (run,) = out.secure[(HOST["b"], SECURE_PORT)]
    assert type(run) is UdpRun and run.head == 0
    seg = run.seg - OVERHEAD
    count = -(-len(run) // run.seg)
    assert kp.send_n == first + count
    gre = b"".join(bytes(run[o + 16:min(o + run.seg, len(run)) - 16])
                   for o in range(0, len(run), run.seg))
    assert s.br["a"].counters.tx_bytes[0] - tx == len(gre)
    # the same key and counters, sealed the old way (a test-only second use of them)
    twin = Keypair(b"\0" * 32, b"\0" * 32, kp.local, kp.remote, 0.0, True, kp.msg_type, 9.0)
    twin.send = kp.send
    ref = bytearray(len(gre) + OVERHEAD * count)
    twin.seal_run(memoryview(gre), seg, memoryview(ref), first)
    assert bytes(run) == bytes(ref)
    got = Output()
    s.br["b"].from_secure([(d, (HOST["a"], SECURE_PORT)) for d in run.datagrams()], 0.5, got)
    assert s.br["b"].counters.rx_packets[0] == count and len(got.tun) == count


@pytest.mark.parametrize("mode", MODES)
def test_secure_peers_compute_no_flow_hash_source_port(tmp_path: Any, mode: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every secure datagram leaves from the secure port (docs/SECURE.md §2), so the
    per-datagram flow hash (source_port = "flow-hash", the default) is not computed for a
    secure peer; data still flows."""
    import bridge.pipeline as pl

    calls: list[int] = []
    real = pl.flow_source_port

    def counted(pkt: Any) -> int:
        calls.append(1)
        return int(real(pkt))

    monkeypatch.setattr(pl, "flow_source_port", counted)
    s = Sites(mode, str(tmp_path))
    s.pump(0.0)
    assert s.br["a"].peers[0].flow_sport is False
    out = Output()
    s.br["a"].from_tun([_ping("198.18.10.5", "198.18.20.7", i) for i in range(3)], 0.5, out)
    assert calls == []
    s.deliver("b", s.carry("a", out), 0.5)
    assert len(s.tun["b"]) == 3
