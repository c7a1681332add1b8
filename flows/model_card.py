"""The model card of an export (docs/design.md §5.3): README.md at the top of `many export --out DIR` — what the model
is, its tasks in order, the run's scores, and how to load it with `many` and with PEFT alone."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from many.inference import Recipe

METRICS = (("Last", "MFN"), ("MFT", "MFT"), ("MAA", "MAA"), ("BWT", "BWT"))  # (column, report field)


def _number(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def scores_table(report: dict[str, Any]) -> str:
    """Markdown: one row per method of the run's report (percent; Last = MFN, the mean of the final row)."""
    tasks = report.get("tasks", [])
    head = "| method | " + " | ".join(c for c, _ in METRICS) + " | " + " | ".join(f"last: {t}" for t in tasks) + " |"
    rule = "|---|" + "---:|" * (len(METRICS) + len(tasks))
    lines = [head, rule]
    for method, row in report.get("methods", {}).items():
        last = row["matrix"][-1] if row.get("matrix") else [None] * len(tasks)
        cells = [_number(row.get(field), field == "BWT") for _, field in METRICS] + [_number(v) for v in last]
        name = f"**{method}**" if method == "many" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(out_dir: Path, summary: dict[str, Any], methods: Mapping[str, Recipe], *, merged: bool, routed: bool,
               tau: float | None) -> str:
    """README.md of the export at `out_dir` of the run `summary`: the `methods` it serves with their recipes (as its
    inference.json lists them, flows.export.served_methods), its parts (`merged` adapter, prototypes for CPM
    `routed`) and τ."""
    tasks: list[str] = list(summary["tasks"])
    out_dir = out_dir.resolve()
    base = out_dir / "base"
    steps = " → ".join(f"`{t}`" for t in tasks)
    oracle = next((m for m, recipe in methods.items() if recipe.update == "task"), None)  # one task's own model
    tau_text = "" if tau is None else f" (τ = {tau:.4g})"
    if "many" in methods:
        flags, call, what = "", f'"{out_dir}"', 'method="many": LPM-merged LoRA + CPM-routed projectors'
    else:  # no LPM merge or no prototypes in this run: one task's own model is what the export can serve
        flags = f" --method {oracle} --task {tasks[-1]}"
        call, what = f'"{out_dir}", "{oracle}", "{tasks[-1]}"', "that task's own adapter and projector"
    adapter = out_dir / "merged" / "adapter" if merged else out_dir / "tasks" / tasks[-1] / "adapter"
    adapter_name = "the merged LoRA" if merged else f"task {tasks[-1]}'s LoRA"
    lines = [
        f"# MAny continual model: {len(tasks)} tasks",
        "",
        "A LLaVA-style vision-language model instruction-tuned on a stream of tasks without forgetting by merging "
        "(MAny, Merge Anything): each task trained its own LoRA and vision projector from the shared base; the LoRAs "
        "are merged in closed form by LPM (recursive least squares, one PEFT LoRA of rank Σr in `merged/adapter/`), "
        f"and each image is routed to the task projectors by CPM{tau_text}: softmax(cos(f(x), μ_i)/τ) over the "
        "tasks' visual prototypes, no task id needed.",
        "",
        f"Exported by `many export` from run `{summary.get('run_id', '?')}`"
        + (f" of the store `{summary['store']}`." if summary.get("store") else "."),
        "",
        "## Tasks, in the order learned",
        "",
        *[f"{i}. `{t}`" for i, t in enumerate(tasks, 1)],
        "",
        f"Stream: {steps}.",
        "",
    ]
    report = summary.get("report")
    if report and report.get("methods"):
        lines += [
            "## Scores of the run",
            "",
            "Percent on each task's test split after the last task (Last = MFN, the mean of that row), mean accuracy "
            "right after learning each task (MFT), mean over the whole accuracy matrix (MAA), and backward transfer "
            "(BWT, negative = forgetting); see docs/design.md §1.3 of `many`.",
            "",
            scores_table(report),
            "",
        ]
    lines += [
        "## Files",
        "",
        "| path | what |",
        "|---|---|",
        "| `base/` | the shared base, a Hugging Face `LlavaForConditionalGeneration` dir (model, tokenizer, processor) |",
        "| `tasks/<task>/adapter/` | the task's PEFT LoRA |",
        "| `tasks/<task>/projector.safetensors` | the task's own vision projector |",
        "| `tasks/<task>/gram.safetensors`, `answer_gram.safetensors` | the Grams LPM merged with, over all tokens and "
        "over the answer positions (if the run computed them) |",
        *(["| `merged/adapter/` | the LPM merge of every task: one PEFT LoRA of rank Σr |",
            "| `merged/merge.json` | the merge's settings: method, tasks, a, γ per layer, λ per task, τ |"]
          if merged else []),
        "| `merged/projectors.safetensors` | every task's projector, keys `<task>.<parameter>` |",
        *(["| `prototypes.parquet` | the tasks' visual prototypes (CPM routing) and their training images' features |"]
          if routed else []),
        "| `inference.json` | what `many.load` needs beyond the files: tasks, τ, top-k, max_new_tokens, dtype |",
        "",
        "## Using it with `many`",
        "",
        "```bash",
        f'many predict IMAGE "QUESTION" --export {out_dir}{flags}          # the answer, then the routing weights',
        f'many predict IMAGE "QUESTION" --export {out_dir}{flags} --json',
        *([f'many predict IMAGE "QUESTION" --export {out_dir} --method {oracle} --task {tasks[-1]}'] if oracle else []),
        "```",
        "",
        "```python",
        "import many",
        "",
        f"model = many.load({call})              # {what}",
        'answer = model.generate("image.png", "QUESTION")      # a path or a PIL image',
        'weights = model.route("image.png")                    # {task: weight}, highest first (None: not routed)',
        "```",
        "",
        f"Methods this export serves: {', '.join(f'`{m}`' for m in methods)}"
        + (f" (`{oracle}` needs a task). " if oracle else ". ")
        + "Every other method of the run is served from its store: `many predict … --store URL --method NAME`.",
        "",
        "## Using it with PEFT alone",
        "",
        f"Every adapter's `adapter_config.json` names the base by its absolute path (`{base}`), so PEFT loads "
        "base and LoRA in one call:",
        "",
        "```python",
        "from peft import AutoPeftModel",
        "from transformers import AutoProcessor",
        "",
        f'model = AutoPeftModel.from_pretrained("{adapter}")   # LlavaForConditionalGeneration + {adapter_name}',
        f'processor = AutoProcessor.from_pretrained("{base}")',
        "```",
        "",
        "If the directory has moved, give the base yourself: "
        "`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(\"DIR/base\"), \"DIR/merged/adapter\")`. "
        "The same works for one task's adapter, `tasks/<task>/adapter/`.",
        "",
        "PEFT loads the LoRA only: the model keeps the base's projector. MAny's projector is chosen per image (CPM, "
        "what `many.load` does); to fix it to one task's, load that task's weights from "
        "`merged/projectors.safetensors` (keys `<task>.<parameter>`) into "
        "`model.base_model.model.model.multi_modal_projector`. Prompts follow LLaVA-1.5: "
        "`USER: <image>\\n{question} ASSISTANT:`; answers end at EOS.",
        "",
    ]
    return "\n".join(lines)
