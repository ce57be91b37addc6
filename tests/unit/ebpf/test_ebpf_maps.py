"""bridge/ebpf: what Python writes into the program's maps, the C/Python agreement on layouts,
flags and reasons, the shared GRE sequence numbers, and the datapath choice. No root needed."""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Datapath, loads_config
from bridge.counters import DROP_REASONS
from bridge.ebpf import maps as M
from bridge.ebpf.build import SOURCE, BuildError, build
from bridge.ebpf.datapath import SharedSeqEncoder
from bridge.ebpf.hook import start_for_endpoint
from bridge.encap import decode_gre
from bridge.errors import ConfigErrors

C = SOURCE.read_text()
REPO = Path(__file__).resolve().parents[3]

BASE = """
mss_clamp = true
[tun]
name = "gbt0"
addresses = ["198.18.100.1/30"]
[listen]
address = "::"
port = 4754
[[peers]]
name = "site-b"
endpoint = "198.18.0.2:4754"
prefixes = ["198.18.2.0/24", "2001:db8:2::/64"]
encapsulation = "gre"
key = 42
sequence = "drop-late"
[[peers]]
name = "site-c"
endpoint = "[2001:db8::3]:4760"
prefixes = ["198.18.3.0/24"]
encapsulation = "ipip"
source_port = "fixed"
"""


def _enum(prefix: str) -> dict[str, int]:
    """NAME = value pairs of a C enum block whose members start with `prefix`."""
    out: dict[str, int] = {}
    block = re.search(r"enum \{\n(\t" + prefix + r".*?)\};", C, re.S)
    assert block, prefix
    n = -1
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(" + prefix + r"\w+)(?:\s*=\s*(\d+))?,", line)
        if m:
            n = int(m.group(2)) if m.group(2) else n + 1
            out[m.group(1)] = n
    return out


def test_c_drop_reasons_are_the_python_indices() -> None:
    reasons = {k: v for k, v in _enum("R_").items() if k.startswith("R_")}
    for name, idx in reasons.items():
        assert DROP_REASONS[idx] == name[2:].lower(), name
    assert len(reasons) == len(M.C_DROP_REASONS)
    assert f"N_REASONS = {M.N_REASONS}," in C and f"N_STATS = {M.N_STATS}," in C


def test_c_stats_order_is_python_stats() -> None:
    stats = _enum("S_")
    names = sorted(stats, key=stats.__getitem__)
    assert [n[2:].lower() for n in names] == list(M.STATS)


def test_c_flag_bits_match() -> None:
    for name, bit in M.PF.items():
        m = re.search(rf"#define PF_{name} (0x[0-9a-f]+)", C)
        assert m and int(m.group(1), 16) == bit, name
    for name, bit in M.GF.items():
        m = re.search(rf"#define GF_{name} (0x[0-9a-f]+)", C)
        assert m and int(m.group(1), 16) == bit, name


def test_every_map_is_declared_in_c() -> None:
    declared = set(re.findall(r"\} (gb_\w+) SEC\(\"\.maps\"\)", C))
    assert set(M.SIZES) <= declared
    assert declared - set(M.SIZES) == {"gb_scratch"}  # the checksum buffer, Python-free


