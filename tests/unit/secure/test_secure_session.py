"""Handshakes (either side first, both at once), data both ways in both modes, rekeying by
messages and by time without loss, key rotation, restart, roaming only when verified."""

from __future__ import annotations

import pytest
from secure_pair import ADDR, Keys, Pair, keypair, make_keys

from bridge.secure import Limits, Roamed, SecurityMode, SessionStarted
from bridge.secure.wire import HEADER_LEN, OVERHEAD

MODES = [SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED]
INNER = bytes(range(256)) * 5 + b"inner-ip-packet"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", ["a", "b"])
def test_handshake_either_side_then_data_both_ways(mode: SecurityMode, first: str) -> None:
    known = (first,)  # only `first` knows the other's address: it must initiate
    p = Pair(mode, known=known)
    p.pump(0.0)
    for side in ("a", "b"):
        assert p.ep[side].peers[0].current is not None
    other = "b" if first == "a" else "a"
    assert p.ep[other].endpoint(0) == ADDR[first]  # learned from a verified datagram
    for i in range(10):
        assert p.send("a", INNER + bytes([i]), 0.1)
        assert p.send("b", bytes([i]) + INNER, 0.1)
    assert p.got["b"] == [INNER + bytes([i]) for i in range(10)]
    assert p.got["a"] == [bytes([i]) + INNER for i in range(10)]
    for side in ("a", "b"):
        assert sum(p.ep[side].drops.values()) == 0, p.ep[side].drops


def test_authenticated_mode_leaves_the_inner_packet_readable_encrypted_does_not() -> None:
    for mode, readable in ((SecurityMode.AUTHENTICATED, True), (SecurityMode.ENCRYPTED, False)):
        p = Pair(mode)
        p.up()
        dgram = p.ep["a"].seal(0, INNER, 0.1)
        assert dgram is not None and len(dgram) == len(INNER) + OVERHEAD
        assert (bytes(dgram[HEADER_LEN:HEADER_LEN + len(INNER)]) == INNER) is readable


def test_simultaneous_initiation_ends_with_working_sessions() -> None:
    p = Pair()
    # both initiate at once: the initiations cross on the wire
    p.ep["a"].handle_timer(0.0)
    p.ep["b"].handle_timer(0.0)
    ia = p.ep["a"].datagrams_to_send(0.0)
    ib = p.ep["b"].datagrams_to_send(0.0)
    for d, _ in ia:
        p.deliver("b", bytes(d), 0.01)
    for d, _ in ib:
        p.deliver("a", bytes(d), 0.01)
    p.pump(0.02)
    for i in range(5):
        assert p.send("a", b"x%d" % i, 0.1 + i)
        assert p.send("b", b"y%d" % i, 0.1 + i)
    assert p.got["b"] == [b"x%d" % i for i in range(5)]
    assert p.got["a"] == [b"y%d" % i for i in range(5)]
    assert p.ep["a"].drops["bad_mac"] == p.ep["b"].drops["bad_mac"] == 0


def test_data_sent_before_the_handshake_is_staged_not_lost() -> None:
    p = Pair(known=("a",))
    assert p.ep["a"].seal(0, b"early-1", 0.0) is None
    assert p.ep["a"].seal(0, b"early-2", 0.0) is None
    assert p.ep["a"].events["staged"] == 2
    p.pump(0.0)
    assert p.got["b"] == [b"early-1", b"early-2"]


@pytest.mark.parametrize("mode", MODES)
def test_rekey_by_messages_without_loss(mode: SecurityMode) -> None:
    lim = Limits(rekey_after_messages=50, reject_after_messages=80)
    p = Pair(mode, limits=lim)
    p.up()
    sent = []
    for i in range(400):
        now = 1.0 + i * 0.001
        payload = b"m%05d" % i
        sent.append(payload)
        if p.send("a", payload, now):
            p.pump(now)  # the rekey handshake runs in the gaps between datagrams
        else:
            p.pump(now)
    assert p.got["b"] == sent
    assert p.ep["a"].events["rekey"] >= 400 // 50 - 1
    assert p.ep["b"].drops["replay"] == 0 and p.ep["b"].drops["bad_mac"] == 0


