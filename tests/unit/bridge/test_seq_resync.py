"""Sequence policies against a restarted peer and forged numbers (issue 12, plain mode):
the window, runs of out-of-window packets and the resynchronisation (bridge/seqpolicy.py),
driven with explicit time, unit and through the sans-I/O Bridge."""

from __future__ import annotations

import pytest
from grebe_sites import A_ADDR, B_ADDR, Pair, site_config, v4
from scapy.layers.inet import IP

from bridge.config import SeqPolicy
from bridge.encap import GreEncoder
from bridge.pipeline import Bridge, Output
from bridge.seqpolicy import CONFIRM, JUMP_MAX, RESYNC_TIME, SeqReceiver

POLICIES = [SeqPolicy.DROP_LATE, SeqPolicy.REORDER]


def _feed(r: SeqReceiver, seqs: list[int], t0: float = 0.0, dt: float = 0.0,
          ) -> tuple[list[int], int]:
    """Receive `seqs`, one every `dt` seconds from `t0`; (delivered numbers, drops)."""
    out: list[bytes | bytearray] = []
    drops = 0
    for i, s in enumerate(seqs):
        r.expire(t0 + i * dt, out)
        drops += r.receive(s, s.to_bytes(4, "big"), t0 + i * dt, out) >= 0
    return [int.from_bytes(p, "big") for p in out], drops


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dt", [0.001, 0.2, 1.0])
def test_restarted_sender_is_heard_again_after_resync_time(policy: SeqPolicy,
                                                            dt: float) -> None:
    # The peer ran up to 1000, restarted and counts from 0 again, sending every dt seconds
    # (a download, pings, sparse traffic): its packets are late, dropped until their run
    # has lasted RESYNC_TIME, then taken as the new numbering.
    r = SeqReceiver(policy, 5, 0.1)
    assert _feed(r, list(range(1001)), 0.0, 0.0) == (list(range(1001)), 0)
    new = list(range(int(3 * RESYNC_TIME / dt) + 3))
    got, drops = _feed(r, new, 10.0, dt)
    first = got[0]
    assert got == new[first:] and drops == first and r.resyncs == 1
    assert first * dt == pytest.approx(RESYNC_TIME, abs=dt + 1e-9)  # recovery time


@pytest.mark.parametrize("policy", POLICIES)
def test_restarted_sender_whose_numbers_look_ahead_is_heard_after_confirm(
        policy: SeqPolicy) -> None:
    # Past 2**31 packets, a restart's 0 is ahead in serial arithmetic: confirmed by
    # CONFIRM packets that follow one another, at any rate.
    r = SeqReceiver(policy, 5, 0.1)
    _feed(r, [0xC0000000 + i for i in range(10)])
    got, drops = _feed(r, list(range(10)), 1.0, 0.001)
    assert got[-(10 - CONFIRM + 1):] == list(range(CONFIRM - 1, 10))
    assert drops == CONFIRM - 1 and r.resyncs == 1


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("jump", [JUMP_MAX, 1000, 1 << 20, (1 << 31) - 1])
@pytest.mark.parametrize("every", [33, 100])
def test_forged_far_ahead_numbers_cost_no_legitimate_packet(policy: SeqPolicy, jump: int,
                                                             every: int) -> None:
    # Issue 12's injected-sequence attack: one spoofed datagram far ahead of the expected
    # number per `every` legitimate ones (drop-late lost 94 % at 1 in 33, reorder 15 %).
    r = SeqReceiver(policy, 5, 0.1)
    out: list[bytes | bytearray] = []
    now = 0.0
    for s in range(3300):
        now += 0.0005
        r.expire(now, out)
        if s % every == every - 1:
            assert r.receive((r.last + 1 + jump) & 0xFFFFFFFF, b"forged", now, out) >= 0
        r.receive(s, s.to_bytes(4, "big"), now, out)
    r.expire(now + 1, out)
    assert b"forged" not in out and [int.from_bytes(p, "big") for p in out] == list(range(3300))
    assert r.resyncs == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_replays_and_late_forgeries_cost_nothing_while_the_peer_talks(
        policy: SeqPolicy) -> None:
    # Replayed recorded packets (a burst, then a trickle) between the peer's own packets,
    # which come at least once per RESYNC_TIME: never a resynchronisation, nothing lost.
    r = SeqReceiver(policy, 5, 0.1)
    out: list[bytes | bytearray] = []
    now = 0.0
    for s in range(200):
        now += RESYNC_TIME / 3
        for old in range(max(0, s - 150), max(0, s - 100)):  # 50 replays per packet
            assert r.receive(old, b"replay", now, out) >= 0
        r.receive(s, s.to_bytes(4, "big"), now, out)
    assert b"replay" not in out and len(out) == 200 and r.resyncs == 0


