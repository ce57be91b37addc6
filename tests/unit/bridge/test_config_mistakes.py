"""check-config catches the mistakes that used to pass and break traffic silently (issue 13).

One row per mistake: the file, the key path and the words of the message `grebe check-config`
prints; every row also checks that `check-config` and `load_config` (`grebe up`) agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import check_config, load_config
from bridge.errors import ConfigErrors

BASE = """\
[tun]
name = "gb0"
addresses = ["198.18.100.1/30"]
[listen]
address = "198.18.0.1"
[[peers]]
name = "b"
endpoint = "198.18.0.2"
prefixes = ["198.18.20.0/24"]
"""

PEER_C = '[[peers]]\nname = "c"\nprefixes = ["198.18.30.0/24"]\n'
RULE = '[[inspect]]\nname = "web"\ndst_ports = [80]\ninspectors = ["log"]\n'

# (id, file text, [(key path, words of its message), ...])
CASES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("v6-endpoint-without-brackets",
     BASE.replace('address = "198.18.0.1"', 'address = "::"')
     .replace('"198.18.0.2"', '"2001:db8::2:4754"'),
     [("peers[0].endpoint", "needs brackets: \"[2001:db8::2]:4754\" (address and port)")]),
    ("prefix-not-a-string", BASE.replace('["198.18.20.0/24"]', "[42]"),
     [("peers[0].prefixes[0]", "must be a prefix string")]),
    ("empty-file", "", [("peers", "needs at least one peer")]),
    ("no-peers", BASE.split("[[peers]]")[0], [("peers", "needs at least one peer")]),
    ("v6-listen-v4-peer", BASE.replace('"198.18.0.1"', '"2001:db8::1"'),
     [("peers[0].endpoint", "IPv4 peer 198.18.0.2 but listen.address 2001:db8::1 is IPv6")]),
    ("v4-listen-v6-peer", BASE.replace('"198.18.0.2"', '"[2001:db8::2]:4754"'),
     [("peers[0].endpoint", "IPv6 peer 2001:db8::2 but listen.address 198.18.0.1 is IPv4")]),
    ("v6-tun-mtu-below-1280",
     BASE.replace('"198.18.100.1/30"]', '"198.18.100.1/30", "2001:db8:100::1/64"]\nmtu = 1000'),
     [("tun.mtu", "below 1280, the IPv6 minimum link MTU")]),
    ("prefix-covers-peer-endpoint", BASE.replace('"198.18.20.0/24"', '"198.18.0.0/24"'),
     [("peers[0].prefixes[0]", "covers the peer's own endpoint 198.18.0.2")]),
    ("dead-after-below-keepalive", BASE + "keepalive = 10\ndead_after = 5\n",
     [("peers[0].dead_after", "is not above keepalive")]),
    ("iif-on-userspace-rule", BASE + RULE + 'iif = ["lan0"]\n',
     [("inspect[0].iif", "only backend = \"kernel\" rules match the incoming interface")]),
    ("custom-inspector-not-importable",
     BASE + RULE.replace('["log"]', '["no_such_module_i13:Thing"]'),
     [("inspect[0].inspectors[0]", "cannot load 'no_such_module_i13:Thing': "
       "ModuleNotFoundError")]),
    ("every-inspect-error",
     BASE + RULE.replace("[80]", "[0]") + 'colour = "red"\n'
     + RULE.replace('"web"', '"ssh"').replace('["log"]', '["nope"]'),
     [("inspect[0].colour", "unknown key"), ("inspect[0].dst_ports[0]", "ports are 1-65535"),
      ("inspect[1].inspectors[0]", "is not a built-in")]),
    ("other-key-and-inspect-errors",
     BASE.replace('name = "gb0"', 'name = "gb0"\nmtu = 10') + RULE.replace("[80]", "[0]"),
     [("tun.mtu", "out of range"), ("inspect[0].dst_ports[0]", "ports are 1-65535")]),
    ("two-peers-one-host-other-port",
     BASE + PEER_C + 'endpoint = "198.18.0.2:5555"\n',
     [("peers[1].endpoint", "same host 198.18.0.2 and key as peers[0]: peers on one host are "
       "told apart by their GRE key (RFC 2890 §2.1), not by UDP port")]),
    ("gre-and-ipip-peer-one-host",
     BASE + PEER_C + 'endpoint = "198.18.0.2"\nencapsulation = "ipip"\n',
     [("peers[1].endpoint", "an ipip peer cannot share its host")]),
    ("log-path-under-a-file",
     BASE + RULE + 'log_path = "/etc/hostname/flows/x.jsonl"\n',
     [("inspect[0].log_path", "/etc/hostname is not a directory")]),
    ("log-path-is-a-directory", BASE + RULE + 'log_path = "/tmp"\n',
     [("inspect[0].log_path", "/tmp is a directory")]),
]


@pytest.mark.parametrize(("text", "expect"), [(t, e) for _, t, e in CASES],
                         ids=[c[0] for c in CASES])
def test_each_mistake_gets_its_message(tmp_path: Path, text: str,
                                       expect: list[tuple[str, str]]) -> None:
    f = tmp_path / "grebe.toml"
    f.write_text(text)
    errors = check_config(str(f))
    got = [(e.path, e.message) for e in errors]
    assert [p for p, _ in got] == [p for p, _ in expect], got
    for (_, message), (_, words) in zip(got, expect, strict=True):
        assert words in message, got
    with pytest.raises(ConfigErrors) as info:   # `grebe up` refuses the same file
        load_config(str(f))
    assert [e.path for e in info.value.errors] == [p for p, _ in expect]


def test_the_good_variants_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixes the messages point to are accepted."""
    (tmp_path / "my_inspector_i13.py").write_text("class Mine:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = [
        BASE.replace('address = "198.18.0.1"', 'address = "::"')
        .replace('"198.18.0.2"', '"[2001:db8::2]:4754"'),
        BASE.replace('address = "198.18.0.1"', 'address = "::"'),   # "::" takes IPv4 too
        BASE + "key = 1\n" + PEER_C + 'endpoint = "198.18.0.2:5555"\nkey = 2\n',
        BASE + "keepalive = 10\ndead_after = 0\n",
        BASE + RULE + f'log_path = "{tmp_path}/flows.jsonl"\n',
        BASE + RULE.replace('["log"]', '["my_inspector_i13:Mine"]'),
    ]
    for i, text in enumerate(good):
        f = tmp_path / f"g{i}.toml"
        f.write_text(text)
        assert check_config(str(f)) == [], (i, text)


def test_utf8_bom_is_skipped(tmp_path: Path) -> None:
    f = tmp_path / "bom.toml"
    f.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert check_config(str(f)) == []
    assert load_config(str(f)).peers[0].name == "b"


def test_a_missing_log_directory_is_created_and_records_kept(tmp_path: Path) -> None:
    """log_path in a directory that does not exist yet: accepted, created at start, and the
    flush writes the records (it used to drop them: "records left after failed flush: 0")."""
    from bridge.inspect.log import LogInspector

    path = tmp_path / "new" / "deeper" / "flows.jsonl"
    text = BASE + RULE + f'log_path = "{path}"\n'
    f = tmp_path / "g.toml"
    f.write_text(text)
    assert check_config(str(f)) == []
    rule = load_config(str(f)).inspect_rules()[0]
    log = LogInspector(rule)
    log._records.append({"start": 0.0, "n": 1})
    log.flush()
    assert path.read_text().count("\n") == 1
