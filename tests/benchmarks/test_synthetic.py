"""The synthetic merge stream (benchmarks/synthetic.py) through the real, layer-streamed merge stage: the stored
adapter equals the batch least-squares merge of the same tasks, and the state holds one file per layer."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.synthetic import Shape, merge_stream, write_task
from many.adapters import lora_factors
from many.config import LPMConfig
from many.lpm import batch_merge
from many.lpm_files import state_gammas
from many.stats import load_grams
from tasks.store import Store


def test_streamed_merge_stage_equals_the_batch_merge(tmp_path: Path) -> None:
    shape = Shape(layers=2, hidden=16, intermediate=24, rank=2)
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    steps, manifest = merge_stream(store, tmp_path / "store", shape, 3, tmp_path / "inputs")
    assert [s.t for s in steps] == [1, 2, 3]
    assert steps[-1].state_bytes > steps[0].state_bytes  # B and A·G̃ grow by r per task
    assert steps[-1].store_bytes > steps[0].store_bytes > 0

    state_dir = store.materialize(manifest.outputs["state"], context="test")
    assert set(state_gammas(state_dir)) == set(shape.modules())
    merged = lora_factors(store.materialize(manifest.outputs["adapter"], context="test"))
    tasks = [write_task(shape, seed=t, out=tmp_path / "again") for t in (1, 2, 3)]
    loras = [lora_factors(task_dir / "adapter") for task_dir, _ in tasks]
    grams = [load_grams(path) for _, path in tasks]
    for module in shape.modules():
        B, A, scale = merged[module]
        expected = batch_merge([lora[module] for lora in loras], [g[module] for g in grams], LPMConfig(), module)
        torch.testing.assert_close((scale * B.double() @ A.double()), expected, rtol=1e-4, atol=1e-6)
