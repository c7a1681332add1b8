"""The two forms of an LPM layer state (docs/design.md §1.1): thin factors (B, A·G̃) while Σr·(in + out) < in·out,
the dense RLS state (C, R) after. The switch is automatic per layer and changes the merge only by float64 rounding;
the state never holds more than min(thin, dense) numbers besides C."""

from __future__ import annotations

import pytest
import torch

from many.config import LPMConfig
from many.lpm import absorb, absorb_group, batch_merge, dense_is_smaller, export_lora, solve
from many.lpm_files import group_tensors

F64 = torch.float64


def random_stream(seed: int, out: int, n_in: int, ranks: list[int]):
    """Tasks with per-task ranks `ranks`: [(B (out, r), A (r, in), scale)] and SPD Grams (in, in)."""
    generator = torch.Generator().manual_seed(seed)
    loras, grams = [], []
    for r in ranks:
        X = torch.randn(3 * n_in, n_in, generator=generator, dtype=F64) @ torch.randn(n_in, n_in, generator=generator,
                                                                                     dtype=F64)
        loras.append((torch.randn(out, r, generator=generator, dtype=F64),
                      torch.randn(r, n_in, generator=generator, dtype=F64) / n_in**0.5, 2.0 / r))
        grams.append(X.T @ X / X.shape[0])
    return loras, grams


def run(loras, grams, cfg, form):
    states, state = [], None
    for lora, gram in zip(loras, grams):
        state = absorb(state, *lora, gram, cfg, "layer", form)
        states.append(state)
    return states


CASES = [  # (seed, out, in, per-task ranks): square, wide, tall; ranks that differ per task
    (0, 24, 24, [3, 5, 2, 4, 6, 1, 3, 7]),
    (1, 40, 16, [2, 2, 9, 1, 4, 3]),
    (2, 12, 36, [1, 4, 2, 8, 3, 5, 2]),
    (3, 20, 20, [10, 1, 1]),  # switches at the first task
]


@pytest.mark.parametrize("seed, out, n_in, ranks", CASES)
@pytest.mark.parametrize("a", [1.0, 0.6])
def test_thin_dense_and_auto_give_the_same_merge_at_every_step(seed, out, n_in, ranks, a):
    loras, grams = random_stream(seed, out, n_in, ranks)
    cfg = LPMConfig(a=a, gamma=1e-3)
    thin, dense, auto = (run(loras, grams, cfg, form) for form in ("thin", "dense", "auto"))
    switched = False
    for t, (th, de, au) in enumerate(zip(thin, dense, auto), start=1):
        rank = sum(ranks[:t])
        assert th.form == "thin" and de.form == "dense" and th.rank == de.rank == au.rank == rank
        # auto: thin until Σr·(in + out) ≥ in·out, dense from that step on
        assert au.form == ("dense" if dense_is_smaller(rank, n_in, out) else "thin"), t
        switched |= au.form == "dense"
        reference = batch_merge(loras[:t], grams[:t], cfg, "layer")
        scale = reference.abs().max().item()
        for state in (th, de, au):
            torch.testing.assert_close(solve(state, "layer"), reference, rtol=1e-9, atol=1e-9 * scale)
        # the exported LoRA multiplies out to the merge, whichever the form
        B, A = export_lora(au, "layer")
        torch.testing.assert_close(B @ A, reference, rtol=1e-9, atol=1e-9 * scale)
    assert switched, "the case should reach the switch"


@pytest.mark.parametrize("seed, out, n_in, ranks", CASES)
def test_state_holds_at_most_min_thin_dense(seed, out, n_in, ranks):
    loras, grams = random_stream(seed, out, n_in, ranks)
    for t, state in enumerate(run(loras, grams, LPMConfig(), "auto"), start=1):
        rank = sum(ranks[:t])
        assert state.numbers == min(rank * (n_in + out), n_in * out)
        tensors, _ = group_tensors({"layer": state})  # what the state file holds
        assert sum(x.numel() for key, x in tensors.items() if key not in ("C", "gamma", "tasks")) == state.numbers


def test_switch_step_is_one_product_of_the_thin_factors():
    """At the switch R_t = [AG_{t−1}; A_t G̃_t]ᵀ [B_{t−1} | s_t B_t]ᵀ: exactly the thin state's R after step t."""
    loras, grams = random_stream(4, 16, 16, [3, 3, 3])  # Σr = 9 ≥ 16·16 / 32 = 8 at t = 3
    cfg = LPMConfig()
    thin = run(loras, grams, cfg, "thin")
    auto = run(loras, grams, cfg, "auto")
    assert [s.form for s in auto] == ["thin", "thin", "dense"]
    assert torch.equal(auto[2].R, thin[2].rhs())
    assert torch.equal(auto[2].C, thin[2].C)
    # the switch step exports from the thin factors it formed R from (rank Σr, no dense solve) …
    for got, expected in zip(export_lora(auto[2], "layer"), export_lora(thin[2], "layer")):
        assert torch.equal(got, expected)
    # … which the next step no longer has: it exports M_t against an identity
    extra = random_stream(9, 16, 16, [3])
    after = absorb(auto[2], *extra[0][0], extra[1][0], cfg, "layer")
    assert after.B is None and export_lora(after, "layer")[0].shape == (16, 16)


def test_a_dense_state_stays_dense_and_cannot_be_forced_thin():
    loras, grams = random_stream(5, 8, 8, [4, 1])
    first = absorb(None, *loras[0], grams[0], LPMConfig(), "layer")  # Σr = 4: 4·16 ≥ 64
    assert first.form == "dense"
    assert absorb(first, *loras[1], grams[1], LPMConfig(), "layer").form == "dense"
    with pytest.raises(ValueError, match="'layer'.*cannot go back to thin"):
        absorb(first, *loras[1], grams[1], LPMConfig(), "layer", "thin")


def test_group_members_switch_on_their_own_shapes():
    """q (out 24) and a narrower layer (out 6) read one input of 24: each switches when its own R is smaller."""
    generator = torch.Generator().manual_seed(6)
    n_in, cfg = 24, LPMConfig()
    states = None
    forms = []
    for _ in range(4):
        X = torch.randn(60, n_in, generator=generator, dtype=F64)
        loras = {name: (torch.randn(out, 2, generator=generator, dtype=F64),
                        torch.randn(2, n_in, generator=generator, dtype=F64), 1.0) for name, out in (("q", 24), ("n", 6))}
        states = absorb_group(states, loras, X.T @ X / 60, cfg, "q")
        forms.append((states["q"].form, states["n"].form))
        assert states["q"].C is states["n"].C
    # n: 2·30 ≥ 144 never before Σr = 6 (t = 3, 6·30 = 180 ≥ 144); q: Σr·48 ≥ 576 at Σr = 12 (never within 4 tasks)
    assert forms == [("thin", "thin"), ("thin", "thin"), ("thin", "dense"), ("thin", "dense")]