def test_rekey_by_time_keeps_old_packets_in_flight_and_nothing_is_lost() -> None:
    p = Pair()
    p.up()
    delivered = 0
    late: list[bytes] = []
    now = 0.0
    for step in range(400):  # 400 s: rekeys at 120 s, keys refused after 180 s
        now = step * 1.0
        p.pump(now)
        for k in range(2):
            d = p.ep["a"].seal(0, b"t%d.%d" % (step, k), now)
            assert d is not None, f"no session at {now}"
            if k == 1 and step % 7 == 0:
                late.append(bytes(d))  # held in the network across the next rekey
            else:
                assert p.deliver("b", bytes(d), now + 0.01)
                delivered += 1
        if late and step % 7 == 3:
            assert p.deliver("b", late.pop(), now + 0.02)  # delayed 3 s: still accepted
            delivered += 1
    assert p.ep["a"].events["rekey"] + p.ep["b"].events["rekey"] >= 3
    assert p.ep["a"].events["silence_handshake"] == 0
    assert len(p.got["b"]) == delivered
    assert sum(p.ep["b"].drops.values()) == 0


@pytest.mark.parametrize("restarted", ["a", "b"])
@pytest.mark.parametrize("mode", MODES)
def test_a_restarted_peer_talks_again_within_one_round_trip(restarted: str,
                                                            mode: SecurityMode) -> None:
    p = Pair(mode)
    p.up()
    assert p.send("a", b"before", 1.0)
    p.restart(restarted, 5.0)  # a fresh process, same keys: it initiates at once
    p.pump(5.0)
    assert p.send("a", b"after-a", 5.1)
    assert p.send("b", b"after-b", 5.1)
    assert p.got["b"][-1] == b"after-a" and p.got["a"][-1] == b"after-b"


def test_responder_keeps_its_own_initiation_when_an_old_initiation_is_replayed() -> None:
    p = Pair()
    p.up(0.0)
    old_init = next(d for to, d, _ in p.wire if to == "b" and d[0] == 1)
    p.restart("b", 10.0)
    b = p.ep["b"]
    b.handle_timer(10.0)  # b's own initiation is now in flight
    mine = b.datagrams_to_send(10.0)
    p.deliver("b", old_init, 10.0)  # replayed: b has no timestamp stored after its restart
    b.datagrams_to_send(10.0)  # its answer goes to the attacker; nothing confirms it
    for d, _ in mine:
        p.deliver("a", bytes(d), 10.01)
    p.pump(10.02)
    assert p.send("b", b"ok", 10.1) and p.got["a"][-1] == b"ok"
    assert p.send("a", b"ok2", 10.1) and p.got["b"][-1] == b"ok2"


def test_roaming_only_after_a_verified_datagram() -> None:
    p = Pair()
    p.up()
    b = p.ep["b"]
    while b.next_event() is not None:
        pass
    new = ("198.19.7.7", 40000)
    forged = bytearray(p.ep["a"].seal(0, b"x", 1.0) or b"")
    forged[-1] ^= 1
    assert b.receive_datagram(bytes(forged), new, 1.0) is None
    assert b.endpoint(0) == ADDR["a"] and b.next_event() is None
    good = p.ep["a"].seal(0, b"y", 1.1)
    assert good is not None
    res = b.receive_datagram(bytes(good), new, 1.1)
    assert res is not None and bytes(res[1]) == b"y"
    assert b.endpoint(0) == new
    assert b.next_event() == Roamed(0, new)
    assert b.events["roamed"] == 1


def test_session_started_events() -> None:
    p = Pair()
    p.up()
    assert SessionStarted(0, True) in (p.ep["a"].next_event(), p.ep["a"].next_event())


