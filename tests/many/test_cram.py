"""CRAM baseline: adaptive rank, orthogonality penalty, centroid routing, experts on the tiny fixture."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image, ImageOps

from many import cpm
from many.adapters import lora_factors
from many.config import EvalConfig, FinetuneConfig, LoraConfig
from many.data.schema import Sample, TaskData
from many.evaluate import Assembly, assemble, evaluate, lora_deltas
from many.loop import encode_dataset, seeded
from many.methods.cram import (
    CramConfig,
    RankAllocation,
    allocate_rank,
    capability_gap,
    estimate_gradients,
    evaluate_cram,
    expert_bases,
    load_expert,
    lora_A,
    orthogonality_penalty,
    route,
    save_expert,
    train_expert,
    trainable_parameters,
)
from many.methods.cram.rank import targeted_linears
from many.model.chat import encode_for_training
from many.model.load import load_base
from many.model.parts import projector_of
from many.prototypes import image_features
from many.training import prepare
from tests.conftest import FIXTURE_BASE, make_samples

FINETUNE = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), steps=80, batch_size=8, lr=1e-2, projector_lr=1e-2,
                          warmup_steps=2)
CFG = CramConfig(finetune=FINETUNE, r_min=1, r_max=8, gradient_batches=2, ortho_weight=1.0)
EVAL = EvalConfig(batch_size=24, max_new_tokens=3)


def _restyled(samples: tuple[Sample, ...], style: str) -> tuple[Sample, ...]:
    """The samples with their images restyled so the two tasks' vision features separate (docs/design.md §7: tasks
    differ in rendition); "striped": every other row black, "inverted": colour-inverted (a dark background)."""
    out = []
    for sample in samples:
        image = Image.open(io.BytesIO(sample.image)).convert("RGB")
        if style == "inverted":
            image = ImageOps.invert(image)
        else:
            pixels = np.array(image)
            pixels[::2] = 0
            image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(Sample(f"{sample.sample_id}/{style}", buffer.getvalue(), sample.prompt, sample.answer))
    return tuple(out)


COLOUR = TaskData("colour", "exact_match", _restyled(make_samples(48, "colour", seed=1), "striped"),
                  _restyled(make_samples(24, "colour", seed=2), "striped"))
SHAPE = TaskData("shape", "exact_match", _restyled(make_samples(48, "shape", seed=3), "inverted"),
                 _restyled(make_samples(24, "shape", seed=4), "inverted"))


def _loss(model, processor, samples) -> float:
    with torch.no_grad():
        return model(**encode_for_training(processor, samples), use_cache=False).loss.item()


def _overlap(model, bases) -> float:
    """Σ_l ‖A_l Q_l‖_F² of a trained expert against the old experts' bases (λ = 1)."""
    return orthogonality_penalty({k: v.detach() for k, v in lora_A(model).items()}, bases, 1.0).item()


@pytest.fixture(scope="module")
def base(pretrained_base_dir):
    """The session's briefly pretrained fixture model (tests/conftest.py), frozen as `pretrain` returns it."""
    model, processor = load_base(pretrained_base_dir, FIXTURE_BASE)
    return model.requires_grad_(False), processor


@pytest.fixture(scope="module")
def experts(base, tmp_path_factory):
    """Expert 1 on COLOUR; expert 2 on SHAPE after it with λ = 1 and with λ = 0; the base state before training."""
    model, processor = base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, first_rank = train_expert(model, processor, COLOUR.train, CFG, progress=False)
    first_dir = save_expert(first, first_rank, tmp_path_factory.mktemp("colour-expert"))
    second, second_rank = train_expert(model, processor, SHAPE.train, CFG, [first_dir], progress=False)
    second_dir = save_expert(second, second_rank, tmp_path_factory.mktemp("shape-expert"))
    free, _ = train_expert(model, processor, SHAPE.train, CFG.model_copy(update={"ortho_weight": 0.0}), [first_dir],
                           progress=False)
    return {"first": first, "first_dir": first_dir, "second": second, "second_dir": second_dir, "free": free,
            "before": before}


# --- orthogonality penalty: exact values ---------------------------------------------------------------------

E = torch.eye(4)