def test_plan_writes_peers_prefixes_hosts_keys_endpoints() -> None:
    cfg = loads_config(BASE)
    p = M.plan(cfg, tun_ifindex=7, mtus=[1460, 1400], locals_=["198.18.0.1", "2001:db8::1"],
               live_until_ns=123, rules=())
    e = p.entries
    live, tun, port, gflags, l4, _l6, _ = M.GLOBAL.unpack(e["gb_global"][0][1])
    assert (live, tun, port, bytes(l4)) == (123, 7, 4754, bytes(4))  # listen on "::"
    assert gflags == M.GF["MSS_CLAMP"] | M.GF["LISTEN_V6"] | M.GF["LISTEN_ANY6"] \
        | M.GF["LISTEN_V4"] | M.GF["LISTEN_ANY4"]
    peers = dict(e["gb_peers"])
    f0, kout, kin, mtu, sport, dport, _, local, remote = M.PEER.unpack(peers[M.U32.pack(0)])
    assert (kout, kin, mtu, sport, dport) == (42, 42, 1460, 4754, 4754)
    assert f0 == (M.PF["TX"] | M.PF["RX"] | M.PF["GRE"] | M.PF["KEY_OUT"] | M.PF["KEY_IN"]
                  | M.PF["SEQ_TX"] | M.PF["DROP_LATE"] | M.PF["FLOW_HASH"])
    assert local[:4] == bytes([198, 18, 0, 1]) and remote[:4] == bytes([198, 18, 0, 2])
    f1, *_rest, local1, remote1 = M.PEER.unpack(peers[M.U32.pack(1)])
    assert f1 == M.PF["TX"] | M.PF["RX"] | M.PF["OUTER_V6"]  # IPIP, fixed port, v6 outer
    assert remote1 == ipaddress.ip_address("2001:db8::3").packed
    pfx4 = {M.LPM4.unpack(k): M.U32.unpack(v)[0] for k, v in e["gb_pfx4"]}
    assert pfx4 == {(24, bytes([198, 18, 2, 0])): 0, (24, bytes([198, 18, 3, 0])): 1}
    pfx6 = {M.LPM6.unpack(k): M.U32.unpack(v)[0] for k, v in e["gb_pfx6"]}
    assert pfx6 == {(64, ipaddress.ip_address("2001:db8:2::").packed): 0}
    hosts = {k: M.U32.unpack(v)[0] for k, v in e["gb_hosts"]}
    assert hosts == {M.addr16("198.18.0.2"): 0, M.addr16("2001:db8::3"): 1}
    assert M.addr16("198.18.0.2") == b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 0, 2])
    assert [M.RXKEY.unpack(k) for k, _ in e["gb_rxkeys"]] == [(M.addr16("198.18.0.2"), 42, 1)]
    assert {k for k, _ in e["gb_endpoints"]} == {M.addr16(h) for h in
                                                 ("198.18.0.2", "2001:db8::3")}
    assert "gb_inspect_ports" not in e and not p.inspect_all_tcp
    for name, entries in e.items():  # every entry has the size the C map declares
        ks, vs = M.SIZES[name]
        assert all(len(k) == ks and len(v) == vs for k, v in entries), name


def test_checksum_and_reorder_peers_leave_work_to_python() -> None:
    cfg = loads_config(BASE.replace('sequence = "drop-late"', 'sequence = "reorder"'))
    f = M.peer_flags(cfg.peers[0])
    assert f & M.PF["TX"] and not f & M.PF["RX"]  # sending is the same; receiving reorders
    cfg = loads_config(BASE.replace('key = 42', 'key = 42\nchecksum = true'))
    f = M.peer_flags(cfg.peers[0])
    assert not f & (M.PF["TX"] | M.PF["RX"]) and f & M.PF["CSUM"]


def test_inspect_rules_become_ports_or_all_tcp() -> None:
    class Rule:
        def __init__(self, ports: tuple[tuple[int, int], ...]) -> None:
            self.dst_ports = ports

    assert M.inspect_ports([Rule(((80, 80), (22, 22))), Rule(((8000, 8002),))]) == \
        (frozenset({22, 80, 8000, 8001, 8002}), False)
    assert M.inspect_ports([Rule(((80, 80),)), Rule(())]) == (frozenset(), True)
    assert M.inspect_ports([Rule(((1, 60000),))]) == (frozenset(), True)
    cfg = loads_config(BASE + '[[inspect]]\nname = "web"\ndst_ports = [80, 22]\n'
                       'inspectors = ["log"]\n')
    p = M.plan(cfg, 7, [1460, 1400], ["198.18.0.1", "2001:db8::1"], 0, cfg.inspect_rules())
    assert sorted(M.U16.unpack(k)[0] for k, _ in p.entries["gb_inspect_ports"]) == [22, 80]


def test_listen_any_and_v6() -> None:
    cfg = loads_config(BASE.replace('address = "198.18.0.1"', 'address = "::"'))
    flags = M.GLOBAL.unpack(M.global_value(cfg, 1, 0))[3]
    assert flags == M.GF["MSS_CLAMP"] | M.GF["LISTEN_V6"] | M.GF["LISTEN_ANY6"] \
        | M.GF["LISTEN_V4"] | M.GF["LISTEN_ANY4"]


def test_percpu_decoding_sums_cpus() -> None:
    assert M.decode_percpu_u64(M.U64.pack(3) + M.U64.pack(4)) == 7
    raw = M.PEERSTAT.pack(1, 2, 3, 4) + M.PEERSTAT.pack(10, 20, 30, 40)
    assert M.decode_peerstats(raw) == (11, 22, 33, 44)
    assert M.decode_peerstats(None) == (0, 0, 0, 0)


