"""A secure endpoint split in two (issue 12 speed; bridge/io/split.py, bridge/secure/mirror.py):
site B's Bridge runs as a PARENT (handshakes, timers, sending) and a CHILD (opening, replay
windows, delivery to the TUN), wired as the I/O layer wires them: the parent's messages to
the child (keysets) are applied before the child opens a batch, the child's messages
(forwarded handshakes, confirmations, roaming) are handled by the parent, and the child's
receive times reach the parent's timers (`RxProcess.sync`). Handshakes in both roles,
rekeys without loss, replay rejection, roaming and a restarted peer must work as they do
for one process (tests/unit/bridge/test_secure_bridge.py)."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP

from bridge.pipeline import Bridge, Output
from bridge.secure import SECURE_PORT
from bridge.securelink import CHILD, PARENT
from tests.unit.bridge.test_secure_bridge import HOST, MODES, OTHER, Sites, _ping

A_TO_B = ("198.18.10.5", "198.18.20.7")


class SplitSites(Sites):
    """Sites whose B is split into `br["b"]` (the parent) and `child`."""

    def __init__(self, mode: str, tmp: str, extra: str = "") -> None:
        self.down: list[Any] = []  # parent -> child
        self.up: list[Any] = []  # child -> parent
        self.a_addr = (HOST["a"], SECURE_PORT)  # where A's datagrams come from
        super().__init__(mode, tmp, extra)

    def build(self, side: str, now: float) -> Bridge:
        br = super().build(side, now)
        if side == "b":
            self.child = super().build(side, now)  # the fork's copy
            assert br.secure is not None and self.child.secure is not None
            br.secure.split(PARENT, self.down.append)
            self.child.secure.split(CHILD, self.up.append)
            self.child.rx_only = True
        return br

    def deliver(self, to: str, dgs: list[bytes], now: float) -> list[bytes]:
        if to != "b":
            return super().deliver(to, dgs, now)
        self.wire += [(to, d) for d in dgs]
        child, parent = self.child, self.br["b"]
        assert child.secure is not None and parent.secure is not None
        self._take_keys()
        out = Output()
        child.from_secure([(d, self.a_addr) for d in dgs], now, out)
        assert not out.secure and not out.udp  # the child never sends
        self.tun["b"] += [bytes(p) for p in out.tun]
        for i, last, data in child.secure.rx_times():  # RxProcess.sync
            parent.secure.note_child(i, last, data)
        for i, p in enumerate(child.peers):
            if p.last_rx > parent.peers[i].last_rx:
                parent.note_heard(i, p.last_rx)
        sent: list[bytes] = []
        while self.up:
            out = Output()
            parent.secure.from_child(self.up.pop(0), now, out)
            sent += self.carry("b", out)
        return sent

    def _take_keys(self) -> None:
        assert self.child.secure is not None
        while self.down:
            msg = self.down.pop(0)
            assert msg[0] == "K"
            self.child.secure.apply_keys(msg[1])

    def carry(self, side: str, out: Output) -> list[bytes]:
        if side == "b":  # everything B sends leaves from where A is now
            dgs = [d for v in out.secure.values() for d in v]
            out.secure = {(HOST["a"], SECURE_PORT): dgs} if dgs else {}
        return super().carry(side, out)

    def counts(self) -> dict[str, dict[str, int]]:
        """B's secure counters, both processes added (`merge_status`)."""
        assert self.child.secure is not None and self.br["b"].secure is not None
        c, p = self.child.secure.counts(), self.br["b"].secure.counts()
        return {k: {n: c[k][n] + p[k][n] for n in c[k]} for k in c}


def _a_to_b(s: SplitSites, i: int, now: float) -> None:
    s.send("a", [_ping(*A_TO_B, i)], now)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("initiator", ["a", "b"])
