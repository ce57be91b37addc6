"""InspectorChain / InspectorManager: order, rewrite, drop, reset, exceptions vs fail_open, log."""

from __future__ import annotations

import json
import logging

import pytest
from helpers_inspect import flow, rule

from bridge.errors import ConfigError
from bridge.inspect.api import C2S, RESET, S2C, CloseReason, Deny
from bridge.inspect.manager import InspectorManager
from bridge.inspect.rules import parse_rules


def manager(body: str) -> InspectorManager:
    return InspectorManager([rule(body)])


def test_builtins_and_custom_classes_load_in_order() -> None:
    m = manager('inspectors=["log", "http", "sample_inspectors:Upper", "tls"]')
    assert m.chain("r").names == ["LogInspector", "HttpInspector", "Upper", "TlsInspector"]


def test_unknown_class_is_a_config_error_with_path() -> None:
    with pytest.raises(ConfigError) as info:
        manager('inspectors=["log", "no_such_module_xyz:Thing"]')
    assert info.value.path == "inspect[0].inspectors[1]"


def test_forward_and_drop_rules_get_no_chain() -> None:
    import tomllib
    rules = parse_rules(tomllib.loads('[[inspect]]\nname="f"\naction="forward"\n')["inspect"])
    assert InspectorManager(rules).chains == {}


def test_rewrite_passes_down_the_chain_and_drop_stops() -> None:
    chain = manager('inspectors=["sample_inspectors:Upper", "replace"]\n'
                    'replace=[["HELLO", "howdy"]]').chain("r")
    f = flow()
    assert chain.data(f, C2S, b"hello world") == b"howdy WORLD"
    chain2 = manager('inspectors=["sample_inspectors:Dropper", "sample_inspectors:Upper"]') \
        .chain("r")
    f2 = flow()
    assert chain2.data(f2, C2S, b"please drop me") == b""
    assert "upper" not in f2.metadata          # later inspectors never saw the dropped chunk
    assert chain2.data(f2, C2S, b"keep") == b"KEEP"


def test_eof_releases_held_bytes_through_later_inspectors() -> None:
    chain = manager('inspectors=["replace", "sample_inspectors:Upper"]\n'
                    'replace=[["abc", "xyz"]]').chain("r")
    f = flow()
    assert chain.data(f, S2C, b"..ab") == b".."
    assert chain.eof(f, S2C) == b"AB"


def test_block_reset_sets_reason() -> None:
    chain = manager('inspectors=["block"]\nblock=["bad"]').chain("r")
    f = flow()
    assert chain.data(f, C2S, b"this is bad") is RESET
    assert f.close_reason is CloseReason.INSPECTOR_RESET and chain.counters["resets"] == 1


def test_exception_fail_open_continues_unchanged_and_disables(caplog: pytest.LogCaptureFixture) \
        -> None:
    chain = manager('inspectors=["sample_inspectors:Boom", "sample_inspectors:Upper"]\n'
                    'fail_open=true').chain("r")
    boom = chain.inspectors[0]
    f = flow()
    with caplog.at_level(logging.WARNING, logger="grebe.inspect"):
        assert chain.data(f, C2S, b"abc") == b"ABC"
    assert chain.data(f, C2S, b"def") == b"DEF"
    assert boom.calls == 1                          # switched off for this flow after raising
    assert chain.counters["errors"] == 1
    assert "boom in data" in caplog.text and "Traceback" in caplog.text
    assert f.metadata["errors"] == ["Boom.data: RuntimeError('boom in data')"]
    g = flow()                                      # a new flow gets the inspector back
    chain.data(g, C2S, b"x")
    assert boom.calls == 2


def test_exception_fail_closed_resets() -> None:
    chain = manager('inspectors=["sample_inspectors:Boom"]\nfail_open=false').chain("r")
    f = flow()
    assert chain.data(f, C2S, b"abc") is RESET
    assert f.close_reason is CloseReason.INSPECTOR_ERROR


@pytest.mark.parametrize(("fail_open", "denied"), [(True, False), (False, True)])
def test_exception_at_flow_start(fail_open: bool, denied: bool) -> None:
    chain = manager('inspectors=["sample_inspectors:Boom"]\noptions={boom="flow_start"}\n'
                    f'fail_open={str(fail_open).lower()}').chain("r")
    assert isinstance(chain.start(flow()), Deny) is denied


def test_exception_at_flow_end_never_escapes() -> None:
    chain = manager('inspectors=["sample_inspectors:Boom", "log"]\noptions={boom="flow_end"}')
    f = flow()
    chain.chain("r").end(f, CloseReason.CLOSED)
    assert "Boom.flow_end" in f.metadata["errors"][0]


def test_log_line_has_everything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "flows.jsonl"
    m = manager(f'inspectors=["log", "http"]\nlog_path="{path}"')
    chain = m.chain("r")
    f = flow()
    assert not isinstance(chain.start(f), Deny)
    req = b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n"
    chain.data(f, C2S, req)
    f.bytes_c2s += len(req)
    chain.data(f, S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    f.bytes_s2c += 40
    f.end = f.start + 1.5
    chain.end(f, CloseReason.CLOSED)
    assert not path.exists()                        # nothing written on the data path
    m.flush()
    rec = json.loads(path.read_text().splitlines()[0])
    assert rec["src"] == "198.18.1.10" and rec["dport"] == 80 and rec["rule"] == "r"
    assert rec["backend"] == "kernel" and rec["close"] == "closed" and rec["duration"] == 1.5
    assert rec["bytes_c2s"] == len(req) and rec["bytes_s2c"] == 40
    assert rec["http"][0]["target"] == "/index.html" and rec["http"][0]["status"] == 200
    # `start` is the endpoint's monotonic clock; flush adds the wall-clock start in ISO 8601
    assert rec["start_utc"].endswith("+00:00") and rec["start_utc"][:2] == "20"


def test_log_runs_last_and_sees_flow_end_metadata() -> None:
    m = manager('inspectors=["log", "sample_inspectors:EndNote"]')
    f = flow()
    m.chain("r").end(f, CloseReason.SERVER_RESET)
    line = json.loads(m.chain("r").inspectors[0].pending()[0])
    assert line["end_note"] == "server_reset" and line["close"] == "server_reset"
