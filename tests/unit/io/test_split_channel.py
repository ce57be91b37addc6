"""The secure channel of a split endpoint (bridge/io/split.py `_send` / `_drain`): messages
arrive whole and in order; forwarded handshakes are dropped, not waited for, when the
parent is behind, so a handshake flood cannot stall the child's data path; keys wait."""

from __future__ import annotations

import socket
import threading

from bridge.io.split import _drain, _send


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_messages_arrive_whole_and_in_order() -> None:
    a, b = _pair()
    msgs = [("K", [(0, ((7, b"k" * 32, 4, 1.0, 181.0, "n", True),), False)]),
            ("H", b"\x01" * 148, ("198.18.0.1", 24754)), ("C", 0, 7), ("R", 0, ("198.18.0.9", 1))]
    for m in msgs:
        assert _send(a, m)
    assert _drain(b) == msgs
    assert _drain(b) == []


def test_a_full_channel_drops_handshakes_but_keys_wait_for_room() -> None:
    a, b = _pair()
    sent = 0
    while _send(a, ("H", bytes(1000), ("198.18.0.1", 1)), block=False):
        sent += 1
        assert sent < 100_000
    assert sent > 0  # the channel filled up, and the last handshake was refused
    got: list[object] = []
    reader = threading.Timer(0.2, lambda: got.extend(_drain(b)))
    reader.start()
    assert _send(a, ("K", []))  # waits until the reader made room
    reader.join()
    got += _drain(b)
    assert len(got) == sent + 1 and got[-1] == ("K", [])
