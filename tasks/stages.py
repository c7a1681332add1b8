"""The shared stages (docs/design.md §2): what each reads and writes, its compute (a thin call into `many`), and the
sub-configs that key their cache entries. Every method row reads these; tasks.catalog adds the eval stage and the
rows' own chain stages (tasks.rows), and tasks.dispatch runs any of them through the store's cache.

    data[t] ─┐
    base ────┼─► finetune[t] (or adapter[t]: a task fine-tuned elsewhere) ─► stats[t] (G_all, G_answer)
             └─► prototypes[t]

A stage's cache key is its sub-config plus the digests of its inputs (`tasks.cache.cache_key`). A compute reads
local copies of its inputs and writes its outputs under a work directory; it never sees the store. A training stage
also writes its loss curve, the `losses` output (many.progress.LossCurve), which no stage reads; a compute reports
its progress to tasks.progress's reporters, which are None unless it runs in a worker that shows progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from pydantic import PositiveInt

from many.config import BaseConfig, FinetuneConfig, Frozen, StatsConfig
from many.data import Metric, MiniUcitConfig
from tasks.progress import batch_reporter, step_reporter

# Bump a stage's version when its code would produce different results: its cache keys change.
VERSIONS = {
    "data": "1",
    "base": "3",  # 2: the `losses` output (the model's bytes are unchanged); 3: byte-level BPE, generic instructions
    "finetune": "3",  # 2: the adapter files hold no local path (identical bytes on every machine); 3: `losses`
    "adapter": "1",
    "prototypes": "2",  # 2: f(x) = mean of the projector's input tokens, not the CLS pooler output
    "stats": "3",  # 2: Grams stored once per input group (q/k/v, gate/up share one), layer → group map in metadata;
    # 3: the answer Grams beside them, from the same pass (the all-token Grams' bytes are unchanged)
}
OUTPUTS = {
    "data": ("task",),
    "base": ("model", "losses"),
    "finetune": ("task", "losses"),
    "adapter": ("task",),
    "prototypes": ("prototypes",),
    "stats": ("grams", "answer_grams"),
}


# -- the sub-configs that go into the stages' cache keys ------------------------------------------------


class DataStageConfig(Frozen):
    """One task's data: a mini-UCIT kind (generated from `mini_ucit`) or LLaVA JSON + images."""

    name: str
    kind: str | None = None
    mini_ucit: MiniUcitConfig | None = None
    train_json: str | None = None
    test_json: str | None = None
    image_root: str | None = None
    metric: Metric = "exact_match"


class BaseStageConfig(Frozen):
    """The base model recipe; `device` is always "auto" here: the worker's resources decide it."""

    base: BaseConfig
    mini_ucit: MiniUcitConfig | None = None  # pretraining captions of the tiny base
    pretrain_samples: int = 0


class FinetuneStageConfig(Frozen):
    finetune: FinetuneConfig
    dtype: str = "float32"


class AdapterStageConfig(Frozen):
    """adapter[t] reads nothing but its inputs: the base and the user's task directory."""


class PrototypesStageConfig(Frozen):
    batch_size: PositiveInt = 64
    dtype: str = "float32"


class StatsStageConfig(Frozen):
    stats: StatsConfig
    dtype: str = "float32"


# -- the computes: read local inputs, call many, write outputs under workdir -----------------------------------


def load_base(path: Path, dtype: str, device: str):
    """The base model and processor of a base stage's output, in `dtype` on `device`."""
    from many.model.load import load_base

    return load_base(path, BaseConfig(dtype=dtype, device=device))


def compute_data(inputs: Mapping[str, Path], workdir: Path, *, config: DataStageConfig, device: str) -> dict[str, Path]:
    from many.data import DataError, TaskData, load_llava_json, make_task, write_task

    if config.kind is not None:
        task = make_task(config.kind, config.mini_ucit or MiniUcitConfig())
        task = replace(task, name=config.name)
    else:
        import fsspec

        def samples(json_path: str):
            fs, _ = fsspec.core.url_to_fs(json_path)
            try:
                return load_llava_json(json_path, config.image_root, fs=fs, name=config.name)
            except DataError as error:  # the one line the CLI prints names the task
                raise DataError(f"task {config.name!r}: {error}") from None

        task = TaskData(config.name, config.metric, samples(config.train_json), samples(config.test_json))
    write_task(task, workdir / "task")
    return {"task": workdir / "task"}


