"""MAny-R's residuals (many.residual): ΔW_i − M truncated to rank k from thin factors, mixed per image by CPM's
weights; with k ≥ the residual's rank and one-hot routing the layer is exactly task i's own W0 + ΔW_i."""

import pytest
import torch

from many.config import EvalConfig
from many.evaluate import Assembly, Router, assemble, generate_answers, lora_deltas
from many.model.chat import encode_for_training
from many.model.parts import PEFT_PREFIX, projector_of
from many.residual import RoutedResidual, own_factors, residual, residuals, task_rank
from tests.conftest import make_samples

F64 = torch.float64


def _lora(out: int, inp: int, r: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=F64), torch.randn(r, inp, generator=g, dtype=F64), scale


def _dense(lora):
    B, A, scale = lora
    return scale * B @ A


def test_a_residual_of_full_rank_restores_the_task_update_exactly() -> None:
    task, (mB, mA, _) = _lora(12, 9, 3, 0), _lora(12, 9, 5, 1, 1.0)  # the merge: rank 5, scale 1
    U, V, error = residual(task, (mB, mA), rank=8)  # 8 = r_i + Σr: nothing is cut
    assert U.shape == (12, 8) and V.shape == (8, 9) and error == 0.0
    torch.testing.assert_close(mB @ mA + U @ V, _dense(task), rtol=0, atol=1e-12)


def test_a_truncated_residual_is_the_best_rank_k_approximation_of_the_dense_difference() -> None:
    task, (mB, mA, _) = _lora(12, 9, 3, 2), _lora(12, 9, 5, 3, 1.0)
    D = _dense(task) - mB @ mA  # (12, 9), formed here only to check the thin computation
    Ud, S, Vh = torch.linalg.svd(D)
    for k in (1, 2, 4):
        U, V, error = residual(task, (mB, mA), rank=k)
        assert U.shape == (12, k) and V.shape == (k, 9)
        torch.testing.assert_close(U @ V, (Ud[:, :k] * S[:k]) @ Vh[:k], rtol=0, atol=1e-10)  # Eckart–Young
        assert error == pytest.approx(float(S[k:].norm() / S.norm()), rel=1e-9)


def test_residuals_of_a_whole_adapter_are_float32_and_need_the_same_layers() -> None:
    task = {"q": _lora(6, 5, 2, 4), "v": _lora(6, 5, 2, 5)}
    merged = {"q": _lora(6, 5, 4, 6)[:2], "v": _lora(6, 5, 4, 7)[:2]}
    factors, errors = residuals(task, merged, rank=2)
    assert set(factors) == set(errors) == {"q", "v"} and all(U.dtype == torch.float32 for U, _ in factors.values())
    assert all(0 < e < 1 for e in errors.values())
    with pytest.raises(ValueError, match=r"different layers \(only in the task: \['v'\]"):
        residuals(task, {"q": merged["q"]}, rank=2)
    with pytest.raises(ValueError, match="the task's update is 6×5 but the merge is 7×5"):
        residual(task["q"], _lora(7, 5, 4, 8)[:2], rank=2)


def test_routed_residual_one_hot_is_each_tasks_own_layer_and_soft_weights_mix_linearly() -> None:
    torch.manual_seed(0)
    W0 = torch.randn(6, 5, dtype=F64)
    tasks, (mB, mA, _) = [_lora(6, 5, 2, 10), _lora(6, 5, 3, 11)], _lora(6, 5, 5, 12, 1.0)
    linear = torch.nn.Linear(5, 6, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(W0 + mB @ mA)
    layer = RoutedResidual(linear, [residual(t, (mB, mA), rank=8)[:2] for t in tasks])
    x = torch.randn(3, 4, 5, dtype=F64)  # (B, L, in)
    layer.route(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]], dtype=F64))
    y = layer(x)
    for b in (0, 1):  # one-hot: exactly W0 + ΔW_b
        torch.testing.assert_close(y[b], x[b] @ (W0 + _dense(tasks[b])).T, rtol=0, atol=1e-10)
    mixed = W0 + mB @ mA + sum(w * (_dense(t) - mB @ mA) for w, t in zip((0.25, 0.75), tasks))
    torch.testing.assert_close(y[2], x[2] @ mixed.T, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="routed 3 images but the batch has 2"):
        layer(x[:2])