@pytest.mark.parametrize(
    ("A", "Q", "expected"),
    [
        (torch.stack([E[0], 2 * E[1]]), E[:, 2:3], 0.0),  # rows ⟂ span(Q)
        (torch.stack([E[0], 2 * E[1]]), E[:, 0:1], 1.0),
        (torch.stack([E[0], 2 * E[1]]), E[:, 0:2], 5.0),  # 1² + 2²
        (torch.stack([E[0] + E[1]]), E[:, 0:1], 1.0),  # a 45° row keeps half its squared norm 2
        (torch.stack([E[0] + E[1]]), (E[:, 0:1] - E[:, 1:2]) / math.sqrt(2), 0.0),
    ],
)
def test_orthogonality_penalty_exact_values(A, Q, expected):
    assert orthogonality_penalty({"l": A}, {"l": Q}, 0.5).item() == pytest.approx(0.5 * expected, abs=1e-7)


def test_orthogonality_penalty_sums_layers_and_its_gradient_is_2_lambda_A_Q_Qt():
    A = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0]], requires_grad=True)
    Q = E[:, 1:3]
    penalty = orthogonality_penalty({"a": A, "b": 2 * A}, {"a": Q, "b": Q}, 0.25)
    # λ (1 + 2²) ‖A Q‖² with A Q = [[2, 0], [1, 3]]
    assert penalty.item() == pytest.approx(0.25 * (1 + 2**2) * (2**2 + 1 + 3**2))
    penalty.backward()
    torch.testing.assert_close(A.grad, 2 * 0.25 * (1 + 4) * A.detach() @ Q @ Q.T)


# --- adaptive rank: constructed gradients --------------------------------------------------------------------


def _old_expert() -> dict:
    """One old expert on layers "a", "b" whose A rows span e0, e1 of R^8 (not orthonormal rows)."""
    A = torch.zeros(2, 8)
    A[0, 0], A[0, 1], A[1, 1] = 2.0, 1.0, 3.0
    return {"a": (torch.randn(6, 2), A, 2.0), "b": (torch.randn(6, 2), A.clone(), 2.0)}


def _outer(*terms: tuple[float, int, int]) -> torch.Tensor:
    """Σ σ e_u e_vᵀ (6, 8) with orthonormal e's: singular values σ exactly."""
    G = torch.zeros(6, 8, dtype=torch.float64)
    for sigma, u, v in terms:
        G[u, v] += sigma
    return G


def test_expert_bases_are_orthonormal_spans_of_the_old_A_rows():
    old = _old_expert()
    bases = expert_bases([old, old])  # a duplicated expert adds no direction
    for layer, (_, A, _) in old.items():
        Q = bases[layer]
        assert Q.shape == (8, 2)
        torch.testing.assert_close(Q.T @ Q, torch.eye(2, dtype=torch.float64))
        torch.testing.assert_close(A.double() - A.double() @ Q @ Q.T, torch.zeros(2, 8, dtype=torch.float64))
    assert expert_bases([]) == {}


def test_capability_gap_removes_exactly_the_old_span():
    bases = expert_bases([_old_expert()])
    G = {"a": torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(6, 8)}
    R = capability_gap(G, bases)
    torch.testing.assert_close(R["a"] @ bases["a"], torch.zeros(6, 2, dtype=torch.float64))
    torch.testing.assert_close(R["a"] + (G["a"].double() @ bases["a"]) @ bases["a"].T, G["a"].double())
    assert capability_gap(G, {})["a"].equal(G["a"].double())  # no old experts: the whole gradient is the gap


@pytest.mark.parametrize(
    ("gradients", "expected"),
    [
        # spanned by the old expert (columns 0, 1): no gap → r_min, the fewest parameters
        ({"a": _outer((3.0, 0, 0), (2.0, 1, 1)), "b": _outer((1.0, 2, 0))}, RankAllocation(1, 0.0, 0.0)),
        # orthogonal to it (columns 2–4), σ = 3, 2, 1: 90 % of 14 needs 9 + 4 → r = 2, ρ = 1
        ({"a": _outer((3.0, 0, 2), (2.0, 1, 3), (1.0, 2, 4)), "b": torch.zeros(6, 8, dtype=torch.float64)},
         RankAllocation(2, 1.0, 2.0)),
        # half spanned: a = spanned 6 e1e0ᵀ + gap σ = [3] (r = 1); b = gap σ = [3, 3, 3] (r = 3)
        # → r_gap = (9·1 + 27·3)/36 = 2.5, ρ = 36/72 → ⌈1.25⌉ = 2
        ({"a": _outer((3.0, 0, 5), (6.0, 1, 0)), "b": _outer((3.0, 0, 2), (3.0, 1, 3), (3.0, 2, 4))},
         RankAllocation(2, 0.5, 2.5)),
    ],
    ids=["spanned", "orthogonal", "half-spanned"],
)
def test_allocate_rank_from_the_capability_gap(gradients, expected):
    allocation = allocate_rank(gradients, capability_gap(gradients, expert_bases([_old_expert()])), CFG)
    assert allocation.rank == expected.rank
    assert allocation.gap_ratio == pytest.approx(expected.gap_ratio, abs=1e-12)
    assert allocation.energy_rank == pytest.approx(expected.energy_rank, abs=1e-12)


