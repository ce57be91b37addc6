"""The kernel backend as `grebe up` runs it, without privileges (issue 4's loose ends).

Rule keys `iif` / `idle_timeout`, the drop rule's RST, TCP_INFO parsing, the idle timeout, the
status summary / Prometheus text / `grebe flows` table, and the backend on its own thread wired
to a control-socket command table, all on loopback (`transparent=False`, no nft).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from helpers_inspect import rule
from test_tproxy_relay import LoopbackBackend, port_of

from bridge.config import check_config, load_config
from bridge.ctl import format_status
from bridge.errors import ConfigError
from bridge.inspect.api import CloseReason
from bridge.inspect.rules import parse_rules
from bridge.kernel.info import (
    TCP_INFO_LEN,
    format_flows,
    parse_tcp_info,
    prometheus,
    summary,
    tcp_info,
)
from bridge.kernel.run import KernelBackendThread, needs_kernel_backend, start_for_config
from bridge.kernel.setup import TproxySettings, nft_ruleset

ROOT = Path(__file__).resolve().parents[3]

# --- rule keys ------------------------------------------------------------------------------


def test_iif_and_idle_timeout_parse_with_defaults() -> None:
    r = rule('backend = "kernel"\niif = ["lan0", "lan1"]\nidle_timeout = 2.5\ninspectors = ["log"]')
    assert r.iif == ("lan0", "lan1") and r.idle_timeout == 2.5
    assert rule('inspectors = ["log"]').idle_timeout == 7200.0  # RFC 9293 MUST-28: 2 h


@pytest.mark.parametrize(("body", "path"), [
    ('iif = ["lan0", "bad name"]', "inspect[0].iif[1]"),
    ('iif = ["x\\"; flush ruleset"]', "inspect[0].iif[0]"),    # nft text injection
    ('iif = ["abcdefghijklmnop"]', "inspect[0].iif[0]"),       # longer than IFNAMSIZ-1
    ("iif = \"lan0\"", "inspect[0].iif"),
    ("idle_timeout = 0", "inspect[0].idle_timeout"),
    ("idle_timeout = true", "inspect[0].idle_timeout"),
    ('idle_timeout = "5"', "inspect[0].idle_timeout"),
])
def test_bad_iif_and_idle_timeout_name_their_key_path(body: str, path: str) -> None:
    text = f'[[inspect]]\nname = "r"\nbackend = "kernel"\ninspectors = ["log"]\n{body}\n'
    with pytest.raises(ConfigError) as e:
        parse_rules(tomllib.loads(text)["inspect"])
    assert e.value.path == path


def test_check_config_reports_the_key_path(tmp_path: Path) -> None:
    base = (ROOT / "topologies/two-sites-inspect-kernel/gw-a.toml").read_text()
    bad = tmp_path / "gw-a.toml"
    bad.write_text(base.replace('iif = ["lan0"]', 'iif = ["lan 0"]'))
    assert base != bad.read_text()
    errors = check_config(str(bad))
    assert [e.path for e in errors] == ["inspect[0].iif[0]", "inspect[1].iif[0]"]  # every one


# --- nft: drop answers with an RST, per-rule iif --------------------------------------------


def test_drop_rule_rejects_with_tcp_reset_and_counts() -> None:
    rules = parse_rules(tomllib.loads("""
