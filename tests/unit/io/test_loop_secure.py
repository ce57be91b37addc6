"""Two Engines with an encrypted peer over the in-memory fakes (issue 12): the secure
socket (`secure_udp`, port 24754) carries everything between them, the plain socket
nothing; `status` and `metrics_text` show the secure counters; an Engine refuses a
secure Bridge without the socket (and one process per direction)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP

from bridge.config import loads_config
from bridge.io.fake import MemoryNet, MemoryTun
from bridge.io.loop import Engine
from bridge.pipeline import Bridge
from bridge.secure import SECURE_PORT
from bridge.secure.keys import write_private_key

HOST = {"a": "198.18.0.1", "b": "198.18.0.2"}
NET = {"a": "198.18.1.0/24", "b": "198.18.2.0/24"}


def _cfg(side: str, tmp: str, pubs: dict[str, str]) -> str:
    o = "b" if side == "a" else "a"
    return f"""
[tun]
name = "grebe-{side}"
mtu = 1400
[listen]
address = "{HOST[side]}"
[[peers]]
name = "to-{o}"
endpoint = "{HOST[o]}"
prefixes = ["{NET[o]}"]
key = 42
sequence = "drop-late"
security = "encrypted"
private_key_file = "{os.path.join(tmp, side + '.key')}"
public_key = "{pubs[o]}"
"""


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def _engines(tmp: str) -> tuple[dict[str, Engine], MemoryNet, Clock]:
    pubs = {s: write_private_key(os.path.join(tmp, f"{s}.key")) for s in "ab"}
    net, clock = MemoryNet(), Clock()
    engines = {}
    for s in "ab":
        br = Bridge(loads_config(_cfg(s, tmp, pubs)), clock(), wall_offset=1.8e9)
        engines[s] = Engine(br, MemoryTun(s), net.endpoint(HOST[s]), clock,
                            secure_udp=net.endpoint(HOST[s], SECURE_PORT))
    return engines, net, clock


def _drive(engines: dict[str, Engine]) -> None:
    for _ in range(100):
        moved = 0
        for e in engines.values():
            e.pump_timer()
            moved += e.pump_tun() + e.pump_udp() + e.pump_secure()
        if not moved:
            return
    raise AssertionError("still moving")


def _ping(i: int, fwd: bool = True) -> bytes:
    src, dst = ("198.18.1.10", "198.18.2.10") if fwd else ("198.18.2.10", "198.18.1.10")
    return bytes(IP(src=src, dst=dst, ttl=64, id=i) / ICMP(seq=i) / (b"p" * 200))


def test_engines_talk_over_the_secure_port_only(tmp_path: Any) -> None:
    e, net, clock = _engines(str(tmp_path))
    _drive(e)  # the handshake, started by the timers at construction
    e["a"].tun.inject(*[_ping(i) for i in range(10)])  # type: ignore[attr-defined]
    _drive(e)
    e["b"].tun.inject(_ping(1, fwd=False))  # type: ignore[attr-defined]
    clock.t += 0.5
    _drive(e)
    assert len(e["b"].tun.take()) == 10  # type: ignore[attr-defined]
    assert len(e["a"].tun.take()) == 1  # type: ignore[attr-defined]
    ports = {(s[1], d[1]) for s, d, _ in net.log}
    assert ports == {(SECURE_PORT, SECURE_PORT)}
    assert all(b"p" * 32 not in payload for _, _, payload in net.log)  # encrypted
    st = e["b"].status()
    assert st["peers"][0]["security"] == "encrypted"
    assert st["peers"][0]["endpoint"] == f"{HOST['a']}:{SECURE_PORT}"
    assert st["secure"]["events"]["session_confirmed"] + \
        st["secure"]["events"]["handshake_completed"] >= 1
    assert 'grebe_secure_drops_total{reason="bad_mac"} 0' in e["b"].metrics_text()
    # forged datagrams on the secure port are counted, never delivered
    e["b"].secure_udp.inject(b"\x05\x00\x00\x00" + bytes(60),  # type: ignore[union-attr]
                             (HOST["a"], SECURE_PORT))
    _drive(e)
    assert e["b"].tun.take() == []  # type: ignore[attr-defined]
    assert e["b"].status()["secure"]["drops"]["unknown_session"] == 1


def test_engine_refuses_a_secure_bridge_without_its_socket(tmp_path: Any) -> None:
    e, net, clock = _engines(str(tmp_path))
    br = e["a"].bridge
    with pytest.raises(ValueError, match="secure UDP socket"):
        Engine(br, MemoryTun("x"), net.endpoint("198.18.0.9"), clock)


def test_a_reload_renumbers_secure_peers_and_keeps_their_session(tmp_path: Any) -> None:
    """Reload (bridge/reconfig.py) of a with a plain peer put before the secure one and a
    second secure peer added: the secure peer, renumbered, keeps its session (no new
    handshake, traffic both ways at once); the new secure peer starts its own handshake."""
    from dataclasses import replace

    from bridge.reconfig import reconfigure

    e, _net, clock = _engines(str(tmp_path))
    _drive(e)
    e["a"].tun.inject(_ping(1))  # type: ignore[attr-defined]
    _drive(e)
    assert len(e["b"].tun.take()) == 1  # type: ignore[attr-defined]
    a = e["a"].bridge
    started = dict(e["a"].status()["secure"]["events"])
    pub_c = write_private_key(os.path.join(str(tmp_path), "c.key"))
    extra = loads_config(_cfg("a", str(tmp_path), {"b": pub_c}).replace('"to-b"', '"to-c"')
                         .replace(HOST["b"], "198.18.0.9").replace(NET["b"], "198.18.9.0/24")
                         + '[[peers]]\nname = "plain"\nendpoint = "198.18.0.7"\n'
                           'prefixes = ["198.18.7.0/24"]\n')
    new = replace(a.config, peers=(extra.peers[1], *a.config.peers, extra.peers[0]))
    done = e["a"].apply(lambda: reconfigure(a, new, clock()))
    assert done.kept == ("to-b",) and set(done.added) == {"plain", "to-c"}
    assert a.secure is not None and a.secure.ep.peers[1].name == "to-b"
    clock.t += 0.5
    e["a"].tun.inject(_ping(2))  # type: ignore[attr-defined]
    e["b"].tun.inject(_ping(3, fwd=False))  # type: ignore[attr-defined]
    _drive(e)
    assert len(e["b"].tun.take()) == 1  # type: ignore[attr-defined]
    assert len(e["a"].tun.take()) == 1  # type: ignore[attr-defined]
    ev = e["a"].status()["secure"]["events"]
    # one handshake more: to-c's (no one answers it); none for to-b
    assert ev["handshake_initiated"] == started["handshake_initiated"] + 1
    assert ev["handshake_completed"] == started["handshake_completed"]
    st = {p["name"]: p for p in e["a"].status()["peers"]}
    assert st["to-b"]["security"] == "encrypted" and st["plain"]["security"] == "plain"
    assert st["to-b"]["rx_packets"] == 1 and st["to-b"]["session"]["session"] is True


def test_secure_receive_hands_big_tun_writes_to_the_writer_like_the_plain_port(
        tmp_path: Any) -> None:
    """With writer threads (`grebe up`), a batch from the secure port bigger than
    INLINE_MAX is written to the TUN by the udp->tun writer, as the plain port's is, not
    inline on the receiving thread (issue 12: the secure->tun thread lost that overlap)."""
    import threading

    from bridge.io.loop import INLINE_MAX

    e, _net, _clock = _engines(str(tmp_path))
    _drive(e)  # the handshake, inline
    b = e["b"]
    tun: Any = b.tun
    names: list[str] = []
    write = tun.write_packets

    def spy(pkts: Any) -> int:
        names.append(threading.current_thread().name)
        return int(write(pkts))

    tun.write_packets = spy
    e["a"].tun.inject(*[_ping(i) for i in range(INLINE_MAX + 4)])  # type: ignore[attr-defined]
    e["a"].pump_tun()
    b.start_writers()
    try:
        assert b.pump_secure() > 0
    finally:
        b.stop_writers()  # finishes what the writer holds
    assert len(tun.take()) == INLINE_MAX + 4
    assert names == ["udp->tun writer"]
