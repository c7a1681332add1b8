"""Fwd-Prompt training of one task, continuing the previous task's prompts (docs/design.md §1 "Comparison methods").

Task t, from state (prompts p_{t−1} (n, d), core U_{t−1} (d, k)) — or, for the first task, n prompts copied from
randomly drawn vocabulary embeddings (Lester et al. 2021) and an empty core:

1. P (d, k_p) = energy basis (share `energy_pretrained`) of the base token-embedding matrix E (V, d), from EᵀE/V;
   Q = basis of span(P) ∩ span(U_{t−1})^⊥ (subspace.update_basis).
2. Train the prompts only (base frozen, base projector, no LoRA) on the answer-token loss of many.loop, with
   every gradient projected before clipping and the step: g ← g Q Qᵀ. SGD with momentum: the momentum buffer
   and the step are linear combinations of projected gradients, so p_t − p_{t−1} ∈ span(Q) exactly (Adam's
   per-coordinate 1/√v would rotate it out).
3. U_t = extend_core(U_{t−1}, G_t, energy_core), G_t = XᵀX / N over the LLM input embeddings of task t's training
   sequences — the projected image tokens and the text tokens of the prompt, the answer and EOS, padding and the
   soft-prompt positions excluded (they are the parameters, not the task's input). They do not depend on the
   prompts, and no sample is kept: only U_t.

Both Grams are taken over unit rows, x̂ = x / ‖x‖ (our choice; the paper does not say): the decoder first applies
RMSNorm, which sees a token's direction only, and raw rows let a few large vectors own the spectrum — in the tiny
base the projected image tokens have norm ≈ 18 against ≈ 0.24 for text tokens, and the raw core was 2 directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.data.schema import Sample
from many.loop import Encoded, StepCallback, encode_dataset, run_steps, seeded, warmup_cosine
from many.methods.fwd_prompt.prompts import PromptedEmbedding, attach_prompts, prompted_samples
from many.methods.fwd_prompt.state import FwdPromptConfig, FwdPromptState
from many.methods.fwd_prompt.subspace import energy_basis, extend_core, project_onto, update_basis
from many.model.parts import max_positions, model_device_dtype

EMBEDDING_CHUNK = 4096  # vocabulary rows per float64 product while forming EᵀE


def unit_rows(x: Tensor) -> Tensor:
    """x̂ = x / ‖x‖ per row (N, d); all-zero rows (a padding embedding) stay zero."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def token_embedding(base_model: LlavaForConditionalGeneration) -> nn.Embedding:
    embedding = base_model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"Fwd-Prompt: the model's input embedding is a {type(embedding).__name__}, not an "
                         "nn.Embedding; pass the base LLaVA, not a prompted model")
    return embedding


def pretrained_basis(base_model: LlavaForConditionalGeneration, energy: float) -> Tensor:
    """P (d, k_p) float64: the energy basis of the base token-embedding matrix E (V, d), from EᵀE / V."""
    weight = token_embedding(base_model).weight.detach()  # (V, d)
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], EMBEDDING_CHUNK):
        rows = unit_rows(weight[start : start + EMBEDDING_CHUNK].to(torch.float64))  # (chunk, d)
        gram += rows.T @ rows
    return energy_basis(gram / weight.shape[0], energy)


def initial_prompts(base_model: LlavaForConditionalGeneration, processor: LlavaProcessor, n: int, seed: int) -> Tensor:
    """(n, d) float32: copies of the embeddings of n vocabulary tokens drawn at random (special tokens excluded)."""
    weight = token_embedding(base_model).weight.detach()  # (V, d)
    special = set(processor.tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(min(len(processor.tokenizer), weight.shape[0])) if i not in special])
    picks = candidates[torch.randint(len(candidates), (n,), generator=torch.Generator().manual_seed(seed))]
    return weight[picks.to(weight.device)].float().cpu()


