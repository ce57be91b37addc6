"""`grebe reload` / SIGHUP (bridge/reload.py, bridge/cli.py reload_config): a bad file is
refused with its errors and the running configuration stays; a good one is compared key by
key, and what cannot be applied while running is named."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import cli
from bridge.config import loads_config
from bridge.io import live
from bridge.io.fake import MemoryTun
from bridge.reload import diff, plan, summary

BASE = """\
[tun]
name = "gb0"
[listen]
address = "198.18.0.1"
[[peers]]
name = "a"
endpoint = "198.18.0.2"
prefixes = ["198.18.20.0/24"]
key = 1
"""
RULE = '[[inspect]]\nname = "k"\nbackend = "kernel"\ndst_ports = [80]\ninspectors = ["log"]\n'


def test_diff_names_every_changed_key() -> None:
    old = loads_config(BASE)
    new = loads_config(BASE.replace("key = 1", "key = 2").replace("gb0", "gb1")
                       + '[[peers]]\nname = "c"\nendpoint = "198.18.0.3"\n'
                       'prefixes = ["198.18.30.0/24"]\n' + RULE)
    assert diff(old, new) == ["tun.name", "peers[c] (added)", "peers[a].key_in",
                              "peers[a].key_out", "inspect"]
    assert diff(old, old) == []
    assert plan(["inspect", "tun.name"], inspect_live=True) == (["inspect"], ["tun.name"])
    assert plan(["inspect"], inspect_live=False) == ([], ["inspect"])
    assert plan(["peers[a].keepalive", "peers[a].key_in", "peers[c] (added)", "mss_clamp",
                 "listen.port"], False) == (
        ["peers[a].keepalive", "peers[a].key_in", "peers[c] (added)", "mss_clamp"],
        ["listen.port"])
    assert plan(["peers[a].keepalive"], False, peers_live=False) == (
        [], ["peers[a].keepalive"])
    assert summary("f", [], []) == "f".join(["reload ", ": no change"])
    assert "NOT applied, restart to apply: tun.name" in summary("f", ["inspect"], ["tun.name"])


class _MemTun(MemoryTun):
    """A TUN without root: the kernel side is in memory (bridge/io/fake.py)."""

    bad_frames = 0
    write_errors = 0

    def __init__(self, name: str, **_kw: Any) -> None:
        super().__init__(name)

    def configure(self, *_a: Any) -> None:
        return None


class _Kernel:
    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1


def test_bad_file_is_refused_and_the_running_config_stays(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    running = loads_config(BASE + RULE)
    f.write_text(BASE.replace('"198.18.0.2"', '"2001:db8::2:4754"') + "colour = 1\n")
    answer, now = live.reload_config(str(f), running, _Kernel())
    assert answer["ok"] is False and now is running
    assert len(answer["errors"]) == 2 and "needs brackets" in answer["errors"][0]


def test_good_file_applies_kernel_rules_and_names_the_rest(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    f = tmp_path / "g.toml"
    running = loads_config(BASE + RULE)
    f.write_text(BASE.replace("key = 1", "key = 7") + RULE.replace("[80]", "[80, 443]"))
    k = _Kernel()
    caplog.set_level("INFO", logger="grebe")
    answer, now = live.reload_config(str(f), running, k)
    assert answer == {"ok": True, "applied": ["inspect"],
                      "needs_restart": ["peers[a].key_in", "peers[a].key_out"]}
    assert k.reloads == 1 and now.inspect != running.inspect and now.peers == running.peers
    assert any("NOT applied, restart to apply: peers[a].key_in" in r.getMessage()
               for r in caplog.records)
    # without a kernel backend nothing is applied, and the answer says so
    answer, now = live.reload_config(str(f), running, None)
    assert answer["applied"] == [] and "inspect" in answer["needs_restart"] and now is running
    # an unchanged file still has the kernel backend re-read its rules (SIGHUP as before)
    f.write_text(BASE + RULE)
    answer, now = live.reload_config(str(f), running, k)
    assert answer == {"ok": True, "applied": [], "needs_restart": []} and k.reloads == 2


def test_sighup_is_handled_by_a_running_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """`grebe up` (in-memory TUN, loopback UDP) tells systemd it is ready after setup, survives
    SIGHUP and logs the reload (RELOADING=1 then READY=1); SIGTERM stops it with exit 0."""
    from bridge.io import tun as tun_mod

    monkeypatch.setattr(tun_mod, "TunDevice", _MemTun)
    monkeypatch.setenv("GREBE_SPLIT", "0")
    f = tmp_path / "g.toml"
    f.write_text(BASE.replace('address = "198.18.0.1"', 'address = "127.0.0.1"\nport = 47541')
                 .replace('name = "gb0"', 'name = "gbhup0"'))
    caplog.set_level("INFO", logger="grebe")

    def signals() -> None:
        def logged(word: str) -> bool:
            return any(word in r.getMessage() for r in caplog.records)

        def reloading() -> bool:  # SIGHUP's reload runs on a thread of its own (cli.py)
            return any(t.name == "reload" for t in threading.enumerate())

        for word, sig in (("grebe up:", signal.SIGHUP), ("no change", signal.SIGTERM)):
            deadline = time.monotonic() + 10
            while (not logged(word) or reloading()) and time.monotonic() < deadline:
                threading.Event().wait(0.02)
            os.kill(os.getpid(), sig)

    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # systemd's end
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    t = threading.Thread(target=signals, daemon=True)
    t.start()
    try:
        assert cli.main(["up", "-c", str(f), "--no-offload"]) == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    t.join(5)
    assert any("SIGHUP: reloading" in r.getMessage() for r in caplog.records)
    with manager:
        got = [manager.recv(4096).decode().split("\n")[0] for _ in range(4)]
    assert got == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


class _Engine:
    """The part of bridge/io/loop.py Engine a reload uses: the Bridge, `apply`, `clock`,
    no UDP->TUN process, no eBPF fast path."""

    sibling = None
    fast_path = None

    def __init__(self, bridge: Any) -> None:
        from bridge.io.warm import Warmer

        self.bridge = bridge
        self.applied = 0
        self.warmer = Warmer(bridge)

    def clock(self) -> float:
        return 7.0

    def apply(self, change: Any) -> Any:
        self.applied += 1
        return change()


class _Routes:
    """The TUN's route calls (bridge/io/tun.py update_routes, set_mtu)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def update_routes(self, add: list[str], remove: list[str]) -> None:
        self.calls.append((add, remove))

    def set_mtu(self, mtu: int) -> None:
        self.calls.append(([f"mtu {mtu}"], []))


