"""MAny-A's chain (tasks/rows/many_answer.py): the LPM merge on G_all + λ·G_answer. λ = 0 is MAny's merge step byte
for byte; λ > 0 changes the merge; the stored answer Grams are those of the positions that predict answer tokens,
under the task's own model; per-task weights override the default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from many.config import AnswerWeightConfig, LPMConfig, StatsConfig
from many.stats import gram_groups, load_grams
from tasks.rows.many import compute_merge
from tasks.rows.many_answer import AnswerMergeStageConfig, compute_merge_answer, weighted_grams
from tests.conftest import two_task_stages

STATS = StatsConfig(batch_size=8)


def _workdir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def task_inputs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tasks' stage outputs on the fixture base: data, finetune (6 steps) and all-token Grams."""
    return two_task_stages(tiny_base_dir, tmp_path_factory.mktemp("many-answer"), STATS, steps=6)


def _chain(inputs: dict[str, Path], root: Path, answer: AnswerWeightConfig) -> list[dict[str, Path]]:
    config = AnswerMergeStageConfig(lpm=LPMConfig(), answer=answer, stats=STATS)
    links: list[dict[str, Path]] = []
    for t in range(2):
        link = {"base": inputs["base"], "data": inputs[f"data{t}"], "finetune": inputs[f"finetune{t}"],
                "grams": inputs[f"grams{t}"]} | ({"previous": links[-1]["state"]} if links else {})
        links.append(compute_merge_answer(link, _workdir(root, f"link{t}"), config=config, device="cpu"))
    return links


def _adapter(link: dict[str, Path]) -> dict[str, torch.Tensor]:
    return load_file(str(link["adapter"] / "adapter_model.safetensors"))


def test_weight_zero_is_many_merge_byte_for_byte(task_inputs: dict[str, Path], tmp_path: Path) -> None:
    answered = _chain(task_inputs, tmp_path / "a", AnswerWeightConfig(weight=0.0))
    plain: list[dict[str, Path]] = []
    for t in range(2):
        link = {"finetune": task_inputs[f"finetune{t}"], "grams": task_inputs[f"grams{t}"]}
        link |= {"previous": plain[-1]["state"]} if plain else {}
        plain.append(compute_merge(link, _workdir(tmp_path / "m", str(t)), config=LPMConfig(), device="cpu"))
    for a, m in zip(answered, plain, strict=True):
        assert set(a) == {"state", "adapter", "export", "answer_grams"}
        assert (a["adapter"] / "adapter_model.safetensors").read_bytes() == (m["adapter"] / "adapter_model.safetensors").read_bytes()
        assert a["export"].read_text() == m["export"].read_text()
    assert not (answered[0]["state"].parent / "weighted").exists()  # the weighted Gram is not left behind


def test_weight_changes_the_merge_and_per_task_weights_override(task_inputs: dict[str, Path], tmp_path: Path) -> None:
    zero = _adapter(_chain(task_inputs, tmp_path / "zero", AnswerWeightConfig(weight=0.0))[-1])
    one = _chain(task_inputs, tmp_path / "one", AnswerWeightConfig(weight=1.0))
    assert any(not torch.allclose(zero[k], v) for k, v in _adapter(one[-1]).items())
    # weight 0 everywhere but λ = 1 for both tasks by name is the λ = 1 merge
    by_name = _chain(task_inputs, tmp_path / "named", AnswerWeightConfig(weight=0.0, tasks={"colour": 1.0, "shape": 1.0}))
    assert all(torch.equal(v, _adapter(by_name[-1])[k]) for k, v in _adapter(one[-1]).items())
    # the stored answer Grams: symmetric, grouped as the stats stage's, and not the all-token Grams
    answer, grams = load_grams(one[0]["answer_grams"]), load_grams(task_inputs["grams0"])
    assert gram_groups(answer) == gram_groups(grams)
    assert all(torch.allclose(g, g.T) and not torch.allclose(g, grams[k]) for k, g in answer.items())


def test_weighted_grams_keep_the_groups_and_refuse_another_grouping() -> None:
    shared, other = torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
    grams = {"q": shared, "k": shared, "o": other}
    answer_shared = torch.ones(2, 2, dtype=torch.float64)
    answer = {"q": answer_shared, "k": answer_shared, "o": torch.zeros(2, 2, dtype=torch.float64)}
    combined = weighted_grams(grams, answer, 0.5)
    assert combined["q"] is combined["k"] and gram_groups(combined) == gram_groups(grams)
    torch.testing.assert_close(combined["q"], shared + 0.5 * answer_shared)
    torch.testing.assert_close(combined["o"], other)
    with pytest.raises(ValueError, match="group the LoRA layers differently"):
        weighted_grams(grams, {"q": answer_shared, "k": answer_shared.clone(), "o": answer_shared}, 1.0)


def test_config_rejects_negative_weights() -> None:
    from pydantic import ValidationError

    for bad in ({"weight": -1.0}, {"tasks": {"style-cls": -0.5}}):
        with pytest.raises(ValidationError):
            AnswerWeightConfig(**bad)
    assert AnswerWeightConfig(weight=2.0, tasks={"a": 0.5}).weight_of("a") == 0.5
    assert AnswerWeightConfig(weight=2.0, tasks={"a": 0.5}).weight_of("b") == 2.0