class FakeCounter:
    """The program's per-peer counter: reserve(peer, n) -> first of n (atomic add)."""

    def __init__(self) -> None:
        self.v = 0

    def __call__(self, peer: int, n: int) -> int:
        old = self.v
        self.v = (self.v + n) & 0xFFFFFFFF
        return old


def test_shared_sequence_numbers_interleave_without_repeats() -> None:
    ctr = FakeCounter()
    enc = SharedSeqEncoder(42, False, ctr, 0)
    seqs = []
    for i in range(6):
        if i % 2:
            ctr(0, 1)  # the program sent one in between
        d = enc.wrap(b"\x45" + bytes(19), False)
        status, _off, seq = decode_gre(d, 42, False)
        assert status == -1
        seqs.append(seq)
    assert seqs == [0, 2, 3, 5, 6, 8]  # 1, 4, 7 are the program's
    assert ctr.v == 9
    # a super-packet builder: reads the next number, builds 3 rows, then takes them
    first = enc.seq
    enc.advance(3)
    assert first == 9 and ctr.v == 12 and enc.collisions == 0
    first = enc.seq
    ctr(0, 1)  # the program took one while the rows were built: counted
    enc.advance(2)
    assert enc.collisions == 1


def test_datapath_key() -> None:
    assert loads_config(BASE).datapath is Datapath.PYTHON  # opt-in (closing note, session 4)
    assert loads_config('datapath = "ebpf"\n' + BASE).datapath is Datapath.EBPF
    with pytest.raises(ConfigErrors) as e:
        loads_config('datapath = "xdp"\n' + BASE)
    assert "datapath" in str(e.value.errors[0])


