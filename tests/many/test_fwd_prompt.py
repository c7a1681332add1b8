"""Fwd-Prompt: projection algebra, prompt tuning through prompt tokens, the sequential chain, state I/O (issue #10)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pydantic
import pytest
import torch
from safetensors.torch import save_file

from many.config import EvalConfig
from many.evaluate import generate_answers
from many.loop import batch_indices, encode_dataset
from many.methods.fwd_prompt import (
    FwdPromptConfig,
    FwdPromptState,
    load_state,
    project_gradient,
    prompted_model,
    prompted_samples,
    save_state,
    train_task,
    trainable_parameters,
)
from many.methods.fwd_prompt.subspace import energy_basis, extend_core, update_basis
from many.methods.fwd_prompt.train import initial_prompts, pretrained_basis
from many.model.chat import encode_for_generation, encode_for_training
from many.model.load import load_base
from many.pretrain import pretrain
from tests.conftest import FIXTURE_BASE, FIXTURE_MODEL, make_samples

D = FIXTURE_MODEL.text_hidden
CFG = FwdPromptConfig(n_prompts=8, steps=60, batch_size=8, lr=1.0, energy_core=0.99, energy_pretrained=0.99)
OLD = make_samples(24, "colour", seed=1)  # task 1
NEW = make_samples(24, "shape", seed=2)  # task 2: another question about the same kind of images


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q  # (d, k)


def loss(model, processor, samples) -> float:
    with torch.no_grad():
        return model(**encode_for_training(processor, samples), use_cache=False).loss.item()


def logits(model, processor, samples) -> torch.Tensor:
    with torch.no_grad():
        return model(**encode_for_training(processor, samples), use_cache=False).logits


# ---- projection algebra (float64, no model) ----

def test_projected_gradient_is_orthogonal_to_the_core_and_inside_the_pretrained_subspace():
    d, core, pretrained = 12, orthonormal(12, 3, 0), orthonormal(12, 8, 1)
    grad = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    projected = project_gradient(grad, core, pretrained)
    assert (projected @ core).norm() < 1e-10  # residual space of the core
    assert (projected - projected @ pretrained @ pretrained.T).norm() < 1e-10  # inside span(P)
    basis = update_basis(core, pretrained)
    assert basis.shape == (d, 8 - 3)  # generic subspaces: dim(P ∩ U^⊥) = k_p − k
    assert ((grad - projected) @ basis).norm() < 1e-10  # the closest point of the intersection
    torch.testing.assert_close(project_gradient(projected, core, pretrained), projected, rtol=0, atol=1e-12)
    assert projected.norm() > 0.1 * grad.norm()


def test_projection_on_coordinate_subspaces_keeps_exactly_the_allowed_coordinates():
    eye = torch.eye(4, dtype=torch.float64)
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    # core e0, pre-trained span(e0, e1, e2): only e1 and e2 may move
    torch.testing.assert_close(project_gradient(grad, eye[:, :1], eye[:, :3]), torch.tensor([[0.0, 2.0, 3.0, 0.0]],
                               dtype=torch.float64), rtol=0, atol=1e-15)
    # no core yet: g P Pᵀ
    torch.testing.assert_close(project_gradient(grad, eye[:, :0], eye[:, :3]), torch.tensor([[1.0, 2.0, 3.0, 0.0]],
                               dtype=torch.float64), rtol=0, atol=1e-15)


def test_core_grows_by_the_gpm_energy_criterion():
    x = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x * torch.tensor([10.0, 5.0, 2.0, 1.0, 0.1, 0.01], dtype=torch.float64)  # known spectrum, axis-aligned
    gram = x.T @ x / 200
    first = energy_basis(gram, 0.9)
    values = torch.linalg.eigvalsh(gram).flip(0)
    k = int((torch.cumsum(values, 0) / values.sum() < 0.9).sum()) + 1
    assert first.shape == (6, k)
    assert (first.T @ first - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-12
    assert extend_core(first, gram, 0.9).shape == first.shape  # a task the core already captures adds nothing
    other = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * torch.tensor(
        [0.01, 0.1, 1.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    grown = extend_core(first, other.T @ other / 200, 0.9)
    assert grown.shape[1] > first.shape[1] and torch.equal(grown[:, : first.shape[1]], first)  # old columns kept
    assert (grown.T @ grown - torch.eye(grown.shape[1], dtype=torch.float64)).abs().max() < 1e-10
    assert energy_basis(gram, 1.0).shape == (6, 6)


# ---- prompt tuning on the tiny LLaVA ----

@pytest.fixture(scope="module")
def base(tiny_base_dir):
    """The fixture model pretrained briefly to describe images ("red circle"), so it can name colours and shapes."""
    model, processor = load_base(tiny_base_dir, FIXTURE_BASE)
    colours, shapes = make_samples(48, "colour", seed=5), make_samples(48, "shape", seed=5)  # the same images
    describe = tuple(replace(c, prompt="describe the image", answer=f"{c.answer} {s.answer}")
                     for c, s in zip(colours, shapes, strict=True))
    cfg = FIXTURE_BASE.model_copy(update={"pretrain_steps": 40, "pretrain_batch_size": 8, "pretrain_lr": 1e-2})
    return pretrain(model, processor, describe, cfg, progress=False), processor


@pytest.fixture(scope="module")
def chain(base):
    """(base state before, state after task 1, after task 2 with projection, after task 2 without)."""
    model, processor = base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_task(model, processor, OLD, None, CFG, progress=False)
    projected = train_task(model, processor, NEW, first, CFG, progress=False)
    plain = train_task(model, processor, NEW, first, CFG.model_copy(update={"project": False}), progress=False)
    return before, first, projected, plain


def test_prompt_tuning_lowers_the_task_loss(base, chain):
    model, processor = base
    start = FwdPromptState(initial_prompts(model, processor, CFG.n_prompts, CFG.seed),
                           torch.zeros(D, 0, dtype=torch.float64), tasks=1)
    untrained = loss(*prompted_model(model, processor, start), prompted_samples(OLD, CFG.n_prompts))
    trained = loss(*prompted_model(model, processor, chain[1]), prompted_samples(OLD, CFG.n_prompts))
    assert trained < 0.7 * untrained


def test_only_the_prompts_differ_from_the_base(base, chain):
    model, processor = base
    before, first, _, _ = chain
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "train_task changed the base"
    prompted, prompted_processor = prompted_model(model, processor, first)
    state = {k.replace("embed_tokens.embedding.", "embed_tokens."): v for k, v in prompted.state_dict().items()}
    assert torch.equal(state.pop("model.language_model.embed_tokens.prompts"), first.prompts)
    assert state.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in state.items())
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == []
    # unprompted input: the wrapper is exactly the base embedding
    assert torch.equal(logits(prompted, prompted_processor, OLD[:4]), logits(model, processor, OLD[:4]))
    assert trainable_parameters(CFG, D) == first.prompts.numel() == CFG.n_prompts * D


def test_task_two_moves_the_prompts_only_inside_the_allowed_subspace(base, chain):
    _, first, projected, plain = chain
    step = (projected.prompts - first.prompts).to(torch.float64)  # (n, d)
    assert step.norm() > 0.1
    assert (step @ first.core).norm() < 1e-5 * step.norm()  # float32 prompts: rounding only
    pretrained = pretrained_basis(base[0], CFG.energy_pretrained)
    assert (step - step @ pretrained @ pretrained.T).norm() < 1e-5 * step.norm()
    unprojected = (plain.prompts - first.prompts).to(torch.float64)
    assert (unprojected @ first.core).norm() > 0.3 * unprojected.norm()


def test_projection_leaves_the_old_task_closer_to_unchanged(base, chain):
    model, processor = base
    _, first, projected, plain = chain
    old = prompted_samples(OLD, CFG.n_prompts)
    reference = logits(*prompted_model(model, processor, first), old)
    change = {name: (logits(*prompted_model(model, processor, state), old) - reference).norm().item()
              for name, state in (("projected", projected), ("plain", plain))}
    assert change["projected"] < 0.5 * change["plain"], change


def test_the_chain_continues_the_previous_prompts_and_keeps_the_core(base, chain):
    model, processor = base
    _, first, projected, _ = chain
    assert (first.tasks, projected.tasks) == (1, 2)
    assert first.core.shape[1] > 0 and torch.equal(projected.core[:, : first.core.shape[1]], first.core)
    losses = []
    cfg = CFG.model_copy(update={"steps": 1})
    train_task(model, processor, NEW, first, cfg, progress=False, on_step=lambda step: losses.append(step.loss))
    prompted, prompted_processor = prompted_model(model, processor, first)
    data = encode_dataset(prompted_processor, prompted_samples(NEW, CFG.n_prompts))
    batch = data.batch(next(batch_indices(len(data), cfg.batch_size, cfg.seed)), torch.device("cpu"))
    with torch.no_grad():
        assert losses[0] == pytest.approx(prompted(**batch, use_cache=False).loss.item(), rel=1e-5)


def test_generation_reads_the_prompts(base, chain):
    model, processor = base
    prompted, prompted_processor = prompted_model(model, processor, chain[1])
    samples = prompted_samples(OLD[:6], CFG.n_prompts)
    answers = generate_answers(prompted, prompted_processor, samples, EvalConfig(batch_size=4, max_new_tokens=3))
    with torch.no_grad():
        batch = encode_for_generation(prompted_processor, samples)  # left-padded: the last position is the next token
        first_ids = prompted(**batch, use_cache=False).logits[:, -1].argmax(-1)
    expected = [prompted_processor.tokenizer.decode([int(i)], skip_special_tokens=True).strip() for i in first_ids]
    assert all(answer.startswith(first) for answer, first in zip(answers, expected, strict=True)), (answers, expected)
    assert any(expected)  # some first token is text, not only a space or EOS


def test_state_round_trips_through_safetensors(base, chain, tmp_path):
    model, processor = base
    state = chain[2]
    loaded = load_state(save_state(state, tmp_path / "task"))
    assert loaded.tasks == state.tasks
    assert torch.equal(loaded.prompts, state.prompts) and torch.equal(loaded.core, state.core)
    assert loaded.core.dtype == torch.float64
    old = prompted_samples(OLD[:4], CFG.n_prompts)
    assert torch.equal(logits(*prompted_model(model, processor, loaded), old),
                       logits(*prompted_model(model, processor, state), old))


def test_bfloat16_base_trains_under_autocast(base):
    model, processor = base
    losses = []
    state = train_task(copy.deepcopy(model).to(torch.bfloat16), processor, OLD, None,
                       CFG.model_copy(update={"steps": 2}), progress=False, on_step=lambda step: losses.append(step.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and state.prompts.dtype == torch.float32


def _state(prompts=None, core=None, tasks=1):
    prompts = torch.zeros(CFG.n_prompts, D) if prompts is None else prompts
    return FwdPromptState(prompts, torch.zeros(D, 0, dtype=torch.float64) if core is None else core, tasks)


def _wrong_keys(tmp_path):
    save_file({"prompts": torch.zeros(2, D)}, str(tmp_path / "fwd_prompt.safetensors"), metadata={"tasks": "1"})
    return load_state(tmp_path)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda *_: FwdPromptConfig(n_prompts=0), "n_prompts"),
        (lambda *_: FwdPromptConfig(energy_core=0.0), "energy_core"),
        (lambda *_: FwdPromptConfig(energy_pretrained=1.5), "energy_pretrained"),
        (lambda *_: FwdPromptConfig(momentum=1.0), "momentum"),
        (lambda *_: FwdPromptConfig(n_promts=4), "n_promts"),
        (lambda m, p, _: train_task(m, p, (), None, CFG, progress=False), "no training samples"),
        (lambda m, p, _: train_task(m, p, OLD, _state(prompts=torch.zeros(3, D)), CFG, progress=False),
         r"continue with the same n_prompts"),
        (lambda m, p, _: train_task(m, p, OLD, _state(core=torch.eye(D, dtype=torch.float64)), CFG, progress=False),
         "no direction is left to train"),
        (lambda m, p, _: train_task(prompted_model(m, p, _state())[0], p, OLD, None, CFG), "not an nn.Embedding"),
        (lambda *_: _state(core=torch.ones(D, 2, dtype=torch.float64)), "not orthonormal"),
        (lambda *_: _state(core=torch.zeros(D + 1, 0, dtype=torch.float64)), r"must have shape \(32, k\)"),
        (lambda *_: _state(core=torch.zeros(D, 0)), "must be float64"),
        (lambda *_: _state(prompts=torch.full((2, D), float("nan"))), "finite float32"),
        (lambda *_: _state(tasks=0), "tasks must be ≥ 1"),
        (lambda *_: project_gradient(torch.zeros(2, 5), torch.zeros(4, 0, dtype=torch.float64),
                                     torch.eye(4, dtype=torch.float64)), r"grad must be \(n, 4\)"),
        (lambda *_: extend_core(torch.zeros(3, 0, dtype=torch.float64), torch.full((3, 3), float("nan")), 0.9),
         "NaN or Inf"),
        (lambda *_: energy_basis(torch.eye(3), 0.0), r"energy must be in \(0, 1\]"),
        (lambda m, p, tmp_path: load_state(tmp_path), "no Fwd-Prompt state"),
        (lambda m, p, tmp_path: _wrong_keys(tmp_path), r"expected tensors \['core', 'prompts'\]"),
    ],
    ids=["n-prompts-0", "energy-core-0", "energy-pretrained-above-1", "momentum-1", "typo", "empty-samples",
         "other-n-prompts", "core-fills-space", "prompted-base", "core-not-orthonormal", "core-wrong-d",
         "core-float32", "nan-prompts", "tasks-0", "grad-wrong-d", "nan-gram", "energy-0", "no-state-file",
         "wrong-keys"],
)
def test_bad_inputs_are_rejected(base, tmp_path, call, error):
    with pytest.raises((ValueError, FileNotFoundError, pydantic.ValidationError), match=error):
        call(*base, tmp_path)