def input_embedding_gram(
    model: nn.Module, embedding: PromptedEmbedding, data: Encoded, batch_size: int, max_samples: int | None = None
) -> Tensor:
    """G = XᵀX / N (d, d) float64 over the input embeddings of all non-padding, non-prompt tokens of `data`.

    The first `max_samples` sequences are used (all if None).
    X is read by a forward pre-hook on the language model (its `inputs_embeds`: text embeddings with the projected
    image features scattered in), accumulated batch by batch.
    """
    device, dtype = model_device_dtype(model)
    half = dtype in (torch.bfloat16, torch.float16)
    d = embedding.prompts.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    tokens = 0
    count = len(data) if max_samples is None else min(max_samples, len(data))
    seen: list[Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=half):
            for start in range(0, count, batch_size):
                batch = data.batch(torch.arange(start, min(start + batch_size, count)), device)
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                index = batch["input_ids"] - embedding.first_id  # (B, L)
                keep = batch["attention_mask"].bool() & ((index < 0) | (index >= embedding.prompts.shape[0]))
                x = unit_rows(seen.pop()[keep].to(torch.float64))  # (N_b, d)
                gram += x.T @ x
                tokens += x.shape[0]
    finally:
        handle.remove()
    return gram / tokens


def _check_state(state: FwdPromptState, cfg: FwdPromptConfig, d: int) -> None:
    if tuple(state.prompts.shape) != (cfg.n_prompts, d):
        raise ValueError(f"Fwd-Prompt: the previous state's prompts are {tuple(state.prompts.shape)} but the config "
                         f"and base ask for ({cfg.n_prompts}, {d}); continue with the same n_prompts and base")


def train_task(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    state: FwdPromptState | None,
    cfg: FwdPromptConfig,
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> FwdPromptState:
    """The state after one more task (module docstring, steps 1–3); `base_model` and `processor` are unchanged."""
    d = token_embedding(base_model).embedding_dim
    if state is not None:
        _check_state(state, cfg, d)
    device, _ = model_device_dtype(base_model)
    core = state.core.to(device) if state is not None else torch.zeros(d, 0, dtype=torch.float64, device=device)
    basis = update_basis(core, pretrained_basis(base_model, cfg.energy_pretrained))  # (d, m)
    if cfg.project and basis.shape[1] == 0:
        raise ValueError(f"Fwd-Prompt: no direction is left to train: the core ({core.shape[1]} of {d} dims) covers "
                         "the pre-trained subspace; lower energy_core or raise energy_pretrained")
    prompts = state.prompts if state is not None else initial_prompts(base_model, processor, cfg.n_prompts, cfg.seed)
    model, prompted_processor, embedding = attach_prompts(base_model, processor, prompts)
    data = encode_dataset(prompted_processor, prompted_samples(samples, cfg.n_prompts), max_positions(base_model))

    def project(_model: nn.Module) -> None:
        grad = embedding.prompts.grad  # (n, d) float32
        grad.copy_(project_onto(grad, basis))  # g ← g Q Qᵀ

    with seeded(cfg.seed, device):
        optimizer = torch.optim.SGD([embedding.prompts], lr=cfg.lr, momentum=cfg.momentum)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=0, total=cfg.steps))
        run_steps(
            model, optimizer, schedule, data, steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1,
            seed=cfg.seed, progress=progress, desc="fwd-prompt", on_step=on_step,
            before_step=project if cfg.project else None,
        )
    gram = input_embedding_gram(model, embedding, data, cfg.batch_size, cfg.core_max_samples)
    return FwdPromptState(
        prompts=embedding.prompts.detach().float().cpu(),
        core=extend_core(core, gram, cfg.energy_core).cpu(),
        tasks=(state.tasks if state is not None else 0) + 1,
    )


def prompted_model(
    base_model: LlavaForConditionalGeneration, processor: LlavaProcessor, state: FwdPromptState
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A frozen copy of the base with the state's prompts and a processor that knows the prompt tokens (eval mode).

    Evaluate it on `prompted_samples(samples, n)` with many.evaluate.generate_answers / evaluate.
    """
    token_embedding(base_model)  # a base, not an already prompted model
    model, prompted_processor, embedding = attach_prompts(base_model, processor, state.prompts)
    embedding.prompts.requires_grad_(False)
    return model.eval(), prompted_processor
