"""Sequence policies (unit and through the pipeline) and peer liveness with explicit time."""

from __future__ import annotations

import pytest
from grebe_sites import A_ADDR, B_ADDR, Pair, site_config, v4
from scapy.layers.inet import IP

from bridge.config import SeqPolicy
from bridge.encap import decode_gre
from bridge.pipeline import Bridge, Output
from bridge.seqpolicy import SeqReceiver, seq_after, seq_diff


def test_serial_arithmetic() -> None:
    assert seq_after(1, 0) and seq_after(0, 0xFFFFFFFF) and not seq_after(0, 1)
    assert not seq_after(5, 5)
    assert seq_diff(0, 0xFFFFFFFF) == 1 and seq_diff(0xFFFFFFFF, 0) == -1
    assert seq_diff(0x80000000, 0) == -(1 << 31)


def _run(policy: SeqPolicy, seqs: list[int], held: int = 5, timer: float = 0.1) -> tuple[
        list[int], int]:
    r = SeqReceiver(policy, held, timer)
    out: list[bytes | bytearray] = []
    drops = 0
    for s in seqs:
        drops += r.receive(s, s.to_bytes(4, "big") if s >= 0 else b"none", 0.0, out) >= 0
    return [int.from_bytes(p, "big") if p != b"none" else -1 for p in out], drops


def test_off_ignores_numbers() -> None:
    assert _run(SeqPolicy.OFF, [3, 1, 2, -1]) == ([3, 1, 2, -1], 0)


def test_drop_late_linux_semantics() -> None:
    # First packet accepted whatever its number; gaps accepted; anything behind dropped.
    assert _run(SeqPolicy.DROP_LATE, [100, 102, 101, 103, 103, 50]) == ([100, 102, 103], 3)
    assert _run(SeqPolicy.DROP_LATE, [0xFFFFFFFF, 0, 1]) == ([0xFFFFFFFF, 0, 1], 0)
    assert _run(SeqPolicy.DROP_LATE, [1, -1]) == ([1], 1)  # S bit missing


def test_reorder_restores_order_and_drops_late() -> None:
    assert _run(SeqPolicy.REORDER, [0, 2, 3, 1, 4]) == ([0, 1, 2, 3, 4], 0)
    # Duplicate of a delivered packet and of a held packet are both discarded.
    assert _run(SeqPolicy.REORDER, [0, 0, 2, 2, 1]) == ([0, 1, 2], 2)
    # RFC 2890 §2.2: last starts at 2**32 - 1, so 0 is the next expected number.
    assert _run(SeqPolicy.REORDER, [1, 0]) == ([0, 1], 0)


def test_reorder_buffer_full_flushes_in_order_ignoring_gaps() -> None:
    # max 3 held: the 4th out-of-order packet trips MAX_PACKETS_HELD.
    got, drops = _run(SeqPolicy.REORDER, [0, 5, 3, 4, 7, 6, 8], held=3)
    assert got == [0, 3, 4, 5, 7, 8] and drops == 1  # 6 arrives after last = 7


def test_reorder_timer_flush() -> None:
    r = SeqReceiver(SeqPolicy.REORDER, 5, 0.1)
    out: list[bytes | bytearray] = []
    r.receive(0, b"0", 1.0, out)
    r.receive(2, b"2", 1.02, out)
    r.receive(3, b"3", 1.05, out)
    assert out == [b"0"] and r.deadline() == pytest.approx(1.12)
    assert r.expire(1.11, out) == 0
    assert r.expire(1.12, out) == 2 and out == [b"0", b"2", b"3"]
    assert r.deadline() is None and r.last == 3
    r.receive(1, b"1", 1.2, out)  # the gap's packet arrives too late now
    assert out == [b"0", b"2", b"3"]


def _sequenced(pair: Pair, n: int) -> list[bytes]:
    oa = Output()
    pair.a.from_tun([v4(src=f"198.18.10.{i + 1}") for i in range(n)], 0.0, oa)
    return [bytes(d) for d in oa.udp[B_ADDR]]


def _delivered(out: Output) -> list[str]:
    return [IP(bytes(p)).src.rsplit(".", 1)[1] for p in out.tun]


@pytest.mark.parametrize(("policy", "expect", "dropped"), [
    ("off", ["1", "3", "2", "4"], 0),
    ("drop-late", ["1", "3", "4"], 1),
    ("reorder", ["1", "2", "3", "4"], 0),
])
def test_policies_through_pipeline(policy: str, expect: list[str], dropped: int) -> None:
    pair = Pair(f'key = 1\nsequence = "{policy}"')
    d = _sequenced(pair, 4)
    if policy != "off":
        assert [decode_gre(x, 1, False)[2] for x in d] == [0, 1, 2, 3]
    out = Output()
    pair.b.from_udp([(d[i], A_ADDR) for i in (0, 2, 1, 3)], 0.0, out)
    assert _delivered(out) == expect
    assert pair.b.counters.drop("sequence") == dropped


