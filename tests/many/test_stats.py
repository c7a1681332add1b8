"""Gram statistics G = XᵀX / N over all non-padding tokens, under the task's own model (docs/design.md §1, §8)."""

import copy
import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from many.config import LLAMA_LORA_TARGETS, StatsConfig
from many.model.chat import encode_for_training
from many.stats import GRAMS_FORMAT, collect_grams, gram_groups, load_grams, lora_layers, read_gram_groups, save_grams
from tests.conftest import make_samples

Q_PROJ = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
DOWN_PROJ = "base_model.model.model.language_model.layers.1.mlp.down_proj"


def _lora(model, init_lora_weights=False):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LORA_TARGETS, init_lora_weights=init_lora_weights)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def _samples():
    # two prompt lengths, so a batch has right padding
    return make_samples(3, "colour", seed=1) + make_samples(3, "shape", seed=2)


@pytest.fixture()
def lora_model(tiny_base):
    model, processor = tiny_base
    torch.manual_seed(0)
    return _lora(model), processor


def test_gram_equals_hand_computed_xtx_over_non_padding_tokens(lora_model):
    model, processor = lora_model
    samples = _samples()
    batch = encode_for_training(processor, samples)
    assert (batch["attention_mask"] == 0).any(), "the fixture batch must contain padding"
    captured = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0]))
        for name in (Q_PROJ, DOWN_PROJ)
    ]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    for handle in handles:
        handle.remove()
    grams = collect_grams(model, processor, samples, StatsConfig(batch_size=len(samples)), progress=False).all
    mask = batch["attention_mask"].bool()
    for name, x in captured.items():
        tokens = x[mask].double()  # (N, in)
        assert tokens.shape[0] == int(mask.sum())
        torch.testing.assert_close(grams[name], tokens.T @ tokens / tokens.shape[0], rtol=1e-10, atol=1e-12)


def test_answer_gram_is_xtx_over_the_positions_that_predict_an_answer_token(lora_model):
    model, processor = lora_model
    samples = _samples()
    batch = encode_for_training(processor, samples)
    captured = {}
    handle = dict(model.named_modules())[Q_PROJ].register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("x", args[0]))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    handle.remove()
    # by hand: position p of sample b predicts token p + 1; the answer tokens (and EOS) are the labelled ones
    positions = [(b, p) for b in range(len(samples)) for p in range(batch["labels"].shape[1] - 1)
                 if batch["labels"][b, p + 1] != -100]
    assert 0 < len(positions) < int(batch["attention_mask"].sum())
    tokens = torch.stack([captured["x"][b, p] for b, p in positions]).double()  # (n, in)
    grams = collect_grams(model, processor, samples, StatsConfig(batch_size=4), progress=False)  # one pass, both
    torch.testing.assert_close(grams.answer[Q_PROJ], tokens.T @ tokens / len(positions), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grams.answer[Q_PROJ], grams.all[Q_PROJ])
    assert gram_groups(grams.answer) == gram_groups(grams.all)  # grouped alike: the merge adds them group by group


def test_padding_does_not_change_the_gram(lora_model):
    model, processor = lora_model
    padded = collect_grams(model, processor, _samples(), StatsConfig(batch_size=4), progress=False).all
    unpadded = collect_grams(model, processor, _samples(), StatsConfig(batch_size=1), progress=False).all
    for name in padded:
        torch.testing.assert_close(padded[name], unpadded[name], rtol=1e-5, atol=1e-6)


def test_keys_match_the_saved_adapter_and_shared_inputs_share_a_gram(lora_model, tmp_path):
    model, processor = lora_model
    grams = collect_grams(model, processor, _samples(), StatsConfig(batch_size=4), progress=False).all
    model.save_pretrained(tmp_path)
    adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(grams) == {key.removesuffix(".lora_A.weight") for key in adapter if key.endswith(".lora_A.weight")}
    for name, gram in grams.items():
        assert gram.dtype == torch.float64
        assert gram.shape == (adapter[name + ".lora_A.weight"].shape[1],) * 2
    prefix = "base_model.model.model.language_model.layers.0."
    assert torch.equal(grams[prefix + "self_attn.q_proj"], grams[prefix + "self_attn.v_proj"])
    assert torch.equal(grams[prefix + "mlp.gate_proj"], grams[prefix + "mlp.up_proj"])
    assert not torch.equal(grams[prefix + "self_attn.q_proj"], grams[prefix + "self_attn.o_proj"])


def test_grams_come_from_the_given_models_own_activations(tiny_base):
    model, processor = tiny_base
    torch.manual_seed(0)
    tuned, untuned = _lora(model), _lora(model, init_lora_weights=True)  # untuned: B = 0, the base's activations
    samples, cfg = _samples(), StatsConfig(batch_size=6)
    first = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    tuned_grams = collect_grams(tuned, processor, samples, cfg, progress=False).all
    untuned_grams = collect_grams(untuned, processor, samples, cfg, progress=False).all
    torch.testing.assert_close(tuned_grams[first], untuned_grams[first])  # below the first LoRA: same inputs
    assert not torch.allclose(tuned_grams[DOWN_PROJ], untuned_grams[DOWN_PROJ])


def test_collect_leaves_the_model_as_it_was(lora_model):
    model, processor = lora_model
    model.train()
    collect_grams(model, processor, _samples()[:2], StatsConfig(max_samples=1), progress=False)
    assert model.training
    assert all(not module._forward_pre_hooks for module in lora_layers(model).values())


