"""Issue 11 #8 and part of #7: SYN floods, half-open caps, SYN cookies, TIME-WAIT slots.

Each test names the defect it guards; all fail on the code before the fix (connect first,
no caps, no cookies, `max_splices` counting TIME-WAIT flows, timers walked per batch)."""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Any

from splice_harness import C_ADDR, S_ADDR, Harness, _Out, finished

from bridge.flows import InspectRule, SpliceLimits
from bridge.inspect.api import CloseReason
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.userspace.terminator import Terminator
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, RST, SYN, TcpSegment, parse_tcp

RULE = InspectRule(name="t", inspectors=())
SRV = ipaddress.ip_address("198.18.2.10").packed


def _term(limits: SpliceLimits | None = None, rule: InspectRule = RULE) -> tuple[Terminator,
                                                                                  list[bytes]]:
    up: list[bytes] = []
    mgr = InspectorManager(())
    mgr.chains[rule.name] = InspectorChain(rule, [])

    def to_peer(pkt: bytes, now: float, out: Any) -> bool:
        up.append(pkt)
        return True

    t = Terminator((rule,), to_peer, lambda d: 1440, lambda: 1440, manager=mgr, limits=limits)
    return t, up


def _src(i: int) -> bytes:
    """A spoofed source: 198.19.x.y, one /24 per 200 sources."""
    return ipaddress.ip_address(f"198.19.{i // 200}.{i % 200 + 1}").packed


def _syn(t: Terminator, src: bytes, port: int, isn: int, now: float, out: _Out) -> None:
    seg = TcpSegment(port, 80, isn, 0, SYN, 64240, b"", 0, 1400, 7, True, None)
    pkt = t.packet(src, SRV, seg)
    assert t.from_tun(pkt, len(pkt), now)
    t.flush(now, out)


def _answers(out: _Out, src: bytes) -> list[TcpSegment]:
    segs = []
    for p in out.tun:
        if bytes(p[16:20]) == src:
            s = parse_tcp(memoryview(p)[20:], SRV, src)
            assert s is not None
            segs.append(s)
    return segs


def test_a_syn_alone_never_reaches_the_server() -> None:
    """#8: accept first. The client leg answers the SYN; nothing goes upstream until the
    client completes its handshake, and then the server leg's SYN carries the client's ISN."""
    t, up = _term()
    out = _Out()
    src = _src(0)
    _syn(t, src, 40000, 1000, 0.0, out)
    (synack,) = _answers(out, src)
    assert synack.flags == SYN | ACK and synack.ack == 1001
    assert up == []                                   # no upstream SYN for a lone SYN
    assert t.status()["half_open"] == 1
    ack = TcpSegment(40000, 80, 1001, (synack.seq + 1) & 0xFFFFFFFF, ACK, 502)
    pkt = t.packet(src, SRV, ack)
    t.from_tun(pkt, len(pkt), 0.01)
    t.flush(0.01, out)
    (syn,) = [parse_tcp(memoryview(p)[20:], src, SRV) for p in up]
    assert syn is not None and syn.flags == SYN and syn.seq == 1000
    assert t.status()["half_open"] == 0


def test_refusing_server_resets_the_accepted_client() -> None:
    """The documented trade-off of accept first: the client was accepted, the server then
    refuses: the client's connection is reset (CONNECT_FAILED), not refused."""
    h = Harness(RULE, [], server_cfg=None)
    assert h.run(lambda h: finished(h.client))
    kinds = h.client.kinds()
    assert kinds[0] == "Connected" and "ConnectionReset" in kinds
    assert h.term.ended == {CloseReason.CONNECT_FAILED.value: 1}


