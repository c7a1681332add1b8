"""The eval stage (docs/design.md §2 eval[t]): row t of one method's accuracy matrix — the method's model after task
t scored on the test split of every task ≤ t. What the model is comes from the method's row (tasks.rows); this
module loads the base and the test tasks, calls the row, and writes the two outputs every row shares:

    predictions.parquet   task, sample_id, prediction, reference — one row per test sample
    scores.json           {"method", "tasks", "scores" (percent), "tau" (CPM's τ, null when not routed), **fields}

`fields` are the row's own: every row's size, "trainable_parameters" and "bytes_per_task" (tasks.rows.parts.footprint),
CPM's "tau", CRAM's "parameters_per_task" and "ranks", MAny-R's "residual_bytes_per_task" and "residual_error".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tasks.progress import batch_reporter
from tasks.rows import get_row
from tasks.rows.row import EvalContext, EvalInputs, EvalStageConfig
from tasks.stages import load_base

VERSION = "3"  # 2: CPM routes with the patch-mean feature; 3: every row reports trainable_parameters, bytes_per_task
OUTPUTS = ("predictions", "scores")


def compute_eval(inputs: Mapping[str, Path], workdir: Path, *, config: EvalStageConfig, device: str) -> dict[str, Path]:
    """eval[t] of row `config.method` (module doc)."""
    from many.data import read_task
    from many.evaluate import write_predictions

    row = get_row(config.method)
    parsed = EvalInputs.parse(inputs)
    base_model, processor = load_base(parsed.base, config.dtype, device)
    tasks = [read_task(path) for path in parsed.data]
    answers = sum(len(task.test[: config.eval.max_samples]) for task in tasks)  # what the row's generate calls add up to
    context = EvalContext(parsed, base_model, processor, tasks, config, batch_reporter("answer", answers))
    results, fields = row.evaluate(context)
    predictions = write_predictions(results, workdir / "predictions.parquet")
    scores = workdir / "scores.json"
    scores.write_text(json.dumps({
        "method": row.name, "tasks": [r.task for r in results], "scores": [r.score for r in results], "tau": None,
        **fields,
    }, sort_keys=True))
    return {"predictions": predictions, "scores": scores}
