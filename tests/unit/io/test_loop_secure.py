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