def test_auto_falls_back_with_a_log_line(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    import bridge.ebpf.datapath as D

    def refuse(cfg: Any, bridge: Any) -> Any:
        raise PermissionError(1, "load grebe_tc.o: Operation not permitted")

    monkeypatch.setattr(D, "start", refuse)
    cfg = loads_config('datapath = "auto"\n' + BASE)
    with caplog.at_level(logging.INFO, logger="grebe.ebpf"):
        assert start_for_endpoint(cfg, None) == (None, None)
    assert "datapath auto: eBPF fast path unavailable" in caplog.text
    assert "Operation not permitted" in caplog.text and "using the Python path" in caplog.text
    fast, fatal = start_for_endpoint(loads_config('datapath = "ebpf"\n' + BASE), None)
    assert fast is None and fatal is not None and "Operation not permitted" in fatal
    called = []
    monkeypatch.setattr(D, "start", lambda *a: called.append(a))
    assert start_for_endpoint(loads_config('datapath = "python"\n' + BASE), None) == (None, None)
    assert not called


def test_the_object_builds_from_source(tmp_path: Path) -> None:
    try:
        out = build(tmp_path / "grebe_tc.o")
    except BuildError as e:  # the bootstrap installs clang and libbpf-dev
        pytest.fail(f"the eBPF object does not build: {e}")
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and b"grebe_ingress" in data and b"gb_peers" in data
    assert not list(REPO.glob("bridge/ebpf/*.o"))  # nothing compiled beside the source


def test_bench_rows_pair_python_and_ebpf(tmp_path: Path) -> None:
    """The bench's eBPF rows run the same endpoints as the Python rows, datapath aside."""
    from bridge.lab.bench_variants import ALL_VARIANTS, write_grebe_configs

    for py, fast in (("grebe-gre", "grebe-gre-ebpf"), ("grebe-ipip", "grebe-ipip-ebpf")):
        a = write_grebe_configs(tmp_path / py, ALL_VARIANTS[py].mode,  # type: ignore[attr-defined]
                                top=ALL_VARIANTS[py].top)  # type: ignore[attr-defined]
        b = write_grebe_configs(tmp_path / fast, ALL_VARIANTS[fast].mode,  # type: ignore[attr-defined]
                                top=ALL_VARIANTS[fast].top)  # type: ignore[attr-defined]
        for gw in a:
            ca, cb = loads_config(a[gw][0].read_text()), loads_config(b[gw][0].read_text())
            assert ca.datapath is Datapath.PYTHON and cb.datapath is Datapath.EBPF
            assert ca.peers == cb.peers and ca.tun == cb.tun


class FakeMap:
    def __init__(self) -> None:
        self.d: dict[bytes, bytes] = {}

    def lookup(self, key: bytes) -> bytes | None:
        return self.d.get(key)

    def update(self, key: bytes, value: bytes) -> None:
        self.d[key] = value


def test_drop_late_windows_start_once_for_both_paths() -> None:
    from bridge.counters import R_SEQUENCE
    from bridge.ebpf.datapath import SeededSeqReceiver

    cfg = loads_config(BASE).peers[0]
    rx = FakeMap()
    r = SeededSeqReceiver(cfg, rx, 0)
    out: list[bytes | bytearray] = []
    assert r.receive(100, b"a", 0.0, out) == -1  # the first packet starts it (Linux iseq)
    assert M.RXSEQ.unpack(rx.d[M.U32.pack(0)])[:2] == (101, 1)  # ... and the program's
    assert r.receive(50, b"late", 0.0, out) == R_SEQUENCE
    # a window that starts after the program's starts where the program's is
    rx.d[M.U32.pack(1)] = M.RXSEQ.pack(5000, 1, 0, 0, 0, 0)
    r2 = SeededSeqReceiver(cfg, rx, 1)
    assert r2.receive(0xF0000000, b"forged", 0.0, out) == R_SEQUENCE
    assert r2.receive(5003, b"ok", 0.0, out) == -1
    assert out == [b"a", b"ok"]
    assert M.RXSEQ.unpack(rx.d[M.U32.pack(1)])[:2] == (5000, 1)  # the program's left alone


class FakeObj:
    def prog_fd(self, name: str) -> int:
        return 99

    def test_run(self, fd: int, data: bytes) -> int:
        return 7

    def close(self) -> None:
        pass


def _fast_path(cfg: Any) -> Any:
    from bridge.ebpf.attach import Attachment
    from bridge.ebpf.datapath import FastPath

    maps: dict[str, Any] = {name: FakeMap() for name in M.SIZES}
    maps["gb_global_all_tcp"] = False
    att = Attachment("grebe:gbt0", {}, {3: "lan0", 4: "wan0"})
    fp = FastPath(cfg, FakeObj(), maps, att, 7, ["198.18.0.1", "2001:db8::1"])
    fp.watch_netfilter = False  # this host's own rules are not the test's
    return fp, maps


def test_program_counters_merge_into_status_and_metrics() -> None:
    from bridge.counters import Counters
    from bridge.pipeline import Bridge

    cfg = loads_config(BASE)
    fp, maps = _fast_path(cfg)
    maps["gb_drops"].d[M.U32.pack(DROP_REASONS.index("wrong_key"))] = \
        M.U64.pack(2) + M.U64.pack(3)  # two CPUs
    maps["gb_peerstats"].d[M.U32.pack(0)] = M.PEERSTAT.pack(10, 1000, 20, 2000)
    maps["gb_stats"].d[M.U32.pack(M.STATS.index("encap"))] = M.U64.pack(20)
    bridge = Bridge(cfg, 0.0)
    st = bridge.status(0.0)
    fp.merge_status(st)
    assert st["datapath"] == "ebpf" and st["drops"]["wrong_key"] == 5
    assert st["ebpf"]["drops"] == {"wrong_key": 5} and st["ebpf"]["encap"] == 20
    assert st["ebpf"]["interfaces"] == ["lan0", "wan0"]
    peer = st["peers"][0]
    assert (peer["rx_packets"], peer["rx_bytes"], peer["tx_packets"], peer["tx_bytes"]) == \
        (10, 1000, 20, 2000)
    assert peer["sequence"]["next_tx"] == 7  # from the shared counter
    text = Counters(["site-b", "site-c"]).merged(fp.counters()).prometheus()
    assert 'grebe_drops_total{reason="wrong_key"} 5' in text
    assert 'grebe_peer_tx_packets_total{peer="site-b"} 20' in text


def test_tick_keeps_the_program_live_and_syncs_peers() -> None:
    from bridge.pipeline import Bridge

    cfg = loads_config(BASE.replace('source_port = "fixed"',
                                    'source_port = "fixed"\nkeepalive = 1\n'
                                    'down_action = "withdraw"'))
    fp, maps = _fast_path(cfg)
    bridge = Bridge(cfg, 0.0)
    fp.bind(bridge, None)
    maps["gb_heard"].d[M.U32.pack(0)] = M.U64.pack(5_000_000_000)  # heard at t = 5 s
    fp.tick()
    live = M.GLOBAL.unpack(maps["gb_global"].d[M.U32.pack(0)])[0]
    import time

    assert live > time.monotonic() * 1e9  # the deadline is ahead
    assert bridge.peers[0].last_rx == 5.0 and bridge.peers[0].heard
    bridge.peers[1].up = False  # withdraw + down: the program stops sending to it
    bridge.peers[1].mtu = 1300
    fp.tick()
    flags, *_r = M.PEER.unpack(maps["gb_peers"].d[M.U32.pack(1)])
    assert not flags & M.PF["TX"] and flags & M.PF["RX"]
    assert M.PEER.unpack(maps["gb_peers"].d[M.U32.pack(1)])[3] == 1300
    fp.close()
    fp.tick()  # after close: nothing, no error


def test_netfilter_chains_keep_auto_on_python_and_suspend_a_running_program(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import bridge.ebpf.datapath as D

    monkeypatch.setattr(D, "netfilter_chains", lambda own=False: ["inet fw/forward"])
    with pytest.raises(RuntimeError, match="inet fw/forward"):
        D.start(loads_config(BASE), None)  # auto: before anything is loaded
    fp, maps = _fast_path(loads_config(BASE))
    fp.watch_netfilter = True
    with caplog.at_level(logging.INFO, logger="grebe.ebpf"):
        fp.tick()
        g = M.GLOBAL.unpack(maps["gb_global"].d[M.U32.pack(0)])
        assert g[3] & M.GF["SUSPENDED"] and g[0] > 0  # passes all, owner alive
        assert "inet fw/forward" in fp.suspended and "suspended" in caplog.text
        monkeypatch.setattr(D, "netfilter_chains", lambda own=False: [])
        fp.tick()
        assert not M.GLOBAL.unpack(maps["gb_global"].d[M.U32.pack(0)])[3] & M.GF["SUSPENDED"]
        assert not fp.suspended and "resumed" in caplog.text
    flags = M.GLOBAL.unpack(M.global_value(loads_config(
        BASE + '[[inspect]]\nname = "w"\ndst_ports = [80]\ninspectors = ["log"]\n'), 1, 0))[3]
    assert flags & M.GF["INSPECT"]  # ICMP errors then go to the Python path


def test_secure_peers_are_left_to_the_python_path() -> None:
    """An authenticated or encrypted peer must never be sent plain GRE by the program: its
    entry has neither TX nor RX, so its packets go up to the Python path, which seals them."""
    from dataclasses import replace

    from bridge.secure.keys import SecurityMode

    p = loads_config(BASE).peers[0]
    sec = replace(p, security=replace(p.security, mode=SecurityMode.ENCRYPTED))
    assert sec.secure
    assert not M.peer_flags(sec) & (M.PF["TX"] | M.PF["RX"])
    assert M.peer_flags(p) & M.PF["TX"]


def test_the_python_window_skips_the_numbers_of_the_programs_stream() -> None:
    """A SYN passed for MSS clamping after a bulk transfer by the peer's program comes
    ~1,000 numbers after the Python path's last: within JUMP_MAX of the program's window it
    is taken (it was dropped until CONFIRM, 2 s per new connection); a forged number far
    from both windows is still dropped and moves neither."""
    from bridge.counters import R_SEQUENCE
    from bridge.ebpf.datapath import SeededSeqReceiver

    cfg = loads_config(BASE).peers[0]
    rx = FakeMap()
    r = SeededSeqReceiver(cfg, rx, 0)
    out: list[bytes | bytearray] = []
    assert r.receive(100, b"a", 0.0, out) == -1  # starts both windows at 101
    rx.d[M.U32.pack(0)] = M.RXSEQ.pack(1101, 1, 0, 0, 0, 0)  # the program took 101..1100
    assert r.receive(0x10000000, b"forged", 0.0, out) == R_SEQUENCE
    assert r.receive(1103, b"syn", 0.0, out) == -1
    assert r.caught_up == 1 and out == [b"a", b"syn"]
    assert r.receive(1104, b"next", 0.0, out) == -1 and r.caught_up == 1
    assert r.receive(1090, b"late", 0.0, out) == R_SEQUENCE
