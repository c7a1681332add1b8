"""The tiny LLaVA recipe and the chat encoding (docs/design.md §7, §8)."""

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from many.model.chat import IGNORE_INDEX, decode_answers, encode_for_generation, encode_for_training
from tests.conftest import FIXTURE_MODEL, make_samples


def test_image_tokens_equal_patch_count(tiny_base):
    model, processor = tiny_base
    batch = encode_for_training(processor, make_samples(2))
    image_id = model.config.image_token_index
    expected = (FIXTURE_MODEL.image_size // FIXTURE_MODEL.patch_size) ** 2
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [expected, expected]


def test_labels_cover_exactly_answer_and_eos(tiny_base):
    _, processor = tiny_base
    samples = make_samples(3)
    batch = encode_for_training(processor, samples)
    tok = processor.tokenizer
    for row, labels, sample in zip(batch["input_ids"], batch["labels"], samples, strict=True):
        supervised = row[labels != IGNORE_INDEX].tolist()
        # the answer as the template writes it, after "ASSISTANT:" and a space (byte-level BPE keeps the space)
        assert supervised == tok(" " + sample.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(supervised, skip_special_tokens=True) == " " + sample.answer


def test_saved_dir_is_a_normal_hf_checkpoint(tiny_base_dir, tiny_base):
    model, processor = tiny_base
    reloaded = LlavaForConditionalGeneration.from_pretrained(tiny_base_dir)
    batch = encode_for_training(AutoProcessor.from_pretrained(tiny_base_dir), make_samples(2))
    with torch.no_grad():
        assert torch.equal(model(**batch, use_cache=False).logits, reloaded(**batch, use_cache=False).logits)


def test_generation_is_left_padded_and_cut_at_eos(tiny_base):
    model, processor = tiny_base
    batch = encode_for_generation(processor, make_samples(2))
    assert (batch["attention_mask"][:, -1] == 1).all()
    eos = processor.tokenizer.eos_token_id
    red = processor.tokenizer.encode(" red", add_special_tokens=False)  # byte-level BPE: the word with its space
    rows = torch.tensor([[*red, eos, *red, *red], [*red, *red, *red, eos]])
    assert decode_answers(processor, rows) == ["red", "red red red"]
