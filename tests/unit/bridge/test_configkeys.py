"""The config key table (bridge/configkeys.py): the parser reads exactly its keys, and
docs/config/ is what bridge/configdocs.py generates from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

import bridge.config as config
from bridge import configdocs
from bridge.config import EXAMPLE, ListenConfig, PeerConfig, PmtuConfig, loads_config
from bridge.configkeys import KEYS, SPEC, Key, Reader, section_keys
from bridge.errors import ConfigErrors
from bridge.flows import InspectRule
from bridge.inspect.rules import parse_rules

DOCS = Path(__file__).resolve().parents[3] / "docs" / "config"


def test_generated_docs_are_up_to_date() -> None:
    """Fails when a key was added or changed without `python -m bridge.configdocs`."""
    assert configdocs.diff(DOCS) == [], "run: python -m bridge.configdocs"


def test_docs_check_sees_a_hand_edit(tmp_path: Path) -> None:
    configdocs.write(tmp_path)
    assert configdocs.diff(tmp_path) == []
    page = tmp_path / "peers.keepalive.md"
    page.write_text(page.read_text().replace("10.0", "5.0"))
    (tmp_path / "peers.gone.md").write_text("a key that no longer exists\n")
    assert configdocs.diff(tmp_path) == ["peers.gone.md", "peers.keepalive.md"]
    configdocs.write(tmp_path)
    assert configdocs.diff(tmp_path) == []


def test_every_key_has_a_page_and_an_index_line() -> None:
    pages = configdocs.pages()
    for key in KEYS:
        assert f"{key.path}.md" in pages
        assert f"]({key.path}.md)" in pages["README.md"]
        assert key.doc.endswith("."), key.path


def test_parser_reads_exactly_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key bridge/config.py reads is in the table, and every table key of the file's
    own sections is read (the [[inspect]] and [[scrub]] rule keys are read by
    bridge/inspect/rules.py and bridge/scrub.py)."""
    readers: list[Reader] = []

    init = Reader.__init__

    def recording(self: Reader, file: str | None) -> None:
        init(self, file)
        readers.append(self)

    monkeypatch.setattr(Reader, "__init__", recording)  # config.py's reader derives from it
    loads_config(EXAMPLE)
    read = set().union(*(r.read for r in readers))
    table = {k.path for k in KEYS if k.section not in ("inspect", "scrub")}
    assert read - table == set()
    assert table - read == set(), "in the table but never read by bridge/config.py"


def test_a_key_missing_from_the_table_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Reader(None).take({"fwmark": 1}, "peers.fwmark", "peers[0]")


def test_inspect_rule_keys_are_the_tables() -> None:
    """bridge/inspect/rules.py accepts the table's rule keys and nothing else, and its
    defaults are the table's."""
    rule = parse_rules([{"name": "r", "inspectors": ["log"]}])[0]
    for name in section_keys("inspect") - {"name", "options", "inspectors"}:
        key = SPEC[f"inspect.{name}"]
        value = getattr(rule, name)
        want = key.default if key.default is not None else ()
        assert getattr(value, "value", value) == want, name
    with pytest.raises(Exception, match="unknown key"):
        parse_rules([{"name": "r", "idle_timout": 3}])
    assert {f.name for f in dataclasses.fields(InspectRule)} == section_keys("inspect")


@pytest.mark.parametrize("cls,section", [(PeerConfig, "peers"), (PmtuConfig, "pmtu"),
                                          (ListenConfig, "listen")])
def test_dataclass_defaults_are_the_tables(cls: Any, section: str) -> None:
    for f in dataclasses.fields(cls):
        key = SPEC.get(f"{section}.{f.name}")
        if key is None or f.default is dataclasses.MISSING or key.default is None:
            continue
        default = getattr(f.default, "value", f.default)
        assert default == key.default, f"{section}.{f.name}"


def test_choices_are_the_enums() -> None:
    for path, enum in (("peers.encapsulation", config.Encapsulation),
                       ("peers.sequence", config.SeqPolicy),
                       ("peers.down_action", config.DownAction),
                       ("peers.source_port", config.SourcePort),
                       ("datapath", config.Datapath)):
        assert SPEC[path].choices == tuple(m.value for m in enum)
        assert SPEC[path].default in SPEC[path].choices


def test_table_checks_type_choice_range_and_names_the_nearest_key() -> None:
    text = EXAMPLE.replace("keepalive = 10 ", "keepalive_s = 10") \
        .replace('sequence = "off"', 'sequence = "of"') \
        .replace("icmp_burst = 20", "icmp_burst = -1") \
        .replace("checksum = false", "checksum = 0")
    with pytest.raises(ConfigErrors) as info:
        loads_config(text)
    got = {e.path: e.message for e in info.value.errors}
    assert got["peers[0].keepalive_s"] == "unknown key (did you mean 'keepalive'?)"
    assert "is not one of 'off' | 'drop-late' | 'reorder'" in got["peers[0].sequence"]
    assert got["pmtu.icmp_burst"] == "-1 out of range 0..1000000"
    assert got["peers[0].checksum"] == "must be a boolean, not int"


def test_keys_are_unique_and_well_formed() -> None:
    assert len(SPEC) == len(KEYS)
    for key in KEYS:
        assert isinstance(key, Key)
        assert (key.lo is None) == (key.hi is None), key.path
        if key.default is not None:
            assert isinstance(key.default, key.types), key.path