def test_half_open_cap_per_prefix_then_syn_cookies() -> None:
    """#8: past the per-prefix cap a SYN gets a stateless cookie (no splice); another
    prefix is unaffected; the cookie's ACK opens the splice with its client leg ESTABLISHED
    and only then a server leg."""
    t, up = _term(SpliceLimits(max_half_open_per_prefix=4))
    out = _Out()
    for i in range(4):
        _syn(t, _src(i), 41000 + i, 5000 + i, 0.0, out)
    assert len(t.splices) == 4 and t.admission.half_open == 4
    src = _src(4)  # same /24
    out.tun.clear()
    _syn(t, src, 42000, 777, 0.0, out)
    (cookie,) = _answers(out, src)
    assert cookie.flags == SYN | ACK and cookie.wscale is None and cookie.mss == 1400
    assert len(t.splices) == 4 and t.admission.counters["cookies_sent"] == 1
    assert t.table.lookup((4, src, SRV, 42000, 80)) is None   # nothing kept
    other = ipaddress.ip_address("198.18.77.5").packed          # another /24: stateful
    _syn(t, other, 43000, 9, 0.0, out)
    assert len(t.splices) == 5
    # a forged ACK (wrong cookie) is not accepted
    bad = TcpSegment(42000, 80, 778, (cookie.seq + 2) & 0xFFFFFFFF, ACK, 502)
    pkt = t.packet(src, SRV, bad)
    t.from_tun(pkt, len(pkt), 0.5)
    assert t.admission.counters["cookies_bad"] == 1 and len(t.splices) == 5
    # the real one, 70 s later (one counter period on), with data
    n_up = len(up)
    ack = TcpSegment(42000, 80, 778, (cookie.seq + 1) & 0xFFFFFFFF, ACK, 502, b"GET /")
    pkt = t.packet(src, SRV, ack)
    assert t.from_tun(pkt, len(pkt), 70.0)
    t.flush(70.0, out)
    sp = t.splices[(4, src, SRV, 42000, 80)]
    assert sp.client is not None and sp.client.state is State.ESTABLISHED
    assert sp.client.send_mss == 1400 and sp.client.info()["wscale"] is None
    assert t.admission.counters["cookies_accepted"] == 1
    syns = [parse_tcp(memoryview(p)[20:], src, SRV) for p in up[n_up:]]
    assert [s.flags for s in syns if s is not None] == [SYN]    # the server leg opens now


def test_a_cookie_expires_after_two_periods() -> None:
    t, _up = _term(SpliceLimits(max_half_open=0))
    out = _Out()
    src = _src(1)
    _syn(t, src, 42000, 777, 0.0, out)
    (cookie,) = _answers(out, src)
    ack = TcpSegment(42000, 80, 778, (cookie.seq + 1) & 0xFFFFFFFF, ACK, 502)
    pkt = t.packet(src, SRV, ack)
    t.from_tun(pkt, len(pkt), 130.0)
    assert not t.splices


def test_without_cookies_past_the_cap_is_refused_and_counted() -> None:
    t, _up = _term(SpliceLimits(max_half_open=2, syn_cookies=False))
    out = _Out()
    for i in range(3):
        _syn(t, _src(i), 41000 + i, 5000 + i, 0.0, out)
    assert len(t.splices) == 2
    assert t.drops["half_open_refused"] == 1
    assert _answers(out, _src(2))[0].flags & RST


def test_time_wait_holds_no_splice_slot() -> None:
    """#7: a closed flow whose legs linger in TIME-WAIT does not count against
    max_splices: the next connection gets a splice, not a RST."""
    h = Harness(RULE, [], server_data=b"x" * 1000, client_close=True, server_close=True,
                terminator_kw={"max_splices": 1, "msl": 30.0})
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    (sp,) = h.term.splices.values()
    assert sp.finished and State.TIME_WAIT in (sp.server.state, sp.client.state)  # type: ignore[union-attr]
    out = _Out()
    _syn(h.term, C_ADDR, 40001, 99, h.now, out)
    assert len(h.term.splices) == 2 and "too_many_splices" not in h.term.drops
    assert h.term.status()["time_wait"] == 1


