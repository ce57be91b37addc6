"""Denial of service: a handshake flood costs the responder little (cookies under load), the
per-source table is bounded, malformed input is counted, roaming needs verification."""

from __future__ import annotations

from secure_pair import ADDR, Pair, keypair

from bridge.secure import Limits, PeerSecurity, PeerSpec, SecureEndpoint, SecurityMode, noise
from bridge.secure.session import RETIRED_MAX
from bridge.secure.wire import INIT_MAC1_AT, MAC_LEN


def _attacker_initiation(victim_pub: bytes, now: float) -> bytes:
    """A well-formed initiation from a key the victim does not know (mac1 is valid: the
    attacker knows the victim's public key)."""
    sk, _ = keypair()
    c = SecureEndpoint([PeerSpec(0, "victim", PeerSecurity(SecurityMode.ENCRYPTED, (sk,),
                                                           (victim_pub,)), ADDR["b"])],
                       now, wall_offset=1.8e9)
    c.handle_timer(now)
    ((msg, _),) = c.datagrams_to_send(now)
    return bytes(msg)


def test_handshake_flood_gets_cookies_and_the_real_peer_still_connects_within_2s() -> None:
    p = Pair(limits=Limits(load_handshakes=3), known=("a",))
    b = p.ep["b"]
    pub_b = p.keys.pub["b"][0]
    flood = [_attacker_initiation(pub_b, 0.0) for _ in range(8)]
    for i, m in enumerate(flood):
        b.receive_datagram(m, (f"198.19.0.{i}", 1000), 0.1)
    assert b.drops["unknown_peer"] == 3  # three DHs, then the load rule
    assert b.drops["cookie_required"] == 5 and b.events["cookie_sent"] == 5
    replies = b.datagrams_to_send(0.1)
    assert all(len(d) == 64 for d, _ in replies)  # smaller than the 152-byte initiation
    # the legitimate initiator gets a cookie, then retries with mac2 and is admitted
    a = p.ep["a"]
    t = 0.5
    a.handle_timer(t)
    connected = None
    while t < 2.5 and connected is None:
        for i, m in enumerate(flood):  # the flood goes on
            b.receive_datagram(m, (f"198.19.1.{i}", 1000), t)
        b.datagrams_to_send(t)
        p.flush("a", t)
        p.flush("b", t)
        p.flush("a", t)
        if a.peers[0].current is not None:
            connected = t
        t += 0.05
        if (tm := a.get_timer()) is not None and tm <= t:
            a.handle_timer(t)
    assert connected is not None and connected - 0.5 <= 2.0
    assert a.events["cookie_received"] >= 1
    assert b.drops["unknown_peer"] == 3  # no DH was spent on the flood under load
    assert p.send("a", b"through the flood", t) and p.got["b"][-1] == b"through the flood"


def test_per_source_limiter_is_bounded_evicts_and_counts() -> None:
    lim = Limits(ratelimit_entries=8, per_source_burst=1.0, per_source_rate=0.1)
    p = Pair(limits=lim)
    b = p.ep["b"]
    b.force_load = True
    m = bytearray(_attacker_initiation(p.keys.pub["b"][0], 0.0))
    for i in range(50):
        addr = (f"198.19.2.{i}", 4000)
        cookie = noise.mac(b.guard.cookie_secret, f"{addr[0]}|{addr[1]}".encode())
        mac2_at = INIT_MAC1_AT + MAC_LEN
        m[mac2_at:] = noise.mac(cookie, bytes(m[:mac2_at]))
        b.receive_datagram(bytes(m), addr, 0.0)
        b.receive_datagram(bytes(m), addr, 0.0)  # second from the same host: over its rate
    assert len(b.guard.ratelimit) == 8
    assert b.guard.ratelimit.evicted == 42
    assert b.drops["rate_limited"] == 50
    assert b.snapshot()["events"]["ratelimit_evicted"] == 42  # type: ignore[index]


def test_index_table_stays_bounded_through_rekeys_restarts_and_replays() -> None:
    p = Pair(limits=Limits(rekey_after_messages=5, reject_after_messages=8))
    p.up(0.0)
    for i in range(300):
        now = 0.01 * i
        p.send("a", b"x", now)
        p.send("b", b"y", now)
        p.pump(now)
        if i % 50 == 49:
            for to, d, src in list(p.wire[-40:]):
                p.deliver(to, d, now, src=src, record=False)
        for side in "ab":
            assert len(p.ep[side].indices) <= 3 + RETIRED_MAX
    p.restart("a", 10.0)
    p.pump(10.0)
    assert len(p.ep["b"].indices) <= 3 + RETIRED_MAX


def test_malformed_input_is_counted_never_raised() -> None:
    p = Pair()
    p.up(0.0)
    b = p.ep["b"]
    cases = [b"", b"\x01", b"\x04\x00\x00", b"\x04\x01\x00\x00" + bytes(40),
             b"\x09\x00\x00\x00" + bytes(40), b"\x01\x00\x00\x00" + bytes(10),
             b"\x02\x00\x00\x00" + bytes(91), b"\x02\x00\x00\x00" + bytes(88),
             b"\x03\x00\x00\x00" + bytes(59),
             b"\x05\x00\x00\x00" + bytes(27)]
    for c in cases:
        assert b.receive_datagram(c, ADDR["a"], 1.0) is None
    assert b.drops["malformed"] == len(cases)


def test_unknown_indices_and_forged_cookie_replies() -> None:
    p = Pair()
    p.up(0.0)
    b = p.ep["b"]
    assert b.receive_datagram(b"\x05\x00\x00\x00" + bytes(40), ADDR["a"], 1.0) is None
    assert b.receive_datagram(b"\x02\x00\x00\x00" + bytes(92), ADDR["a"], 1.0) is None
    assert b.drops["unknown_session"] == 2
    a = p.ep["a"]
    idx = a.peers[0].current.local if a.peers[0].current else 0
    forged = b"\x03\x00\x00\x00" + idx.to_bytes(4, "big") + bytes(56)
    new = ("198.19.9.9", 9)
    assert a.receive_datagram(forged, new, 1.0) is None
    assert a.drops["bad_cookie"] == 1 and a.endpoint(0) == ADDR["b"]  # never roams


def test_a_replayed_datagram_from_a_new_address_does_not_move_the_peer() -> None:
    p = Pair()
    p.up(0.0)
    assert p.send("a", b"one", 1.0)
    last = p.wire[-1][1]
    b = p.ep["b"]
    assert b.receive_datagram(last, ("198.19.3.3", 3333), 1.0) is None
    assert b.endpoint(0) == ADDR["a"] and b.drops["replay"] == 1