def test_static_key_rotation_accepts_both_keys_during_the_change() -> None:
    keys = make_keys()
    p = Pair(keys=keys)
    p.up(0.0)
    old_priv_b = keys.priv["b"][0]
    new_priv_b, new_pub_b = keypair()
    # step 1: a accepts b's new public key beside the old one
    keys.pub["b"] = (keys.pub["b"][0], new_pub_b)
    p.restart("a", 10.0)
    p.pump(10.0)
    assert p.send("b", b"s1", 10.1)
    # step 2: b switches to its new key and still answers to the old one
    keys.priv["b"] = (new_priv_b, old_priv_b)
    p.restart("b", 20.0)
    p.pump(20.0)
    assert p.send("b", b"s2", 20.1) and p.send("a", b"s2a", 20.1)
    # step 3: a forgets b's old key
    keys.pub["b"] = (new_pub_b,)
    p.restart("a", 30.0)
    p.pump(30.0)
    assert p.send("b", b"s3", 30.1) and p.send("a", b"s3a", 30.1)
    assert p.got["a"][-3:] == [b"s1", b"s2", b"s3"]


def test_psk_rotation_and_psk_mismatch() -> None:
    keys = make_keys(psk=b"\x01" * 32)
    p = Pair(keys=keys)
    p.up(0.0)
    new = b"\x02" * 32
    keys.psk = {"a": (b"\x01" * 32, new), "b": (b"\x01" * 32, new)}  # step 1: accept both
    p.restart("a", 10.0)
    p.restart("b", 10.5)
    p.pump(10.5)
    assert p.send("a", b"p1", 10.6)
    keys.psk["b"] = (new, b"\x01" * 32)  # step 2: b responds with the new one first
    p.restart("b", 20.0)
    p.pump(20.0)
    assert p.send("a", b"p2", 20.1) and p.send("b", b"p2b", 20.1)
    q = Pair(keys=Keys(keys.priv, keys.pub, {"a": (b"\x03" * 32,), "b": (new,)}))
    q.pump(0.0)
    assert q.ep["a"].peers[0].current is None and q.ep["b"].peers[0].current is None
    assert q.ep["a"].drops["bad_handshake"] + q.ep["b"].drops["bad_handshake"] >= 1


def test_mode_mismatch_never_forms_a_session() -> None:
    p = Pair(modes={"a": SecurityMode.AUTHENTICATED, "b": SecurityMode.ENCRYPTED})
    p.pump(0.0)
    assert p.ep["a"].peers[0].current is None
    assert p.ep["b"].drops["mode_mismatch"] >= 1 and p.ep["a"].drops["mode_mismatch"] >= 1


def test_unreachable_peer_is_retried_every_second() -> None:
    p = Pair(known=("a",))
    a = p.ep["a"]
    sent = 0
    for t in range(0, 10):
        if (tm := a.get_timer()) is not None and tm <= t:
            a.handle_timer(float(t))
        sent += len(a.datagrams_to_send(float(t)))
    assert sent == 10 and a.events["handshake_initiated"] == 10


@pytest.mark.parametrize("mode", MODES)
def test_seal_batch_of_a_udprun_round_trips_every_datagram(mode: SecurityMode) -> None:
    from bridge.gso import UdpRun

    p = Pair(mode)
    p.up()
    seg = 1400
    rows = [bytes([i]) * seg for i in range(45)] + [b"tail" * 10]  # the last is shorter
    run = UdpRun(b"".join(rows), seg)
    res = p.ep["a"].seal_batch(0, run, run.seg, 1.0,
                               alloc=lambda n: UdpRun(n, seg + OVERHEAD))
    assert res is not None
    out, oseg = res
    assert isinstance(out, UdpRun) and oseg == seg + OVERHEAD and out.seg == oseg
    assert len(out) == len(run) + OVERHEAD * len(rows)
    for d in UdpRun(out, oseg).datagrams():
        assert p.deliver("b", d, 1.0)
    assert p.got["b"] == rows


def test_seal_batch_without_a_session_stages_each_datagram() -> None:
    p = Pair(known=("a",))
    a = p.ep["a"]
    assert a.seal_batch(0, b"x" * 250, 100, 0.0) is None
    assert a.events["staged"] == 3
    p.pump(0.0)
    assert p.got["b"] == [b"x" * 100, b"x" * 100, b"x" * 50]


