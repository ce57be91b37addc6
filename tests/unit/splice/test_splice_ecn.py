"""Issue 11 #10: ECN (RFC 3168) carried by the splice. The client leg negotiates it with the
client only if the client asked (§6.1.1), the server leg asks the server only if the client
did; each leg that has it marks its new data ECT(0) in the IP header, echoes the CE marks
of its own path and reduces its window on an echo. Counters reach status and metrics, and
`grebe flows` shows it per leg."""

from __future__ import annotations

import os
from typing import Any

from splice_harness import TUN_MTU, Harness, Link, finished

from bridge.flows import InspectRule
from bridge.io.flows import format_flows
from bridge.userspace.bounds import prometheus
from bridge.userspace.legwire import ecn_of
from stack.tcp_config import TcpConfig
from stack.wire.tcp import CWR, ECE, SYN

RULE = InspectRule(name="t", inspectors=())
CLIENT_ECN = TcpConfig(mss=TUN_MTU - 40, msl=1.0, ecn=True)
SERVER_ECN = TcpConfig(msl=1.0, ecn=True)  # accepts ECN when asked (as Linux tcp_ecn=2)


def tap(link: Link) -> list[tuple[int, int, int]]:
    """Record (TCP flags, payload length, IP ECN field) of every packet put on `link`."""
    seen: list[tuple[int, int, int]] = []
    put = link.put

    def wrapped(pkt: bytes, now: float) -> None:
        ihl = (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40
        hl = (pkt[ihl + 12] >> 4) * 4
        seen.append((pkt[ihl + 13], len(pkt) - ihl - hl, ecn_of(pkt)))
        put(pkt, now)

    link.put = wrapped  # type: ignore[method-assign]
    return seen


def download(client_cfg: TcpConfig, server_cfg: TcpConfig, size: int = 400_000,
             **kw: Any) -> tuple[Harness, bytes, list[tuple[int, int, int]],
                                 list[tuple[int, int, int]]]:
    data = os.urandom(size)
    h = Harness(RULE, [], client_cfg=client_cfg, server_cfg=server_cfg, server_data=data,
                client_close=True, server_close=True, **kw)
    to_client, to_server = tap(h.t2c), tap(h.t2s)
    return h, data, to_client, to_server


def legs(h: Harness) -> tuple[Any, Any]:
    (sp,) = h.term.splices.values()
    return sp.client, sp.server


def test_ecn_is_negotiated_on_both_legs_when_the_client_asks() -> None:
    h, data, to_client, to_server = download(CLIENT_ECN, SERVER_ECN)
    assert h.run(lambda h: len(h.client.rx) > 0)
    client_leg, server_leg = legs(h)
    assert client_leg.ecn and server_leg.ecn and h.client.conn.ecn
    assert h.server is not None and h.server.conn.ecn
    # §6.1.1 on the wire: the client leg's SYN-ACK has ECE alone, the server leg's SYN
    # ECE and CWR; neither SYN is ECT.
    synack = [f for f, _n, e in to_client if f & SYN]
    syn = [f for f, _n, e in to_server if f & SYN]
    assert synack and all(f & (ECE | CWR) == ECE for f in synack)
    assert syn and all(f & (ECE | CWR) == ECE | CWR for f in syn)
    assert all(e == 0 for f, _n, e in to_client + to_server if f & SYN)
    flows = h.term.flows(h.now)
    assert flows[0]["client_leg"]["ecn"] is True and flows[0]["server_leg"]["ecn"] is True
    assert " ecn " in format_flows({"flows": flows})
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    assert bytes(h.client.rx) == data
    # the client leg's data went out ECT(0), its pure ACKs toward the server did not
    data_out = [e for _f, n, e in to_client if n]
    assert data_out and all(e == 2 for e in data_out)
    assert all(e == 0 for _f, n, e in to_server if not n)


def test_the_server_leg_does_not_ask_when_the_client_did_not() -> None:
    h, data, to_client, to_server = download(TcpConfig(mss=TUN_MTU - 40, msl=1.0), SERVER_ECN)
    assert h.run(lambda h: len(h.client.rx) > 0)
    client_leg, server_leg = legs(h)
    assert not client_leg.ecn and not server_leg.ecn
    syn = [f for f, _n, e in to_server if f & SYN]
    assert syn and all(not f & (ECE | CWR) for f in syn)
    synack = [f for f, _n, e in to_client if f & SYN]
    assert synack and all(not f & ECE for f in synack)
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    assert bytes(h.client.rx) == data
    assert all(e == 0 for _f, _n, e in to_client + to_server)


def test_a_server_that_refuses_leaves_the_server_leg_without_ecn() -> None:
    h, data, to_client, _ = download(CLIENT_ECN, TcpConfig(msl=1.0))
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    assert bytes(h.client.rx) == data
    assert h.term.status()["counters"]["ecn_legs"] == 1  # the client leg only
    assert [e for _f, n, e in to_client if n] and all(e == 2 for _f, n, e in to_client if n)


def test_connect_first_mirrors_the_servers_refusal_to_the_client() -> None:
    rule = InspectRule(name="t", inspectors=(), connect_first=True)
    h = Harness(rule, [], client_cfg=CLIENT_ECN, server_cfg=TcpConfig(msl=1.0),
                server_data=b"x" * 1000, client_close=True, server_close=True)
    assert h.run(lambda h: len(h.client.rx) == 1000)
    client_leg, server_leg = legs(h)
    assert not server_leg.ecn and not client_leg.ecn and not h.client.conn.ecn
    # The client leg's settings without ECN are the Terminator's cached ones, not a copy
    # made for each splice.
    (key,) = h.term.splices
    assert client_leg.config is h.term.client_config_without_ecn(key, rule)
    assert not client_leg.config.ecn


def test_ce_marks_on_each_path_are_echoed_by_that_leg_and_counted() -> None:
    """CE marks made on the server's path reach the server leg, which echoes them so that
    the server halves its window; the marks on the client's path make the client echo and
    the client leg halve its window. The download stays byte-exact, nothing resent."""
    h, data, _, _ = download(CLIENT_ECN, SERVER_ECN, size=2_000_000)
    h.s2t.mark = h.t2c.mark = 0.02
    assert h.run(lambda h: h.server is not None and finished(h.client) and finished(h.server))
    assert bytes(h.client.rx) == data
    assert h.s2t.marked and h.t2c.marked
    assert h.server is not None
    assert h.server.conn.ecn_cuts > 0 and h.server.conn.retransmissions == 0
    assert h.client.conn.ce_marks == h.t2c.marked
    c = h.term.status()["counters"]
    assert c["ecn_legs"] == 2
    assert c["ce_marks"] == h.s2t.marked  # the server leg's (the client leg's path: client)
    assert c["ecn_cuts"] > 0  # the client leg's reductions for the client's echoes
    text = prometheus(h.term.status())
    assert 'grebe_inspect_events_total{event="ce_marks"}' in text
    assert 'grebe_inspect_events_total{event="ecn_cuts"}' in text


def test_connect_first_without_ecn_asked_reuses_the_cached_settings() -> None:
    """A client that does not ask for ECN (Linux's default, tcp_ecn = 2): its connect-first
    client leg takes the Terminator's cached settings too, not a copy per splice."""
    rule = InspectRule(name="t", inspectors=(), connect_first=True)
    h = Harness(rule, [], client_cfg=TcpConfig(msl=1.0), server_cfg=TcpConfig(msl=1.0),
                server_data=b"x" * 1000, client_close=True, server_close=True)
    assert h.run(lambda h: len(h.client.rx) == 1000)
    client_leg, _server_leg = legs(h)
    (key,) = h.term.splices
    assert client_leg.config is h.term.client_config_without_ecn(key, rule)
