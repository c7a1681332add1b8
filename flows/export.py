"""`many export` (docs/design.md §5): the latest run's artifacts as standard files, readable without `many`.

    DIR/tasks/<task>/adapter/              PEFT LoRA (PeftModel.from_pretrained on DIR/base)
    DIR/tasks/<task>/projector.safetensors the task's own projector
    DIR/tasks/<task>/gram.safetensors      Grams, one float32 tensor per input group (q/k/v, gate/up share one), named
                                           by its first module; metadata "grams": {"groups": {module: tensor name}}
    DIR/merged/adapter/                    the LPM merge as a PEFT LoRA of rank Σr
    DIR/merged/merge.json                  {"method", "tasks", "a", "gamma": {module: absolute γ}, "tau"}
    DIR/merged/projectors.safetensors      every task's projector, keys "<task>.<parameter>"
    DIR/prototypes.parquet                 image + prototype rows of every task
    DIR/base/                              the HF model dir
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from many.lpm_files import state_gammas
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
    projectors: dict[str, Any] = {}
    for task in tasks:
        tuned = find("finetune", task) or find("adapter", task)  # trained here, or brought by the task config
        if tuned is None:
            raise StoreError(
                f"the latest run has no per-task adapter for task {task!r}: export covers runs with a method row that "
                "reads the tasks' own fine-tunes (only rows that train their own way ran?)"
            )
        _copy(store, tuned, "task", out_dir / "tasks" / task)
        for key, value in load_file(str(out_dir / "tasks" / task / "projector.safetensors")).items():
            projectors[f"{task}.{key}"] = value
        stats = find("stats", task)
        if stats is not None:
            _copy(store, stats, "grams", out_dir / "tasks" / task / "gram.safetensors")
    merged_dir = out_dir / "merged"
    merged_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in projectors.items()}, str(merged_dir / "projectors.safetensors"))
    merge = find(LPM_CHAIN.stage, tasks[-1], LPM_CHAIN.method)
    if merge is not None:
        _copy(store, merge, "adapter", merged_dir / "adapter")
        gammas = state_gammas(store.materialize(merge.outputs["state"], context="export: merge state"))
        tau = None
        evaluation = find("eval", tasks[-1], MANY.name)
        if evaluation is not None:
            tau = read_json_output(store, evaluation, "scores").get("tau")
        (merged_dir / "merge.json").write_text(json.dumps(
            {"method": MANY.name, "tasks": tasks, "a": merge.config.get("a"), "gamma": gammas, "tau": tau},
            indent=2, sort_keys=True,
        ))
    tables = [pq.read_table(store.materialize(m.outputs["prototypes"], context="export: prototypes"))
              for m in (find("prototypes", t) for t in tasks) if m is not None]
    if tables:
        pq.write_table(pa.concat_tables(tables), out_dir / "prototypes.parquet")
    return sorted(p for p in out_dir.iterdir())
