"""What an attacker on the path can do with everything it saw: replay (at once, after a rekey,
after a restart of either side), flip bits, truncate, inject far-ahead counters, reorder.
Nothing is delivered twice or forged, every drop is counted, legitimate traffic goes on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secure_pair import ADDR, Pair

from bridge.secure import SecurityMode
from bridge.secure.replay import WINDOW, ReplayWindow
from bridge.secure.wire import HEADER_LEN, TRANSPORT

MODES = [SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED]


def _traffic(p: Pair, t0: float, n: int = 20) -> None:
    for i in range(n):
        assert p.send("a", b"a->b %d" % i, t0 + i * 0.01)
        assert p.send("b", b"b->a %d" % i, t0 + i * 0.01)


def _replay_all(p: Pair, recorded: list[tuple[str, bytes, tuple[str, int]]], now: float) -> int:
    """Replay every recorded datagram to its receiver; return how many delivered."""
    before = {s: sum(p.ep[s].drops.values()) for s in "ab"}
    delivered = 0
    handshakes = 0
    for to, data, src in recorded:
        if p.deliver(to, data, now, src=src, record=False):
            delivered += 1
        if data[0] in (1, 2, 3):
            handshakes += 1
        p.ep["a"].datagrams_to_send(now)  # answers to replayed handshakes go to the attacker
        p.ep["b"].datagrams_to_send(now)
    after = {s: sum(p.ep[s].drops.values()) for s in "ab"}
    transport = len(recorded) - handshakes
    assert sum(after.values()) - sum(before.values()) >= transport  # each one counted
    return delivered


def _still_works(p: Pair, now: float) -> None:
    p.pump(now)
    assert p.send("a", b"still-a", now) and p.got["b"][-1] == b"still-a"
    assert p.send("b", b"still-b", now) and p.got["a"][-1] == b"still-b"


@pytest.mark.parametrize("mode", MODES)
def test_replay_of_everything_at_once_is_never_accepted(mode: SecurityMode) -> None:
    p = Pair(mode)
    p.up(0.0)
    _traffic(p, 1.0)
    recorded = list(p.wire)
    assert _replay_all(p, recorded, 2.0) == 0
    assert p.ep["b"].drops["replay"] >= 20 and p.ep["b"].drops["stale_handshake"] >= 1
    _still_works(p, 3.0)


@pytest.mark.parametrize("mode", MODES)
def test_replay_after_rekey_is_never_accepted(mode: SecurityMode) -> None:
    p = Pair(mode)
    p.up(0.0)
    _traffic(p, 1.0)
    recorded = list(p.wire)
    for t in range(2, 400, 5):  # rekeys at 120 s and after; old keys refused after 180 s
        p.pump(float(t))
        _traffic(p, float(t), 1)
    assert p.ep["a"].events["rekey"] + p.ep["b"].events["rekey"] >= 2
    assert _replay_all(p, recorded, 400.0) == 0
    _still_works(p, 401.0)


@pytest.mark.parametrize("restarted", ["a", "b"])
@pytest.mark.parametrize("mode", MODES)
def test_replay_after_a_restart_of_either_side_is_never_accepted(restarted: str,
                                                                 mode: SecurityMode) -> None:
    p = Pair(mode)
    p.up(0.0)
    _traffic(p, 1.0)
    recorded = list(p.wire)
    p.restart(restarted, 30.0)
    p.pump(30.0)
    _traffic(p, 31.0, 3)
    recorded += p.wire[len(recorded):]
    assert _replay_all(p, recorded, 32.0) == 0
    _still_works(p, 33.0)
    p.restart("b" if restarted == "a" else "a", 60.0)  # and the other side too
    p.pump(60.0)
    assert _replay_all(p, recorded, 61.0) == 0
    _still_works(p, 62.0)


@pytest.mark.parametrize("mode", MODES)
def test_every_bit_flip_and_truncation_is_rejected_and_counted(mode: SecurityMode) -> None:
    p = Pair(mode)
    p.up(0.0)
    b = p.ep["b"]
    good = bytes(p.ep["a"].seal(0, b"payload-under-test" * 3, 1.0) or b"")
    variants = []
    for i in range(len(good) * 8):
        v = bytearray(good)
        v[i // 8] ^= 1 << (i % 8)
        variants.append(bytes(v))
    variants += [good[:n] for n in range(len(good))]
    before = sum(b.drops.values())
    for v in variants:
        assert b.receive_datagram(v, ADDR["a"], 1.0) is None
    assert sum(b.drops.values()) - before == len(variants)
    assert b.drops["bad_mac"] > 0 and b.drops["malformed"] > 0
    res = b.receive_datagram(good, ADDR["a"], 1.0)  # the original still passes, once
    assert res is not None and bytes(res[1]) == b"payload-under-test" * 3
    assert b.receive_datagram(good, ADDR["a"], 1.0) is None


def test_flipped_handshake_messages_never_form_a_session() -> None:
    p = Pair(known=("a",))
    a, b = p.ep["a"], p.ep["b"]
    a.handle_timer(0.0)
    (init, _), = a.datagrams_to_send(0.0)
    # mac2 (the last 16 bytes) is only checked under load (WireGuard's rule): with it
    # flipped the message is still the genuine initiation, so flips stop before it
    for i in range(0, (len(init) - 16) * 8, 3):
        v = bytearray(init)
        v[i // 8] ^= 1 << (i % 8)
        b.receive_datagram(bytes(v), ADDR["a"], 0.0)
    assert b.datagrams_to_send(0.0) == [] and b.peers[0].next is None
    assert b.drops["bad_mac1"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_forged_far_ahead_counters_cost_no_legitimate_packet(mode: SecurityMode) -> None:
    """Issue 12's attack on drop-late: one forged datagram (right header, counter far
    ahead) for every 33 legitimate ones. Here the forgeries fail the tag and the window
    never moves for them."""
    p = Pair(mode)
    p.up(0.0)
    b = p.ep["b"]
    sent = 0
    for i in range(660):
        dgram = p.ep["a"].seal(0, b"legit %d" % i, 1.0)
        assert dgram is not None
        if i % 33 == 0:
            _, idx, ctr = TRANSPORT.unpack_from(dgram)
            forged = bytearray(dgram)
            TRANSPORT.pack_into(forged, 0, forged[0], idx, ctr + 1_000_000)
            assert b.receive_datagram(bytes(forged), ADDR["a"], 1.0) is None
        assert p.deliver("b", bytes(dgram), 1.0)
        sent += 1
    assert len(p.got["b"]) == sent and b.drops["bad_mac"] == 20


def test_reordering_inside_the_window_is_accepted_once() -> None:
    p = Pair()
    p.up(0.0)
    dgrams = [bytes(p.ep["a"].seal(0, b"%d" % i, 1.0) or b"") for i in range(3000)]
    for d in reversed(dgrams):  # the worst order: newest first, 2999 back
        assert p.deliver("b", d, 1.0)
    for d in dgrams:
        assert not p.deliver("b", d, 1.0)
    assert p.ep["b"].drops["replay"] == 3000
    assert sorted(p.got["b"], key=int) == [b"%d" % i for i in range(3000)]


def test_left_of_the_window_is_a_replay() -> None:
    w = ReplayWindow()
    assert w.accept(WINDOW + 100)
    assert not w.check(99) and not w.accept(99)
    assert w.accept(101)  # inside the window, first time
    assert not w.accept(101)


def test_window_is_at_least_1024_and_jumps_clear_old_bits() -> None:
    assert WINDOW >= 1024
    w = ReplayWindow()
    for n in range(0, 5000, 3):
        assert w.accept(n)
    assert w.accept(10**9)  # a jump far ahead clears the ring
    assert w.accept(10**9 - 1) and w.accept(10**9 - WINDOW + 1)
    assert not w.accept(10**9 - WINDOW)


def test_transport_header_carries_the_receiver_index_and_counter() -> None:
    p = Pair()
    p.up(0.0)
    a = p.ep["a"]
    d1 = a.seal(0, b"x", 1.0)
    d2 = a.seal(0, b"y", 1.0)
    assert d1 is not None and d2 is not None
    t1, i1, c1 = TRANSPORT.unpack_from(d1)
    _, i2, c2 = TRANSPORT.unpack_from(d2)
    assert t1 == SecurityMode.ENCRYPTED.msg_type and i1 == i2 and c2 == c1 + 1
    assert len(d1) == HEADER_LEN + 1 + 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 20_000), st.integers(0, 2**64 - 1)), max_size=300))
def test_replay_window_matches_a_plain_model(counters: list[int]) -> None:
    """RFC 6479 ring against the rule it implements: accept n once, if n > top - WINDOW."""
    w = ReplayWindow()
    seen: set[int] = set()
    top = -1
    for n in counters:
        expect = n not in seen and n > top - WINDOW
        assert w.check(n) == expect
        assert w.accept(n) == expect, n
        if expect:
            seen.add(n)
            top = max(top, n)
