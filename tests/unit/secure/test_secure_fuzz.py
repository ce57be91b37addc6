"""The fuzz command runs and finds nothing in a short run; a hypothesis property: whatever
sequence of hostile datagrams arrives between legitimate ones, nothing hostile delivers,
nothing raises, every legitimate datagram delivers exactly once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secure_pair import Pair

from bridge.fuzz.modes import ADDR_A, ADDR_B, exchange, fuzz, main, make_pair
from bridge.secure import Limits, SecurityMode
from bridge.secure.wire import TRANSPORT


@pytest.mark.parametrize("mode", [SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED])
def test_fuzz_short_run_finds_nothing(mode: SecurityMode) -> None:
    r = fuzz(3000, mode, seed=7)
    assert r["exceptions"] == 0, r["first_exception"]
    assert r["violations"] == 0, r["violation_examples"]
    assert r["legit_sent"] > 0 and r["legit_lost"] == 0
    assert sum(r["drops"].values()) > 1000


def test_fuzz_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--inputs", "200", "--mode", "encrypted"]) == 0
    assert "policy violations 0" in capsys.readouterr().out
    assert main(["--inputs", "200"]) == 0  # every mode, plain included
    out = capsys.readouterr().out
    assert all(f"{m}: 200 inputs" in out for m in ("plain", "authenticated", "encrypted"))


def test_fuzz_plain_mode_finds_nothing_and_can_find_something(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain mode (bridge/fuzz/plain.py): mutated GRE/IPIP with the peer's key are
    delivered (RFC 2890 §3), which is no finding; a Bridge that let a spoofed inner
    source through would be."""
    from bridge.fuzz.plain import fuzz_plain
    from bridge.peers import PeerTable

    r = fuzz_plain(4000, seed=3)
    assert r["exceptions"] == 0, r["first_exception"]
    assert r["violations"] == 0, r["violation_examples"]
    assert r["events"]["delivered_hostile_or_mutated"] > 0
    assert r["drops"]["spoofed_source"] > 0 and r["drops"]["unknown_peer"] > 0
    monkeypatch.setattr(PeerTable, "accept", lambda *a: -1)  # AllowedIPs broken on purpose
    r = fuzz_plain(4000, seed=3)
    assert r["violations"] > 0
    assert any("spoofed inner source" in v for v in r["violation_examples"])


_hostile = st.lists(
    st.one_of(
        st.binary(max_size=120),
        st.tuples(st.integers(0, 7), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
                  st.binary(max_size=64)).map(
            lambda t: TRANSPORT.pack(t[0], t[1], t[2]) + t[3]),
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 63)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from([SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED]),
       hostile=_hostile)
def test_hostile_datagrams_never_deliver_and_never_cost_legitimate_ones(
        mode: SecurityMode, hostile: list[object]) -> None:
    a, b, log = make_pair(mode)
    seen: list[bytes] = [d for _, d in log]
    now = 1.0
    for i, h in enumerate(hostile):
        now += 0.01
        payload = b"legit %d" % i
        dgram = a.seal(0, payload, now)
        assert dgram is not None
        seen.append(bytes(dgram))
        if isinstance(h, tuple):  # mutate something already seen: flip one bit of it
            base = bytearray(seen[h[0] % len(seen)])
            if base:
                base[h[1] % len(base)] ^= 1 << (h[2] % 8)
            data = bytes(base)
        else:
            assert isinstance(h, bytes)
            data = h
        assert b.receive_datagram(data, ADDR_A, now) is None or data == bytes(dgram)
        res = b.receive_datagram(dgram, ADDR_A, now)
        if data == bytes(dgram):
            assert res is None  # it was delivered already: this is a replay
        else:
            assert res is not None and bytes(res[1]) == payload
        assert b.endpoint(0) == ADDR_A
        b.datagrams_to_send(now)
    assert exchange(a, b, now) >= 0 and a.endpoint(0) == ADDR_B


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["a", "b", "tick", "drop", "restart"]),
                                st.floats(0.001, 40.0)), max_size=40))
def test_a_due_timer_always_finds_work(steps: list[tuple[str, float]]) -> None:
    """No busy loop: after handle_timer(t) at the deadline t, the next deadline is later.
    (A sans-I/O loop that sees get_timer() <= now and calls handle_timer must progress.)"""
    p = Pair(limits=Limits(rekey_after_time=30.0, reject_after_time=45.0))
    now = 0.0
    for action, dt in steps:
        now += dt
        for side in "ab":  # run every due timer at its deadline, checking progress
            for _ in range(1000):
                t = p.ep[side].get_timer()
                if t is None or t > now:
                    break
                p.ep[side].handle_timer(t)
                t2 = p.ep[side].get_timer()
                assert t2 is None or t2 > t, (side, t, t2)
                if action != "drop":
                    p.flush("a", t)
                    p.flush("b", t)
                else:
                    p.ep["a"].datagrams_to_send(t)
                    p.ep["b"].datagrams_to_send(t)
            else:
                raise AssertionError("timer loop did not settle")
        if action in "ab":
            p.send(action, b"data", now)
        elif action == "restart":
            p.restart("b", now)
