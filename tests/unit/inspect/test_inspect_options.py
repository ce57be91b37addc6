"""Inspector options and the built-ins: declared, checked with the configuration, found by name."""

from __future__ import annotations

import pytest
from helpers_inspect import rule

from bridge.errors import ConfigError
from bridge.inspect.api import Inspector
from bridge.inspect.manager import InspectorManager
from bridge.inspect.rules import builtins


def test_the_builtins_are_found_in_their_modules() -> None:
    found = builtins()
    assert sorted(found) == ["block", "http", "log", "pcap", "replace", "tls"]
    for name, cls in found.items():
        assert issubclass(cls, Inspector) and cls.name == name
        assert cls.__module__ == f"bridge.inspect.{name}"
    names = [o.name for cls in found.values() for o in cls.options]
    assert len(names) == len(set(names))          # a key means one thing in every rule


@pytest.mark.parametrize(("body", "where"), [
    ('inspectors=["block"]\nblock=["x"]\noptions={block_window=0}',
     "inspect[0].options.block_window"),
    ('inspectors=["block"]\nblock=["x"]\noptions={block_window=true}',
     "inspect[0].options.block_window"),
    ('inspectors=["pcap"]\npcap_path="/x"\noptions={pcap_mss="big"}',
     "inspect[0].options.pcap_mss"),
    ('inspectors=["log"]\nlog_path=3', "inspect[0].log_path"),
    ('inspectors=["log"]\nblock=["(bad"]', "inspect[0].block[0]"),   # checked even if unused
    ('inspectors=["block"]\nblock_dst=["198.18.2.1/24"]', "inspect[0].block_dst[0]"),
    ('inspectors=["replace"]\nreplace=[]', "inspect[0].replace"),
])
def test_builtin_option_errors_name_the_key_path(body: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        rule(body)
    assert info.value.path == where


def test_builtin_defaults_only_for_the_inspectors_in_use() -> None:
    r = rule('inspectors=["block"]\nblock=["x"]\nlog_path="/l"\noptions={colour="blue"}')
    assert r.options["block_window"] == 4096 and r.options["block_dst"] == ()
    assert r.options["log_path"] == "/l" and r.options["colour"] == "blue"
    assert "pcap_mss" not in r.options


def test_custom_inspector_options_resolved_at_load() -> None:
    m = InspectorManager([rule('inspectors=["sample_inspectors:Greeter"]\n'
                               'options={greeting="hi ", times=2}')])
    assert m.chain("r").inspectors[0].said == "hi hi "
    m = InspectorManager([rule('inspectors=["sample_inspectors:Greeter"]')])
    assert m.chain("r").inspectors[0].said == "hello"                # defaults filled in


@pytest.mark.parametrize(("body", "where"), [
    ('inspectors=["sample_inspectors:Greeter"]\noptions={times=7}', "inspect[0].options.times"),
    ('inspectors=["sample_inspectors:Greeter"]\noptions={greeting=1}',
     "inspect[0].options.greeting"),
    ('inspectors=["sample_inspectors:Greeter"]\noptions={greeting="boo", times=2}',
     "inspect[0].options.times"),
    ('inspectors=["log", "sample_inspectors:Thief"]', "inspect[0].inspectors[1]"),
])
def test_custom_option_errors_name_the_key_path(body: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        InspectorManager([rule(body)])
    assert info.value.path == where
