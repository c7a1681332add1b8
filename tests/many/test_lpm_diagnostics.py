"""LPM merge diagnostics (many/lpm_diagnostics.py) on hand-built cases: identical tasks fit exactly, tasks on
orthogonal input subspaces neither leak nor lose fit, a random case equals the dense formula (and the wrong task's
Gram would not), the limits M = 0 and M = ΔW; and the files of the merge stage read back as the algebra says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from many.config import LPMConfig
from many.lpm import absorb, export_lora
from many.lpm_diagnostics import FORMAT, diagnose, inner_products, layer_diagnostics

F64 = torch.float64
OUT, IN, RANK = 9, 10, 2


def lora(generator: torch.Generator, support: slice = slice(None), rank: int = RANK, scale: float = 2.0):
    """(B (OUT, rank), A (rank, IN), s) with non-zero B; A's rows live on the input coordinates `support`."""
    B = torch.randn(OUT, rank, generator=generator, dtype=F64)
    A = torch.zeros(rank, IN, dtype=F64)
    A[:, support] = torch.randn(rank, IN, generator=generator, dtype=F64)[:, support]
    return B, A, scale


def gram(generator: torch.Generator, support: slice = slice(None), samples: int = 40) -> torch.Tensor:
    """XᵀX/N (IN, IN) of correlated inputs that are zero outside the coordinates `support` (full rank on them)."""
    X = torch.zeros(samples, IN, dtype=F64)
    width = len(range(IN)[support])
    X[:, support] = torch.randn(samples, width, generator=generator, dtype=F64) @ torch.randn(
        width, width, generator=generator, dtype=F64)
    return X.T @ X / samples


def merged(loras, grams, cfg: LPMConfig):
    """The LPM merge of the tasks as the merge stage exports it: (B, A, scale 1) of rank Σr."""
    state = None
    for (B, A, s), G in zip(loras, grams):
        state = absorb(state, B, A, s, G, cfg, "layer")
    B, A = export_lora(state, "layer")
    return B, A, 1.0


def dense(merge, loras, grams):
    """The definitions with dense matrices: e_i and ℓ_ij from M (out, in), ΔW_i and G_i."""
    M = merge[2] * merge[0] @ merge[1]
    deltas = [s * B @ A for B, A, s in loras]

    def energy(U, G):
        return torch.trace(U @ G @ U.T).item()

    errors = [energy(M - dW, G) / energy(dW, G) for dW, G in zip(deltas, grams)]
    leakage = [[energy(dWj, G) / energy(dWi, G) for dWj in deltas] for dWi, G in zip(deltas, grams)]
    return errors, leakage


