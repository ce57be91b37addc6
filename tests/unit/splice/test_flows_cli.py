"""`grebe flows`: the control command a running endpoint answers, and the printed table."""

from __future__ import annotations

import json
import threading
from typing import Any

from test_terminate_bridge import World

from bridge.io.flows import attach, format_flows
from bridge.pipeline import Output
from stack.events import ConnectionReset
from stack.state import State


class _Ctl:
    def __init__(self) -> None:
        self.commands: dict[str, Any] = {}

    def register(self, name: str, fn: Any) -> None:
        self.commands[name] = fn


class _Engine:
    def __init__(self, w: World) -> None:
        self.bridge = w.a
        self.lock = threading.Lock()
        self.clock = lambda: w.now
        self._out_timer = Output()
        self.executed: list[Output] = []

    def _execute(self, out: Output) -> None:
        self.executed.append(out)


def test_flows_command_table_and_shutdown() -> None:
    w = World(80)
    assert w.run(lambda: w.server.state is State.ESTABLISHED)
    w.server.send(b"secret" * 1000)
    assert w.run(lambda: len(w.client_rx) >= 6000)
    eng, ctl = _Engine(w), _Ctl()
    detach = attach(eng, ctl, interval=3600)
    answer = ctl.commands["flows"]({})
    json.dumps(answer)      # JSON-able for the control socket
    (f,) = answer["flows"]
    assert f["dst"] == "198.18.20.7" and f["server_leg"]["bytes_in"] == 6000
    text = format_flows(answer)
    assert "198.18.10.5:40001" in text and "198.18.20.7:80" in text
    assert "client leg: ESTABLISHED" in text and "ReplaceInspector" in text
    detach()    # shutdown: every live flow is reset toward both sides
    out = eng.executed[0]
    assert out.tun and out.udp
    w.client.receive_segment(_tcp(out.tun[0]), w.now)
    events = list(iter(w.client.next_event, None))
    assert any(isinstance(e, ConnectionReset) for e in events), events


def _tcp(pkt: Any) -> Any:
    from test_terminate_bridge import tcp_of

    return tcp_of(bytes(pkt))


def test_attach_without_terminator_is_a_no_op() -> None:
    w = World(80)
    w.a.terminator = None
    ctl = _Ctl()
    attach(_Engine(w), ctl)()
    assert "flows" not in ctl.commands


class _OrderEngine(_Engine):
    """An engine with the loop's hook and writers: records what reaches the TUN."""

    def __init__(self, w: World, writer: bool) -> None:
        super().__init__(w)
        from bridge.io.loop import Writer

        self.tun = None
        self.under_lock: Any = None
        self._out_u = Output()
        self.written: list[bytes] = []
        self.writers = {id(self._out_u): Writer("test udp->tun")} if writer else {}

    def _write(self, pkts: list[bytes]) -> None:
        self.written.extend(pkts)


def test_tun_writes_leave_in_core_order_from_every_thread() -> None:
    """Two threads run the core in turn (the lock orders them) and each batch's TUN output
    goes through the hook under that lock: the TUN sees exactly the core's order."""
    w = World(80)
    for writer in (True, False):
        eng, ctl = _OrderEngine(w, writer), _Ctl()
        detach = attach(eng, ctl, interval=3600)
        assert eng.under_lock is not None
        counter = iter(range(10**9))

        def produce(eng: _OrderEngine = eng, counter: Any = counter) -> None:
            out = Output()
            for i in range(300):
                with eng.lock:
                    n = 1 + i % 7  # small batches go inline, larger ones to the writer
                    out.tun.extend(next(counter).to_bytes(4, "big") for _ in range(n))
                    eng.under_lock(out)
                    assert not out.tun

        threads = [threading.Thread(target=produce) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for wr in eng.writers.values():
            wr.stop()  # finishes what is queued
        seq = [int.from_bytes(p, "big") for p in eng.written]
        assert seq == list(range(len(seq))) and len(seq) == 3 * sum(1 + i % 7 for i in range(300))
        detach()


def test_attach_leaves_an_engine_without_the_hook_alone() -> None:
    w = World(80)
    eng = _Engine(w)
    attach(eng, _Ctl(), interval=3600)()
    assert not hasattr(eng, "under_lock")