[[inspect]]
name = "web"
backend = "kernel"
iif = ["lan0"]
dst_ports = [80]
inspectors = ["log"]
[[inspect]]
name = "nope"
backend = "kernel"
action = "drop"
dst = ["198.18.2.10/32"]
dst_ports = [8088]
""")["inspect"])
    text = nft_ruleset(rules, TproxySettings(iifnames=("eth9",)))
    web = [ln for ln in text.splitlines() if ln.endswith("# rule web")]
    nope = [ln for ln in text.splitlines() if ln.endswith("# rule nope")]
    assert len(web) == 2 and all(ln.strip().startswith('iifname "lan0" ') for ln in web)
    assert len(nope) == 1       # v4 only: the rule has only a v4 prefix
    assert nope[0].strip().startswith('iifname "eth9" ')   # no rule iif: the settings' one
    assert 'counter name "rejected" reject with tcp reset  # rule nope' in nope[0]
    assert " drop " not in text and "counter rejected { }" in text


# --- TCP_INFO -------------------------------------------------------------------------------


def test_parse_tcp_info_fields_and_units() -> None:
    u32 = [0] * 24
    u32[0] = 204000         # rto µs
    u32[2] = 1448           # snd_mss
    u32[14] = 64000         # rcv_ssthresh (not reported)
    u32[15], u32[16] = 1500, 750   # rtt, rttvar µs
    u32[17], u32[18] = 2147483647, 10   # snd_ssthresh, snd_cwnd
    u32[23] = 3             # total_retrans
    raw = struct.pack("=8B24I4Q", 1, 0, 1, 0, 0, 0, 0, 0, *u32, 0, 0, 5000, 7000)
    assert len(raw) == TCP_INFO_LEN == 136
    info = parse_tcp_info(raw + b"\0" * 100)
    assert info is not None
    assert info["state"] == "ESTABLISHED" and info["rto"] == pytest.approx(0.204)
    assert info["srtt"] == pytest.approx(0.0015) and info["cwnd"] == 10 and info["mss"] == 1448
    assert info["retransmissions"] == 3 and info["retransmits_now"] == 1
    assert info["bytes_out"] == 5000 and info["bytes_in"] == 7000
    assert parse_tcp_info(raw[:100]) is None and parse_tcp_info(b"") is None
    bad_state = bytearray(raw)
    bad_state[0] = 200
    assert parse_tcp_info(bytes(bad_state))["state"] == "200"   # type: ignore[index]


def test_tcp_info_of_a_real_socket() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"x" * 1000)
    assert conn.recv(2000)
    info = tcp_info(conn)
    assert info is not None and info["state"] == "ESTABLISHED" and info["bytes_in"] >= 1000
    # a fresh loopback connection: the initial window (RFC 6928: 10 segments), ssthresh not
    # yet set (infinite), a loopback RTT, an RTO at Linux's 200 ms floor plus a little
    assert info["cwnd"] == 10 and info["ssthresh"] == 0x7FFFFFFF, info
    assert 0 < info["srtt"] < 0.05 and 0.2 <= info["rto"] < 1.0, info
    for s in (cli, conn, srv):
        s.close()
    assert tcp_info(cli) is None and tcp_info(None) is None


# --- summary, status, metrics ---------------------------------------------------------------


def test_summary_status_line_and_prometheus() -> None:
    counters = {"accepted": 7, "denied": 1, "client_reset": 1, "idle": 2, "closed": 3,
                "relay_errors": 1, "bytes_c2s": 100, "bytes_s2c": 900}
    s = summary(counters, 2, 10, 20, 4)
    assert s["active"] == 2 and s["reset"] == 3 and s["rejected"] == 4
    assert s["bytes_c2s"] == 110 and s["bytes_s2c"] == 920 and s["relay_errors"] == 1
    text = format_status({"tun": {}, "inspect_kernel": {"summary": s}})
    assert "inspect kernel (tproxy): accepted=7, active=2, denied=1, rejected=4" in text
    prom = prometheus({"summary": s})
    assert "grebe_tproxy_active_flows 2" in prom
    assert 'grebe_tproxy_flow_ends_total{cause="idle"} 2' in prom
    assert 'grebe_tproxy_bytes_total{direction="server_to_client"} 920' in prom


# --- the backend on its own thread, wired like `grebe up` -----------------------------------


class _Ctl:
    def __init__(self) -> None:
        self.commands: dict[str, Any] = {}

    def register(self, name: str, fn: Any) -> None:
        self.commands[name] = fn


def _wait(pred: Any, what: str, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.01)


class _Echo:
    """A threaded TCP echo server on loopback."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.addr = self.srv.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


def _thread_backend(body: str, target: tuple[str, int]) -> KernelBackendThread:
    r = rule('dst = ["127.0.0.0/8"]\nbackend = "kernel"\n' + body)
    settings = TproxySettings(port=0, transparent=False, flush_interval=0.05)
    b = LoopbackBackend([r], settings, install=False)
    b.target = target
    kb = KernelBackendThread([r], settings, backend=b)
    kb.start()
    return kb


def test_live_flow_with_tcp_info_then_idle_reset(tmp_path: Path) -> None:
    echo = _Echo()
    log_path = tmp_path / "flows.jsonl"
    kb = _thread_backend(f'inspectors = ["log"]\nlog_path = "{log_path}"\nidle_timeout = 0.6',
                         echo.addr)
    try:
        c = socket.create_connection(("127.0.0.1", port_of(kb.backend)))
        c.sendall(b"hello")
        assert c.recv(100) == b"hello"
        flows = _wait(lambda: [f for f in kb.flows() if f["phase"] == "open"], "open flow")
        (f,) = flows
        json.dumps(f)
        assert f["backend"] == "kernel" and f["bytes_c2s"] == 5 and f["bytes_s2c"] == 5
        assert f["inspectors"] == ["LogInspector"] and f["dst"] == "127.0.0.1"
        for leg in ("client_leg", "server_leg"):
            assert f[leg]["state"] == "ESTABLISHED" and f[leg]["rto"] > 0, f
        assert f["client_leg"]["bytes_in"] == 5
        text = format_flows({"flows": flows, "inspect_kernel": kb.status(with_flows=False)})
        assert "kernel" in text and "client leg (kernel TCP_INFO): ESTABLISHED" in text
        # now silent both ways: reset after idle_timeout, counted, logged with close "idle"
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            c.recv(100)
        c.close()
        st = _wait(lambda: (s := kb.status())["summary"]["idle"] == 1 and s, "idle counted")
        assert st["summary"]["active"] == 0 and st["summary"]["reset"] == 1
        assert st["summary"]["bytes_c2s"] == 5 and st["summary"]["accepted"] == 1
    finally:
        kb.stop()
        echo.srv.close()
    rec = json.loads(log_path.read_text())
    assert rec["close"] == "idle" == CloseReason.IDLE.value
    assert not kb.running