def test_inner_products_equal_the_dense_traces() -> None:
    generator = torch.Generator().manual_seed(0)
    parts = [lora(generator, rank=r) for r in (3, 1, 2)]
    G = gram(generator)
    W = torch.cat([s * B for B, _, s in parts], dim=1)
    Z = torch.cat([A for _, A, _ in parts], dim=0)
    Q = inner_products(W, Z, [3, 1, 2], G)
    U = [s * B @ A for B, A, s in parts]
    expected = torch.tensor([[torch.trace(a @ G @ b.T).item() for b in U] for a in U], dtype=F64)
    torch.testing.assert_close(Q, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def test_two_identical_tasks_fit_exactly() -> None:
    generator = torch.Generator().manual_seed(1)
    task, G = lora(generator), gram(generator)
    result = layer_diagnostics(merged([task, task], [G, G], LPMConfig(gamma=1e-12)), [task, task], [G, G])
    assert all(e < 1e-10 for e in result.fit_error), result.fit_error
    assert [row == pytest.approx([1.0, 1.0], rel=1e-12) for row in result.leakage] == [True, True]
    assert result.energy[0] == pytest.approx(result.energy[1], rel=1e-12) and result.energy[0] > 0


def test_tasks_on_orthogonal_input_subspaces_do_not_leak_and_both_fit() -> None:
    generator = torch.Generator().manual_seed(2)
    first, second = slice(0, 5), slice(5, IN)
    loras = [lora(generator, first), lora(generator, second)]
    grams = [gram(generator, first), gram(generator, second)]
    result = layer_diagnostics(merged(loras, grams, LPMConfig(gamma=1e-12)), loras, grams)
    assert result.leakage == [[1.0, 0.0], [0.0, 1.0]]  # exactly: A_j G_i = 0 in floating point too
    assert all(e < 1e-10 for e in result.fit_error), result.fit_error
    # Each task's update measured on the other task's inputs (the Grams paired with the wrong tasks) has no energy:
    # the pairing of G_i with task i is what makes the numbers above meaningful.
    swapped = layer_diagnostics(merged(loras, grams, LPMConfig(gamma=1e-12)), loras[::-1], grams)
    assert swapped.fit_error == [None, None]  # ΔW_1 on G_0 (and ΔW_0 on G_1) is 0: no energy to compare with


@pytest.mark.parametrize("a", [1.0, 0.5])
def test_random_tasks_match_the_dense_definitions(a: float) -> None:
    """Three tasks with distinct Grams, merged with a = 1 and a = 0.5 (the diagnostic always uses the raw G_i)."""
    generator = torch.Generator().manual_seed(3)
    loras = [lora(generator, rank=r, scale=s) for r, s in ((2, 2.0), (3, 0.5), (1, 4.0))]
    grams = [gram(generator, samples=15 + 10 * i) for i in range(3)]
    merge = merged(loras, grams, LPMConfig(a=a, gamma=1e-3))
    result = layer_diagnostics(merge, loras, grams)
    errors, leakage = dense(merge, loras, grams)
    assert result.fit_error == pytest.approx(errors, rel=1e-9, abs=1e-12)
    assert result.leakage == [pytest.approx(row, rel=1e-9) for row in leakage]
    # Three tasks on overlapping inputs do not fit exactly; the small update of task 1 (s = 0.5) is swamped by the
    # others acting on its inputs (ℓ_12 ≈ 60 here), so the merge does it more harm than no update at all (e_1 > 1).
    assert all(e > 1e-3 for e in result.fit_error) and result.fit_error[1] > 1.0 and leakage[1][2] > 10.0
    # Bookkeeping: the Gram of the wrong task (the last one for every i, or G_j in ℓ_ij) gives other numbers, which
    # the assertions above would catch.
    wrong_errors, _ = dense(merge, loras, [grams[-1]] * 3)
    assert min(abs(w - e) / e for w, e in zip(wrong_errors[:2], errors[:2])) > 0.05
    own = result.energy  # tr(ΔW_j G_j ΔW_jᵀ): with G_j in the numerator, ℓ_ij would be own[j] / own[i]
    assert all(abs(own[j] / own[i] - leakage[i][j]) > 0.05 * leakage[i][j] for i in range(3) for j in range(3) if i != j)


def test_a_truncated_merge_of_any_rank_matches_the_dense_definitions() -> None:
    generator = torch.Generator().manual_seed(4)
    loras = [lora(generator) for _ in range(3)]
    grams = [gram(generator) for _ in range(3)]
    merge = lora(generator, rank=4, scale=1.0)  # any (B, A) the evals would put on the model
    result = layer_diagnostics(merge, loras, grams)
    assert result.fit_error == pytest.approx(dense(merge, loras, grams)[0], rel=1e-9)


def test_limits_no_update_scores_one_and_the_own_update_scores_zero() -> None:
    generator = torch.Generator().manual_seed(5)
    task, G = lora(generator), gram(generator)
    zero = (torch.zeros(OUT, 1, dtype=F64), torch.zeros(1, IN, dtype=F64), 1.0)
    assert layer_diagnostics(zero, [task], [G]).fit_error == [pytest.approx(1.0, rel=1e-14)]
    own = layer_diagnostics(task, [task], [G])
    assert own.fit_error[0] == pytest.approx(0.0, abs=1e-14) and own.fit_error[0] >= 0.0
    assert own.leakage == [[1.0]]
    untrained = (torch.zeros(OUT, RANK, dtype=F64), task[1], task[2])  # PEFT's initial B = 0: no update at all
    none = layer_diagnostics(task, [untrained, task], [G, G])
    assert none.fit_error[0] is None and none.leakage[0] == [None, None] and none.energy[0] == 0.0
    assert none.leakage[1] == [0.0, 1.0]


def test_mismatched_inputs_are_errors() -> None:
    generator = torch.Generator().manual_seed(6)
    task, G = lora(generator), gram(generator)
    with pytest.raises(ValueError, match="more Grams than the 1 tasks"):
        layer_diagnostics(task, [task], [G, G])
    with pytest.raises(ValueError, match="1 Grams for 2 tasks"):
        layer_diagnostics(task, [task, task], [G])
    with pytest.raises(ValueError, match="reads 10 features but task 0's Gram is \\(3, 3\\)"):
        layer_diagnostics(task, [task], [torch.eye(3, dtype=F64)])


def test_diagnose_reads_the_merge_stage_files(tmp_path: Path) -> None:
    """diagnostics.json of a real merge step over synthetic task files equals layer_diagnostics per layer, with the
    groups and layers in model order."""
    import json

    from benchmarks.synthetic import ALL_TOKENS, Shape, write_task
    from many.adapters import lora_factors
    from many.stats import load_grams
    from tasks.merge import merge_step

    shape = Shape(layers=2, hidden=12, intermediate=20, rank=2)
    tasks = [write_task(shape, seed=t, out=tmp_path / "inputs") for t in (1, 2, 3)]
    previous = None
    for t, (task_dir, grams) in enumerate(tasks):
        workdir = tmp_path / f"merge-{t}"
        workdir.mkdir()
        inputs = {"finetune": task_dir, "grams": grams} | ({"previous": previous} if previous else {})
        outputs = merge_step(inputs, workdir, ALL_TOKENS, fan_out=False)
        previous = outputs["state"]
    result = diagnose(outputs["adapter"], [d for d, _ in tasks], [g for _, g in tasks])
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["format"] == FORMAT and result["tasks"] == 3
    modules = shape.modules()
    assert [layer for group in result["groups"].values() for layer in group["layers"]] == list(modules)
    assert list(result["groups"]) == list(dict.fromkeys(
        next(m for m in modules if modules[m][2] == group) for _, _, group in modules.values()))
    merge, loras = lora_factors(outputs["adapter"]), [lora_factors(d / "adapter") for d, _ in tasks]
    grams = [load_grams(g) for _, g in tasks]
    for group in result["groups"].values():
        for layer in group["layers"]:
            expected = layer_diagnostics(merge[layer], [task[layer] for task in loras], [g[layer] for g in grams])
            assert group["fit_error"][layer] == pytest.approx(expected.fit_error, rel=1e-12)
            assert group["leakage"][layer] == expected.leakage
            assert all(e is not None and 0.0 <= e < float("inf") for e in group["fit_error"][layer])
    with pytest.raises(ValueError, match="2 task dirs and 3 Grams files"):
        diagnose(outputs["adapter"], [d for d, _ in tasks][:2], [g for _, g in tasks])


def test_a_dense_state_export_gives_the_thin_state_diagnostics() -> None:
    """Once a layer's state is dense (C, R) the merge is exported as M against an identity (rank min(in, out)); the
    diagnostics read those factors as any LoRA and agree with the thin state's and with the dense formula."""
    generator = torch.Generator().manual_seed(11)
    loras = [lora(generator, rank=r) for r in (3, 2, 4)]  # Σr = 9: 9·19 ≥ 90, dense from the last task
    grams = [gram(generator) for _ in loras]
    thin = merged(loras, grams, LPMConfig(state_form="thin"))
    auto = merged(loras, grams, LPMConfig())
    assert thin[0].shape[1] == 9 and auto[0].shape[1] == min(OUT, IN)  # the dense export
    from_thin = layer_diagnostics(thin, loras, grams)
    from_dense = layer_diagnostics(auto, loras, grams)
    errors, leakage = dense(auto, loras, grams)
    assert from_dense.fit_error == pytest.approx(from_thin.fit_error, rel=1e-8, abs=1e-12)
    assert from_dense.fit_error == pytest.approx(errors, rel=1e-8, abs=1e-12)
    for got, expected in zip(from_dense.leakage, leakage):
        assert got == pytest.approx(expected, rel=1e-8)
