"""benchmarks/gpu.py: one line and exit 2 without CUDA; its CPU smoke path at toy shapes runs both loops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import all as bench_all
from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark runs instead")
def test_refuses_without_cuda_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no CUDA device" in err
    assert "benchmarks.gpu" not in [module for module, _, _ in bench_all.BENCHMARKS]  # not in make bench here


def test_smoke_trains_both_loops_at_toy_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--smoke", "--json", str(tmp_path / "gpu.json")]) == 0
    out = capsys.readouterr().out
    assert "| many / bare PEFT steps/s (toy-shaped, float32) |" in out and "not run (smoke" in out
    step = json.loads((tmp_path / "gpu.json").read_text())["lora_step"]
    assert step["device"] == "cpu" and step["many_steps_per_s"] > 0 and step["bare_steps_per_s"] > 0
    assert step["ratio"] == pytest.approx(step["many_steps_per_s"] / step["bare_steps_per_s"])
