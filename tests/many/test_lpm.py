"""LPM (many/lpm.py) against its algebra: recursion == batch formula, order invariance, limits, exact LoRA export,
optimality of the merge; its state as tensors and back (many/lpm_files.py); and a table of bad inputs
(many/lpm_checks.py)."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from many.config import LPMConfig
from many.lpm import (
    LayerState,
    absorb,
    absorb_group,
    absorb_model,
    batch_merge,
    export_group,
    export_lora,
    regularize,
    solve,
    truncate,
)
from many.lpm_files import group_from_tensors, group_tensors

OUT, IN, RANK = 12, 10, 3
LAYER = "model.language_model.layers.0.self_attn.q_proj"


def make_task(generator: torch.Generator, samples: int = 40, out: int = OUT, n: int = IN, rank: int = RANK):
    """A LoRA with non-zero B (PEFT's zero init would hide bugs), its inputs X and their Gram XᵀX/N."""
    B = torch.randn(out, rank, generator=generator, dtype=torch.float64)
    A = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    # Correlated inputs with a per-task offset, so that the Grams differ in more than scale.
    mixing = torch.randn(n, n, generator=generator, dtype=torch.float64)
    X = torch.randn(samples, n, generator=generator, dtype=torch.float64) @ mixing
    X = X + torch.randn(n, generator=generator, dtype=torch.float64)
    scale = 16.0 / rank
    return (B, A, scale), X, X.T @ X / samples


def make_tasks(count: int, seed: int = 0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    tasks = [make_task(generator, samples=30 + 7 * i, **kwargs) for i in range(count)]
    return [lora for lora, _, _ in tasks], [X for _, X, _ in tasks], [G for _, _, G in tasks]


def recursive_merge(loras, grams, cfg, layer=LAYER) -> LayerState:
    state = None
    for (B, A, scale), gram in zip(loras, grams):
        state = absorb(state, B, A, scale, gram, cfg, layer)
    return state


def assert_close(actual, expected, rtol):
    # Relative to the matrix's scale: entries near zero make element-wise rtol meaningless.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("a", [1.0, 0.6])
@pytest.mark.parametrize("tasks", range(1, 7))
def test_recursive_equals_batch(tasks, a):
    loras, _, grams = make_tasks(tasks)
    cfg = LPMConfig(a=a, gamma=1e-3)
    state = recursive_merge(loras, grams, cfg)
    assert state.tasks == tasks and state.rank == tasks * RANK
    assert_close(solve(state, LAYER), batch_merge(loras, grams, cfg, LAYER), rtol=1e-8)


def test_float32_inputs_give_float64_merge():
    loras, _, grams = make_tasks(3)
    cfg = LPMConfig()
    loras32 = [(B.float(), A.float(), s) for B, A, s in loras]
    merged = solve(recursive_merge(loras32, [G.float() for G in grams], cfg), LAYER)
    assert merged.dtype == torch.float64
    assert_close(merged, batch_merge(loras, grams, cfg, LAYER), rtol=1e-4)


def test_gamma_is_fixed_at_first_task():
    loras, _, grams = make_tasks(3)
    cfg = LPMConfig(gamma=0.01, gamma_mode="relative")
    first = absorb(None, *loras[0], grams[0], cfg, LAYER)
    assert math.isclose(first.gamma, 0.01 * grams[0].diagonal().mean().item(), rel_tol=1e-12)
    assert recursive_merge(loras, grams, cfg).gamma == first.gamma
    assert absorb(None, *loras[0], grams[0], LPMConfig(gamma=0.5, gamma_mode="absolute"), LAYER).gamma == 0.5


def test_absorb_leaves_the_old_state_unchanged():
    loras, _, grams = make_tasks(2)
    cfg = LPMConfig()
    state = absorb(None, *loras[0], grams[0], cfg, LAYER)
    before = {name: t.clone() for name, t in group_tensors({LAYER: state})[0].items()}
    absorb(state, *loras[1], grams[1], cfg, LAYER)
    for name, tensor in group_tensors({LAYER: state})[0].items():
        assert torch.equal(tensor, before[name]), name


def test_order_invariance():
    # Absolute γ: in relative mode γ depends on which task came first, by design.
    loras, _, grams = make_tasks(5)
    cfg = LPMConfig(gamma=1e-3, gamma_mode="absolute")
    forward = solve(recursive_merge(loras, grams, cfg), LAYER)
    order = [3, 0, 4, 2, 1]
    shuffled = solve(recursive_merge([loras[i] for i in order], [grams[i] for i in order], cfg), LAYER)
    assert_close(shuffled, forward, rtol=1e-8)


@pytest.mark.parametrize("gamma", [0.0, 1e-12])
def test_one_task_without_ridge_returns_its_update(gamma):
    loras, _, grams = make_tasks(1)  # 30 samples > IN = 10: the Gram has full rank
    B, A, scale = loras[0]
    state = recursive_merge(loras, grams, LPMConfig(gamma=gamma, gamma_mode="absolute"))
    assert_close(solve(state, LAYER), scale * B @ A, rtol=1e-8)


def test_equal_grams_give_the_average_update():
    loras, _, grams = make_tasks(4)
    shared = grams[0]
    state = recursive_merge(loras, [shared] * 4, LPMConfig(gamma=0.0, gamma_mode="absolute"))
    average = sum(scale * B @ A for B, A, scale in loras) / 4
    assert_close(solve(state, LAYER), average, rtol=1e-8)


def test_regularize_shrinks_only_the_off_diagonal():
    gram = make_tasks(1)[2][0]
    shrunk = regularize(gram.float(), 0.25)
    assert shrunk.dtype == torch.float64
    torch.testing.assert_close(shrunk.diagonal(), gram.diagonal(), rtol=1e-6, atol=0)
    off = ~torch.eye(IN, dtype=torch.bool)
    torch.testing.assert_close(shrunk[off], 0.25 * gram[off], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(regularize(gram, 0.0), torch.diag(gram.diagonal()))


@pytest.mark.parametrize("a", [1.0, 0.5])
def test_exported_lora_reproduces_the_merge(a):
    loras, _, grams = make_tasks(4)
    state = recursive_merge(loras, grams, LPMConfig(a=a, state_form="thin"))
    merged_B, merged_A = export_lora(state, LAYER)
    assert merged_B.shape == (OUT, 4 * RANK) and merged_A.shape == (4 * RANK, IN)
    assert_close(merged_B @ merged_A, solve(state, LAYER), rtol=1e-6)
    # Dense: M_t against an identity (IN ≤ OUT here), the product bit for bit M_t.
    dense = recursive_merge(loras, grams, LPMConfig(a=a, state_form="dense"))
    dense_B, dense_A = export_lora(dense, LAYER)
    assert dense_B.shape == (OUT, IN) and torch.equal(dense_A, torch.eye(IN, dtype=torch.float64))
    assert torch.equal(dense_B @ dense_A, solve(dense, LAYER))
    assert_close(dense_B @ dense_A, merged_B @ merged_A, rtol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 7, 11, 12])
def test_truncation_reports_its_true_error(rank):
    loras, _, grams = make_tasks(4)
    B, A = export_lora(recursive_merge(loras, grams, LPMConfig()), LAYER)
    short_B, short_A, error = truncate(B, A, rank)
    assert short_B.shape[1] == short_A.shape[0] <= rank
    dense = B @ A
    true_error = (torch.linalg.matrix_norm(dense - short_B @ short_A) / torch.linalg.matrix_norm(dense)).item()
    assert math.isclose(error, true_error, rel_tol=1e-6, abs_tol=1e-12)
    # The SVD truncation is optimal: its error is the tail of the dense singular values.
    singular = torch.linalg.svdvals(dense)
    assert math.isclose(error, (singular[rank:].norm() / singular.norm()).item(), rel_tol=1e-6, abs_tol=1e-12)


def test_truncation_at_full_rank_is_exact():
    B, A = torch.randn(OUT, 4, dtype=torch.float64), torch.randn(4, IN, dtype=torch.float64)
    same_B, same_A, error = truncate(B, A, 4)
    assert error == 0.0 and torch.equal(same_B @ same_A, B @ A)


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_merge_minimises_the_least_squares_objective(gamma):
    loras, inputs, grams = make_tasks(3)
    cfg = LPMConfig(a=1.0, gamma=gamma, gamma_mode="absolute")
    merged = solve(recursive_merge(loras, grams, cfg), LAYER)

    def objective(M):
        # Σ_i ‖X_i Mᵀ − X_i ΔW_iᵀ‖² / N_i + γ‖M‖², whose normal equations are LPM's with G_i = X_iᵀX_i / N_i.
        fit = sum(((X @ (M - scale * B @ A).T) ** 2).sum() / X.shape[0] for (B, A, scale), X in zip(loras, inputs))
        return (fit + gamma * (M**2).sum()).item()

    best = objective(merged)
    generator = torch.Generator().manual_seed(1)
    for step in (1e-1, 1e-3):
        for _ in range(10):
            direction = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
            assert objective(merged + step * direction) > best
            assert objective(merged - step * direction) > best


@pytest.mark.parametrize("form", ["thin", "dense"])
def test_state_round_trip(tmp_path, form):
    loras, _, grams = make_tasks(3)
    state = recursive_merge(loras, grams, LPMConfig(state_form=form))
    path = tmp_path / "state.safetensors"
    tensors, metadata = group_tensors({LAYER: state})
    stored = {"thin": {f"B.{LAYER}", f"AG.{LAYER}"}, "dense": {f"R.{LAYER}"}}[form]
    assert set(tensors) == {"C", "gamma", "tasks", *stored}  # thin: R = AGᵀBᵀ derived, never stored
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with safetensors.safe_open(str(path), framework="pt") as f:
        restored = group_from_tensors({key: f.get_tensor(key) for key in f.keys()}, f.metadata(), LAYER)[LAYER]
    assert (restored.gamma, restored.tasks, restored.rank, restored.form) == (state.gamma, state.tasks, 3 * RANK, form)
    for name in ("C", "R", "B", "AG"):
        if getattr(state, name) is None:
            assert getattr(restored, name) is None, name
        else:
            assert torch.equal(getattr(restored, name), getattr(state, name)), name
    # The restored state keeps absorbing exactly like the original.
    extra_lora, extra_gram = make_tasks(1, seed=7)[0][0], make_tasks(1, seed=7)[2][0]
    assert torch.equal(
        solve(absorb(restored, *extra_lora, extra_gram, LPMConfig(), LAYER), LAYER),
        solve(absorb(state, *extra_lora, extra_gram, LPMConfig(), LAYER), LAYER),
    )


QKV = ("layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj")


def group_tasks(count: int) -> tuple[list[dict], list[torch.Tensor]]:
    """`count` tasks of three layers reading one input: per task {layer: LoRA} and the one Gram."""
    generator = torch.Generator().manual_seed(5)
    loras, grams = [], []
    for _ in range(count):
        task = [make_task(generator, out=OUT - i) for i in range(len(QKV))]
        loras.append({name: lora for name, (lora, _, _) in zip(QKV, task)})
        grams.append(task[0][2])
    return loras, grams


@pytest.mark.parametrize("a", [1.0, 0.7])
def test_group_shares_one_C_and_equals_the_layers_merged_alone(a):
    loras, grams = group_tasks(3)
    cfg = LPMConfig(a=a)  # "auto": the layers (OUT, OUT − 1, OUT − 2 out) switch to dense at different steps
    group = None
    for task, gram in zip(loras, grams):
        group = absorb_group(group, task, gram, cfg, QKV[0])
    assert len({id(state.C) for state in group.values()}) == 1
    exported = export_group(group, QKV[0])
    for name in QKV:
        alone = recursive_merge([task[name] for task in loras], grams, cfg, name)
        assert group[name].form == alone.form
        for field in ("C", "B", "AG", "R"):
            if getattr(alone, field) is not None:
                assert torch.equal(getattr(group[name], field), getattr(alone, field)), (name, field)
        assert (group[name].gamma, group[name].tasks) == (alone.gamma, alone.tasks)
        # The group's one Cholesky factor gives each layer the bits of its own export.
        for got, expected in zip(exported[name], export_lora(alone, name)):
            assert torch.equal(got, expected)
        expected = batch_merge([task[name] for task in loras], grams, cfg, name)
        assert_close(exported[name][0] @ exported[name][1], expected, rtol=1e-8)


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.float32])
def test_group_state_stores_C_once_and_loads_for_each_layer(tmp_path, c_dtype):
    loras, grams = group_tasks(2)
    cfg = LPMConfig(state_form="thin")
    group = absorb_group(absorb_group(None, loras[0], grams[0], cfg, QKV[0]), loras[1], grams[1], cfg, QKV[0])
    tensors, metadata = group_tensors(group, c_dtype)
    assert sorted(tensors) == sorted(["C", "gamma", "tasks", *(f"{f}.{n}" for n in QKV for f in ("B", "AG"))])
    assert tensors["C"].dtype == c_dtype
    path = tmp_path / "group.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with safetensors.safe_open(str(path), framework="pt") as f:
        restored = group_from_tensors({key: f.get_tensor(key) for key in f.keys()}, f.metadata(), QKV[0])
    assert list(restored) == list(QKV)
    assert len({id(state.C) for state in restored.values()}) == 1
    assert restored[QKV[0]].C.dtype == torch.float64
    for name in QKV:
        assert torch.equal(restored[name].B, group[name].B) and torch.equal(restored[name].AG, group[name].AG)
        if c_dtype == torch.float64:
            assert torch.equal(restored[name].C, group[name].C)
        else:  # C rounded to float32 between tasks: the merge moves by about cond(C) · 2⁻²⁴
            assert_close(solve(restored[name], name), solve(group[name], name), rtol=1e-4)


