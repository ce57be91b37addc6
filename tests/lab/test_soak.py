"""The soak command (bridge/lab/soak.py), short: about a minute of mixed traffic under loss
and reordering against encrypted peers, with replays of recorded traffic. The 30-minute
run is `./netns-lab.sh soak --minutes 30` (not in CI); this keeps the command exercised
and its checks able to fail (`grew` below)."""

from __future__ import annotations

import io
import os

import pytest

from bridge.lab import soak

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="the lab needs root and /dev/net/tun"),
]


def test_growth_rule() -> None:
    assert soak.grew("rss_kb", 1000, 1051) and not soak.grew("rss_kb", 1000, 1050)
    assert soak.grew("fds", 20, 22) and not soak.grew("fds", 20, 21)
    assert not soak.grew("secure.indices", 2, 5)  # a rekey moves a small table by a few
    assert soak.grew("secure.ratelimit", 100, 120)


def test_short_soak_passes_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    rc = soak.run(minutes=0.75, mode="encrypted", instance=f"sk{os.getpid()}", warmup=10,
                  loss="1%", reorder="5%", delay="2ms", mb=1, out=out)
    text = out.getvalue()
    print(text)
    assert rc == 0, text
    for gw in ("gw-a", "gw-b"):
        for measure in ("rss_kb", "fds", "secure.indices", "reorder_held"):
            assert any(line.startswith(gw) and measure in line for line in text.splitlines())
    assert "replays of the recorded capture 1 " in text
    assert "'replay':" in text  # the replays arrived and were refused, counted
    assert "soak: passed" in text