def test_save_load_roundtrip_float32_storage(lora_model, tmp_path):
    model, processor = lora_model
    grams = collect_grams(model, processor, _samples(), StatsConfig(), progress=False).all
    path = save_grams(grams, tmp_path / "gram.safetensors")
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float32}
    loaded = load_grams(path)
    assert set(loaded) == set(grams)
    for name in grams:
        assert loaded[name].dtype == torch.float64
        torch.testing.assert_close(loaded[name], grams[name], rtol=1e-6, atol=1e-7)


def test_layers_reading_one_input_share_one_gram_stored_once(lora_model, tmp_path):
    model, processor = lora_model
    grams = collect_grams(model, processor, _samples(), StatsConfig(), progress=False).all
    block = "base_model.model.model.language_model.layers.0"
    q, k, v, o = (f"{block}.self_attn.{p}_proj" for p in "qkvo")
    gate, up, down = (f"{block}.mlp.{p}_proj" for p in ("gate", "up", "down"))
    assert grams[q] is grams[k] is grams[v] and grams[gate] is grams[up]
    assert len({id(grams[name]) for name in (q, o, gate, down)}) == 4
    path = save_grams(grams, tmp_path / "gram.safetensors")
    stored = load_file(str(path))
    assert len(stored) == 4 * 2  # 2 blocks × (q/k/v, o, gate/up, down)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["grams"])["format"] == GRAMS_FORMAT
    groups = read_gram_groups(path)
    assert groups[k] == groups[v] == q and groups[up] == gate and groups[down] == down
    loaded = load_grams(path)
    assert loaded[q] is loaded[k] is loaded[v] and loaded[gate] is loaded[up]
    assert torch.equal(loaded[k], stored[q].double())


def test_grams_of_the_earlier_per_layer_format_still_load(tmp_path):
    grams = {Q_PROJ: torch.eye(3), DOWN_PROJ: 2 * torch.eye(5)}
    save_file(grams, str(tmp_path / "old.safetensors"))  # no metadata: one Gram per layer
    assert read_gram_groups(tmp_path / "old.safetensors") == {Q_PROJ: Q_PROJ, DOWN_PROJ: DOWN_PROJ}
    loaded = load_grams(tmp_path / "old.safetensors")
    assert torch.equal(loaded[DOWN_PROJ], 2 * torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("no_lora", "has no LoRA layers"),
        ("no_samples", "no samples"),
        ("not_square", "must be square"),
    ],
)
def test_bad_input(tiny_base, lora_model, tmp_path, case, error):
    base, processor = tiny_base
    model, _ = lora_model
    with pytest.raises(ValueError, match=error):
        if case == "no_lora":
            collect_grams(base, processor, _samples(), StatsConfig(), progress=False)
        elif case == "no_samples":
            collect_grams(model, processor, (), StatsConfig(), progress=False)
        else:
            save_grams({Q_PROJ: torch.zeros(2, 3)}, tmp_path / "g.safetensors")


def test_half_precision_grams_halve_the_file_and_bound_the_merge_error(tmp_path) -> None:
    """StatsConfig.gram_dtype: bfloat16 / float16 Grams take half the bytes; read back as float64 they move each Gram
    by its dtype's rounding (2⁻⁹, 2⁻¹² relative) and an LPM merge of them by a bounded amount."""
    from many.config import LPMConfig
    from many.lpm import absorb

    generator = torch.Generator().manual_seed(0)
    n, out, tasks = 48, 40, 4
    loras, grams = [], []
    for _ in range(tasks):
        X = torch.randn(4 * n, n, generator=generator, dtype=torch.float64) * 3.0
        grams.append(X.T @ X / X.shape[0])
        loras.append((torch.randn(out, 4, generator=generator), torch.randn(4, n, generator=generator) / n**0.5, 2.0))
    merged = {}
    for dtype, unit in (("float32", 2.0**-24), ("bfloat16", 2.0**-8), ("float16", 2.0**-11)):
        paths = [save_grams({"q": G, "k": G}, tmp_path / f"{dtype}-{i}.safetensors", dtype) for i, G in enumerate(grams)]
        read = [load_grams(p) for p in paths]
        assert read[0]["q"] is read[0]["k"] and read[0]["q"].dtype == torch.float64
        for G, stored in zip(grams, read):
            assert (stored["q"] - G).abs().max() <= unit * G.abs().max()  # one rounding per entry
        state = None
        for (B, A, s), stored in zip(loras, read):
            state = absorb(state, B, A, s, stored["q"], LPMConfig(), "q")
        merged[dtype] = (state, paths[0].stat().st_size)
    from many.lpm import solve

    reference = solve(merged["float32"][0], "q")
    errors = {dtype: (torch.linalg.matrix_norm(solve(state, "q") - reference) / torch.linalg.matrix_norm(reference)).item()
              for dtype, (state, _) in merged.items() if dtype != "float32"}
    assert 0 < errors["float16"] < errors["bfloat16"] < 0.05, errors
    assert merged["bfloat16"][1] < 0.55 * merged["float32"][1] and merged["float16"][1] < 0.55 * merged["float32"][1]


def test_float16_grams_that_overflow_name_bfloat16(tmp_path) -> None:
    with pytest.raises(ValueError, match="do not fit float16.*bfloat16"):
        save_grams({"q": torch.full((3, 3), 1e5)}, tmp_path / "g.safetensors", "float16")


def test_gram_dtype_enters_the_stats_key_only_when_not_float32() -> None:
    """Existing stores keep their stats stages: the default dumps as before, another dtype is a new key."""
    from many.config import StatsConfig

    assert StatsConfig().model_dump(mode="json") == {"batch_size": 32, "max_samples": None}
    assert StatsConfig(gram_dtype="bfloat16").model_dump(mode="json")["gram_dtype"] == "bfloat16"
