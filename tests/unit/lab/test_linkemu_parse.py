"""parse_impairment (the topology's `impair = {...}` and the CLI's key=value) and Impairment."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import ConfigError, ConfigErrors
from bridge.lab.impair import Impairment, parse_impairment

GOOD: list[tuple[dict[str, Any], Impairment]] = [
    ({}, Impairment()),
    ({"rate": "100mbit"}, Impairment(rate_mbit=100.0)),
    ({"rate": "1.5Gbit"}, Impairment(rate_mbit=1500.0)),
    ({"rate": "500kbit"}, Impairment(rate_mbit=0.5)),
    ({"rate": "64000bit"}, Impairment(rate_mbit=0.064)),
    ({"rate": "10mbit/s"}, Impairment(rate_mbit=10.0)),
    ({"rate": 25}, Impairment(rate_mbit=25.0)),
    ({"rate": 0}, Impairment()),
    ({"loss": "2%"}, Impairment(loss_pct=2.0)),
    ({"loss": "0.5 %"}, Impairment(loss_pct=0.5)),
    ({"loss": 1.25}, Impairment(loss_pct=1.25)),
    ({"loss": "100%"}, Impairment(loss_pct=100.0)),
    ({"delay": "20ms"}, Impairment(delay_ms=20.0)),
    ({"delay": "1.5s"}, Impairment(delay_ms=1500.0)),
    ({"delay": "250us"}, Impairment(delay_ms=0.25)),
    ({"delay": 7}, Impairment(delay_ms=7.0)),
    ({"delay": "7"}, Impairment(delay_ms=7.0)),
    ({"jitter": "5ms"}, Impairment(jitter_ms=5.0)),
    ({"reorder": "10%"}, Impairment(reorder_pct=10.0)),
    ({"duplicate": "1%"}, Impairment(duplicate_pct=1.0)),
    ({"seed": 7}, Impairment(seed=7)),
    ({"seed": "7"}, Impairment(seed=7)),
    ({"rate": "100mbit", "loss": "2%", "delay": "20ms", "jitter": "5ms", "reorder": "10%",
      "duplicate": "1%", "seed": 7},
     Impairment(100.0, 2.0, 20.0, 5.0, 10.0, 1.0, 7)),
]


@pytest.mark.parametrize(("table", "want"), GOOD)
def test_good_values(table: dict[str, Any], want: Impairment) -> None:
    assert parse_impairment(table, "links[0].impair") == want


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"rate": "100mbps"}, "rate", "BYTES per second"),
    ({"rate": "100MBps"}, "rate", "BYTES per second"),
    ({"rate": "100furlong"}, "rate", "unknown rate unit"),
    ({"rate": "1bit"}, "rate", "8kbit..100gbit"),
    ({"rate": "200gbit"}, "rate", "8kbit..100gbit"),
    ({"rate": "-5mbit"}, "rate", "cannot read"),
    ({"rate": True}, "rate", "boolean"),
    ({"loss": "101%"}, "loss", "at most 100%"),
    ({"loss": "2ms"}, "loss", "percentage"),
    ({"loss": "lots"}, "loss", "cannot read"),
    ({"loss": float("nan")}, "loss", "finite"),
    ({"loss": float("inf")}, "loss", "finite"),
    ({"delay": "20min"}, "delay", "unknown time unit"),
    ({"delay": "11s"}, "delay", "at most 10s"),
    ({"delay": [20]}, "delay", "cannot read"),
    ({"jitter": "-1ms"}, "jitter", "cannot read"),
    ({"reorder": "150"}, "reorder", "at most 100%"),
    ({"duplicate": "x%"}, "duplicate", "cannot read"),
    ({"seed": -1}, "seed", "integer"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"seed": 2**32}, "seed", "integer"),
    ({"latency": "5ms"}, "latency", "unknown impairment key"),
]


@pytest.mark.parametrize(("table", "key", "problem"), BAD)
def test_bad_values_name_the_key(table: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_impairment(table, "links[2].impair")
    assert info.value.path == f"links[2].impair.{key}"
    assert problem in info.value.message


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_impairment({"loss": "200%", "delay": "soon", "colour": "red"}, "impair")
    assert sorted(e.path for e in info.value.errors) == [
        "impair.colour", "impair.delay", "impair.loss"]


def test_table_round_trip_and_description() -> None:
    imp = Impairment(rate_mbit=100.0, loss_pct=2.0, delay_ms=20.0, jitter_ms=5.0,
                     reorder_pct=10.0, duplicate_pct=1.0, seed=7)
    assert parse_impairment(imp.to_table(), "x") == imp
    assert str(imp) == ("rate 100 Mbit/s, delay 20 ms ± 5 ms, loss 2%, reorder 10%, "
                        "duplicate 1%, seed 7 (each direction)")
    assert parse_impairment(Impairment().to_table(), "x") == Impairment()
    assert str(Impairment()) == "off"


@pytest.mark.parametrize(("imp", "off", "emulator"), [
    (Impairment(), True, False),
    (Impairment(seed=3), True, False),
    (Impairment(rate_mbit=1.0), False, False),
    (Impairment(loss_pct=1.0), False, False),
    (Impairment(delay_ms=1.0), False, True),
    (Impairment(jitter_ms=1.0), False, True),
    (Impairment(reorder_pct=1.0), False, True),
    (Impairment(duplicate_pct=1.0), False, True),
])
def test_what_needs_the_emulator(imp: Impairment, off: bool, emulator: bool) -> None:
    assert imp.is_off is off
    assert imp.needs_emulator is emulator