def test_own_factors_without_the_merge_mix_as_the_exact_residuals_with_it() -> None:
    """Σ_i w_i (ΔW_i − M) + M = Σ_i w_i ΔW_i for weights summing to one: the tasks' own rank-r factors on W0 alone
    give the layer the exact rank-(r + Σr) residuals give on W0 + M, at any soft weights."""
    torch.manual_seed(1)
    W0 = torch.randn(6, 5, dtype=F64)
    tasks, (mB, mA, _) = [_lora(6, 5, 2, 20), _lora(6, 5, 2, 21)], _lora(6, 5, 4, 22, 1.0)
    with_merge, alone = torch.nn.Linear(5, 6, bias=False).double(), torch.nn.Linear(5, 6, bias=False).double()
    with torch.no_grad():
        with_merge.weight.copy_(W0 + mB @ mA)
        alone.weight.copy_(W0)
    exact = RoutedResidual(with_merge, [residual(t, (mB, mA), rank=6)[:2] for t in tasks])  # 6 = r + Σr
    own = own_factors({f"layer{i}": t for i, t in enumerate(tasks)})
    assert task_rank({"q": tasks[0]}) == 2 and all(U.shape == (6, 2) and U.dtype == torch.float32 for U, _ in own.values())
    routed = RoutedResidual(alone, [tuple(f.double() for f in own[f"layer{i}"]) for i in range(2)])
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=F64)
    x = torch.randn(2, 3, 5, dtype=F64)
    exact.route(weights)
    routed.route(weights)
    torch.testing.assert_close(routed(x), exact(x), rtol=0, atol=1e-6)  # own factors stored float32


def test_assembled_merge_plus_residual_is_the_own_adapters_model(tiny_base) -> None:
    """In the real harness: M_t on every layer + residuals routed one-hot to task i gives the logits of task i's
    own assembly (its ΔW_i and projector)."""
    base, processor = tiny_base
    layers = [f"{PEFT_PREFIX}model.language_model.layers.{n}.{m}" for n in (0, 1) for m in ("self_attn.q_proj", "mlp.up_proj")]
    shapes = {name: tuple(base.get_submodule(name.removeprefix(PEFT_PREFIX)).weight.shape) for name in layers}
    loras = [{name: tuple(t.float() if torch.is_tensor(t) else t for t in _lora(*shapes[name], 2, 20 + 7 * i + j))
              for j, name in enumerate(layers)} for i in range(2)]
    merged = {name: tuple(t.float() for t in _lora(*shapes[name], 4, 50 + j)[:2]) for j, name in enumerate(layers)}
    projectors = tuple({k: v + 0.01 * (i + 1) for k, v in projector_of(base).state_dict().items()} for i in range(2))
    sets = tuple(residuals(lora, merged, rank=6)[0] for lora in loras)  # 6 = 2 + 4: exact
    routed = Assembly({n: B @ A for n, (B, A) in merged.items()}, projectors,
                      Router(torch.eye(2, projector_of(base).linear_1.in_features), tau=0.01), residuals=sets)
    model = assemble(base, routed)
    batch = {k: v for k, v in encode_for_training(processor, make_samples(3)).items() if k != "labels"}
    for i in range(2):
        weights = torch.zeros(3, 2)
        weights[:, i] = 1.0
        for module in model.modules():
            if hasattr(module, "route"):
                module.route(weights)
        own = assemble(base, Assembly(lora_deltas(loras[i]), (projectors[i],)))
        with torch.no_grad():
            torch.testing.assert_close(model(**batch, use_cache=False).logits, own(**batch, use_cache=False).logits,
                                       rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="pass routing exactly when the model has a CPM RoutedProjector"):
        generate_answers(model, processor, make_samples(2), EvalConfig(batch_size=2, max_new_tokens=2))


def test_residuals_need_cpm_routing_and_one_set_per_projector(tiny_base) -> None:
    base, _ = tiny_base
    state = projector_of(base).state_dict()
    with pytest.raises(ValueError, match="residuals are mixed by CPM's weights and need a router"):
        Assembly({}, (state,), residuals=({},))
    with pytest.raises(ValueError, match="got 1 sets for 2 projectors"):
        Assembly({}, (state, state), Router(torch.eye(2, 4), tau=0.1), residuals=({},))