def test_absorb_model_groups_layers_given_one_gram_object():
    loras, grams = group_tasks(2)
    states = None
    for task, gram in zip(loras, grams):
        states = absorb_model(states, task, dict.fromkeys(QKV, gram), LPMConfig())
    assert len({id(state.C) for state in states.values()}) == 1
    copies = absorb_model(None, loras[0], {name: grams[0].clone() for name in QKV}, LPMConfig())
    assert len({id(state.C) for state in copies.values()}) == 3  # equal values, separate objects: no grouping


def test_absorb_model_merges_layer_by_layer():
    names = ["layers.0.q_proj", "layers.0.down_proj"]
    shapes = {"layers.0.q_proj": (OUT, IN), "layers.0.down_proj": (6, 9)}
    cfg = LPMConfig(a=0.8)
    states = None
    per_task = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        task = {name: make_task(generator, out=shapes[name][0], n=shapes[name][1]) for name in names}
        per_task.append(task)
        loras = {name: lora for name, (lora, _, _) in task.items()}
        grams = {name: gram for name, (_, _, gram) in task.items()}
        states = absorb_model(states, loras, grams, cfg)
    assert set(states) == set(names)
    for name in names:
        expected = batch_merge([t[name][0] for t in per_task], [t[name][2] for t in per_task], cfg, name)
        assert_close(solve(states[name], name), expected, rtol=1e-8)


