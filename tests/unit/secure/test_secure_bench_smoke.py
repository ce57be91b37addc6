"""The secure micro-benchmark runs (tiny sizes) and opens what it seals; no timing."""

from __future__ import annotations

import bench_secure


def test_bench_secure_runs() -> None:
    rows = bench_secure.run(50, 1400)
    names = [r[0] for r in rows]
    assert names[:2] == ["copy", "aesgcm"] and "encr.seal_batch/46" in names
    assert all(us > 0 for _, us in rows)
    assert bench_secure.main(["--packets", "50"]) == 0
