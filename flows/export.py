"""`many export` (docs/design.md §5): the latest run's artifacts as standard files, readable without `many`.

    DIR/tasks/<task>/adapter/              PEFT LoRA (PeftModel.from_pretrained on DIR/base)
    DIR/tasks/<task>/projector.safetensors the task's own projector
    DIR/tasks/<task>/gram.safetensors      Grams, one float32 tensor per input group (q/k/v, gate/up share one), named
                                           by its first module; metadata "grams": {"groups": {module: tensor name}}
    DIR/tasks/<task>/answer_gram.safetensors  the same over the positions that predict an answer token (LPM's G_answer)
    DIR/merged/adapter/                    the LPM merge as a PEFT LoRA: exact (rank Σr while a layer's state is thin,
                                           min(in, out) once dense) or truncated to lpm.rank
    DIR/merged/merge.json                  {"method", "tasks", "a", "gamma": {module: absolute γ}, "answer_weight":
                                           {task: λ}, "tau", "export": {module: {"form", "rank", "exported_rank",
                                           "error"}}} (merge[t]'s export.json; G_i = G_all,i + λ_i·G_answer,i)
    DIR/merged/projectors.safetensors      every task's projector, keys "<task>.<parameter>"
    DIR/prototypes.parquet                 image + prototype rows of every task
    DIR/base/                              the HF model dir
    DIR/inference.json                     {"tasks", "methods", "max_new_tokens", "dtype", "tau", "top_k",
                                           "calibration_target", "metric"}: the methods served, each with its row's recipe
                                           ({name: {"update", "projector"}}, `served_methods`), and the last eval's
                                           settings — what many.load needs beyond the files
    DIR/README.md                          the model card (flows/model_card.py)

Every exported adapter's `base_model_name_or_path` is the absolute path of DIR/base, so
`AutoPeftModel.from_pretrained(DIR/merged/adapter)` loads base and LoRA in one call (PEFT resolves a relative
path against the working directory, not the adapter's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flows.model_card import model_card
from many.adapters import CONFIG_FILE
from many.config import CPMConfig
from many.inference import INFERENCE_FILE, Recipe
from tasks.dispatch import read_json_output
from tasks.rows.many import LPM_CHAIN
from tasks.rows.many import ROW as MANY
from tasks.store import Manifest, Store, StoreError, validate_name


def _manifest(store: Store, entry: dict[str, Any]) -> Manifest:
    manifest = store.read_manifest(entry["stage"], entry["key"])
    if manifest is None:
        raise StoreError(f"stage {entry['stage']} of task {entry.get('task')} ({entry['key'][:12]}) is missing from {store.url}; rerun `many run`")
    return manifest


def _copy(store: Store, manifest: Manifest, output: str, dest: Path) -> Path:
    """A stage output (file or directory) copied to `dest` as ordinary writable files."""
    ref = manifest.outputs[output]
    local = store.materialize(ref, context=f"export: stage {manifest.stage}, output {output}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if ref.kind == "dir":
        shutil.copytree(local, dest, copy_function=shutil.copyfile, dirs_exist_ok=True)
    else:
        shutil.copyfile(local, dest)
    return dest


def _point_at_base(adapter_dir: Path, base_dir: Path) -> None:
    """Record the exported base in the adapter's config, as an absolute path (module doc)."""
    path = adapter_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "base_model_name_or_path": str(base_dir.resolve())}, indent=2, sort_keys=True))


def served_methods(merged: bool, routed: bool, truncated: bool = False) -> dict[str, Recipe]:
    """The methods an export serves, with their recipes: the rows (tasks/rows/, in table order) with a recipe whose
    parts it holds — every task's adapter and projector always; merged/adapter, the last link of the LPM chain, only
    if the run merged (`merged`), and only for the rows of that chain; prototypes only if the run made them
    (`routed`). A routed update (MAny-R: the tasks' own adapters mixed per image) is served in its exact form, so not
    if the run scored it with truncated residuals (`truncated`). The export holds one CPM routing, the run's `cpm`:
    rows that route their own way (`Row.routing`, e.g. many_r_cos) are served from the store."""
    from tasks.rows import ROWS

    def holds(recipe: Recipe, row: Any) -> bool:
        if recipe.update == "merged":
            return merged and row.chain is LPM_CHAIN
        return recipe.update == "task" or not truncated

    return {name: row.recipe for name, row in ROWS.items() if row.recipe is not None and holds(row.recipe, row)
            and (routed or row.recipe.projector != "cpm") and row.routing is None}


def _settings(store: Store, find: Any, task: str) -> dict[str, Any]:
    """inference.json: the settings of the last task's eval — MAny's if it ran, else any row's — with the CPM
    settings and τ of the first row routed by the run's `cpm` that ran."""
    from tasks.rows import ROWS

    ran = [(row, manifest) for row in [MANY, *ROWS.values()] if (manifest := find("eval", task, row.name)) is not None]
    if not ran:
        return {}
    config = ran[0][1].config
    settings = {"max_new_tokens": config["eval"]["max_new_tokens"], "dtype": config.get("dtype", "float32")}
    routed = next((manifest for row, manifest in ran if row.routed and row.routing is None), None)
    if routed is not None:
        cpm = routed.config.get("cpm") or {}
        settings |= {"tau": read_json_output(store, routed, "scores").get("tau"), "top_k": cpm.get("top_k"),
                     "calibration_target": cpm.get("calibration_target", 0.9),
                     "metric": cpm.get("metric", CPMConfig.UNKEYED["metric"])}
    return settings


