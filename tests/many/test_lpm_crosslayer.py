"""Cross-layer Grams (many.lpm_crosslayer, the many_xl row's merge_xl chain): the input groups in forward order; the
first group's Grams are the stats stage's, so its merge is RegMean's on them; later groups differ from the merge on
own-model Grams; one task reproduces its own update on its inputs; the chain stage writes what the merge returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from many.adapters import projector_state
from many.config import LPMConfig, StatsConfig
from many.data import read_task
from many.lpm_crosslayer import TaskParts, cross_layer_merge, group_gram, input_groups
from many.merging import regmean
from many.merging.config import RegMeanConfig
from many.model.parts import PEFT_PREFIX
from many.stats import encoded_batches, load_grams
from tasks.rows.many_xl import CrossLayerStageConfig, compute_merge_xl
from tasks.rows.parts import task_deltas
from tasks.stages import load_base
from tests.conftest import make_samples, two_task_stages

STATS = StatsConfig(batch_size=8)
LPM = LPMConfig()


@pytest.fixture(scope="module")
def stages(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tasks' data, fine-tuned adapters (8 steps, rank 2) and all-token Grams on the fixture base."""
    return two_task_stages(tiny_base_dir, tmp_path_factory.mktemp("many-xl"), STATS, steps=8, lr=1e-2)


def _tasks(stages: dict[str, Path], n: int) -> list[TaskParts]:
    return [TaskParts(task_deltas(stages[f"finetune{t}"]), projector_state(stages[f"finetune{t}"]),
                      read_task(stages[f"data{t}"]).train) for t in range(n)]


def _fit_error(merged: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((M − ΔW) G (M − ΔW)ᵀ) / tr(ΔW G ΔWᵀ)."""
    diff, delta = (merged - delta).double(), delta.double()
    return float(torch.trace(diff @ gram @ diff.T) / torch.trace(delta @ gram @ delta.T))


def test_input_groups_follow_the_forward_pass(stages: dict[str, Path]) -> None:
    model, processor = load_base(stages["base"], "float32", "cpu")
    names = [name.removeprefix(PEFT_PREFIX) for name in task_deltas(stages["finetune0"])]
    groups = input_groups(model, next(encoded_batches(model, processor, make_samples(2), STATS.batch_size))[0], names)
    kinds = [tuple(name.rsplit(".", 1)[1] for name in group) for group in groups]
    blocks = len(groups) // 4
    assert blocks >= 1 and kinds == [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                                     ("down_proj",)] * blocks
    assert [int(group[0].split(".layers.")[1].split(".")[0]) for group in groups] == sorted(
        int(group[0].split(".layers.")[1].split(".")[0]) for group in groups)  # block by block
    with pytest.raises(ValueError, match="does not have"):
        input_groups(model, next(encoded_batches(model, processor, make_samples(2), STATS.batch_size))[0], [*names, "model.no_such_layer"])


def test_first_group_gram_is_the_stats_stages_and_later_groups_merge_differently(stages: dict[str, Path]) -> None:
    model, processor = load_base(stages["base"], "float32", "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks(stages, 2)
    merged = cross_layer_merge(model, processor, tasks, LPM, STATS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is left as it was
    assert set(merged) == set(tasks[0].deltas)
    own = [load_grams(stages[f"grams{t}"]) for t in range(2)]
    first = next(name for name in merged if name.endswith("layers.0.self_attn.q_proj"))
    # the first group sees no merged layer: its cross-layer Gram is the stats stage's, so its merge is RegMean's on it
    model.model.multi_modal_projector.load_state_dict(tasks[1].projector)
    gram = group_gram(model, processor, tasks[1].samples, dict(model.named_modules())[first.removeprefix(PEFT_PREFIX)], STATS)
    torch.testing.assert_close(gram, own[1][first], rtol=1e-6, atol=1e-9)
    solve = RegMeanConfig(a=LPM.a, gamma=LPM.gamma)
    torch.testing.assert_close(merged[first], regmean.merge([t.deltas[first] for t in tasks], [g[first] for g in own], solve))
    # a later layer's inputs pass through the merged earlier layers: its merge differs from the own-model-Gram one
    last = next(name for name in reversed(list(merged)) if name.endswith("down_proj"))
    plain = regmean.merge([t.deltas[last] for t in tasks], [g[last] for g in own], solve)
    assert not torch.allclose(merged[last], plain, rtol=1e-3, atol=1e-6)


def test_one_task_keeps_its_own_update_on_its_inputs(stages: dict[str, Path]) -> None:
    model, processor = load_base(stages["base"], "float32", "cpu")
    tasks = _tasks(stages, 1)
    merged = cross_layer_merge(model, processor, tasks, LPM, STATS)
    grams = load_grams(stages["grams0"])  # one task: the merged earlier layers are its own, so its Grams are these
    errors = [_fit_error(merged[name], delta, grams[name]) for name, delta in tasks[0].deltas.items()]
    assert max(errors) < 1e-3


def test_the_chain_stage_writes_the_merge(stages: dict[str, Path], tmp_path: Path) -> None:
    inputs = {"base": stages["base"], "data_0": stages["data0"], "data_1": stages["data1"],
              "finetune_0": stages["finetune0"], "finetune_1": stages["finetune1"]}
    out = compute_merge_xl(inputs, tmp_path, config=CrossLayerStageConfig(a=LPM.a, gamma=LPM.gamma, stats=STATS),
                           device="cpu")
    model, processor = load_base(stages["base"], "float32", "cpu")
    expected = cross_layer_merge(model, processor, _tasks(stages, 2), LPM, STATS)
    written = load_file(str(out["deltas"]))
    assert set(written) == set(expected)
    assert all(torch.equal(written[name], expected[name].float()) for name in expected)
    with pytest.raises(ValueError, match="no task"):
        cross_layer_merge(model, processor, [], LPM, STATS)
