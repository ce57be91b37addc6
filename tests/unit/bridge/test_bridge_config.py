"""Configuration: good and bad files, every error with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import (
    EXAMPLE,
    DownAction,
    Encapsulation,
    SeqPolicy,
    SourcePort,
    check_config,
    load_config,
    loads_config,
    parse_endpoint,
)
from bridge.errors import ConfigErrors

FIX = Path(__file__).parent / "fixtures"

MIN = """
[tun]
name = "gb0"
[listen]
address = "198.18.0.1"
[[peers]]
endpoint = "198.18.0.2"
prefixes = ["198.18.20.0/24"]
"""


def test_example_files_are_good() -> None:
    assert check_config(str(FIX / "site-a.toml")) == []
    assert check_config(str(FIX / "site-b.toml")) == []
    assert (FIX / "site-a.toml").read_text() == EXAMPLE


def test_site_b_values() -> None:
    cfg = load_config(str(FIX / "site-b.toml"))
    assert cfg.tun.mtu == 1400 and cfg.listen.address == "::"
    a, br = cfg.peers
    assert a.endpoint == ("2001:db8:ff::1", 4754) and a.ipv6
    assert (a.key_in, a.key_out, a.sequence, a.checksum) == (42, 43, SeqPolicy.REORDER, True)
    assert (a.max_packets_held, a.outoforder_timer_ms) == (8, 50.0)
    assert a.keepalive == 5.0 and a.dead_after == 15.0  # default: 3 x keepalive
    assert a.down_action is DownAction.WITHDRAW and a.source_port is SourcePort.FLOW_HASH
    assert br.encapsulation is Encapsulation.IPIP and br.endpoint == ("198.18.0.9", 5555)
    assert br.keepalive == 0 and br.dead_after == 0
    assert cfg.inspect[0]["name"] == "web"
    rules = cfg.inspect_rules()
    assert rules is not None and rules[0].name == "web"


def test_defaults() -> None:
    cfg = loads_config(MIN)
    p = cfg.peers[0]
    assert cfg.tun.mtu is None and cfg.mss_clamp and cfg.listen.port == 4754
    assert p.port == 4754 and p.encapsulation is Encapsulation.GRE and p.key_in is None
    assert p.sequence is SeqPolicy.OFF and not p.checksum
    assert cfg.pmtu.fragment and cfg.control_socket is None
    assert cfg.split_directions and cfg.keep_warm
    assert not loads_config("split_directions = false\n" + MIN).split_directions
    with pytest.raises(ConfigErrors) as info:
        loads_config('split_directions = "yes"\n' + MIN)
    assert [e.path for e in info.value.errors] == ["split_directions"]


EXPECTED_BAD = {
    "tun.name", "tun.addresses[0]", "tun.mtu", "listen.address", "listen.port",
    "pmtu.icmp_rate", "mss_clamp", "peers[0].endpoint", "peers[0].prefixes[0]",
    "peers[0].encapsulation", "peers[0].key", "peers[0].sequence", "peers[1].endpoint",
    "peers[1].checksum", "peers[1].down_action", "colour",
}


def test_bad_file_reports_every_error_with_its_path() -> None:
    path = str(FIX / "bad.toml")
    errors = check_config(path)
    assert {e.path for e in errors} == EXPECTED_BAD
    assert all(e.file == path and str(e).startswith(path + ": ") for e in errors)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert len(info.value.errors) == len(EXPECTED_BAD)


@pytest.mark.parametrize(("patch", "path", "words"), [
    ('prefixes = ["198.18.20.0/24"]\n[[peers]]\nendpoint = "198.18.0.3"\n'
     'prefixes = ["198.18.20.0/24"]', "peers[1].prefixes[0]", "also belongs"),
    ('prefixes = ["198.18.20.0/24"]\n[[peers]]\nendpoint = "198.18.0.2"\n'
     'prefixes = ["198.18.21.0/24"]', "peers[1].endpoint", "same host 198.18.0.2 and key"),
    ('prefixes = ["198.18.20.0/24"]\nkey = 4294967296', "peers[0].key", "32-bit"),
    ('prefixes = ["198.18.20.0/24"]\nkeepalive = true', "peers[0].keepalive", "boolean"),
    ('prefixes = ["198.18.20.0/24"]\nmax_packets_held = 0', "peers[0].max_packets_held",
     "range"),
    ('prefixes = ["198.18.20.0/24"]\nencapsulation = "ipip"\nkey = 1', "peers[0].key",
     "only"),
    ('prefixes = ["198.18.20.0/24"]\nwhat = 1', "peers[0].what", "unknown"),
])
def test_single_errors(patch: str, path: str, words: str) -> None:
    text = MIN.replace('prefixes = ["198.18.20.0/24"]', patch)
    with pytest.raises(ConfigErrors) as info:
        loads_config(text)
    errs = info.value.errors
    assert [e.path for e in errs] == [path], errs
    assert words in errs[0].message


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    assert check_config(str(tmp_path / "nope.toml"))[0].message.startswith("cannot read")
    bad = tmp_path / "x.toml"
    bad.write_text("[tun\n")
    assert "not valid TOML" in check_config(str(bad))[0].message


@pytest.mark.parametrize(("text", "expect"), [
    ("198.18.0.2:4754", ("198.18.0.2", 4754)),
    ("198.18.0.2", ("198.18.0.2", 4754)),
    ("[2001:db8::1]:5555", ("2001:db8::1", 5555)),
    ("[2001:db8::1]", ("2001:db8::1", 4754)),
])
def test_parse_endpoint(text: str, expect: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expect


@pytest.mark.parametrize("text", ["host:1", "198.18.0.2:0", "[198.18.0.2]:1", "[::1",
                                  "0.0.0.0:1", "224.0.0.1:5", "[2001:db8::1]x",
                                  "2001:db8::1", "2001:db8::2:4754"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)
