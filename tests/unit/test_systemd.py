"""contrib/systemd/grebe@.service and the sd_notify messages of `grebe up` (issue 13)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bridge.cli import config_path
from bridge.io.notify import notify, reloading

UNIT = Path(__file__).resolve().parents[2] / "contrib/systemd/grebe@.service"


def _unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_unit_is_notify_reloadable_and_unprivileged() -> None:
    u = _unit()
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["ExecStart"] == ["grebe up %i"]
    assert u["ExecReload"] == ["kill -HUP $MAINPID"]
    assert u["AmbientCapabilities"] == ["CAP_NET_ADMIN"] == u["CapabilityBoundingSet"]
    assert u["DynamicUser"] == ["yes"] and u["DeviceAllow"] == ["/dev/net/tun rw"]
    assert u["RestartPreventExitStatus"] == ["2"]   # bridge/cli.py EXIT_CONFIG


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / "grebe@x.service"
    unit.write_text(UNIT.read_text().replace("=grebe ", f"={shutil.which('true')} grebe ")
                    .replace("=kill ", f"={shutil.which('kill') or '/bin/kill'} "))
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                        capture_output=True, text=True, timeout=60)
    bad = [line for line in cp.stderr.splitlines() if str(unit) in line]
    assert not bad, cp.stderr


def test_notify_sends_one_datagram_to_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        assert notify("READY=1\nSTATUS=gb0: 1 peer(s)", {"NOTIFY_SOCKET": path})
        assert s.recv(4096) == b"READY=1\nSTATUS=gb0: 1 peer(s)"
        assert reloading({"NOTIFY_SOCKET": path})
        msg = s.recv(4096).decode().split("\n")
        assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:   # abstract "@name"
        s.bind(f"\0grebe-test-{id(s)}")
        s.settimeout(5)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": f"@grebe-test-{id(s)}"})
        assert s.recv(4096) == b"STOPPING=1"


def test_notify_without_a_manager_does_nothing(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_up_name_reads_etc_grebe() -> None:
    assert config_path("site-a") == "/etc/grebe/site-a.toml"
    assert config_path("./site-a") == "./site-a"
    assert config_path("gw.toml") == "gw.toml"


def test_up_without_a_file_or_with_a_missing_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge import cli

    monkeypatch.setattr(cli, "CONFIG_DIR", "/nonexistent-grebe-dir")
    assert cli.main(["up"]) == cli.EXIT_CONFIG
    assert cli.main(["up", "nosuch"]) == cli.EXIT_CONFIG   # /nonexistent-grebe-dir/nosuch.toml
    assert cli.config_path("nosuch") == "/nonexistent-grebe-dir/nosuch.toml"


def test_logs_on_the_journal_stream_carry_priorities_and_no_time(tmp_path: Path) -> None:
    """stderr is the journal's stream when $JOURNAL_STREAM names its device:inode
    (systemd.exec(5)): lines are "<prio>logger: message" (sd-daemon(3)); elsewhere timed."""
    import logging

    from bridge.io.notify import JournalFormatter, log_format

    f = tmp_path / "stream"
    f.write_text("")
    with f.open("w") as out:
        st = os.fstat(out.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        fmt = log_format(out.fileno(), env)
        assert isinstance(fmt, JournalFormatter)
        rec = logging.LogRecord("grebe.loop", logging.WARNING, __file__, 1, "peer b down\nx",
                                None, None)
        assert fmt.format(rec) == "<4>grebe.loop: peer b down\n<4>grebe.loop: x"
        rec.levelno = logging.INFO
        assert fmt.format(rec).startswith("<6>grebe.loop: ")
        other = log_format(out.fileno(), {"JOURNAL_STREAM": "1:2"})
        assert not isinstance(other, JournalFormatter)
        assert not isinstance(log_format(out.fileno(), {}), JournalFormatter)
