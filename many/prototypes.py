"""Visual prototypes for CPM routing (docs/design.md §1 "CPM", §2 prototypes[t]).

f(x) is the frozen vision tower's pooled feature: the mean over the patch tokens that LLaVA hands to the
projector (hidden state at `vision_feature_layer`, CLS dropped under the "default" strategy). Not CLIP's
`pooler_output` (the CLS token): LLaVA drops CLS, so a tower trained through LLaVA — like the embedded tiny
one — never trains it. Measured on the tiny base (benchmarks, 6 mini-UCIT tasks): argmax routing by the CLS
feature sent 0% of style-cls images to their task, by the patch mean 52–100% per task. The tower is frozen
in every task, so the base model's tower gives every task's features. Task i's prototype is

    μ_i = normalize(mean_j normalize(f(x_j)))        (many.cpm.prototype)

Written to Parquet, readable with plain pyarrow/pandas: one row per image (task, sample_id,
kind="image", embedding) plus one row per task (kind="prototype", sample_id null), where
embedding is fixed_size_list<float32>[D].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from peft import PeftModel
from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many import cpm
from many.data.schema import Sample
from many.model.chat import decode_image
from many.model.parts import llava
from many.progress import BatchCallback


def pooled_features(model: LlavaForConditionalGeneration | PeftModel, pixel_values: Tensor) -> Tensor:
    """f(x) (B, D) float32 for a batch of processed images (B, 3, H, W): mean of the projector's input tokens."""
    inner = llava(model)
    tower, config = inner.model.vision_tower, inner.config
    parameter = next(tower.parameters())
    with torch.no_grad():
        out = tower(
            pixel_values.to(device=parameter.device, dtype=parameter.dtype), output_hidden_states=True, return_dict=True
        )
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    hidden = torch.cat([out.hidden_states[k] for k in layers], dim=-1)  # (B, 1 + P, D·len(layers))
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]  # drop CLS, as LLaVA does
    return hidden.mean(dim=1).float()  # (B, D)


def image_features(
    model: LlavaForConditionalGeneration | PeftModel,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    batch_size: int = 64,
    on_batch: BatchCallback | None = None,
) -> Tensor:
    """f(x) (N, D) float32 on CPU for each sample's image, in sample order; `on_batch(images done, images)`
    after each batch."""
    if not samples:
        raise ValueError("image_features: no samples; the task's training split is empty")
    chunks = []
    for start in range(0, len(samples), batch_size):
        images = [decode_image(s) for s in samples[start : start + batch_size]]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(pooled_features(model, pixel_values).cpu())
        if on_batch is not None:
            on_batch(min(start + batch_size, len(samples)), len(samples))
    return torch.cat(chunks)


def _schema(embedding: pa.DataType) -> pa.Schema:
    return pa.schema(
        [("task", pa.string()), ("sample_id", pa.string()), ("kind", pa.string()), ("embedding", embedding)]
    )


def prototype_table(task: str, samples: Sequence[Sample], features: Tensor) -> pa.Table:
    """Image rows (one per sample) + one prototype row μ = cpm.prototype(features)."""
    if features.ndim != 2 or features.shape[0] != len(samples):
        raise ValueError(
            f"prototype_table({task!r}): features have shape {tuple(features.shape)}, "
            f"expected ({len(samples)}, D) — one row per sample"
        )
    dim = features.shape[1]
    rows = torch.cat([features.float(), cpm.prototype(features).float().reshape(1, dim)]).numpy()  # (N+1, D)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()), dim)
    return pa.table(
        [
            pa.array([task] * (len(samples) + 1), pa.string()),
            pa.array([s.sample_id for s in samples] + [None], pa.string()),
            pa.array(["image"] * len(samples) + ["prototype"], pa.string()),
            embedding,
        ],
        schema=_schema(pa.list_(pa.float32(), dim)),
    )


def write_prototypes(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    pq.write_table(table, path)
    return path


def _embeddings(table: pa.Table) -> Tensor:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return torch.from_numpy(np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim).copy())


def read_prototypes(
    sources: Sequence[str | Path | pa.Table],
) -> tuple[tuple[str, ...], Tensor, tuple[Tensor, ...]]:
    """(task names in order of first appearance, prototypes (T, D), image features per task (N_t, D)).

    Each source is a Parquet path or a table from `prototype_table`; every task needs exactly one
    prototype row, and all embeddings one dimension D.
    """
    tables = [source if isinstance(source, pa.Table) else pq.read_table(source) for source in sources]
    if not tables:
        raise ValueError("read_prototypes: no prototype tables given")
    dims = set()
    for table in tables:
        if set(table.column_names) != {"task", "sample_id", "kind", "embedding"}:
            raise ValueError(
                f"read_prototypes: columns {table.column_names}, expected task, sample_id, kind, embedding"
            )
        kind = table.schema.field("embedding").type
        if not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
            raise ValueError(f"read_prototypes: embedding has type {kind}, expected fixed_size_list<float32>[D]")
        dims.add(kind.list_size)
    if len(dims) != 1:
        raise ValueError(f"read_prototypes: the tables disagree on D: {sorted(dims)}")
    embedding = pa.list_(pa.float32(), dims.pop())
    table = pa.concat_tables(
        [t.select(["task", "sample_id", "kind", "embedding"]).cast(_schema(embedding)) for t in tables]
    )
    tasks = list(dict.fromkeys(table.column("task").to_pylist()))
    kinds = np.asarray(table.column("kind").to_pylist())
    unknown = sorted(set(kinds.tolist()) - {"image", "prototype"})
    if unknown:
        raise ValueError(f"read_prototypes: unknown kind {unknown}; expected 'image' or 'prototype'")
    names = np.asarray(table.column("task").to_pylist())
    embeddings = _embeddings(table)  # (rows, D)
    prototypes, features = [], []
    for task in tasks:
        is_prototype = (names == task) & (kinds == "prototype")
        if is_prototype.sum() != 1:
            raise ValueError(f"read_prototypes: task {task!r} has {int(is_prototype.sum())} prototype rows, expected 1")
        prototypes.append(embeddings[torch.from_numpy(is_prototype)][0])
        features.append(embeddings[torch.from_numpy((names == task) & (kinds == "image"))])
    return tuple(tasks), torch.stack(prototypes), tuple(features)