def test_allocated_rank_is_clipped_to_its_bounds():
    G = {"a": _outer(*[(1.0, i, 2 + i) for i in range(6)])}  # flat spectrum of 6 orthogonal directions
    R = capability_gap(G, {})
    assert allocate_rank(G, R, CFG).rank == 6
    assert allocate_rank(G, R, CFG.model_copy(update={"r_max": 4})).rank == 4
    assert allocate_rank(G, R, CFG.model_copy(update={"energy": 0.1})).rank == 1
    assert allocate_rank(G, R, CFG.model_copy(update={"energy": 0.1, "r_min": 3})).rank == 3


# --- centroid routing ----------------------------------------------------------------------------------------


def test_route_picks_the_nearest_centroid():
    generator = torch.Generator().manual_seed(0)
    centroids = torch.eye(3, 16) * torch.tensor([[1.0], [5.0], [0.2]])  # magnitude must not matter
    labels = torch.randint(0, 3, (60,), generator=generator)
    features = torch.eye(3, 16)[labels] * 4 + 0.3 * torch.randn(60, 16, generator=generator)
    assert route(features, centroids).equal(labels)
    assert route(features, centroids[[2, 0, 1]]).equal((labels + 1) % 3)


# --- experts on the tiny fixture -----------------------------------------------------------------------------


def test_gradient_estimate_equals_lora_b_gradient_identity(base):
    """With B = 0, ∂L/∂B = s · (∂L/∂W0) Aᵀ: the estimated base gradient, checked through a PEFT LoRA."""
    model, processor = base
    samples = COLOUR.train[:8]
    cfg = CFG.model_copy(update={"gradient_batches": 1, "finetune": FINETUNE.model_copy(update={"batch_size": 8})})
    gradients = estimate_gradients(model, processor, samples, cfg)
    assert set(gradients) == set(targeted_linears(model, FINETUNE.lora.target_modules))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with seeded(0, torch.device("cpu")):
        peft_model = prepare(model, FINETUNE)
    data = encode_dataset(processor, samples)
    peft_model(**data.batch(torch.arange(8), torch.device("cpu")), use_cache=False).loss.backward()
    scale = FINETUNE.lora.alpha / FINETUNE.lora.rank
    for name, module in dict(peft_model.named_modules()).items():
        if name in gradients:
            expected = scale * gradients[name] @ module.lora_A["default"].weight.detach().T  # (out, r)
            torch.testing.assert_close(module.lora_B["default"].weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_train_expert_lowers_the_loss_and_leaves_the_base(base, experts):
    model, processor = base
    assert _loss(experts["first"], processor, COLOUR.train) < 0.6 * _loss(model, processor, COLOUR.train)
    assert _loss(experts["second"], processor, SHAPE.train) < 0.75 * _loss(model, processor, SHAPE.train)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in experts["before"].items())


def test_penalty_keeps_the_new_expert_out_of_the_old_span(base, experts):
    _, processor = base
    bases = expert_bases([lora_factors(experts["first_dir"] / "adapter")])
    free = _overlap(experts["free"], bases)
    assert free > 0.1  # without the penalty the new A overlaps the old span
    assert _overlap(experts["second"], bases) < 0.01 * free
    # ... at no cost to the task
    assert _loss(experts["second"], processor, SHAPE.train) < 1.2 * _loss(experts["free"], processor, SHAPE.train)


