"""RFC 9438 CUBIC, the default congestion control; NewReno stays selectable."""

from __future__ import annotations

import pytest

from stack.congestion import NewReno
from stack.connection import TcpConnection
from stack.cubic import BETA, C, Cubic, make_cc
from stack.tcp_config import TcpConfig

SMSS = 1000


def _cubic_at(cwnd_segs: int) -> Cubic:
    cc = Cubic(SMSS)
    cc.cwnd = cwnd_segs * SMSS
    cc.ssthresh = cc.cwnd  # in congestion avoidance
    return cc


def test_cubic_is_the_default_and_newreno_selectable() -> None:
    a, b = (198, 18, 0, 1), (198, 18, 0, 2)
    conn = TcpConnection((bytes(a), 1), (bytes(b), 2), TcpConfig())
    assert type(conn._snd.cc) is Cubic
    conn = TcpConnection((bytes(a), 1), (bytes(b), 2), TcpConfig(congestion="newreno"))
    assert type(conn._snd.cc) is NewReno
    with pytest.raises(ValueError):
        TcpConfig(congestion="bbr")
    with pytest.raises(ValueError):
        make_cc("vegas", 1000)


def test_rfc9438_4_6_multiplicative_decrease_is_0_7() -> None:
    cc = _cubic_at(100)
    cc.sack = True
    for _ in range(3):
        retx = cc.on_dupack(snd_una=1, snd_max=1 + 100 * SMSS, flight=100 * SMSS)
    assert retx and cc.ssthresh == int(100 * SMSS * BETA) == cc.cwnd
    reno = NewReno(SMSS)
    reno.cwnd = reno.ssthresh = 100 * SMSS
    reno.sack = True
    for _ in range(3):
        reno.on_dupack(snd_una=1, snd_max=1 + 100 * SMSS, flight=100 * SMSS)
    assert reno.ssthresh == 50 * SMSS


def _grow(cc: Cubic, t0: float, until: float, rtt: float) -> float:
    """ACK a whole window once per RTT from t0 to `until`; return the time reached."""
    t = t0
    una = 1
    while t < until:
        per_ack = 2 * SMSS
        for _ in range(max(cc.cwnd // per_ack, 1)):
            una += per_ack
            cc.on_ack(per_ack, una, cc.cwnd, t, rtt)
        t += rtt
    return t


def test_rfc9438_4_2_concave_growth_back_to_w_max_at_k() -> None:
    """After a loss at 100 segments the window climbs back to W_max = 100 in about
    K = cbrt(W_max (1 - beta) / C) seconds and stays near it (the plateau), where Reno's
    one segment per RTT (at a 100 ms RTT) would still be far below."""
    cc = _cubic_at(100)
    cc.sack = True
    for _ in range(3):
        cc.on_dupack(snd_una=1, snd_max=1 + 100 * SMSS, flight=100 * SMSS)
    cc.on_ack(SMSS, 1 + 100 * SMSS, 0, 0.0, 0.1)  # full ACK: recovery ends
    assert cc.cwnd <= 71 * SMSS
    k = (100 * (1 - BETA) / C) ** (1 / 3)
    _grow(cc, 0.0, k - 0.1, 0.1)
    assert 95 * SMSS <= cc.cwnd <= 105 * SMSS
    _grow(cc, k, k + 1.0, 0.1)  # the plateau: slow growth around W_max
    assert cc.cwnd <= 110 * SMSS


def test_rfc9438_4_7_fast_convergence() -> None:
    cc = _cubic_at(100)
    cc.reduce(100 * SMSS)
    cc.cwnd = 80 * SMSS  # a second loss before the window regained W_max
    cc.reduce(80 * SMSS)
    assert cc.w_max == pytest.approx(80 * (1 + BETA) / 2)


def test_rule_key_congestion_selects_the_legs_algorithm() -> None:
    from bridge.errors import ConfigError
    from bridge.inspect.rules import parse_rules
    from bridge.userspace.terminator import Terminator

    (cubic,) = parse_rules([{"name": "a", "inspectors": ["log"]}])
    (reno,) = parse_rules([{"name": "b", "inspectors": ["log"], "congestion": "newreno"}])
    assert (cubic.congestion, reno.congestion) == ("cubic", "newreno")
    with pytest.raises(ConfigError) as e:
        parse_rules([{"name": "c", "inspectors": ["log"], "congestion": "bbr"}])
    assert e.value.path == "inspect[0].congestion"
    term = Terminator((cubic, reno), lambda p, n, o: True, lambda d: 1500, lambda: 1500)
    key = (4, bytes(4), bytes(4), 1, 80)
    assert {c.congestion for c in term.configs_for(key, cubic)} == {"cubic"}
    assert {c.congestion for c in term.configs_for(key, reno)} == {"newreno"}


def test_rfc9438_4_3_reno_friendly_alpha_is_1_once_w_est_regained_cwnd_prior() -> None:
    """A short lossy path (RTT 4 ms, the cubic curve K = 2.5 s away): after a loss at 20
    segments W_est climbs at alpha = 0.53 segments per RTT back to 20, then at Reno's 1
    (RFC 9438 §4.3 SHOULD); before, it stayed at 0.53."""
    cc = _cubic_at(20)
    cc.reduce(20 * SMSS)
    cc.cwnd = cc.ssthresh = 14 * SMSS
    t = _grow(cc, 0.0, 0.04, 0.004)  # 10 RTTs
    assert 18 * SMSS <= cc.cwnd <= 20 * SMSS  # ~0.53 a round: 14 + 5.3
    t = _grow(cc, t, 0.06, 0.004)
    assert cc.cwnd >= 20 * SMSS
    w = cc.cwnd
    _grow(cc, t, t + 0.04, 0.004)  # 10 more RTTs past cwnd_prior
    assert cc.cwnd - w >= 9 * SMSS  # one segment a round (0.53 would give ~5)