def test_peer_changes_are_applied_and_the_rest_named(tmp_path: Path) -> None:
    """A key, liveness and prefix change of a running peer and an added peer are applied
    (bridge/reconfig.py), routes follow; what needs a restart (the TUN name) is named."""
    from bridge.config import DownAction
    from bridge.pipeline import Bridge

    running = loads_config(BASE)
    bridge = Bridge(running, 0.0)
    bridge.heard(bridge.peers[0], 5.0)
    bridge.counters.rx_bytes[0] += 99
    f = tmp_path / "g.toml"
    f.write_text(BASE.replace('key = 1', 'key = 2\nkeepalive = 1\ndead_after = 4\n'
                              'down_action = "withdraw"').replace('name = "gb0"', 'name = "gb9"')
                 .replace('"198.18.20.0/24"', '"198.18.20.0/24", "198.18.21.0/24"')
                 + '[[peers]]\nname = "c"\nendpoint = "198.18.0.3"\nprefixes = ["0.0.0.0/0"]\n')
    engine, routes = _Engine(bridge), _Routes()

    class _Udp:
        mark = 0

        def set_mark(self, mark: int) -> None:
            self.mark = mark

    udp = _Udp()
    answer, now = live.reload_config(str(f), running, None, engine, routes, [udp, None])
    assert udp.mark == 4754   # the first /0: grebe's datagrams skip the full tunnel
    assert answer["applied"] == ["peers[c] (added)", "peers[a].prefixes", "peers[a].key_in",
                                 "peers[a].key_out", "peers[a].keepalive",
                                 "peers[a].dead_after", "peers[a].down_action"]
    assert answer["needs_restart"] == ["tun.name"] and engine.applied == 1
    peer = bridge.peers[0]
    assert (peer.keepalive, peer.dead_after, peer.withdraw, peer.key_in) == (1.0, 4.0, True, 2)
    assert peer.last_rx == 7.0 and bridge.counters.rx_bytes[0] == 99  # renewed: new key
    assert [p.name for p in bridge.peers] == ["a", "c"]
    assert [p.name for p in engine.warmer._t.peers] == ["a", "c"]   # keep-warm's shadows
    assert routes.calls == [(["0.0.0.0/0", "198.18.21.0/24"], [])]
    assert now.tun.name == "gb0" and now.peers[0].key_in == 2   # what runs
    assert now.peers[0].down_action is DownAction.WITHDRAW
    # the same file again: nothing left to apply but the TUN name
    answer, again = live.reload_config(str(f), now, None, engine, routes)
    assert answer["applied"] == [] and answer["needs_restart"] == ["tun.name"]
    assert engine.applied == 1
    # a peer removed: its route goes
    f.write_text(BASE)
    answer, now = live.reload_config(str(f), again, None, engine, routes)
    assert "peers[c] (removed)" in answer["applied"]
    assert routes.calls[-1] == ([], ["0.0.0.0/0", "198.18.21.0/24"])
    assert [p.name for p in bridge.peers] == ["a"] and bridge.peers[0].key_in == 1