def test_a_replayed_burst_shorter_than_resync_time_is_dropped_whole() -> None:
    burst = list(range(2000))
    r = SeqReceiver(SeqPolicy.DROP_LATE)
    got, drops = _feed(r, burst + burst, 0.0, RESYNC_TIME / 4000 * 0.99)
    assert got == burst and drops == 2000 and r.resyncs == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_a_loss_longer_than_the_window_costs_confirm_minus_one(policy: SeqPolicy) -> None:
    seqs = list(range(100)) + list(range(100 + JUMP_MAX + 50, 300))
    got, drops = _feed(SeqReceiver(policy, 5, 0.1), seqs, 0.0, 0.001)
    assert got == seqs[:100] + seqs[100 + CONFIRM - 1:] and drops == CONFIRM - 1


@pytest.mark.parametrize("policy", POLICIES)
def test_a_forged_run_ahead_is_undone_by_the_peer_resuming(policy: SeqPolicy) -> None:
    # CONFIRM forged packets in a row (the peer silent meanwhile) move the numbering; the
    # peer's next packets resume the old one and move it back after CONFIRM of them.
    r = SeqReceiver(policy, 5, 0.1)
    _feed(r, list(range(100)), 0.0, 0.001)
    forged = [5000 + i for i in range(CONFIRM)]
    _feed(r, forged, 1.0, 0.001)
    assert r.resyncs == 1
    got, drops = _feed(r, list(range(100, 200)), 1.1, 0.001)
    assert got == list(range(100 + CONFIRM - 1, 200)) and drops == CONFIRM - 1
    assert r.resyncs == 2


def test_reorder_resync_delivers_what_was_held_first() -> None:
    # 103 and 104 wait for 102 when the sender restarts: its late packets are dropped until
    # their run lasts RESYNC_TIME, then the held packets go out first, then the new ones.
    r = SeqReceiver(SeqPolicy.REORDER, 5, 10.0)
    got, _ = _feed(r, list(range(102)) + [103, 104])
    new, drops = _feed(r, list(range(20)), 1.0, RESYNC_TIME / 10)
    assert got == list(range(102)) and new == [103, 104, *range(10, 20)] and drops == 10


# ------------------------------------------------------------------ through the Bridge


@pytest.mark.parametrize("policy", ["off", "drop-late", "reorder"])
def test_bridge_hears_a_restarted_peer_within_two_seconds(policy: str) -> None:
    # A's grebe is killed after 1000 packets and started again (a new Bridge, numbers from
    # 0) while B keeps running: B delivers A's packets again within 2 s of A's first one.
    extra = f'key = 7\nsequence = "{policy}"\nkeepalive = 0'
    pair = Pair(extra)
    o = Output()
    for i in range(10):
        pair.a.from_tun([v4(src="198.18.10.1")] * 100, i * 0.01, o)
    ob = Output()
    pair.b.from_udp([(d, A_ADDR) for d in o.udp[B_ADDR]], 0.1, ob)
    assert len(ob.tun) == 1000
    a2 = Bridge(site_config("a", extra), 5.0)  # restarted
    t, heard_at = 5.0, None
    while t < 8.0 and heard_at is None:
        o, ob = Output(), Output()
        a2.from_tun([v4(src="198.18.10.1")], t, o)  # a ping every 0.2 s
        pair.b.from_udp([(d, A_ADDR) for d in o.udp[B_ADDR]], t, ob)
        if ob.tun:
            heard_at = t
        t += 0.2
    assert heard_at is not None and heard_at - 5.0 <= 2.0
    assert IP(bytes(ob.tun[0])).src == "198.18.10.1"
    ev = pair.b.counters.event("seq_resync")
    assert ev == (0 if policy == "off" else 1)
    assert pair.b.status(t)["events"]["seq_resync"] == ev
    assert f"grebe_sequence_resyncs_total {ev}" in pair.b.metrics_text()


def test_bridge_forged_far_ahead_datagrams_lose_nothing() -> None:
    # The measurement through the Bridge: spoofed datagrams with the right key and
    # address, one per 33 legitimate ones, far ahead: every legitimate packet delivered.
    pair = Pair('key = 7\nsequence = "drop-late"\nkeepalive = 0')
    forger = GreEncoder(7, True, False)
    legit, delivered = 0, 0
    for i in range(100):
        o, ob = Output(), Output()
        pair.a.from_tun([v4(src="198.18.10.1")] * 33, i * 0.01, o)
        forger.seq = (pair.a.peers[0].encoder.seq + (1 << 20)) & 0xFFFFFFFF
        spoof = forger.wrap(bytes(v4(src="198.18.10.66")), False)
        dgrams = [(d, A_ADDR) for d in o.udp[B_ADDR]]
        dgrams.insert(16, (bytes(spoof), A_ADDR))
        pair.b.from_udp(dgrams, i * 0.01, ob)
        legit += 33
        delivered += sum(IP(bytes(p)).src == "198.18.10.1" for p in ob.tun)
    assert delivered == legit
    assert pair.b.counters.drop("sequence") == 100