class FloodHarness(Harness):
    """The harness, with spoofed sources' packets taken off the client's link."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.spoof_out: list[bytes] = []

    def _term_out(self) -> None:
        keep = []
        for p in self.out.tun:
            (keep if bytes(p[16:20]) == C_ADDR else self.spoof_out).append(p)
        self.out.tun[:] = keep
        super()._term_out()


def test_ten_thousand_abandoned_handshakes_leave_nothing_behind() -> None:
    """Issue 11 "must show": 10,000 connection attempts abandoned half-way (half reset after
    our SYN-ACK, half silent after their SYN), at 1,000/s from spoofed sources, while a real
    download runs: the download completes byte-exact, the server sees exactly one
    connection, and once the timeouts ran no splice, timer, half-open entry or flow-table
    entry is left."""
    down = os.urandom(3_000_000)
    h = FloodHarness(RULE, [], server_data=down, client_close=True, server_close=True)
    h.t2c.rate = h.c2t.rate = 1.0e6   # a slow client: the download spans the flood
    rng = random.Random(11)
    t = h.term
    for i in range(10_000):
        at = i / 1000.0
        if h.now < at:
            h.run(lambda h, at=at: h.now >= at, max_time=at + 1)
        src = _src(i)
        port = 1024 + i % 60000
        isn = rng.getrandbits(32)
        h.now = max(h.now, at)
        _syn(t, src, port, isn, h.now, h.out)
        if i % 2 == 0:   # the client resets after our SYN-ACK (RFC 9293 §3.10.7.4)
            rst = TcpSegment(port, 80, (isn + 1) & 0xFFFFFFFF, 0, RST, 0)
            pkt = t.packet(src, SRV, rst)
            if not t.from_tun(pkt, len(pkt), h.now):
                pass  # a cookie-answered one: no state here, the RST goes its way
            t.flush(h.now, h.out)
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server),
                 max_time=120)
    assert bytes(h.client.rx) == down
    assert len(h.server_syns) == 1              # the flood never reached the server
    st = t.status()
    assert st["admission"]["half_open_peak"] <= t.limits.max_half_open
    assert st["admission"]["cookies_sent"] > 0
    assert st["admission"]["capped_half_open_total"] > 0
    # the timeouts: SYN-ACK retries (~63 s), TIME-WAIT, the flow table's idle expiry
    h.run(lambda h: False, max_time=h.now + 700)
    assert t.splices == {} and t.admission.half_open == 0
    assert len(t._deadlines) == 0 and len(t._idle) == 0 and not t._done
    assert len(t.table) == 0 and t.get_timer() is None
    assert t.ended.get(CloseReason.CLIENT_RESET.value, 0) > 4000
    assert h.server is not None and h.server.conn.state is State.CLOSED


def test_client_leg_silent_after_syn_gives_up_after_synack_retries() -> None:
    t, up = _term()
    out = _Out()
    _syn(t, _src(3), 40000, 1, 0.0, out)
    now = 0.0
    while (nt := t.get_timer()) is not None and nt < 200:
        now = nt
        t.handle_timer(now, out)
    assert not t.splices and up == [] and 60 < now < 70   # 5 retries: 1+2+4+8+16+32 s


def test_per_rule_connect_first_keeps_the_deferred_accept() -> None:
    rule = InspectRule(name="t", inspectors=(), connect_first=True)
    t, up = _term(rule=rule)
    out = _Out()
    _syn(t, _src(0), 40000, 1000, 0.0, out)
    assert len(up) == 1 and _answers(out, _src(0)) == []


def test_idle_timeout_is_the_rules_and_long_by_default() -> None:
    """#10: the rule's idle_timeout applies (default 2 h), not a fixed 300 s."""
    h = Harness(RULE, [], server_data=b"hi")
    assert h.run(lambda h: len(h.client.rx) == 2)
    (sp,) = h.term.splices.values()
    assert sp.idle_timeout == 7200.0
    h.run(lambda h: False, max_time=600)
    assert not sp.finished
    h2 = Harness(InspectRule(name="t", inspectors=(), idle_timeout=30.0), [], server_data=b"hi")
    assert h2.run(lambda h: finished(h.client), max_time=100)
    assert h2.term.counters["idle_aborts"] == 1


def test_keepalive_detects_a_dead_client_and_resets_the_server() -> None:
    """#10: a client that vanished without a FIN is found by the client leg's keep-alives
    (2 h idle, 9 probes 75 s apart) and the server leg is reset, before the idle timeout."""
    h = Harness(InspectRule(name="t", inspectors=(), idle_timeout=86400.0), [],
                server_data=b"hi", server_cfg=TcpConfig(msl=1.0))
    assert h.run(lambda h: len(h.client.rx) == 2)
    h.run(lambda h: False, max_time=h.now + 1.0)  # every byte acknowledged, all quiet
    h.t2c.loss = h.c2t.loss = 1.0  # the client host is gone: nothing in, nothing out
    assert h.run(lambda h: h.server is not None and finished(h.server), max_time=9000)
    assert 7200 < h.now < 7200 + 10 * 75 + 60
    assert h.term.ended == {CloseReason.CLIENT_RESET.value: 1}


