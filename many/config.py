"""Typed, frozen configs of the method. Each stage receives only the sub-config it reads,
and that sub-config is exactly what goes into the stage's cache key (docs/design.md §2)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    model_serializer,
    model_validator,
)

# LoRA on the language model's linear layers only: the CLIP tower also has q/k/v_proj (docs/design.md §8).
LLAMA_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class Frozen(BaseModel):
    """Base of every config: immutable, and a typo is an error.

    `UNKEYED` names fields added after stores were written, left out of the config's JSON (hence out of every
    cache key) while they hold the value given there, so those stores keep their keys. That value need not be the
    field's default (CPMConfig's metric is left out at "cosine", its default is "mahalanobis"): read a config back
    from its JSON with `from_keyed`, never `model_validate`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    UNKEYED: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _unkeyed_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name, default in self.UNKEYED.items():
            if getattr(self, name) == default:
                data.pop(name, None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _keyed_omissions(cls, data: Any, info: ValidationInfo) -> Any:
        """Under `from_keyed`, a field the JSON leaves out that UNKEYED names takes UNKEYED's value (nested too)."""
        if isinstance(data, dict) and (info.context or {}).get("keyed"):
            return {**cls.UNKEYED, **data}
        return data

    @classmethod
    def from_keyed(cls, data: Any) -> Any:
        """The config whose JSON (a stage manifest's `config`, a cache key's) is `data`: the inverse of model_dump."""
        return cls.model_validate(data, context={"keyed": True})


class TinyModelConfig(Frozen):
    """The embedded tiny LLaVA (docs/design.md §7, §8): CLIP-style ViT + Llama decoder, built from config."""

    image_size: PositiveInt = 32
    patch_size: PositiveInt = 4
    vision_hidden: PositiveInt = 64
    vision_layers: PositiveInt = 3
    vision_heads: PositiveInt = 4
    text_hidden: PositiveInt = 128
    text_layers: PositiveInt = 3
    text_heads: PositiveInt = 4
    text_intermediate: PositiveInt = 256
    max_length: PositiveInt = 192  # positions (RoPE: no parameters): 64 image + ≤ 49 text tokens + Fwd-Prompt's 32 prompts
    vocab_size: int = Field(512, ge=260)  # byte-level BPE: 4 special + 256 byte tokens + at most the rest in merges


class BaseConfig(Frozen):
    """Where the base model comes from: the embedded tiny LLaVA (pretrained in the `base` stage) or a HF LLaVA."""

    kind: Literal["tiny", "hf"] = "tiny"
    hf_id: str | None = None  # e.g. "llava-hf/llava-1.5-7b-hf" or a local path, when kind == "hf"
    tiny: TinyModelConfig = TinyModelConfig()
    pretrain_steps: int = Field(1500, ge=0)
    pretrain_batch_size: PositiveInt = 32
    pretrain_lr: float = Field(1e-3, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class LoraConfig(Frozen):
    """Each task's LoRA. The default rank 2 (α = 4, scale 2) keeps the miniature's Σr/d = 6·2/128 = 0.094 at
    LLaVA-1.5-7B's in the UCIT reference setting (r = 64 on hidden 4096): docs/design.md §7, BENCHMARKS.md
    (benchmarks/miniature.py). examples/stress.yaml keeps the earlier rank 8 (Σr/d = 0.375)."""

    rank: PositiveInt = 2
    alpha: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str = LLAMA_LORA_TARGETS  # a regex over module names (PEFT `target_modules` as str)


class FinetuneConfig(Frozen):
    """One task's LoRA + its own projector, trained from the base (docs/design.md §1)."""

    lora: LoraConfig = LoraConfig()
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    lr: float = Field(2e-3, gt=0)
    projector_lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    seed: int = 0


class StatsConfig(Frozen):
    """Gram statistics G_i = X_iᵀX_i / N_i per LoRA-targeted layer, over all tokens (docs/design.md §1, §8).

    gram_dtype: how the Grams are stored (they are summed in float64 either way): "float32" (default), or
           "bfloat16" / "float16", half the bytes — 11 GB instead of 22 per task at LLaVA-1.5-7B shapes — for a merge
           error benchmarks/merge_bounds.py measures (large where the Grams are ill-conditioned: check yours);
           float16 overflows past 65504 (the stage then fails naming bfloat16). Left out of the config's JSON at its default, so the stats stages of a store written
           before it existed keep their cache keys.
    """

    batch_size: PositiveInt = 32
    max_samples: int | None = Field(None, ge=1)  # None: every training sample
    gram_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    UNKEYED: ClassVar[dict[str, Any]] = {"gram_dtype": "float32"}


class AnswerWeightConfig(Frozen):
    """The answer weighting of LPM's Grams (docs/design.md §1, "answer-weighted Grams"): each task's Gram emphasises
    the positions that predict its answer tokens,

        G_i = G_all,i + λ_i · G_answer,i        (both per-token averages, in × in; many.stats)

    weight: λ for every task. λ = 1 (default) gives the answer-predicting positions as much weight as all tokens
            together (a scale-free choice, not tuned); it beat λ = 0 in all 3 seeds × 2 orders (BENCHMARKS.md, quality
            section). λ = 0 is the all-token merge as MAny was published (the `many_all` row).
    tasks:  λ per task name, overriding `weight` for those tasks.
    """

    weight: float = Field(1.0, ge=0)
    tasks: dict[str, Annotated[float, Field(ge=0)]] = {}

    def weight_of(self, task: str) -> float:
        return self.tasks.get(task, self.weight)


class LPMConfig(Frozen):
    """Low-rank parameter merging by recursive least squares (docs/design.md §1).

    a:     RegMean off-diagonal scale, G̃ = a·G + (1−a)·diag(G).
    gamma: ridge. `gamma_mode="relative"`: γ = gamma · mean(diag(G̃_1)) of the layer's first task
           (fixed at the first absorb, so the recursion stays exact); "absolute": γ = gamma.
    rank:  optional SVD truncation of the exported merged LoRA (None: exact rank Σ r_i).
    state_dtype: how C = γI + Σ G̃_i is stored between tasks (the merge computes in float64 either way);
           "float32" halves the state (the running sum is rounded once per task), "float64" keeps it exact.
    state_form: how each layer's R = Σ G̃_i ΔW_iᵀ is kept (docs/design.md §1.1): "auto" as thin factors B, A·G̃ while
           Σr·(in + out) < in·out, then as the dense in×out R (whichever is smaller; the merge is the same up to
           float64 rounding); "thin" / "dense" force one form (for comparisons: thin grows with t without bound).
           Left out of the config's JSON at "auto" (the merge's version marks the change), so a run config's
           fingerprint — which runs `gc --keep-last` compares — stays what it was.
    answer: the answer weighting of each task's Gram, G_i = G_all,i + λ_i·G_answer,i (AnswerWeightConfig); a merge link
           takes its task's λ (`for_task`).
    diagnostics: whether the pipeline runs merge_diagnostics[t] beside merge[t] (fit error and leakage per layer
           and task, many.lpm_diagnostics; it reads the Grams of all tasks ≤ t). It changes nothing the merge
           computes, so it is left out of the config's JSON (`exclude`): the merge's cache key does not see it.
    """

    a: float = Field(1.0, ge=0, le=1)
    gamma: float = Field(1e-4, ge=0)
    gamma_mode: Literal["relative", "absolute"] = "relative"
    rank: PositiveInt | None = None
    state_dtype: Literal["float64", "float32"] = "float64"
    state_form: Literal["auto", "thin", "dense"] = "auto"
    answer: AnswerWeightConfig = AnswerWeightConfig()
    diagnostics: bool = Field(True, exclude=True)
    UNKEYED: ClassVar[dict[str, Any]] = {"state_form": "auto"}

    def for_task(self, task: str) -> LPMConfig:
        """This config as merge[t] of task `task` reads it (its cache key): λ resolved to the task's, no per-task map."""
        return self.model_copy(update={"answer": AnswerWeightConfig(weight=self.answer.weight_of(task))})


class ResidualConfig(Frozen):
    """MAny-R's per-task residuals (many.residual; docs/design.md §1.4): rank k of each task's ΔW_i − M_t.

    rank: k. With k ≥ r_i a task keeps its own factors: exact, for as many bytes as its own LoRA, and the merge
          cancels (each task's own adapter, routed by CPM); k < r_i keeps the rank-k truncation of ΔW_i − M_t.
          None (the default): each task's own rank r_i, so exact whatever the LoRA rank.
    """

    rank: PositiveInt | None = None


class CPMConfig(Frozen):
    """Cross-modal projection merging: w = softmax(s(f(x)) / τ), s the routing score of `metric` (docs/design.md §1).

    tau None: calibrated at merge time — the largest τ that puts ≥ `calibration_target` mean weight on
    the right task for the tasks' own training images.
    metric: "mahalanobis" (default): a Gaussian per task with one shared, Ledoit–Wolf-shrunk covariance of the
            normalised features (many.cpm.shared_gaussian), or "cosine": the cosine to each prototype, MAny's CPM as
            published (the `many_cos` row). The Gaussian is the default because it routed better for every routed
            row on 3 seeds × 2 orders (BENCHMARKS.md, quality section). "cosine" is left out of the config's JSON,
            so the cosine evals of a store written before the field existed keep their cache keys.
    """

    tau: float | None = Field(None, gt=0)
    top_k: PositiveInt | None = None
    calibration_target: float = Field(0.9, gt=0, lt=1)
    metric: Literal["cosine", "mahalanobis"] = "mahalanobis"
    UNKEYED: ClassVar[dict[str, Any]] = {"metric": "cosine"}


class EvalConfig(Frozen):
    batch_size: PositiveInt = 64
    max_new_tokens: PositiveInt = 24
    max_samples: int | None = Field(None, ge=1)  # None: the whole test split