def test_reorder_timer_through_pipeline() -> None:
    pair = Pair('sequence = "reorder"\noutoforder_timer_ms = 50\nkeepalive = 0')
    d = _sequenced(pair, 3)
    out = Output()
    pair.b.from_udp([(d[0], A_ADDR), (d[2], A_ADDR)], 10.0, out)
    assert _delivered(out) == ["1"] and pair.b.get_timer() == pytest.approx(10.05)
    pair.b.handle_timer(10.04, out)
    assert _delivered(out) == ["1"]
    pair.b.handle_timer(10.05, out)
    assert _delivered(out) == ["1", "3"]
    assert pair.b.counters.event("reorder_flushed") == 1
    pair.b.from_udp([(d[1], A_ADDR)], 10.1, out)
    assert pair.b.counters.drop("sequence") == 1


def test_sequence_required_when_policy_on() -> None:
    b = Bridge(site_config("b", 'sequence = "drop-late"'), 0)
    a = Bridge(site_config("a"), 0)  # sends without S
    oa, ob = Output(), Output()
    a.from_tun([v4()], 0, oa)
    b.from_udp([(oa.udp[B_ADDR][0], A_ADDR)], 0, ob)
    assert ob.tun == [] and b.counters.drop("sequence") == 1


# ------------------------------------------------------------------ liveness


def test_keepalive_sent_when_idle_and_received_as_liveness() -> None:
    pair = Pair("key = 4\nkeepalive = 5\ndead_after = 15")
    a, b = pair.a, pair.b
    assert a.get_timer() == 5.0
    out = Output()
    a.handle_timer(4.9, out)
    assert not out
    a.handle_timer(5.0, out)
    ka = out.udp[B_ADDR]
    assert len(ka) == 1 and decode_gre(ka[0], 4, False)[0] == -2
    assert a.counters.event("keepalive_tx") == 1
    out.clear()
    a.from_tun([v4()], 7.0, out)  # data resets the idle clock
    out.clear()
    a.handle_timer(11.0, out)
    assert not out.udp
    assert a.get_timer() == 12.0
    ob = Output()
    b.from_udp([(ka[0], A_ADDR)], 8.0, ob)
    assert ob.tun == [] and b.counters.event("keepalive_rx") == 1
    assert b.status(9.0)["peers"][0]["last_seen_s"] == 1.0


def test_ipip_keepalive_is_empty_datagram() -> None:
    pair = Pair('encapsulation = "ipip"\nkeepalive = 1')
    out = Output()
    pair.a.handle_timer(1.0, out)
    assert out.udp[B_ADDR] == [b""]
    ob = Output()
    pair.b.from_udp([(b"", A_ADDR)], 1.0, ob)
    assert pair.b.counters.event("keepalive_rx") == 1 and not ob.tun


def test_peer_down_withdraw_and_recovery() -> None:
    pair = Pair('keepalive = 2\ndead_after = 6\ndown_action = "withdraw"')
    a, b = pair.a, pair.b
    out = Output()
    for t in (2.0, 4.0):
        a.handle_timer(t, out)
    st = a.status(5.9)["peers"][0]   # never heard: not up, but not yet given up on
    assert st["up"] is False and st["state"] == "waiting"
    a.handle_timer(6.0, out)
    assert a.status(6.0)["peers"][0]["up"] is False
    assert a.counters.event("peer_down") == 1
    out.clear()
    a.from_tun([v4()], 6.5, out)
    assert a.counters.drop("peer_down") == 1 and B_ADDR not in out.udp
    assert out.tun and IP(bytes(out.tun[0])).getlayer(1).type == 3  # ICMP unreachable
    # B's keepalive brings A's view of B back up.
    ob = Output()
    b.handle_timer(7.0, ob)
    out.clear()
    a.from_udp([(ob.udp[A_ADDR][0], B_ADDR)], 7.0, out)
    assert a.status(7.0)["peers"][0]["up"] is True and a.counters.event("peer_up") == 1
    out.clear()
    a.from_tun([v4()], 7.1, out)
    assert len(out.udp[B_ADDR]) == 1


def test_down_action_none_keeps_sending() -> None:
    a = Bridge(site_config("a", "keepalive = 1\ndead_after = 3"), 0)
    out = Output()
    a.handle_timer(3.0, out)
    out.clear()
    a.from_tun([v4()], 3.5, out)
    assert len(out.udp[B_ADDR]) == 1 and a.status(3.5)["peers"][0]["up"] is False


def test_timer_never_in_the_past_after_handling() -> None:
    pair = Pair('sequence = "reorder"\nkeepalive = 1\ndead_after = 3')
    out = Output()
    now = 0.0
    for _ in range(50):
        t = pair.a.get_timer()
        assert t is not None
        now = max(now, t)
        pair.a.handle_timer(now, out)
        nxt = pair.a.get_timer()
        assert nxt is None or nxt > now
