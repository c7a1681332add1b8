"""The `base` stage: tiny LLaVA pretraining and the HF copy path (docs/design.md §2, §7)."""

from __future__ import annotations

import pytest
import torch

from many.model.chat import encode_for_training, sequence_text
from many.model.load import load_base
from many.model.tiny import build_tiny_llava
from many.pretrain import make_base, pretrain
from tests.conftest import FIXTURE_BASE, FIXTURE_MODEL, make_samples

CAPTIONS = make_samples(32, "shape", seed=5)
CFG = FIXTURE_BASE.model_copy(update={"pretrain_steps": 30, "pretrain_batch_size": 8, "pretrain_lr": 1e-2})


def caption_loss(model, processor) -> float:
    with torch.no_grad():
        return model(**encode_for_training(processor, CAPTIONS), use_cache=False).loss.item()


def logits(model, processor) -> torch.Tensor:
    with torch.no_grad():
        return model(**encode_for_training(processor, CAPTIONS[:4]), use_cache=False).logits


def test_pretrain_lowers_caption_loss_and_leaves_its_input_alone(tiny_base):
    model, processor = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = pretrain(model, processor, CAPTIONS, CFG, progress=False)
    assert caption_loss(trained, processor) < 0.5 * caption_loss(model, processor)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = pretrain(model, processor, CAPTIONS, CFG, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())


def test_make_base_tiny_writes_a_loadable_pretrained_dir(tmp_path):
    out = make_base(CFG, CAPTIONS, tmp_path / "base", progress=False)
    model, processor = load_base(out, CFG)
    fresh, _ = build_tiny_llava(FIXTURE_MODEL, [sequence_text(s) for s in CAPTIONS], seed=CFG.seed)
    assert caption_loss(model, processor) < 0.5 * caption_loss(fresh.eval(), processor)
    # its tokenizer is the one trained on the captions' text: every caption word is one token
    assert all(len(processor.tokenizer.tokenize(" " + s.answer)) == 1 for s in CAPTIONS)


def test_make_base_hf_copies_a_local_hf_dir(tiny_base_dir, tiny_base, tmp_path):
    cfg = CFG.model_copy(update={"kind": "hf", "hf_id": str(tiny_base_dir)})
    out = make_base(cfg, (), tmp_path / "base")
    copied, processor = load_base(out, cfg)
    assert torch.equal(logits(copied, processor), logits(*tiny_base))


@pytest.mark.parametrize(
    ("update", "samples", "error"),
    [
        ({"kind": "hf"}, CAPTIONS, "hf_id is not set"),
        ({}, (), "no training samples"),
    ],
    ids=["hf-without-id", "no-captions"],
)
def test_bad_base_inputs_are_rejected(tmp_path, update, samples, error):
    with pytest.raises(ValueError, match=error):
        make_base(CFG.model_copy(update=update), samples, tmp_path / "base", progress=False)
