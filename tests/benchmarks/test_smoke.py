"""`make bench-smoke`: every benchmark of BENCHMARKS.md runs at its tiny size, so the scripts cannot rot."""

from __future__ import annotations

import pytest

from benchmarks import all as bench_all


@pytest.mark.slow
def test_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_all.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for expected in ("**ucit order**", "**reverse order**", "| goal | measured | goal | met |", "synthetic tasks",
                     "smoke shapes", "sanity rows above match them on every seed", "Gaussian (cpm.metric: mahalanobis)", "step / bare", "store / plain", "finetune_steps_per_s", "ray.cluster_utils.Cluster",
                     "test_bad_user_adapter_is_one_line_exit_2_store_unchanged | 5 / 5",
                     "Critical path", "| LLaVA-1.5-7B, UCIT reference (r = 64) | 4096 | 64 |", "Lever, shared METEOR JVM", "| cold wall / floor |", "cached rerun fixed cost (CPU s)"):
        assert expected in out
