"""Per-task LoRA + projector fine-tuning and adapter factor I/O (docs/design.md §1, §5)."""

from __future__ import annotations

import copy
import json

import pydantic
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from many.adapters import load_task, lora_factors, projector_state, save_task, write_lora_adapter
from many.config import FinetuneConfig, LoraConfig
from many.loop import batch_indices, encode_dataset
from many.model.chat import encode_for_training
from many.model.load import load_base
from many.model.parts import projector_of
from many.progress import LossCurve
from many.training import finetune
from tests.conftest import FIXTURE_BASE, FIXTURE_MODEL, make_samples

CFG = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), steps=30, batch_size=8, lr=5e-3, projector_lr=5e-3,
                     warmup_steps=2)
SAMPLES = make_samples(24, "colour", seed=1)


def answer_loss(model, processor, samples) -> float:
    with torch.no_grad():
        return model(**encode_for_training(processor, samples), use_cache=False).loss.item()


def forward_logits(model, processor, samples) -> torch.Tensor:
    with torch.no_grad():
        return model(**encode_for_training(processor, samples), use_cache=False).logits


@pytest.fixture(scope="module")
def base(pretrained_base_dir):
    """The session's briefly pretrained fixture model (tests/conftest.py), frozen as `pretrain` returns it."""
    model, processor = load_base(pretrained_base_dir, FIXTURE_BASE)
    return model.requires_grad_(False), processor


@pytest.fixture(scope="module")
def trained(base):
    model, processor = base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return finetune(model, processor, SAMPLES, CFG, progress=False), before


@pytest.fixture(scope="module")
def task_dir(trained, tmp_path_factory):
    return save_task(trained[0], tmp_path_factory.mktemp("task"))


def test_finetune_lowers_the_task_loss(base, trained):
    model, processor = base
    assert answer_loss(trained[0], processor, SAMPLES) < 0.6 * answer_loss(model, processor, SAMPLES)


def test_base_is_unchanged_and_the_projector_is_task_own(base, trained):
    model, _ = base
    peft_model, before = trained
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    base_projector = projector_of(model).state_dict()
    task_projector = projector_of(peft_model).state_dict()
    assert any(not torch.equal(base_projector[k], task_projector[k]) for k in base_projector)
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_wraps_only_language_model_linears(trained):
    wrapped = [name for name, module in trained[0].named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == 7 * FIXTURE_MODEL.text_layers
    assert all(".language_model.layers." in name for name in wrapped)
    assert not any("vision_tower" in name for name, _ in trained[0].named_parameters() if "lora_" in name)


def test_saved_task_reloads_with_identical_logits(base, trained, task_dir):
    model, processor = base
    assert (task_dir / "adapter" / "adapter_model.safetensors").is_file()
    expected = forward_logits(trained[0], processor, SAMPLES[:4])
    assert torch.equal(forward_logits(load_task(model, task_dir), processor, SAMPLES[:4]), expected)
    by_hand = PeftModel.from_pretrained(copy.deepcopy(model), task_dir / "adapter")
    projector_of(by_hand).load_state_dict(projector_state(task_dir))
    assert torch.equal(forward_logits(by_hand.eval(), processor, SAMPLES[:4]), expected)


def test_same_seed_gives_a_bit_identical_adapter(base):
    model, processor = base
    cfg = CFG.model_copy(update={"steps": 3, "grad_accum": 2, "lora": LoraConfig(rank=4, alpha=8.0, dropout=0.1)})
    curves = [LossCurve(), LossCurve()]
    runs = [finetune(model, processor, SAMPLES, cfg, progress=False, on_step=curve) for curve in curves]
    states = [{k: v for k, v in run.state_dict().items() if "lora_" in k or "projector" in k} for run in runs]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # the loss curve is bit-reproducible too (its `seconds` column is wall-clock time, not compared)
    assert [(s.step, s.loss, s.lr) for s in curves[0].steps] == [(s.step, s.loss, s.lr) for s in curves[1].steps]
    other = finetune(model, processor, SAMPLES, cfg.model_copy(update={"seed": 1}), progress=False)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in states[0].items())


def first_batch(processor, cfg):
    data = encode_dataset(processor, SAMPLES)
    return data.batch(next(batch_indices(len(data), cfg.batch_size, cfg.seed)), torch.device("cpu"))


def test_seqlora_starts_from_the_previous_task(base, task_dir):
    model, processor = base
    cfg = CFG.model_copy(update={"steps": 1})
    losses = []
    finetune(model, processor, SAMPLES, cfg, init_dir=task_dir, progress=False, on_step=lambda s: losses.append(s.loss))
    with torch.no_grad():
        previous = load_task(model, task_dir)(**first_batch(processor, cfg), use_cache=False).loss.item()
        fresh = model(**first_batch(processor, cfg), use_cache=False).loss.item()
    assert losses[0] == pytest.approx(previous, rel=1e-5)
    assert abs(previous - fresh) > 0.1  # the continuation is not a fresh start (B = 0 reproduces the base)


