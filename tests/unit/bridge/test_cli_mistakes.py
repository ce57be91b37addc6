"""Everyday mistakes end in one clear line and a non-zero exit, never a traceback (issue 13).

`grebe up` is driven with an in-memory TUN where a real one would need root; the UDP and
metrics sockets are real (loopback), so "in use" and "no such address" are the kernel's own.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from bridge import cli, ctl
from bridge.io import tun as tun_mod
from bridge.io.fake import MemoryTun

GOOD = """\
[tun]
name = "gbtest0"
[listen]
address = "{listen}"
port = {port}
[[peers]]
name = "b"
endpoint = "198.18.0.2"
prefixes = ["198.18.20.0/24"]
"""


class _Tun(MemoryTun):
    bad_frames = 0
    write_errors = 0

    def __init__(self, name: str, **_kw: Any) -> None:
        super().__init__(name)

    def configure(self, *_a: Any) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> tuple[int, list[str]]:
    f = tmp_path / "grebe.toml"
    f.write_text(text)
    rc = cli.main(["up", "-c", str(f), "--no-offload"])
    out = capsys.readouterr()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "Traceback" not in out.err + out.out
    return rc, lines


@pytest.fixture(autouse=True)
def _no_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREBE_SPLIT", "0")
    monkeypatch.setenv("GREBE_KEEP_WARM", "0")


def test_not_root_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str],
                              caplog: pytest.LogCaptureFixture) -> None:
    def denied(*_a: Any, **_kw: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/dev/net/tun")

    monkeypatch.setattr(tun_mod, "TunDevice", denied)
    rc, lines = _up(tmp_path, GOOD.format(listen="127.0.0.1", port=_free_port()), capsys,
                    caplog)
    assert rc == cli.EXIT_FAILED
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0] and "/dev/net/tun" in lines[0]


def test_metrics_port_in_use_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tun_mod, "TunDevice", _Tun)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = f'metrics_listen = "127.0.0.1:{port}"\n' \
            + GOOD.format(listen="127.0.0.1", port=_free_port())
        rc, lines = _up(tmp_path, text, capsys, caplog)
    assert rc == cli.EXIT_FAILED
    assert lines == [f"metrics_listen 127.0.0.1:{port}: address already in use "
                     "(another grebe, or another program?)"]


def test_listen_address_the_host_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str],
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tun_mod, "TunDevice", _Tun)
    rc, lines = _up(tmp_path, GOOD.format(listen="198.18.254.254", port=4754), capsys, caplog)
    assert rc == cli.EXIT_FAILED
    assert lines == ["listen 198.18.254.254 port 4754: this host has no such address"]


def test_missing_custom_inspector_is_a_config_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    text = GOOD.format(listen="127.0.0.1", port=4754) \
        + '[[inspect]]\nname = "x"\ninspectors = ["gone_i13:Nope"]\n'
    rc, lines = _up(tmp_path, text, capsys, caplog)
    assert rc == cli.EXIT_CONFIG
    assert len(lines) == 1 and "inspect[0].inspectors[0]: cannot load 'gone_i13:Nope'" in lines[0]


def test_check_config_and_up_exit_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("")
    assert cli.main(["check-config", str(f)]) == cli.EXIT_CONFIG
    rc, lines = _up(tmp_path, "", capsys, caplog)
    assert rc == cli.EXIT_CONFIG and "needs at least one peer" in lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("grebe ")


def test_status_json_error_exits_non_zero(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ctl, "ask", lambda _a, _c: {"error": "boom"})
    assert cli.main(["status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"error": "boom"}
    monkeypatch.setattr(ctl, "ask", lambda _a, _c: {"peers": []})
    assert cli.main(["status", "--json"]) == 0


def test_a_never_heard_peer_is_not_up() -> None:
    from bridge.config import loads_config
    from bridge.pipeline import Bridge

    b = Bridge(loads_config(GOOD.format(listen="198.18.0.1", port=4754)), 0.0)
    peer = b.status(1.0)["peers"][0]
    assert peer["up"] is False and peer["last_seen_s"] is None and peer["state"] == "waiting"
    assert 'grebe_peer_up{peer="b"} 0' in b.metrics_text()
    assert "never" in ctl.format_status(b.status(1.0))
