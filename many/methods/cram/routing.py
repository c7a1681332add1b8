"""CRAM's centroid-guided routing: each test image activates the expert whose task centroid it is closest to.

Task i's centroid is its CPM prototype μ_i = normalize(mean_j normalize(f(x_j))) over its training images
(`many.cpm.prototype`, f = the frozen vision tower's pooled feature). An image x goes to

    e(x) = argmax_i cos(f(x), μ_i)                                   (top-1)

and is answered by the base with that expert's ΔW_e = s_e B_e A_e and projector P_e only. With a shared `precision`
Σ⁻¹ (the `cram_lda` row), the centroids are the tasks' means m_i and the argmax is the Gaussian routing of
`cpm.metric: mahalanobis` instead (many.cpm): e(x) = argmax_i −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i). The test set is grouped
by routed expert, each group is evaluated through the shared harness (`many.evaluate.assemble` + `generate_answers`),
and the predictions are scored together in test order.
Soft top-k routing (mixing several experts per image) is not implemented: the harness adds one ΔW per model, not
per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many import cpm, metrics
from many.config import EvalConfig
from many.data.schema import TaskData
from many.evaluate import Assembly, EvalResult, assemble, generate_answers, lora_deltas
from many.methods.cram.expert import CramExpert
from many.progress import BatchCallback
from many.prototypes import image_features


def route(features: Tensor, centroids: Tensor, precision: Tensor | None = None) -> Tensor:
    """e(x) = argmax_i cos(f(x), μ_i) (or the Gaussian score with `precision` (D, D)): (N,) long expert index per
    image, for features (N, D), centroids (T, D)."""
    return cpm.routing_weights(features, centroids, tau=1.0, precision=precision).argmax(dim=1)  # the same for any τ


def evaluate_cram(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    tasks: Sequence[TaskData],
    experts: Sequence[CramExpert],
    centroids: Tensor,
    cfg: EvalConfig,
    on_batch: BatchCallback | None = None,
    precision: Tensor | None = None,
) -> list[EvalResult]:
    """Score (percent) of each task on its first `cfg.max_samples` test samples, each answered by its routed expert.

    Each expert's model is assembled once for all `tasks` (T copies of the base per accuracy-matrix row, not T²);
    its answers are generated task by task, so the batches are the same as when one task is scored alone.
    `on_batch` goes to each of those `generate_answers` calls."""
    if not experts:
        raise ValueError("evaluate_cram: no experts")
    if centroids.ndim != 2 or centroids.shape[0] != len(experts):
        raise ValueError(f"evaluate_cram: centroids have shape {tuple(centroids.shape)}, expected "
                         f"({len(experts)}, D) — one per expert, in the experts' order")
    samples = [task.test[: cfg.max_samples] for task in tasks]
    for task, test in zip(tasks, samples, strict=True):
        if not test:
            raise ValueError(f"evaluate_cram: task {task.name!r} has no test samples")
    chosen = [route(image_features(base_model, processor, test), centroids, precision) for test in samples]  # (N_task,)
    predictions: list[list[str | None]] = [[None] * len(test) for test in samples]
    for index, expert in enumerate(experts):
        routed = [torch.nonzero(experts_of_task == index).squeeze(1).tolist() for experts_of_task in chosen]
        if not any(routed):
            continue
        model = assemble(base_model, Assembly(lora_deltas(expert.factors), (expert.projector,)))
        for test, rows, answered in zip(samples, routed, predictions, strict=True):
            if rows:
                answers = generate_answers(model, processor, [test[r] for r in rows], cfg, on_batch=on_batch)
                for row, answer in zip(rows, answers, strict=True):
                    answered[row] = answer
        del model
    results = []
    for task, test, answered in zip(tasks, samples, predictions, strict=True):
        references = [sample.answer for sample in test]
        results.append(EvalResult(
            task=task.name,
            score=metrics.score(task.metric, answered, references),
            predictions=tuple(zip([s.sample_id for s in test], answered, references, strict=True)),
        ))
    return results
