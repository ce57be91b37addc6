"""`grebe flows`: the control command a running endpoint answers, and the printed table."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from test_terminate_bridge import World

from bridge.io.fake import MemoryNet, MemoryTun
from bridge.io.flows import attach, format_flows
from bridge.io.loop import Engine
from bridge.pipeline import Output
from stack.events import ConnectionReset
from stack.state import State


class _Ctl:
    def __init__(self) -> None:
        self.commands: dict[str, Any] = {}

    def register(self, name: str, fn: Any) -> None:
        self.commands[name] = fn


def _engine(w: World, tun: MemoryTun | None = None) -> tuple[Engine, MemoryTun, MemoryNet]:
    """The real Engine over the in-memory fakes, on the World's Bridge A and clock."""
    tun, net = tun or MemoryTun("a"), MemoryNet()
    return Engine(w.a, tun, net.endpoint("198.18.0.1"), lambda: w.now), tun, net


class _SlowTun(MemoryTun):
    """A TUN whose write takes a while before the packets land (as a 64 KB GSO write
    does): two threads writing at once would interleave."""

    def write_packets(self, packets: Any) -> int:
        time.sleep(0.0002)
        return super().write_packets(packets)


def test_flows_command_table_and_shutdown() -> None:
    w = World(80)
    assert w.run(lambda: w.server.state is State.ESTABLISHED)
    w.server.send(b"secret" * 1000)
    assert w.run(lambda: len(w.client_rx) >= 6000)
    (eng, tun, net), ctl = _engine(w), _Ctl()
    detach = attach(eng, ctl, interval=3600)
    answer = ctl.commands["flows"]({})
    json.dumps(answer)      # JSON-able for the control socket
    (f,) = answer["flows"]
    assert f["dst"] == "198.18.20.7" and f["server_leg"]["bytes_in"] == 6000
    text = format_flows(answer)
    assert "198.18.10.5:40001" in text and "198.18.20.7:80" in text
    assert "client leg: ESTABLISHED" in text and "ReplaceInspector" in text
    detach()    # shutdown: every live flow is reset toward both sides
    assert tun.written and net.log  # the client's RST into the TUN, the server's to B
    w.client.receive_segment(_tcp(tun.written[0]), w.now)
    events = list(iter(w.client.next_event, None))
    assert any(isinstance(e, ConnectionReset) for e in events), events


def _tcp(pkt: Any) -> Any:
    from test_terminate_bridge import tcp_of

    return tcp_of(bytes(pkt))


def test_attach_without_terminator_is_a_no_op() -> None:
    w = World(80)
    w.a.terminator = None
    ctl = _Ctl()
    attach(_engine(w)[0], ctl)()
    assert "flows" not in ctl.commands


def test_tun_writes_leave_in_core_order_from_every_thread() -> None:
    """An Engine whose Bridge terminates flows keeps the TUN writes in core order: three
    threads run the core in turn (the lock orders them) and each call's TUN output goes to
    the TUN in that order, through the udp->tun writer or inline (bridge/io/loop.py
    `_tun_in_order`)."""
    w = World(80)
    for writers in (True, False):
        eng, tun, _net = _engine(w, _SlowTun("a"))
        if writers:
            eng.start_writers()
        counter = iter(range(10**9))

        def produce(eng: Engine = eng, counter: Any = counter) -> None:
            for i in range(150):
                n = 1 + i % 7  # small batches go inline, larger ones to the writer

                def core(_now: float, out: Output, n: int = n) -> None:
                    out.tun.extend(next(counter).to_bytes(4, "big") for _ in range(n))

                eng.call_core(core)

        threads = [threading.Thread(target=produce) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        eng.stop_writers()  # finishes what is queued
        seq = [int.from_bytes(p, "big") for p in tun.written]
        assert seq == list(range(len(seq))) and len(seq) == 3 * sum(1 + i % 7 for i in range(150))
