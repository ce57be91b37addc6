"""Replays of recorded conversations with real Linux TCP (no root needed).

A mismatch means the stack now answers a real Linux peer differently than when the trace
was recorded: check the difference, and if it is intended, re-record with
`sudo .venv/bin/python tests/sim/replay.py record tests/sim/traces/NAME.jsonl.gz`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from replay import replay

TRACES = Path(__file__).parent / "traces"


@pytest.mark.parametrize(
    ("name", "size"),
    [("linux_client_echo_clean", 40_000), ("linux_client_echo_loss", 60_000)],
)
def test_replay_linux_conversation(name: str, size: int) -> None:
    res = replay(TRACES / f"{name}.jsonl.gz")
    assert res.first_mismatch is None, res.first_mismatch
    assert res.received == size and res.segments_in > 10 and res.segments_out > 10
