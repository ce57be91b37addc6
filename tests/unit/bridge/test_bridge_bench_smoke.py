"""The pipeline micro-benchmark runs (tiny sizes) and decapsulates without drops; no timing."""

from __future__ import annotations

import bench_pipeline


def test_bench_runs_every_variant(capsys: object) -> None:
    rows = bench_pipeline.run(128, 32, 1400)
    assert [r[0] for r in rows] == ["copy floor"] + [v[0] for v in bench_pipeline.VARIANTS] \
        + [v[0] for v in bench_pipeline.SECURE_VARIANTS]
    assert all(r[1] > 0 for r in rows) and all(r[2] > 0 for r in rows[1:])
    assert bench_pipeline.main(["--packets", "64", "--batch", "32"]) == 0