def test_bfloat16_base_trains_under_autocast(base):
    model, processor = base
    half = copy.deepcopy(model).to(torch.bfloat16)
    losses = []
    tuned = finetune(half, processor, SAMPLES, CFG.model_copy(update={"steps": 2}), progress=False,
                     on_step=lambda s: losses.append(s.loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in projector_of(tuned).parameters()} == {torch.bfloat16}


def test_lora_factors_reproduce_peft_delta(base, task_dir):
    factors = lora_factors(task_dir / "adapter")
    peft_model = load_task(base[0], task_dir)
    modules = dict(peft_model.named_modules())
    assert factors.keys() == {n for n, m in modules.items() if hasattr(m, "lora_A")}
    for name, (B, A, scale) in factors.items():
        assert scale == CFG.lora.alpha / CFG.lora.rank and A.shape[0] == B.shape[1] == CFG.lora.rank
        assert torch.allclose(modules[name].get_delta_weight("default"), scale * B @ A, atol=1e-7)


def test_written_adapter_equals_adding_ba_by_hand(base, task_dir, tmp_path):
    model, processor = base
    config = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for i, (name, (B, A, _)) in enumerate(lora_factors(task_dir / "adapter").items()):
        rank = 2 if i == 0 else 6  # one module off the common rank → rank_pattern
        factors[name] = (0.05 * torch.randn(B.shape[0], rank, generator=generator),  # B non-zero (docs/design.md §11)
                         0.05 * torch.randn(rank, A.shape[1], generator=generator))
    out = write_lora_adapter(factors, config, tmp_path / "merged")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    by_hand = copy.deepcopy(model)
    weights = dict(by_hand.named_modules())
    with torch.no_grad():
        for name, (B, A) in factors.items():
            weights[name.removeprefix("base_model.model.")].weight += B @ A
    expected = forward_logits(by_hand, processor, SAMPLES[:4])
    assert not torch.allclose(expected, forward_logits(model, processor, SAMPLES[:4]), atol=1e-3)
    assert torch.allclose(forward_logits(loaded, processor, SAMPLES[:4]), expected, atol=1e-5)
    reread = lora_factors(out)
    assert all(torch.equal(reread[n][0], B) and torch.equal(reread[n][1], A) and reread[n][2] == 1.0
               for n, (B, A) in factors.items())


def test_rslora_scale_is_alpha_over_root_rank(task_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    save_file(load_file(task_dir / "adapter" / "adapter_model.safetensors"), adapter / "adapter_model.safetensors")
    assert {s for _, _, s in lora_factors(adapter).values()} == {CFG.lora.alpha / CFG.lora.rank**0.5}


def _corrupt(task_dir, tmp_path, edit_weights=None, edit_config=None):
    adapter = tmp_path / "bad"
    adapter.mkdir()
    weights = load_file(task_dir / "adapter" / "adapter_model.safetensors")
    config = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
    save_file(edit_weights(weights) if edit_weights else weights, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return adapter


def _nan_first(weights):
    key = sorted(k for k in weights if k.endswith("lora_B.weight"))[0]
    return {**weights, key: torch.full_like(weights[key], float("nan"))}


def _wrong_rank(weights):
    key = sorted(k for k in weights if k.endswith("lora_A.weight"))[0]
    return {**weights, key: weights[key][:2].contiguous()}


def _no_b(weights):
    key = sorted(k for k in weights if k.endswith("lora_B.weight"))[0]
    return {k: v for k, v in weights.items() if k != key}


@pytest.mark.parametrize(
    ("edit_weights", "edit_config", "error"),
    [
        (_nan_first, None, r"layers\.0\.mlp\.down_proj'.*non-finite"),
        (_wrong_rank, None, "rank mismatch"),
        (_no_b, None, "needs both A and B"),
        (None, lambda c: {**c, "r": 5}, "adapter_config.json says 5"),
        (None, lambda c: {**c, "use_dora": True}, "only plain LoRA"),
    ],
    ids=["nan-factor", "rank-mismatch", "missing-B", "config-rank", "dora"],
)
def test_bad_adapters_are_rejected(task_dir, tmp_path, edit_weights, edit_config, error):
    with pytest.raises(ValueError, match=error):
        lora_factors(_corrupt(task_dir, tmp_path, edit_weights, edit_config))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda model, processor, task_dir, tmp_path: finetune(model, processor, (), CFG, progress=False),
         "no training samples"),
        (lambda *_, tmp_path: LoraConfig(rank=0), "rank"),
        (lambda model, processor, task_dir, tmp_path: finetune(
            model, processor, SAMPLES, CFG.model_copy(update={"lora": LoraConfig(rank=2)}), init_dir=task_dir),
         r"differs from finetune.lora in \['r'"),
        (lambda model, processor, task_dir, tmp_path: load_task(model, tmp_path), "no PEFT adapter"),
        (lambda model, processor, task_dir, tmp_path: projector_state(tmp_path), "no projector"),
        (lambda *_, tmp_path: write_lora_adapter(
            {"m": (torch.full((3, 2), float("nan")), torch.ones(2, 3))}, {}, tmp_path / "x"), "'m': non-finite"),
        (lambda *_, tmp_path: write_lora_adapter({"m": (torch.ones(3, 2), torch.ones(4, 3))}, {}, tmp_path / "x"),
         "'m': rank mismatch"),
    ],
    ids=["empty-samples", "rank-0", "seqlora-other-rank", "not-a-task-dir", "no-projector", "nan-export",
         "export-rank-mismatch"],
)
def test_bad_finetune_inputs_are_rejected(base, task_dir, tmp_path, call, error):
    with pytest.raises((ValueError, FileNotFoundError, pydantic.ValidationError), match=error):
        call(*base, task_dir, tmp_path=tmp_path)