def test_saved_expert_round_trips_and_counts_its_parameters(base, experts):
    model, _ = base
    expert = load_expert(experts["second_dir"])
    factors = lora_factors(experts["second_dir"] / "adapter")
    assert expert.factors.keys() == factors.keys()
    assert all(torch.equal(expert.factors[k][1], factors[k][1]) for k in factors)
    assert CFG.r_min <= expert.allocation.rank <= CFG.r_max
    assert json.loads((experts["second_dir"] / "cram.json").read_text())["rank"] == expert.allocation.rank
    assert {A.shape[0] for _, A, _ in factors.values()} == {expert.allocation.rank}
    assert {s for _, _, s in factors.values()} == {FINETUNE.lora.alpha / FINETUNE.lora.rank}  # scale kept
    lora = sum(expert.allocation.rank * (m.in_features + m.out_features)
               for m in targeted_linears(model, FINETUNE.lora.target_modules).values())
    projector = sum(p.numel() for p in projector_of(model).parameters())
    assert trainable_parameters(expert) == {"lora": lora, "projector": projector, "total": lora + projector}


def test_with_a_precision_routing_takes_the_gaussian_argmax_not_the_cosine() -> None:
    """cram_lda's choice: an image nearer centroid 0 by the cosine but, under a precision that weighs the second axis
    100×, nearer centroid 1."""
    means = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    image = torch.nn.functional.normalize(torch.tensor([[0.9, 0.436]]), dim=1)
    assert route(image, means).tolist() == [0]  # cos 0.900 against 0.889
    assert route(image, means, torch.diag(torch.tensor([1.0, 100.0]))).tolist() == [1]  # 19.0 against 13.3


def test_evaluate_cram_routes_each_image_to_its_task_expert(base, experts):
    model, processor = base
    loaded = [load_expert(experts["first_dir"]), load_expert(experts["second_dir"])]
    centroids = torch.stack([cpm.prototype(image_features(model, processor, t.train)) for t in (COLOUR, SHAPE)])
    for index, task in enumerate((COLOUR, SHAPE)):
        assert route(image_features(model, processor, task.test), centroids).eq(index).all()
        [routed] = evaluate_cram(model, processor, [task], loaded, centroids, EVAL)
        oracle = evaluate(assemble(model, Assembly(lora_deltas(loaded[index].factors), (loaded[index].projector,))),
                          processor, task, EVAL)
        assert routed.predictions == oracle.predictions and routed.score == oracle.score
        # swapped centroids send every image to the other expert: exactly that expert's answers, not the own ones
        [misrouted] = evaluate_cram(model, processor, [task], loaded, centroids.flip(0), EVAL)
        other = loaded[1 - index]
        assert misrouted.predictions == evaluate(
            assemble(model, Assembly(lora_deltas(other.factors), (other.projector,))), processor, task, EVAL).predictions
        assert misrouted.predictions != routed.predictions
    mixed = TaskData("mixed", "exact_match", (), COLOUR.test[:5] + SHAPE.test[:5])  # test order is kept
    [result] = evaluate_cram(model, processor, [mixed], loaded, centroids, EVAL)
    by_expert = evaluate_cram(model, processor, [TaskData(t.name, "exact_match", (), t.test[:5]) for t in (COLOUR, SHAPE)],
                              loaded, centroids, EVAL)
    assert [p for _, p, _ in result.predictions] == [p for r in by_expert for _, p, _ in r.predictions]


def test_evaluate_cram_builds_each_expert_once_for_all_tasks(base, experts, monkeypatch):
    import many.methods.cram.routing as routing

    model, processor = base
    loaded = [load_expert(experts["first_dir"]), load_expert(experts["second_dir"])]
    centroids = torch.stack([cpm.prototype(image_features(model, processor, t.train)) for t in (COLOUR, SHAPE)])
    # each task's images route to both experts
    tasks = [TaskData(f"mixed{i}", "exact_match", (), COLOUR.test[i:i + 3] + SHAPE.test[i:i + 3]) for i in (0, 3)]
    alone = [evaluate_cram(model, processor, [task], loaded, centroids, EVAL)[0] for task in tasks]
    built = []
    monkeypatch.setattr(routing, "assemble", lambda *args: built.append(args) or assemble(*args))
    together = evaluate_cram(model, processor, tasks, loaded, centroids, EVAL)
    assert len(built) == len(loaded)  # one copy of the base per expert, not one per (task, expert)
    assert [(r.task, r.score, r.predictions) for r in together] == [(r.task, r.score, r.predictions) for r in alone]


# --- bad input -----------------------------------------------------------------------------------------------


UP_PROJ_ONLY = CFG.model_copy(update={"finetune": FINETUNE.model_copy(update={
    "lora": FINETUNE.lora.model_copy(update={"target_modules": r".*language_model\.layers\.0\.mlp\.up_proj"})})})