def test_userspace_limits_are_configurable_and_counted_in_status_and_metrics() -> None:
    """`max_splices` was fixed at 10,000: `[userspace]` sets it and the half-open caps; the
    admission counters reach `grebe status` (Bridge.status) and the metrics text."""
    import pytest
    from test_terminate_bridge import INSPECT, SITE

    from bridge.config import loads_config
    from bridge.errors import ConfigErrors
    from bridge.pipeline import Bridge

    site = SITE.format(side="a", tun4="198.18.100.1/30", tun6="2001:db8:100::1/64",
                       listen="198.18.0.1", endpoint="198.18.0.2", seq="off",
                       prefixes='"198.18.20.0/24"')
    cfg = loads_config(site + INSPECT + "[userspace]\nmax_splices = 3\nmax_half_open = 0\n"
                       "prefix4 = 16\n")
    assert cfg.userspace == SpliceLimits(max_splices=3, max_half_open=0, prefix4=16)
    b = Bridge(cfg, 0.0)
    assert b.terminator is not None and b.terminator.max_splices == 3
    t = b.terminator
    out = _Out()
    _syn(t, _src(0), 40000, 1, 0.0, out)   # past max_half_open = 0: a cookie
    assert b.status(0.0)["inspect"]["admission"]["cookies_sent"] == 1
    text = b.metrics_text()
    assert 'grebe_inspect_events_total{event="cookies_sent"} 1' in text
    assert "grebe_inspect_half_open 0" in text
    with pytest.raises(ConfigErrors) as e:
        loads_config(site + "[userspace]\nprefix6 = 129\nmax_splice = 1\n")
    paths = {err.path for err in e.value.errors}
    assert {"userspace.prefix6", "userspace.max_splice"} <= paths


def test_grebe_status_text_shows_the_userspace_backend() -> None:
    from bridge.ctl import format_status as cli_status

    t, _up = _term(SpliceLimits(max_half_open=0))
    _syn(t, _src(0), 40000, 1, 0.0, _Out())
    text = cli_status({"inspect": t.status()})
    assert "inspect (userspace): live=0 half_open=0" in text
    assert "cookies_sent=1" in text


def test_time_wait_reuse_needs_a_newer_syn_rfc6191() -> None:
    """#7: a SYN on the 4-tuple of an ended flow replaces it only when it is newer (TSval
    above TS.Recent, RFC 6191; or ISN beyond the old sequence space): an old duplicate SYN
    must not end the TIME-WAIT protection (it used to: any other ISN was taken)."""
    h = Harness(RULE, [], server_data=b"x", client_close=True, server_close=True,
                terminator_kw={"msl": 60.0})
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    (old,) = h.term.splices.values()
    assert old.finished and old.client is not None
    recent = old.client._rcv.ts_recent   # (the private field: the test also runs on old code)
    assert recent is not None
    port = h.client.conn.local[1]
    out = _Out()
    stale = TcpSegment(port, 80, 12345, 0, SYN, 64240, b"", 0, 1400, 7, True,
                       ((recent - 1000) & 0xFFFFFFFF, 0))
    pkt = h.term.packet(C_ADDR, S_ADDR, stale)
    h.term.from_tun(pkt, len(pkt), h.now)
    h.term.flush(h.now, out)
    assert list(h.term.splices.values()) == [old]          # still the old, lingering one
    fresh = stale._replace(ts=((recent + 1000) & 0xFFFFFFFF, 0))
    pkt = h.term.packet(C_ADDR, S_ADDR, fresh)
    h.term.from_tun(pkt, len(pkt), h.now)
    h.term.flush(h.now, out)
    (new,) = h.term.splices.values()
    assert new is not old and new.syn.ts == fresh.ts
    assert old.client.ts_recent == recent


def test_connect_first_parses_and_is_refused_on_a_kernel_rule() -> None:
    import pytest

    from bridge.errors import ConfigError, ConfigErrors
    from bridge.inspect.rules import parse_rules

    (r,) = parse_rules([{"name": "a", "inspectors": ["log"], "connect_first": True}])
    assert r.connect_first is True
    assert parse_rules([{"name": "a", "inspectors": ["log"]}])[0].connect_first is False
    for bad in ({"connect_first": "yes"}, {"connect_first": True, "backend": "kernel"}):
        with pytest.raises((ConfigError, ConfigErrors)) as e:
            parse_rules([{"name": "a", "inspectors": ["log"], **bad}])
        assert "inspect[0].connect_first" in str(e.value)
