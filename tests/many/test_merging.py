"""The merge baselines (many/merging/) on hand-computed layers, their identities, and their bad-input errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from many.merging import CONFIGS, MERGERS, get_merger, merge_layer, merge_model
from many.merging.average import AverageConfig
from many.merging.regmean import RegMeanConfig
from many.merging.task_arithmetic import TaskArithmeticConfig
from many.merging.ties import TiesConfig, trim


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


D1 = t([[1, 2], [3, 4]])
D2 = t([[3, 0], [-1, 2]])


def test_average_by_hand() -> None:
    assert torch.equal(merge_layer("average", [D1, D2], None, AverageConfig()), t([[2, 1], [1, 3]]))


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [(TaskArithmeticConfig(scale=0.5), [[2, 1], [1, 3]]), (TaskArithmeticConfig(), [[1.2, 0.6], [0.6, 1.8]])],
)
def test_task_arithmetic_by_hand(cfg: TaskArithmeticConfig, expected: list[list[float]]) -> None:
    torch.testing.assert_close(merge_layer("task_arithmetic", [D1, D2], None, cfg), t(expected))


# Density 0.5 keeps 3 of 6 entries per task:
#   T1 = [[4, 0, 2], [0, -3, 0]]   T2 = [[-2, 5, 0], [3, 0, 0]]   T3 = [[3, -6, 0], [-4, 0, 0]]
#   Σ = [[5, -1, 2], [-1, -3, 0]] → signs [[+, -, +], [-, -, 0]]
#   agreeing means: (0,0) (4+3)/2; (0,1) -6; (0,2) 2; (1,0) -4; (1,1) -3; (1,2) nothing kept → 0
TIES_DELTAS = [
    t([[4, -1, 2], [0.5, -3, 1.5]]),
    t([[-2, 5, 1], [3, -0.5, 0.2]]),
    t([[3, -6, -0.1], [-4, 0.3, 2.5]]),
]
TIES_EXPECTED = t([[3.5, -6, 2], [-4, -3, 0]])


def test_ties_trim_keeps_top_magnitudes() -> None:
    assert torch.equal(trim(TIES_DELTAS[2], 0.5), t([[3, -6, 0], [-4, 0, 0]]))
    assert torch.equal(trim(t([[1, -2, 3]]), 0.01), t([[0, 0, 3]]))  # at least one entry survives


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_ties_by_hand(scale: float) -> None:
    merged = merge_layer("ties", TIES_DELTAS, None, TiesConfig(density=0.5, scale=scale))
    torch.testing.assert_close(merged, scale * TIES_EXPECTED)


def test_ties_cancelling_signs_give_zero_and_agreeing_signs_give_average() -> None:
    cancelled = merge_layer("ties", [t([[2.0]]), t([[-2.0]])], None, TiesConfig(density=1.0))
    assert torch.equal(cancelled, t([[0.0]]))
    positive = [D1.abs() + 1, D2.abs() + 1]
    torch.testing.assert_close(
        merge_layer("ties", positive, None, TiesConfig(density=1.0)), merge_layer("average", positive)
    )


def test_regmean_by_hand() -> None:
    # a = 0.5: G̃1 = [[2, 1], [1, 2]], G̃2 = [[4, 0], [0, 2]]; C = [[6, 1], [1, 4]], C⁻¹ = [[4, -1], [-1, 6]] / 23
    # R = G̃1 [1, 0]ᵀ + G̃2 [0, 1]ᵀ = [2, 3]ᵀ → Mᵀ = [5, 16]ᵀ / 23
    grams = [t([[2, 2], [2, 2]]), t([[4, 0], [0, 2]])]
    merged = merge_layer("regmean", [t([[1, 0]]), t([[0, 1]])], grams, RegMeanConfig(a=0.5))
    torch.testing.assert_close(merged, t([[5 / 23, 16 / 23]]))


def test_regmean_takes_each_input_dimension_from_the_task_that_uses_it() -> None:
    grams = [t([[1, 0], [0, 0]]), t([[0, 0], [0, 1]])]
    merged = merge_layer("regmean", [t([[1, 2]]), t([[3, 4]])], grams, RegMeanConfig(a=1.0))
    torch.testing.assert_close(merged, t([[1, 4]]))


def test_regmean_relative_ridge_by_hand() -> None:
    # one task, G = I, γ = 1: C = I + 1·mean(diag)·I = 2I → M = ΔW / 2
    merged = merge_layer("regmean", [D1], [torch.eye(2, dtype=torch.float64)], RegMeanConfig(gamma=1.0))
    torch.testing.assert_close(merged, D1 / 2)


def test_regmean_equals_average_for_equal_grams_and_returns_one_task_unchanged() -> None:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=generator)
    gram = (X.T @ X / 50).float()  # (in, in)
    deltas = [torch.randn(4, 6, generator=generator) for _ in range(3)]  # (out, in)
    merged = merge_layer("regmean", deltas, [gram] * 3)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, merge_layer("average", deltas), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_layer("regmean", deltas[:1], [gram]), deltas[0], rtol=1e-5, atol=1e-5)


def test_merge_model_goes_layer_by_layer() -> None:
    layers = {"q_proj": [D1, D2], "v_proj": [D2, D2]}
    grams = {"q_proj": [torch.eye(2)] * 2, "v_proj": [torch.eye(2)] * 2}
    merged = merge_model("regmean", layers, grams, RegMeanConfig(a=1.0))
    assert set(merged) == {"q_proj", "v_proj"}
    torch.testing.assert_close(merged["q_proj"], t([[2, 1], [1, 3]]))
    torch.testing.assert_close(merged["v_proj"], D2)


def test_registry_is_complete_and_unknown_names_list_the_known_ones() -> None:
    assert set(MERGERS) == set(CONFIGS) == {"average", "task_arithmetic", "ties", "regmean"}
    assert get_merger("ties") is MERGERS["ties"]
    with pytest.raises(ValueError, match="unknown merge method 'dare'; known: average, regmean, task_arithmetic, ties"):
        get_merger("dare")


def test_configs_are_frozen_validated_and_have_the_documented_defaults() -> None:
    assert TaskArithmeticConfig().scale == 0.3
    assert (TiesConfig().density, TiesConfig().scale) == (0.2, 1.0)
    assert (RegMeanConfig().a, RegMeanConfig().gamma) == (0.9, 0.0)
    with pytest.raises(ValidationError, match="densty"):
        TiesConfig(densty=0.5)
    with pytest.raises(ValidationError, match="density"):
        TiesConfig(density=0.0)
    with pytest.raises(ValidationError, match="frozen"):
        TiesConfig().density = 0.5  # type: ignore[misc]


NAN = t([[float("nan"), 0], [0, 0]])
# (case, method, deltas, grams, cfg, literal fragments the error message must contain)
BAD_LAYERS = [
    ("empty task list", "average", [], None, None, ["layer 'L': no task deltas"]),
    ("1-D delta", "average", [torch.ones(3)], None, None, ["layer 'L': task 0 delta has shape (3,); expected a 2-D"]),
    ("shape mismatch", "ties", [D1, torch.ones(2, 3)], None, None,
     ["layer 'L': task 1 delta has shape (2, 3), task 0 has (2, 2)"]),
    ("NaN delta", "task_arithmetic", [D1, NAN], None, None, ["layer 'L': task 1 delta contains NaN/Inf"]),
    ("Inf Gram", "regmean", [D1], [t([[float("inf"), 0], [0, 1]])], None,
     ["layer 'L': task 0 Gram contains NaN/Inf"]),
    ("Gram shape", "regmean", [D1], [torch.eye(3)], None,
     ["layer 'L': task 0 Gram has shape (3, 3); expected (in, in) = (2, 2)"]),
    ("Gram count", "regmean", [D1, D2], [torch.eye(2)], None, ["layer 'L': 1 Grams for 2 task deltas"]),
    ("no Grams", "regmean", [D1], None, None, ["layer 'L': regmean needs one Gram per task"]),
    ("singular Gram", "regmean", [D1], [t([[1, 1], [1, 1]])], RegMeanConfig(a=1.0),
     ["layer 'L': regmean: Σ G̃_i is not positive definite", "set gamma > 0"]),
    ("wrong config", "average", [D1], None, TiesConfig(),
     ["merge method 'average' takes a AverageConfig, got TiesConfig"]),
]


@pytest.mark.parametrize(
    ("name", "deltas", "grams", "cfg", "fragments"),
    [case[1:] for case in BAD_LAYERS],
    ids=[case[0] for case in BAD_LAYERS],
)
def test_bad_layer_inputs_name_the_layer(name, deltas, grams, cfg, fragments) -> None:  # noqa: ANN001
    with pytest.raises(ValueError) as error:
        merge_layer(name, deltas, grams, cfg, layer="L")
    for fragment in fragments:
        assert fragment in str(error.value)


BAD_MODELS = [
    ("no layers", {}, None, "merge_model('average'): no layers to merge"),
    ("task counts", {"a": [D1], "b": [D1, D2]}, None, "layers have different task counts {'a': 1, 'b': 2}"),
    ("Gram keys", {"a": [D1], "b": [D1]}, {"a": [torch.eye(2)], "c": [torch.eye(2)]},
     "only in deltas: ['b']; only in grams: ['c']"),
]


@pytest.mark.parametrize(
    ("deltas", "grams", "fragment"), [case[1:] for case in BAD_MODELS], ids=[case[0] for case in BAD_MODELS]
)
def test_bad_model_inputs_list_the_layers(deltas, grams, fragment) -> None:  # noqa: ANN001
    with pytest.raises(ValueError) as error:
        merge_model("average", deltas, grams)
    assert fragment in str(error.value)
