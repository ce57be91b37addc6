"""block and replace: pattern matches split across chunk boundaries, EOF flush."""

from __future__ import annotations

import random

import pytest
from helpers_inspect import chunks, flow, rule

from bridge.inspect.api import C2S, RESET, S2C, Deny
from bridge.inspect.block import BlockInspector
from bridge.inspect.replace import ReplaceInspector

PAIRS = 'inspectors=["replace"]\nreplace=[["nginx", "grebe"], ["Welcome", "Farewell"], ["aa", "b"]]'


def stream_replace(data: bytes, size: int) -> bytes:
    r, f = ReplaceInspector(rule(PAIRS)), flow()
    out = b""
    for c in chunks(data, size):
        res = r.data(f, S2C, c)
        assert isinstance(res, bytes)
        out += res
    return out + (r.eof(f, S2C) or b"")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 1000])
def test_replace_across_boundaries_equals_whole(size: int) -> None:
    data = b"<h1>Welcome to nginx!</h1> nginxnginx ngin nginx aaa Welcom"
    expected = data.replace(b"nginx", b"grebe").replace(b"Welcome", b"Farewell") \
        .replace(b"aa", b"b")
    assert stream_replace(data, size) == expected


def test_replace_random_streams() -> None:
    rng = random.Random(7)
    alphabet = b"ngixWelcoma "
    for _ in range(200):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        whole = stream_replace(data, 10_000)
        assert stream_replace(data, rng.randint(1, 9)) == whole


def test_replace_holds_only_possible_prefixes() -> None:
    r, f = ReplaceInspector(rule(PAIRS)), flow()
    assert r.data(f, C2S, b"hello ngi") == b"hello "
    assert r.data(f, C2S, b"z") == b"ngiz"
    assert r.data(f, C2S, b"xyz") == b"xyz"
    assert r.eof(f, C2S) is None
    assert f.metadata.get("replaced") is None
    r.data(f, C2S, b"nginx")
    assert f.metadata["replaced"] == 1


def test_replace_directions_are_independent() -> None:
    r, f = ReplaceInspector(rule(PAIRS)), flow()
    assert r.data(f, C2S, b"ng") == b""
    assert r.data(f, S2C, b"inx") == b"inx"
    assert r.data(f, C2S, b"inx") == b"grebe"


@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_block_pattern_split_across_chunks(size: int) -> None:
    r = rule('inspectors=["block"]\nblock=["evil\\\\.example", "DROP TABLE"]')
    b, f = BlockInspector(r), flow()
    data = b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    results = [b.data(f, C2S, c) for c in chunks(data, size)]
    assert RESET in results
    assert f.metadata["blocked"]["direction"] == "c2s"


def test_block_needs_whole_match_and_other_direction_separate() -> None:
    b, f = BlockInspector(rule('inspectors=["block"]\nblock=["secret"]')), flow()
    assert b.data(f, C2S, b"sec") is None
    assert b.data(f, S2C, b"ret") is None        # different direction: no match
    assert b.data(f, C2S, b"rat") is None
    assert b.data(f, S2C, b"xx secret") is RESET


def test_block_dst_denies_at_start() -> None:
    b = BlockInspector(rule('inspectors=["block"]\nblock_dst=["198.18.2.0/24"]'))
    res = b.flow_start(flow(dst="198.18.2.10"))
    assert isinstance(res, Deny)
    assert not isinstance(b.flow_start(flow(dst="198.18.3.10")), Deny)