def test_handshake_in_either_role_then_data_both_ways(tmp_path: Any, mode: str,
                                                      initiator: str) -> None:
    s = SplitSites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    other = OTHER[initiator]
    s.br[other].secure.ep.peers[0].next_attempt = 1e9  # type: ignore[union-attr]
    s.pump(0.0)
    for i in range(30):
        _a_to_b(s, i, 0.1 + i * 0.01)
        s.send("b", [_ping("198.18.20.7", "198.18.10.5", i)], 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 30 and len(s.tun["a"]) == 30
    c = s.counts()
    assert sum(c["drops"].values()) == 0
    assert c["events"]["handshake_completed" if initiator == "b" else "handshake_responded"] == 1
    if initiator == "a":  # B responded: its child confirmed, its parent switched to send
        assert c["events"]["session_confirmed"] == 1
    assert s.child.counters.drop("sequence") == 0
    st = s.br["b"].status(1.0)
    assert st["peers"][0]["up"]


@pytest.mark.parametrize("mode", MODES)
def test_traffic_both_ways_across_rekeys_loses_nothing(tmp_path: Any, mode: str) -> None:
    s = SplitSites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    now, n = 0.1, 0
    while now < 400.0:  # past rekey_after_time (120 s) three times, and reject_after_time
        _a_to_b(s, n, now)
        s.send("b", [_ping("198.18.20.7", "198.18.10.5", n)], now)
        n += 1
        now += 0.7
        s.pump(now)
    assert len(s.tun["b"]) == n and len(s.tun["a"]) == n
    c = s.counts()
    assert c["events"]["rekey"] >= 3
    assert sum(c["drops"].values()) == 0
    assert s.child.counters.drop("sequence") == 0
    # the child holds only what the parent holds: nothing expired lingers
    assert s.child.secure is not None and s.br["b"].secure is not None
    assert set(s.child.secure.ep.indices) <= set(s.br["b"].secure.ep.indices)


def test_the_child_rejects_replays_and_forgeries(tmp_path: Any) -> None:
    s = SplitSites("encrypted", str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    for i in range(40):
        _a_to_b(s, i, 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 40
    recorded = [d for to, d in s.wire if to == "b"]
    s.deliver("b", recorded, 1.0)  # handshakes included: the parent refuses those
    flipped = [d[:20] + bytes([d[20] ^ 1]) + d[21:] for d in recorded[-5:]]
    s.deliver("b", flipped, 1.0)
    assert len(s.tun["b"]) == 40
    c = s.counts()
    assert c["drops"]["replay"] >= 40
    assert c["drops"]["replay"] + c["drops"]["bad_mac"] >= 45
    _a_to_b(s, 41, 1.1)  # still forwarding
    assert len(s.tun["b"]) == 41


def test_a_peer_that_roams_is_followed_after_a_verified_datagram(tmp_path: Any) -> None:
    s = SplitSites("authenticated", str(tmp_path))
    s.pump(0.0)
    _a_to_b(s, 0, 0.1)
    parent = s.br["b"].secure
    assert parent is not None
    assert parent.ep.endpoint(0) == (HOST["a"], SECURE_PORT)
    s.a_addr = ("198.18.0.99", 40000)  # A's NAT rebinds
    _a_to_b(s, 1, 0.2)
    assert len(s.tun["b"]) == 2
    assert parent.ep.endpoint(0) == ("198.18.0.99", 40000)  # learned by the child, sent up
    out = Output()
    s.br["b"].from_tun([_ping("198.18.20.7", "198.18.10.5", 1)], 0.3, out)
    assert list(out.secure) == [("198.18.0.99", 40000)]
    assert s.counts()["events"]["roamed"] == 1
    # a forged datagram from yet another address moves nothing
    s.deliver("b", [b"\x04\x00\x00\x00" + bytes(60)], 0.4)
    assert parent.ep.endpoint(0) == ("198.18.0.99", 40000)


@pytest.mark.parametrize("mode", MODES)
def test_a_restarted_peer_is_heard_again_within_2_s(tmp_path: Any, mode: str) -> None:
    s = SplitSites(mode, str(tmp_path), 'key = 9\nsequence = "drop-late"')
    s.pump(0.0)
    for i in range(50):
        _a_to_b(s, i, 0.1 + i * 0.01)
    assert len(s.tun["b"]) == 50
    s.br["a"] = Sites.build(s, "a", 10.0)  # kill -9 and start again: sequence from 0
    now, got_at = 10.0, None
    while now < 12.0 and got_at is None:
        _a_to_b(s, 7, now)
        s.send("b", [_ping("198.18.20.7", "198.18.10.5", 7)], now)
        if len(s.tun["b"]) > 50 and s.tun["a"]:
            got_at = now
        now += 0.1
    assert got_at is not None and got_at - 10.0 <= 2.0
    assert s.child.counters.drop("sequence") == 0  # the child's receiver was reset
    assert s.counts()["events"]["peer_restarted"] >= 1
    assert IP(s.tun["b"][-1]).dst == A_TO_B[1]


def test_without_the_keys_the_child_opens_nothing(tmp_path: Any) -> None:
    """The channel matters: a child that is never handed the keys drops everything as
    unknown_session (so the tests above pass only through the mirror)."""
    s = SplitSites("encrypted", str(tmp_path))
    s._take_keys = lambda: s.down.clear()  # type: ignore[method-assign]
    s.pump(0.0)
    _a_to_b(s, 0, 0.1)
    assert not s.tun["b"]
    assert s.counts()["drops"]["unknown_session"] >= 1