def _bad(case, base, experts, tmp_path):
    model, processor = base
    Q = E[:, :1]
    cases = {
        "rank_bounds": lambda: CramConfig(r_min=5, r_max=2),
        "energy": lambda: CramConfig(energy=1.5),
        "typo": lambda: CramConfig(ortho_wieght=1.0),
        "penalty_layers": lambda: orthogonality_penalty({"a": torch.ones(2, 4)}, {"b": Q}, 1.0),
        "penalty_shapes": lambda: orthogonality_penalty({"a": torch.ones(2, 3)}, {"a": Q}, 1.0),
        "penalty_empty": lambda: orthogonality_penalty({}, {}, 1.0),
        "gap_layers": lambda: capability_gap({"a": torch.ones(6, 4)}, {"b": Q}),
        "gap_basis_shape": lambda: capability_gap({"a": torch.ones(6, 5)}, {"a": Q}),
        "gap_not_orthonormal": lambda: capability_gap({"a": torch.ones(6, 4)}, {"a": 2 * Q}),
        "gap_nan": lambda: capability_gap({"a": torch.full((6, 4), math.nan)}, {}),
        "rank_empty": lambda: allocate_rank({}, {}, CFG),
        "rank_layers": lambda: allocate_rank({"a": torch.ones(2, 2)}, {"b": torch.ones(2, 2)}, CFG),
        "rank_energy": lambda: allocate_rank({"a": torch.ones(2, 2)}, {"a": 2 * torch.ones(2, 2)}, CFG),
        "bases_layers": lambda: expert_bases([_old_expert(), {"a": _old_expert()["a"]}]),
        "no_targets": lambda: targeted_linears(model, r".*vision_tower\.nothing"),
        "route_dims": lambda: route(torch.ones(3, 4), torch.ones(2, 5)),
        "eval_centroids": lambda: evaluate_cram(model, processor, [COLOUR], [load_expert(experts["first_dir"])],
                                                torch.ones(2, 32), EVAL),
        "eval_no_experts": lambda: evaluate_cram(model, processor, [COLOUR], [], torch.ones(0, 32), EVAL),
        "previous_other_layers": lambda: train_expert(
            model, processor, COLOUR.train[:8], UP_PROJ_ONLY, [experts["first_dir"]], progress=False),
        "rank_record": lambda: load_expert(_edited_expert(experts["first_dir"], tmp_path, {"rank": 99})),
        "record_keys": lambda: load_expert(_edited_expert(experts["first_dir"], tmp_path, {"extra": 1})),
        "not_expert": lambda: load_expert(tmp_path),
    }
    return cases[case]()


def _edited_expert(expert_dir, tmp_path, update):
    copied = shutil.copytree(expert_dir, tmp_path / "edited")
    record = json.loads((copied / "cram.json").read_text())
    (copied / "cram.json").write_text(json.dumps({**record, **update}))
    return copied


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("rank_bounds", r"r_min \(5\) > r_max \(2\)"),
        ("energy", "energy"),
        ("typo", "ortho_wieght"),
        ("penalty_layers", "layers differ"),
        ("penalty_shapes", r"layer 'a': A \(2, 3\) and basis \(4, 1\) do not chain"),
        ("penalty_empty", "no layers"),
        ("gap_layers", "need the same target_modules"),
        ("gap_basis_shape", r"layer 'a': basis has shape \(4, 1\), expected \(5, k\)"),
        ("gap_not_orthonormal", "not orthonormal"),
        ("gap_nan", "layer 'a': the gradient must be a finite"),
        ("rank_empty", "no layers"),
        ("rank_layers", "gradient and residual layers differ"),
        ("rank_energy", "more energy than the gradients"),
        ("bases_layers", "expert 1 adapts other layers"),
        ("no_targets", "no linear layer of the base matches"),
        ("route_dims", "dimension 4 but prototypes"),
        ("eval_centroids", r"centroids have shape \(2, 32\), expected \(1, D\)"),
        ("eval_no_experts", "no experts"),
        ("previous_other_layers", "old and new experts need the same target_modules"),
        ("rank_record", "records rank 99"),
        ("record_keys", "keys"),
        ("not_expert", "no cram.json"),
    ],
)
def test_bad_input(base, experts, tmp_path, case, error):
    with pytest.raises((ValueError, FileNotFoundError, pydantic.ValidationError), match=error):
        _bad(case, base, experts, tmp_path)