def test_status_snapshot_and_metrics_name_every_reason() -> None:
    from bridge.secure import DROP_REASONS

    p = Pair()
    p.up()
    snap = p.ep["a"].snapshot()
    assert set(snap["drops"]) == set(DROP_REASONS)  # type: ignore[arg-type]
    assert p.send("b", b"x", 2.0)
    peer = p.ep["a"].snapshot(now=3.5)["peers"]["b"]  # type: ignore[index]
    assert peer["session"] and peer["last_rx_age"] == 1.5 and not peer["handshake_pending"]
    assert peer["session_age"] is not None and peer["session_age"] >= 3.5
    text = p.ep["a"].prometheus()
    assert all(f'reason="{r}"' in text for r in DROP_REASONS)


@pytest.mark.parametrize("known", [("a", "b"), ("a",), ("b",)])
@pytest.mark.parametrize("restarted", ["a", "b"])
def test_traffic_flows_again_within_2s_of_a_restart(known: tuple[str, ...],
                                                    restarted: str) -> None:
    """A steady one-way stream a -> b every 20 ms; `restarted` is killed and started again
    at t = 10 s (a fresh endpoint, same keys). When the restarted side does not know the
    other's address it cannot initiate: the other side's next datagram, unanswered for
    `silence_after`, starts the handshake. With a -> b only, b sends nothing but the
    Bridge's own keepalives, here every 0.5 s (the bound is keepalive + 1.5 s)."""
    p = Pair(known=known)
    p.pump(0.0)
    t = 0.0
    restart_at = 10.0
    back = None
    got_before = 0
    while t < 14.0:
        t = round(t + 0.02, 2)
        if t == restart_at:
            p.restart(restarted, t)
            got_before = len(p.got["b"])
        p.pump(t)
        p.send("a", b"s%.2f" % t, t)
        if round(t * 100) % 50 == 0:
            p.send("b", b"bridge keepalive", t)
        p.pump(t + 0.005)
        if t > restart_at and back is None and len(p.got["b"]) > got_before:
            back = t
    assert back is not None and back - restart_at <= 2.0, back
    assert p.got["b"][-1] == b"s%.2f" % t  # and it keeps flowing


def _drain(ep: object) -> list[object]:
    out = []
    while (ev := ep.next_event()) is not None:  # type: ignore[attr-defined]
        out.append(ev)
    return out


def test_peer_restarted_is_signalled_once_per_restart_never_for_rekeys_or_replays() -> None:
    from bridge.secure import PeerRestarted

    p = Pair()
    p.up(0.0)
    # first start: each side is fresh for the other
    assert PeerRestarted(0) in _drain(p.ep["a"]) and PeerRestarted(0) in _drain(p.ep["b"])
    first_boot_init_from_a = next(d for to, d, _ in p.wire if to == "b" and d[0] == 1)
    for t in range(1, 400, 2):  # rekeys (120 s) and silence: no restart signal
        p.pump(float(t))
        assert p.send("a", b"x", float(t)) and p.send("b", b"y", float(t))
    assert p.ep["a"].events["rekey"] + p.ep["b"].events["rekey"] >= 3
    assert PeerRestarted(0) not in _drain(p.ep["a"]) + _drain(p.ep["b"])
    p.restart("b", 500.0)
    p.pump(500.0)
    assert p.send("a", b"after", 500.1) and p.send("b", b"after", 500.1)
    assert _drain(p.ep["a"]).count(PeerRestarted(0)) == 1  # b restarted
    assert PeerRestarted(0) not in _drain(p.ep["b"])  # a did not
    # b restarts again; a's first-boot initiation (FRESH) replayed to it is consumed (b has
    # no timestamp stored any more) but never confirmed: no restart signal from it
    p.restart("b", 600.0)
    p.deliver("b", first_boot_init_from_a, 600.0, record=False)
    assert p.ep["b"].events["handshake_responded"] == 1
    p.ep["b"].datagrams_to_send(600.0)  # its answer goes to the attacker
    p.pump(600.0)
    assert p.send("a", b"x", 600.1) and p.send("b", b"y", 600.1)
    assert PeerRestarted(0) not in _drain(p.ep["b"])
    assert _drain(p.ep["a"]).count(PeerRestarted(0)) == 1