def test_secure_peers_change_live_but_the_first_needs_a_restart(tmp_path: Path) -> None:
    """Secure peers are renumbered and rekeyed live (bridge/reconfig.py; their sessions:
    tests/unit/io/test_loop_secure.py); the first secure peer of an endpoint started without
    one needs the secure socket: a restart."""
    from bridge.pipeline import Bridge
    from bridge.secure.keys import write_private_key

    pub = write_private_key(str(tmp_path / "b.key"))
    write_private_key(str(tmp_path / "a.key"))
    plain = '[[peers]]\nname = "p"\nendpoint = "198.18.0.3"\nprefixes = ["198.18.30.0/24"]\n'
    head = '[tun]\nname = "gs0"\n[listen]\naddress = "198.18.0.1"\n'
    secure = (f'[[peers]]\nname = "s"\nendpoint = "198.18.0.2"\nprefixes = ["198.18.20.0/24"]\n'
              f'security = "encrypted"\nprivate_key_file = "{tmp_path / "a.key"}"\n'
              f'public_key = "{pub}"\n')
    f = tmp_path / "g.toml"
    running = loads_config(head + plain)
    bridge = Bridge(running, 0.0)
    f.write_text(head + plain + secure)
    answer, after = live.reload_config(str(f), running, None, _Engine(bridge))
    assert answer["applied"] == [] and answer["needs_restart"] == ["peers[s] (added)"]
    assert after is running and len(bridge.peers) == 1
    running = loads_config(head + secure)
    bridge = Bridge(running, 0.0)
    state = bridge.peers[0]
    f.write_text(head + plain + secure.replace(pub, write_private_key(str(tmp_path / "c.key"))))
    answer, after = live.reload_config(str(f), running, None, _Engine(bridge))
    assert answer["needs_restart"] == [] and "peers[s].security" in answer["applied"]
    assert [p.name for p in bridge.peers] == ["p", "s"] and bridge.peers[1] is not state
    assert bridge.secure is not None and bridge.secure.ep.peers[1].name == "s"