def _task_inputs(**changes):
    """One valid task, as keyword arguments of `absorb`, with some of them replaced."""
    (B, A, scale), _, gram = make_task(torch.Generator().manual_seed(0))
    inputs = {"lora_B": B, "lora_A": A, "scale": scale, "gram": gram}
    return {**inputs, **{name: change(inputs[name]) for name, change in changes.items()}}


def _with_nan(tensor):
    tensor = tensor.clone()
    tensor[0, 1] = math.nan
    return tensor


def _with_inf(tensor):
    tensor = tensor.clone()
    tensor[1, 0] = math.inf
    return tensor


BAD_TASKS = {
    "B and A ranks differ": (_task_inputs(lora_B=lambda B: B[:, :2]), "different ranks"),
    "gram does not match in_features": (
        _task_inputs(gram=lambda G: G[:-1, :-1]),
        "gram has shape (9, 9), expected (10, 10)",
    ),
    "gram not square": (_task_inputs(gram=lambda G: G[:, :-1]), "gram has shape (10, 9)"),
    "A is 1-D": (_task_inputs(lora_A=lambda A: A[0]), "lora_A must be 2-D"),
    "NaN in A": (_task_inputs(lora_A=_with_nan), "lora_A contains NaN or Inf"),
    "NaN in gram": (_task_inputs(gram=_with_nan), "gram contains NaN or Inf"),
    "Inf in B": (_task_inputs(lora_B=_with_inf), "lora_B contains NaN or Inf"),
    "rank 0": (_task_inputs(lora_B=lambda B: B[:, :0], lora_A=lambda A: A[:0]), "rank 0"),
    "rank 0 in B only": (_task_inputs(lora_B=lambda B: B[:, :0]), "rank 0"),
    "NaN scale": (_task_inputs(scale=lambda s: math.nan), "scale must be finite"),
}