@pytest.mark.parametrize("t", [4, 5])  # MSG_AUTHENTICATED, MSG_ENCRYPTED
def test_seal_run_and_open_run_match_the_per_datagram_calls(t: int) -> None:
    """The batched seal and open (numpy for headers and payload copies) put and take the
    same bytes as seal_into one by one, the shorter last datagram included; open_run stops
    at a replay and at a damaged tag, having accepted only what came before."""
    import os

    from bridge.secure.session import Keypair
    from bridge.secure.wire import OVERHEAD

    key = bytes(range(32))
    tx = Keypair(key, key, 1, 0x01020304, 0.0, True, t, 100.0)
    src = os.urandom(1400 * 5 + 333)
    out = bytearray(len(src) + OVERHEAD * 6)
    tx.seal_run(memoryview(src), 1400, memoryview(out), 77)
    ref = bytearray()
    for i, off in enumerate(range(0, len(src), 1400)):
        piece = src[off:off + 1400]
        b = bytearray(len(piece) + OVERHEAD)
        tx.seal_into(piece, memoryview(b), 0, 77 + i)
        ref += b
    assert out == ref
    rx = Keypair(key, key, 0x01020304, 1, 0.0, False, t, 100.0)
    inner = bytearray(len(src))
    assert rx.open_run(memoryview(bytes(out)), 1400 + OVERHEAD, memoryview(inner), 1 << 60) == 6
    assert inner == src
    assert rx.open_run(memoryview(bytes(out)), 1400 + OVERHEAD, memoryview(inner), 1 << 60) == 0
    rx2 = Keypair(key, key, 0x01020304, 1, 0.0, False, t, 100.0)
    bad = bytearray(out)
    bad[3 * (1400 + OVERHEAD) - 1] ^= 1  # the third datagram's tag
    assert rx2.open_run(memoryview(bytes(bad)), 1400 + OVERHEAD, memoryview(inner), 1 << 60) == 2
    assert rx2.window.check(79) and not rx2.window.check(78)