def _truncated(store: Store, find: Any, task: str) -> bool:
    """Whether the run scored a routed update (MAny-R) with truncated residuals rather than the tasks' own factors."""
    from tasks.rows import ROWS, many_r

    return any(not many_r.exact(read_json_output(store, manifest, "scores"))
               for name, row in ROWS.items() if row.recipe is not None and row.recipe.update == "routed"
               and (manifest := find("eval", task, name)) is not None)


def export(store: Store, summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the standard artifacts of the run `summary` under `out_dir`; return the top-level paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    # Task names become paths under out_dir; a run summary is read from the store, so never trust them.
    tasks: list[str] = [validate_name("task", task) for task in summary["tasks"]]
    by_stage: dict[tuple[str, str | None, str | None], dict[str, Any]] = {
        (e["stage"], e.get("task"), e.get("method")): e for e in summary["stages"]
    }

    def find(stage: str, task: str | None = None, method: str | None = None) -> Manifest | None:
        entry = by_stage.get((stage, task, method))
        return None if entry is None else _manifest(store, entry)

    base = find("base")
    if base is None:
        raise StoreError(f"the latest run in {store.url} has no base stage; run `many run` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy(store, base, "model", out_dir / "base")
    adapters: list[Path] = []
    projectors: dict[str, Any] = {}
    for task in tasks:
        tuned = find("finetune", task) or find("adapter", task)  # trained here, or brought by the task config
        if tuned is None:
            raise StoreError(
                f"the latest run has no per-task adapter for task {task!r}: export covers runs with a method row that "
                "reads the tasks' own fine-tunes (only rows that train their own way ran?)"
            )
        _copy(store, tuned, "task", out_dir / "tasks" / task)
        adapters.append(out_dir / "tasks" / task / "adapter")
        for key, value in load_file(str(out_dir / "tasks" / task / "projector.safetensors")).items():
            projectors[f"{task}.{key}"] = value
        stats = find("stats", task)
        if stats is not None:
            _copy(store, stats, "grams", out_dir / "tasks" / task / "gram.safetensors")
            if "answer_grams" in stats.outputs:  # a stats stage of version ≥ 3
                _copy(store, stats, "answer_grams", out_dir / "tasks" / task / "answer_gram.safetensors")
    merged_dir = out_dir / "merged"
    merged_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in projectors.items()}, str(merged_dir / "projectors.safetensors"))
    merge = find(LPM_CHAIN.stage, tasks[-1], LPM_CHAIN.method)
    if merge is not None:
        _copy(store, merge, "adapter", merged_dir / "adapter")
        adapters.append(merged_dir / "adapter")
        # γ and the export's form and error per module from the small export.json, not the (large) state
        if "export" not in merge.outputs:
            raise StoreError("the latest run's merge was computed before merges wrote export.json (merge version < 4): "
                             "run `many run` again with the same config to bring it up to date, then export")
        layers = read_json_output(store, merge, "export")["layers"]
        gammas = {module: record["gamma"] for module, record in layers.items()}
        export = {module: {k: v for k, v in record.items() if k != "gamma"} for module, record in layers.items()}
        tau = None
        evaluation = find("eval", tasks[-1], MANY.name)
        if evaluation is not None:
            tau = read_json_output(store, evaluation, "scores").get("tau")
        links = {task: find(LPM_CHAIN.stage, task, LPM_CHAIN.method) for task in tasks}
        answer_weight = {task: link.config.get("answer", {}).get("weight", 0.0)  # a merge of version < 5: all tokens
                         for task, link in links.items() if link is not None}
        (merged_dir / "merge.json").write_text(json.dumps(
            {"method": MANY.name, "tasks": tasks, "a": merge.config.get("a"), "gamma": gammas,
             "answer_weight": answer_weight, "tau": tau, "export": export},
            indent=2, sort_keys=True,
        ))
    tables = [pq.read_table(store.materialize(m.outputs["prototypes"], context="export: prototypes"))
              for m in (find("prototypes", t) for t in tasks) if m is not None]
    if tables:
        pq.write_table(pa.concat_tables(tables), out_dir / "prototypes.parquet")
    for adapter in adapters:
        _point_at_base(adapter, out_dir / "base")
    settings = _settings(store, find, tasks[-1])
    methods = served_methods(merged=merge is not None, routed=bool(tables), truncated=_truncated(store, find, tasks[-1]))
    (out_dir / INFERENCE_FILE).write_text(json.dumps(
        {"tasks": tasks, "methods": {name: recipe.to_json() for name, recipe in methods.items()}, **settings},
        indent=2, sort_keys=True,
    ))
    (out_dir / "README.md").write_text(model_card(
        out_dir, summary, methods, merged=merge is not None, routed=bool(tables), tau=settings.get("tau"),
    ))
    return sorted(p for p in out_dir.iterdir())