@pytest.mark.parametrize("inputs, message", BAD_TASKS.values(), ids=BAD_TASKS.keys())
def test_absorb_rejects_bad_input(inputs, message):
    with pytest.raises(ValueError, match=f"LPM layer '{LAYER}'") as error:
        absorb(None, cfg=LPMConfig(), layer=LAYER, **inputs)
    assert message in str(error.value)
    B, A, scale, gram = inputs["lora_B"], inputs["lora_A"], inputs["scale"], inputs["gram"]
    with pytest.raises(ValueError) as error:
        batch_merge([(B, A, scale)], [gram], LPMConfig(), LAYER)
    assert message in str(error.value)


def test_absorb_rejects_a_task_of_another_shape():
    loras, _, grams = make_tasks(1)
    state = recursive_merge(loras, grams, LPMConfig())
    (B, A, scale), _, gram = make_task(torch.Generator().manual_seed(3), out=OUT + 1)
    with pytest.raises(ValueError, match=r"task is 13×10 \(out×in\) but the state holds a 12×10 layer"):
        absorb(state, B, A, scale, gram, LPMConfig(), LAYER)


def test_singular_system_asks_for_a_larger_gamma():
    # 4 samples < IN = 10: a rank-deficient Gram, and no ridge to make C invertible.
    (B, A, scale), _, gram = make_task(torch.Generator().manual_seed(0), samples=4)
    state = absorb(None, B, A, scale, gram, LPMConfig(gamma=0.0, gamma_mode="absolute"), LAYER)
    for call in (lambda: solve(state, LAYER), lambda: export_lora(state, LAYER)):
        with pytest.raises(ValueError, match=f"LPM layer '{LAYER}'.*larger gamma"):
            call()