@pytest.mark.parametrize("last", [333, 1400, 0])
def test_seal_rows_in_place_equals_seal_run(last: int) -> None:
    """Authenticated, sealed in place (rows with room for header and tag, bridge/gso.py
    `UdpRun.head`): byte for byte what seal_run makes of the payloads alone, under the
    same counters, a shorter last row, a full-size one or none included; the endpoint
    counts the counters once (no nonce reuse) and stages when it has no session."""
    import os

    from bridge.secure.session import Keypair
    from bridge.secure.wire import HEADER_LEN, MSG_AUTHENTICATED, OVERHEAD, TAG_LEN

    key = bytes(range(32))
    src = os.urandom(1400 * 4 + last)
    count = -(-len(src) // 1400)
    ref = bytearray(len(src) + OVERHEAD * count)
    Keypair(key, key, 1, 9, 0.0, True, MSG_AUTHENTICATED, 100.0).seal_run(
        memoryview(src), 1400, memoryview(ref), 5)
    row = 1400 + OVERHEAD
    buf = bytearray(len(ref))
    for i, off in enumerate(range(0, len(src), 1400)):
        piece = src[off:off + 1400]
        buf[i * row + HEADER_LEN:i * row + HEADER_LEN + len(piece)] = piece
    Keypair(key, key, 1, 9, 0.0, True, MSG_AUTHENTICATED, 100.0).seal_rows(
        memoryview(buf), row, 5)
    assert buf == ref
    assert TAG_LEN == OVERHEAD - HEADER_LEN


def test_seal_rows_through_the_endpoint_counts_and_stages() -> None:
    """SecureEndpoint.seal_rows advances the send counter by the row count (the next
    datagram takes the next counter) and, without a session, stages each datagram
    without its room, sealed later like any staged one."""
    from bridge.secure.wire import TRANSPORT

    row = 100 + OVERHEAD
    run = bytearray(row * 2 + 50 + OVERHEAD)  # the last row shorter
    pieces = [bytes([1]) * 100, bytes([2]) * 100, bytes([3]) * 50]
    for i, piece in enumerate(pieces):
        run[i * row + HEADER_LEN:i * row + HEADER_LEN + len(piece)] = piece
    p = Pair(SecurityMode.AUTHENTICATED, known=("a",))
    a = p.ep["a"]
    assert not a.seal_rows(0, bytearray(run), row, 0.0)  # no session yet: staged
    assert a.events["staged"] == 3
    p.pump(0.0)  # the handshake; the staged datagrams go out sealed
    assert p.got["b"] == pieces
    kp = a.peers[0].current
    assert kp is not None
    n = kp.send_n
    assert a.seal_rows(0, run, row, 0.1)
    assert kp.send_n == n + 3
    cuts = [bytes(run[o:o + row]) for o in range(0, len(run), row)]
    assert [TRANSPORT.unpack_from(c)[2] for c in cuts] == [n, n + 1, n + 2]
    for c in cuts:
        assert p.deliver("b", c, 0.1)
    assert p.got["b"] == pieces * 2


def test_accept_run_marks_what_accept_would_one_by_one() -> None:
    """ReplayWindow.accept_run (open_run's in-order batches) is the per-counter loop."""
    import random

    from bridge.secure.replay import WINDOW, ReplayWindow

    rnd = random.Random(12)
    for _ in range(300):
        a, b = ReplayWindow(), ReplayWindow()
        top = rnd.choice([-1, 0, 5, 63, 64, 1000, 70_000])
        for w in (a, b):
            if top >= 0:
                w.accept(top)
                for n in rnd.sample(range(max(0, top - 300), top), min(top, 20)):
                    w.accept(n)
        first = top + 1 + rnd.choice([0, 1, 62, 63, 64, 200, WINDOW + 5])
        last = first + rnd.choice([0, 1, 43, 63, 64, 130])
        b.ring = list(a.ring)
        b.top = a.top
        a.accept_run(first, last)
        for n in range(first, last + 1):
            assert b.accept(n)
        assert (a.top, a.ring) == (b.top, b.ring)
        for n in range(max(0, last - WINDOW - 3), last + 3):
            assert a.check(n) == b.check(n)


def test_renumber_moves_a_kept_session_and_forgets_the_indices_of_a_dropped_one() -> None:
    p = Pair()
    p.up()
    ep = p.ep["a"]
    sess = ep.peers[0]
    old_local = sess.current.local if sess.current is not None else -1
    ep.renumber({3: sess})  # a reload put the peer at index 3; its keys stay
    assert ep.peers == {3: sess} and sess.index == 3
    assert ep.indices[old_local][0] is sess
    assert ep.by_public[p.keys.pub["b"][0]] is sess
    assert p.send("b", b"x" * 40, 0.5)  # the session goes on across the renumbering
    assert p.got["a"] == [b"x" * 40]
    ep.renumber({})  # the peer removed: nothing of it can be looked up any more
    assert ep.indices == {} and ep.by_public == {} and ep.identities == {}


def test_renumber_refuses_a_public_key_of_two_peers_and_changes_nothing() -> None:
    p = Pair()
    p.up()
    ep = p.ep["a"]
    sess = ep.peers[0]
    twin = Pair(keys=p.keys).ep["a"].peers[0]  # another session with the same peer key
    before = (dict(ep.peers), dict(ep.indices), dict(ep.by_public))
    with pytest.raises(ValueError):
        ep.renumber({0: sess, 1: twin})
    assert (ep.peers, ep.indices, ep.by_public) == before and sess.index == 0


def test_set_keypairs_forgets_the_receiver_indices_of_keypairs_left_out() -> None:
    p = Pair()
    p.up()
    ep = p.ep["a"]
    sess = ep.peers[0]
    kp = sess.current
    assert kp is not None and ep.indices[kp.local] == (sess, kp)
    ep.set_keypairs(sess, None, None, ())
    assert kp.local not in ep.indices and sess.current is None
    ep.set_keypairs(sess, None, kp, ())  # given back, as `next`
    assert ep.indices[kp.local] == (sess, kp) and sess.next is kp