def compute_base(inputs: Mapping[str, Path], workdir: Path, *, config: BaseStageConfig, device: str) -> dict[str, Path]:
    """The base model and its pretraining loss curve (no rows for a HF base: it is not trained here)."""
    from many.data import pretrain_samples
    from many.pretrain import make_base
    from many.progress import LossCurve, fan_out

    cfg = config.base.model_copy(update={"device": device})
    tiny = cfg.kind == "tiny"
    samples = pretrain_samples(config.mini_ucit or MiniUcitConfig(), config.pretrain_samples) if tiny else ()
    curve = LossCurve()
    make_base(cfg, samples, workdir / "model", progress=False, on_step=fan_out(curve, step_reporter()))
    return {"model": workdir / "model", "losses": curve.write(workdir / "losses.parquet")}


def compute_finetune(
    inputs: Mapping[str, Path], workdir: Path, *, config: FinetuneStageConfig, device: str
) -> dict[str, Path]:
    """finetune[t] from the base, and its loss curve; with a `previous` input (a chain's task dir at t−1) it
    continues that fine-tune."""
    from many.adapters import save_task
    from many.data import read_task
    from many.progress import LossCurve, fan_out
    from many.training import finetune

    model, processor = load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    curve = LossCurve()
    trained = finetune(model, processor, task.train, config.finetune, init_dir=inputs.get("previous"), progress=False,
                       on_step=fan_out(curve, step_reporter()))
    save_task(trained, workdir / "task")
    return {"task": workdir / "task", "losses": curve.write(workdir / "losses.parquet")}


def compute_adapter(inputs: Mapping[str, Path], workdir: Path, *, config: AdapterStageConfig, device: str) -> dict[str, Path]:
    """adapter[t]: a task fine-tuned elsewhere (`tasks[i].adapter`) in place of finetune[t], checked against the
    base it will be merged into (flows/preflight.py checked it against the configured architecture already)."""
    import shutil

    from many.adapters import check_task_dir
    from many.model.shapes import base_shapes

    shapes = base_shapes(BaseConfig(kind="hf", hf_id=str(inputs["base"])))
    check_task_dir(inputs["task"], shapes.linears, shapes.projector)
    shutil.copytree(inputs["task"], workdir / "task")
    return {"task": workdir / "task"}


def compute_prototypes(
    inputs: Mapping[str, Path], workdir: Path, *, config: PrototypesStageConfig, device: str
) -> dict[str, Path]:
    from many.data import read_task
    from many.prototypes import image_features, prototype_table, write_prototypes

    model, processor = load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    features = image_features(model, processor, task.train, config.batch_size, on_batch=batch_reporter("image"))
    path = workdir / "prototypes.parquet"
    write_prototypes(prototype_table(task.name, task.train, features), path)
    return {"prototypes": path}


def compute_stats(inputs: Mapping[str, Path], workdir: Path, *, config: StatsStageConfig, device: str) -> dict[str, Path]:
    """Grams under the task's OWN fine-tuned model (docs/design.md §8 lesson 2), one pass: over all tokens ("grams") and
    over the positions that predict an answer token ("answer_grams", LPM's answer weighting)."""
    from many.adapters import load_task
    from many.data import read_task
    from many.stats import collect_grams, save_grams

    model, processor = load_base(inputs["base"], config.dtype, device)
    tuned = load_task(model, inputs["finetune"])
    task = read_task(inputs["data"])
    grams = collect_grams(tuned, processor, task.train, config.stats, progress=False, on_batch=batch_reporter("batch"))
    return {"grams": save_grams(grams.all, workdir / "gram.safetensors", config.stats.gram_dtype),
            "answer_grams": save_grams(grams.answer, workdir / "answer_gram.safetensors", config.stats.gram_dtype)}



COMPUTES = {
    "data": compute_data,
    "base": compute_base,
    "finetune": compute_finetune,
    "adapter": compute_adapter,
    "prototypes": compute_prototypes,
    "stats": compute_stats,
}