(ONE_LORA,), _, (ONE_GRAM,) = make_tasks(1)
ONE_STATE, ONE_METADATA = group_tensors({LAYER: absorb(None, *ONE_LORA, ONE_GRAM, LPMConfig(), LAYER)})
BAD_MERGES = {
    "empty task list": (lambda: batch_merge([], [], LPMConfig(), LAYER), "empty task list"),
    "LoRAs and Grams differ in count": (
        lambda: batch_merge(make_tasks(2)[0], make_tasks(1)[2], LPMConfig(), LAYER),
        "2 LoRAs but 1 Grams",
    ),
    "missing Gram": (
        lambda: absorb_model(None, {"q": ONE_LORA, "v": ONE_LORA}, {"q": ONE_GRAM}, LPMConfig()),
        "missing Grams for layers ['v']",
    ),
    "no LoRA layers": (lambda: absorb_model(None, {}, {}, LPMConfig()), "no LoRA layers"),
    "state without LoRA": (
        lambda: absorb_model(
            absorb_model(None, {"q": ONE_LORA}, {"q": ONE_GRAM}, LPMConfig()),
            {"k": ONE_LORA},
            {"k": ONE_GRAM},
            LPMConfig(),
        ),
        "missing states for ['k'], missing LoRAs for ['q']",
    ),
    "truncation rank 0": (lambda: truncate(torch.ones(4, 2), torch.ones(2, 3), 0), "truncation rank must be ≥ 1"),
    "truncation ranks differ": (lambda: truncate(torch.ones(4, 2), torch.ones(3, 3), 1), "different ranks"),
    "state with a missing key": (
        lambda: group_from_tensors({"C": torch.eye(2, dtype=torch.float64)}, ONE_METADATA),
        "state tensors must have keys",
    ),
    "state with inconsistent shapes": (
        lambda: group_from_tensors({**ONE_STATE, f"AG.{LAYER}": torch.ones(2, 2)}, ONE_METADATA),
        "AG has shape (2, 2), expected (3, 10)",
    ),
    "state of the earlier per-layer format": (
        lambda: group_from_tensors(ONE_STATE, None),
        "not an LPM group state",
    ),
    "group of states that do not share C": (
        lambda: export_group({"q": absorb(None, *ONE_LORA, ONE_GRAM, LPMConfig(), "q"),
                              "k": absorb(None, *ONE_LORA, ONE_GRAM, LPMConfig(), "k")}, "q"),
        "do not share one C",
    ),
    "group state and task hold other layers": (
        lambda: absorb_group(absorb_group(None, {"q": ONE_LORA}, ONE_GRAM, LPMConfig(), "q"), {"k": ONE_LORA},
                             ONE_GRAM, LPMConfig(), "q"),
        "the group's state holds layers ['q'] but the task has LoRAs for ['k']",
    ),
}


@pytest.mark.parametrize("call, message", BAD_MERGES.values(), ids=BAD_MERGES.keys())
def test_merge_rejects_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
