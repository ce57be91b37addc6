"""Control socket and metrics listener against slow and foreign clients (issue 12): one
deadline per client (CLIENT_TIMEOUT from accept to the answer), and the control socket
answers only uid 0 and the endpoint's own uid (SO_PEERCRED)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from bridge.io import control
from bridge.io.control import ControlServer, MetricsServer, _address, request
from bridge.io.metrics import io_prometheus


def _dribble(connect: socket.socket, stop: threading.Event) -> None:
    """A client sending one byte every 0.2 s, never a whole request, for 3 s at most (until
    `stop`, or cut)."""
    try:
        for _ in range(15):
            if stop.wait(0.2):
                break
            connect.send(b"x")
    except OSError:
        pass


@pytest.mark.parametrize("kind", ["control", "metrics"])
def test_a_dribbling_client_is_cut_at_one_deadline(kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "CLIENT_TIMEOUT", 0.6)
    srv: ControlServer | MetricsServer
    if kind == "control":
        srv = ControlServer(f"@grebe-test/dribble-{os.getpid()}")
        cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cl.connect(_address(srv.name))
    else:
        srv = MetricsServer("127.0.0.1:0", lambda: "grebe_x 1\n")
        cl = socket.create_connection(srv.address)
    stop = threading.Event()
    t = threading.Thread(target=_dribble, args=(cl, stop), daemon=True)
    t.start()
    try:
        srv.sock.setblocking(True)
        t0 = time.monotonic()
        srv.on_readable()  # the main thread: back after the deadline, not after the client
        held = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        cl.close()
        srv.close()
    print(f"{kind}: a client dribbling a byte every 0.2 s held the main thread {held:.2f} s")
    assert srv.stats == {"clients": 1, "timeouts": 1, "rejected": 0}
    assert held < 0.6 + 0.5  # one deadline (a timeout per recv: the client's 3 s)


def test_control_answers_only_root_and_its_own_uid() -> None:
    name = f"@grebe-test/uid-{os.getpid()}"
    srv = ControlServer(name)
    srv.register("status", lambda req: {"ok": True})
    assert srv.uids == {0, os.geteuid()}
    srv.sock.setblocking(True)
    try:
        t = threading.Thread(target=srv.on_readable, daemon=True)
        t.start()
        assert request(name, "status") == {"ok": True}  # our own uid (SO_PEERCRED)
        t.join()
        srv.uids = frozenset({os.geteuid() + 12345})  # as if we were another user
        t = threading.Thread(target=srv.on_readable, daemon=True)
        t.start()
        assert request(name, "status") == {"error": "permission denied"}
        t.join()
    finally:
        srv.close()
    assert srv.stats == {"clients": 2, "timeouts": 0, "rejected": 1}


def test_a_filesystem_control_socket_is_private(tmp_path: Path) -> None:
    path = str(tmp_path / "grebe.sock")
    srv = ControlServer(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_listener_counters_reach_the_metrics() -> None:
    text = io_prometheus({"io": {"control": {"clients": 3, "timeouts": 1, "rejected": 2},
                                 "metrics": {"clients": 4, "timeouts": 0, "rejected": 0}}})
    assert 'grebe_listener_timeouts_total{listener="control"} 1' in text
    assert 'grebe_listener_rejected_total{listener="control"} 2' in text
    assert 'grebe_listener_clients_total{listener="metrics"} 4' in text
