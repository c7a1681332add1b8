"""Build the model of any method from its parts, and score it on a task (docs/design.md §1, §2 eval[t]).

Every method is evaluated through one harness. An `Assembly` names what differs between methods:

    W = W0 + ΔW            per LoRA-targeted linear (ΔW dense, (out, in); none = the base LLM)
    H = P(z)               "single": one projector (or the base's own when none is given)
    H = Σ_i w_i P_i(z)     "cpm": w = softmax(cos(f(x), μ_i) / τ) per image, optional top-k (many.cpm)
    y += Σ_i w_i U_i V_i x  "cpm" with residuals: per-task low-rank residuals mixed by the same w (many.residual)

Individual (task-id oracle) = task j's ΔW_j + its own projector; SeqLoRA = the chain's adapter + projector;
the merges = merged ΔW + CPM routing (MAny) or one averaged projector. `assemble` returns a new model (the
base is deep-copied, never changed); `evaluate` generates greedily with the KV cache, cuts answers at EOS
(docs/design.md §8) and scores them with many.metrics (percent).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from peft import PeftModel
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many import cpm, metrics
from many.config import CPMConfig, EvalConfig
from many.data.schema import Sample, TaskData
from many.model.chat import decode_answers, encode_for_generation
from many.model.parts import PEFT_PREFIX, llava  # PEFT module name = PEFT_PREFIX + the base model's module name
from many.progress import BatchCallback
from many.prototypes import pooled_features, read_prototypes
from many.residual import RoutedResidual

log = logging.getLogger("many.evaluate")


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class Router:
    """CPM routing of a batch: w = softmax(cos(f(x), μ_i) / τ) over the T known tasks, optional top-k; with a
    shared `precision` the Gaussian routing of `cpm.metric: mahalanobis` (many.cpm), `prototypes` the tasks' means."""

    prototypes: Tensor  # (T, D)
    tau: float
    top_k: int | None = None
    precision: Tensor | None = None  # (D, D) Σ⁻¹, metric "mahalanobis" only

    def __post_init__(self) -> None:
        if self.prototypes.ndim != 2:
            raise ValueError(f"Router: prototypes must be (T, D), one per task, got shape {tuple(self.prototypes.shape)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"Router: tau must be finite and > 0, got {self.tau!r}")

    def weights(self, features: Tensor) -> Tensor:
        """(B, T) routing weights of a batch of image features (B, D), on the features' device."""
        device = features.device
        precision = None if self.precision is None else self.precision.to(device)
        return cpm.routing_weights(features, self.prototypes.to(device), self.tau, self.top_k, precision)


def cpm_router(prototype_sources: Sequence[str | Path | pa.Table], cfg: CPMConfig) -> Router:
    """CPM's routing over the tasks of `prototype_sources` (many.prototypes.read_prototypes, in task order): their
    prototypes, τ = cfg.tau or else calibrated on their training features (many.cpm.calibrate_tau), cfg.top_k."""
    _, prototypes, features = read_prototypes(prototype_sources)
    precision = None
    if cfg.metric == "mahalanobis":
        prototypes, precision = cpm.shared_gaussian(features)
    tau = cfg.tau if cfg.tau is not None else cpm.calibrate_tau(features, prototypes, cfg.calibration_target, cfg.top_k,
                                                                precision)
    return Router(prototypes, tau, cfg.top_k, precision)


@dataclass(frozen=True, eq=False)
class Assembly:
    """What to evaluate: dense LoRA updates per PEFT module name, projector state dicts, and their routing.

    Without a `router`: at most one projector (none = the base's own). With one (CPM): one projector per known task,
    in the router's task order. `residuals` (routed only, MAny-R): one {PEFT module name: (U (out, k), V (k, in))}
    per known task, in the projectors' order, mixed by the same weights.
    """

    deltas: Mapping[str, Tensor] = field(default_factory=dict)  # PEFT module name -> ΔW (out, in)
    projectors: tuple[Mapping[str, Tensor], ...] = ()  # projector state dicts (keys as in multi_modal_projector)
    router: Router | None = None  # CPM routing over the projectors; pass it to `generate_answers`/`evaluate`
    residuals: tuple[Mapping[str, tuple[Tensor, Tensor]], ...] = ()  # per task: module -> (U (out, k), V (k, in))

    def __post_init__(self) -> None:
        if self.router is None:
            if len(self.projectors) > 1:
                raise ValueError(f"Assembly: {len(self.projectors)} projectors and no router; route them by CPM "
                                 "(a Router) or average them first")
            if self.residuals:
                raise ValueError("Assembly: residuals are mixed by CPM's weights and need a router")
            return
        if len(self.projectors) != self.router.prototypes.shape[0]:
            raise ValueError(f"Assembly: the router knows {self.router.prototypes.shape[0]} tasks but "
                             f"{len(self.projectors)} projectors were given; give one projector per prototype")
        if self.residuals and len(self.residuals) != len(self.projectors):
            raise ValueError(f"Assembly: residuals need one set per projector, got {len(self.residuals)} sets for "
                             f"{len(self.projectors)} projectors")


@dataclass(frozen=True)
class EvalResult:
    task: str
    score: float  # percent
    predictions: tuple[tuple[str, str, str], ...]  # (sample_id, prediction, reference)


def lora_deltas(factors: Mapping[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """ΔW = s·B A (out, in) float32 per PEFT module name, from `many.adapters.lora_factors`."""
    return {
        name: (scale * B.to(torch.float64) @ A.to(torch.float64)).to(torch.float32)  # (out, r) @ (r, in)
        for name, (B, A, scale) in factors.items()
    }


def _add_delta(modules: Mapping[str, nn.Module], name: str, delta: Tensor) -> None:
    """W ← W0 + ΔW in place on the copy; ValueError names the module and what is wrong."""
    if not name.startswith(PEFT_PREFIX) or name.removeprefix(PEFT_PREFIX) not in modules:
        raise ValueError(f"assemble: unknown module {name!r}; deltas are keyed by PEFT module names "
                         f"('{PEFT_PREFIX}' + a linear layer of the base model)")
    module = modules[name.removeprefix(PEFT_PREFIX)]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"assemble: module {name!r} is a {type(module).__name__}, not a linear layer")
    if tuple(delta.shape) != tuple(module.weight.shape):
        raise ValueError(f"assemble: module {name!r}: delta has shape {tuple(delta.shape)}, "
                         f"weight has shape {tuple(module.weight.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError(f"assemble: module {name!r}: delta contains NaN or Inf")
    with torch.no_grad():
        weight = module.weight
        weight.copy_((weight.to(torch.float64) + delta.to(weight.device, torch.float64)).to(weight.dtype))


def _add_residual(model: nn.Module, modules: Mapping[str, nn.Module], name: str, factors: list) -> None:
    """Replace the linear `name` by a RoutedResidual holding the tasks' residual factors (None: that task has none)."""
    path = name.removeprefix(PEFT_PREFIX)
    if not name.startswith(PEFT_PREFIX) or not isinstance(modules.get(path), nn.Linear):
        raise ValueError(f"assemble: residual for {name!r}, which is not a linear layer of the base "
                         f"(residuals are keyed by PEFT module names, '{PEFT_PREFIX}' + a linear layer)")
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, RoutedResidual(modules[path], factors))


def _projector(template: nn.Module, state: Mapping[str, Tensor], index: int) -> nn.Module:
    projector = copy.deepcopy(template)
    expected = projector.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"assemble: projector {index} has keys {sorted(state)}, expected {sorted(expected)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"assemble: projector {index} {key!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"assemble: projector {index} {key!r} contains NaN or Inf")
    projector.load_state_dict(dict(state))
    return projector


def assemble(
    base_model: LlavaForConditionalGeneration, assembly: Assembly, *, copy_base: bool = True
) -> LlavaForConditionalGeneration:
    """A new model (eval mode): the base deep-copied, W0 + ΔW on every listed layer, projector(s) swapped in.
    `copy_base=False` changes `base_model` itself instead (one model in memory, when the caller has no other use
    for the base)."""
    if isinstance(base_model, PeftModel):
        raise ValueError("assemble: pass the base LLaVA, not a PeftModel; its LoRA goes into Assembly.deltas")
    model = copy.deepcopy(base_model) if copy_base else base_model
    modules = dict(model.named_modules())
    for name, delta in assembly.deltas.items():
        _add_delta(modules, name, delta)
    for name in sorted({name for task in assembly.residuals for name in task}):
        _add_residual(model, modules, name, [task.get(name) for task in assembly.residuals])
    template = model.model.multi_modal_projector
    projectors = [_projector(template, state, i) for i, state in enumerate(assembly.projectors)]
    if assembly.router is not None:
        model.model.multi_modal_projector = cpm.RoutedProjector(projectors)
    elif projectors:
        model.model.multi_modal_projector = projectors[0]
    return model.eval()


def generate_answers(
    model: LlavaForConditionalGeneration | PeftModel,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: EvalConfig,
    *,
    routing: Router | None = None,
    use_cache: bool = True,
    progress: bool = False,
    on_batch: BatchCallback | None = None,
) -> list[str]:
    """Greedy answers (cut at EOS), batch by batch; with `routing`, each batch's images are routed first.
    `on_batch(answered, len(samples))` after each batch."""
    projector = llava(model).model.multi_modal_projector
    if isinstance(projector, cpm.RoutedProjector) != (routing is not None):
        raise ValueError("generate_answers: pass routing exactly when the model has a CPM RoutedProjector "
                         "(use Assembly.router)")
    residual_layers = [m for m in model.modules() if isinstance(m, RoutedResidual)]  # only beside a RoutedProjector
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(llava(model).model.vision_tower.parameters()).dtype
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(samples), cfg.batch_size), desc="generate", disable=not progress):
            chunk = samples[start : start + cfg.batch_size]
            batch = {k: v.to(device) for k, v in encode_for_generation(processor, chunk).items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            if routing is not None:
                weights = routing.weights(pooled_features(model, batch["pixel_values"]))  # (B, T)
                projector.route(weights)  # (B, T), in force for this batch's generate
                for module in residual_layers:
                    module.route(weights)
            with torch.no_grad():
                out = model.generate(
                    **batch, do_sample=False, max_new_tokens=cfg.max_new_tokens, use_cache=use_cache,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            answers += decode_answers(processor, out[:, batch["input_ids"].shape[1] :])
            if on_batch is not None:
                on_batch(len(answers), len(samples))
    finally:
        model.train(was_training)
    return answers


def warn_if_cut(processor: LlavaProcessor, task: str, samples: Sequence[Sample], max_new_tokens: int) -> None:
    """Warn when a reference answer needs more than `max_new_tokens` tokens: generation stops there, so the
    prediction of that sample is cut short (new words take several byte-level tokens each)."""
    lengths = [len(ids) for ids in processor.tokenizer([" " + s.answer for s in samples], add_special_tokens=False)["input_ids"]]
    longer = [(n, s.sample_id) for n, s in zip(lengths, samples, strict=True) if n > max_new_tokens]
    if longer:
        n, sample_id = max(longer)
        log.warning("task %r: %d reference answers need more than eval.max_new_tokens = %d tokens (the longest, %r, "
                    "%d), and their predictions are cut there; raise eval.max_new_tokens", task, len(longer),
                    max_new_tokens, sample_id, n)


def evaluate(
    model: LlavaForConditionalGeneration | PeftModel,
    processor: LlavaProcessor,
    task: TaskData,
    cfg: EvalConfig,
    *,
    routing: Router | None = None,
    progress: bool = False,
    on_batch: BatchCallback | None = None,
) -> EvalResult:
    """Score (percent, by task.metric) on the first `cfg.max_samples` test samples (all if None);
    `on_batch` as in `generate_answers`."""
    samples = task.test[: cfg.max_samples]
    if not samples:
        raise ValueError(f"evaluate: task {task.name!r} has no test samples")
    warn_if_cut(processor, task.name, samples, cfg.max_new_tokens)
    predictions = generate_answers(model, processor, samples, cfg, routing=routing, progress=progress, on_batch=on_batch)
    references = [s.answer for s in samples]
    return EvalResult(
        task=task.name,
        score=metrics.score(task.metric, predictions, references),
        predictions=tuple(zip([s.sample_id for s in samples], predictions, references, strict=True)),
    )


def predictions_table(result: EvalResult) -> pa.Table:
    """Columns task, sample_id, prediction, reference (all strings), one row per test sample."""
    sample_ids, predictions, references = zip(*result.predictions, strict=True) if result.predictions else ((), (), ())
    return pa.table({
        "task": pa.array([result.task] * len(sample_ids), pa.string()),
        "sample_id": pa.array(sample_ids, pa.string()),
        "prediction": pa.array(predictions, pa.string()),
        "reference": pa.array(references, pa.string()),
    })


def write_predictions(results: Sequence[EvalResult], path: str | Path) -> Path:
    """One Parquet file of `predictions_table` rows: every result's test samples, in the order of `results`."""
    if not results:
        raise ValueError("write_predictions: no results; pass the EvalResult of at least one task")
    path = Path(path)
    pq.write_table(pa.concat_tables([predictions_table(result) for result in results]), path)
    return path


def routing_accuracy(features_by_task: Sequence[Tensor], prototypes: Tensor, precision: Tensor | None = None) -> float:
    """Fraction of images (N_t, D) per task whose highest routing weight — argmax_i cos(f, μ_i), or the Gaussian
    routing's with `precision`, for any τ — falls on their own task (row t of `prototypes`)."""
    if len(features_by_task) != prototypes.shape[0]:
        raise ValueError(f"routing_accuracy: {len(features_by_task)} feature sets but {prototypes.shape[0]} prototypes")
    right = total = 0
    for index, features in enumerate(features_by_task):
        chosen = cpm.routing_weights(features, prototypes, tau=1.0, precision=precision).argmax(dim=1)  # (N_t,)
        right += int((chosen == index).sum())
        total += features.shape[0]
    if total == 0:
        raise ValueError("routing_accuracy: no images")
    return right / total