def test_busy_flow_is_not_idle() -> None:
    echo = _Echo()
    kb = _thread_backend('inspectors = ["log"]\nidle_timeout = 0.5', echo.addr)
    try:
        c = socket.create_connection(("127.0.0.1", port_of(kb.backend)))
        c.settimeout(5)
        end = time.monotonic() + 1.5           # three idle timeouts of traffic every 0.1 s
        while time.monotonic() < end:
            c.sendall(b"ping")
            assert c.recv(100) == b"ping"
            time.sleep(0.1)                    # the traffic pattern under test, not a wait
        assert kb.status()["summary"]["idle"] == 0 and len(kb.flows()) == 1
        c.close()
    finally:
        kb.stop()
        echo.srv.close()


def test_start_for_config_wires_status_and_flows() -> None:
    cfg = load_config(str(ROOT / "topologies/two-sites-inspect-kernel/gw-a.toml"))
    ctl = _Ctl()
    ctl.register("status", lambda _r: {"tun": {"name": "grebe0"}})
    ctl.register("flows", lambda _r: {"flows": [{"id": 1, "phase": "open"}], "inspect": {}})
    kb = start_for_config(cfg, ctl, TproxySettings(port=0, transparent=False), install=False)
    assert kb is not None
    try:
        st = ctl.commands["status"]({})
        assert st["tun"]["name"] == "grebe0" and st["inspect_kernel"]["summary"]["active"] == 0
        assert "flows" not in st["inspect_kernel"]
        ans = ctl.commands["flows"]({})
        assert ans["flows"] == [{"id": 1, "phase": "open", "backend": "userspace"}]
        assert "summary" in ans["inspect_kernel"]
        json.dumps(ans)
    finally:
        kb.stop()
    assert not kb.running


def test_needs_kernel_backend() -> None:
    def rs(text: str) -> Any:
        return parse_rules(tomllib.loads(text)["inspect"])

    assert not needs_kernel_backend(())
    assert not needs_kernel_backend(rs('[[inspect]]\nname="a"\ninspectors=["log"]'))
    assert not needs_kernel_backend(rs('[[inspect]]\nname="a"\nbackend="kernel"\n'
                                       'action="forward"'))
    assert needs_kernel_backend(rs('[[inspect]]\nname="a"\nbackend="kernel"\naction="drop"'))


def test_start_failure_leaves_no_thread() -> None:
    busy = socket.create_server(("0.0.0.0", 0))
    port = busy.getsockname()[1]
    r = rule('backend = "kernel"\ninspectors = ["log"]')
    kb = KernelBackendThread([r], TproxySettings(port=port, transparent=False), install=False)
    with pytest.raises(OSError):
        kb.start()
    busy.close()
    assert not kb.running
    kb.stop()       # idempotent


def test_reload_from_the_endpoint_file_and_refusal(tmp_path: Path, caplog: Any) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text('[[inspect]]\nname = "a"\nbackend = "kernel"\ninspectors = ["log"]\n')
    r = parse_rules(tomllib.loads(conf.read_text())["inspect"])
    kb = KernelBackendThread(r, TproxySettings(port=0, transparent=False), str(conf),
                             install=False)
    kb.start()
    try:
        conf.write_text('[[inspect]]\nname = "b"\nbackend = "kernel"\ninspectors = ["log"]\n'
                        'idle_timeout = 9\n')
        kb.reload()         # what grebe up's SIGHUP handler calls
        _wait(lambda: kb.call(lambda: kb.backend.counters.get("reloads") == 1), "reloaded")
        assert kb.call(lambda: [x.name for x in kb.backend.rules]) == ["b"]
        conf.write_text('[[inspect]]\nname = "c"\nsrc = ["not an address"]\n')
        with caplog.at_level("ERROR", logger="grebe.tproxy"):
            kb.reload()
            _wait(lambda: "reload of" in caplog.text, "refusal logged")
        assert kb.call(lambda: [x.name for x in kb.backend.rules]) == ["b"]
    finally:
        kb.stop()


def test_flows_table_without_kernel_backend_is_the_userspace_one() -> None:
    from bridge.io.flows import format_flows as user_table

    answer: dict[str, Any] = {"flows": [], "inspect": {"ended": {"closed": 2}}}
    assert format_flows(answer) == user_table(answer)
    both = format_flows({"flows": [], "inspect": {}, "inspect_kernel": {"summary": {}}})
    assert "0 flow(s)" not in both and "0 kernel flow(s)" in both
