"""`many predict --store URL` (docs/design.md §5.5): a method's model from a store's latest run.

The model is the one the run scored last: the inputs of the method's eval stage at the last task (its base, the
tasks' adapters and projectors, prototypes, its chain link — the merged update), and that eval's settings
(`max_new_tokens`, dtype, CPM's τ as recorded in its scores, top-k). Only those files are fetched (into the
store's cache, by digest); the test data is not. The model itself is built by many.inference.
"""

from __future__ import annotations

import json
from typing import Any

from many.config import CPMConfig
from many.inference import Parts, Predictor, Recipe, check_task
from tasks.rows import get_row, many_r
from tasks.rows.row import EvalInputs
from tasks.store import Store, StoreError


class NoModel(ValueError):
    """The source holds no model for the question asked (no run, method not run): bad input, exit 2."""


def open_store(url: str) -> Store:
    """The store at `url` without creating it (`Store.open(create=False)`: a local root that exists, an S3 prefix
    with objects); an endpoint that does not answer is a bad --store (exit 2), as for every command."""
    from tasks.store import BadStoreURL, StoreNotFound, StoreUnreachable

    try:
        return Store.open(url, create=False)
    except StoreNotFound as error:
        raise NoModel(f"{error}, or give --export DIR") from None
    except StoreUnreachable as error:
        raise BadStoreURL(str(error)) from None


def recipe_of(method: str) -> Recipe:
    """The recipe of `method`'s row (tasks/rows/); ValueError for an unknown method or a row without one."""
    row = get_row(method)
    if row.recipe is None:
        raise ValueError(f"method {method!r} builds its model its own way (not one LoRA update + projectors) "
                         "and is not served by `many predict`")
    return row.recipe


def store_parts(store: Store, summary: dict[str, Any], method: str) -> Parts:
    """`Parts` of `method`'s model after the last task of the run `summary` (module doc)."""
    recipe_of(method)  # an unknown or unservable method fails before anything is fetched
    tasks = tuple(summary["tasks"])
    entry = next((s for s in summary["stages"] if (s["stage"], s.get("task"), s.get("method")) == ("eval", tasks[-1], method)), None)
    if entry is None:
        raise NoModel(f"the latest run in {store.url} did not evaluate method {method!r} "
                      f"(it ran {', '.join(summary.get('methods', []))}); add it to the config's methods and rerun")
    manifest = store.read_manifest("eval", entry["key"])
    if manifest is None:
        raise StoreError(f"stage eval of task {tasks[-1]} [{method}] ({entry['key'][:12]}) is missing from {store.url}; "
                         "rerun `many run`")
    local = {name: store.materialize(ref, context=f"predict: eval input {name}")
             for name, ref in manifest.inputs.items() if not name.startswith("data_")}
    inputs = EvalInputs.parse(local)
    config = manifest.config
    cpm = config.get("cpm") or {}
    scores = json.loads(store.get_bytes(manifest.outputs["scores"].digest, context="predict: eval scores"))
    tau = scores.get("tau")  # τ as the eval used it (calibrated there when cpm.tau is null)
    if get_row(method).recipe.update == "routed" and not many_r.exact(scores):
        raise NoModel(f"the latest run scored {method!r} with truncated residuals; it is served in its exact form "
                      "only, each task keeping its own factors: rerun with many_r.rank unset (or at least the LoRA rank)")
    return Parts(
        base=inputs.base, tasks=tasks, task_dirs=inputs.finetune, prototypes=inputs.prototypes,
        merged=inputs.chain[-1] if inputs.chain else None, tau=tau, top_k=cpm.get("top_k"),
        calibration_target=cpm.get("calibration_target", 0.9), metric=cpm.get("metric", CPMConfig.UNKEYED["metric"]),
        max_new_tokens=config["eval"]["max_new_tokens"],
        dtype=config.get("dtype", "float32"),
    )


def load_store(url: str, method: str = "many", task: str | None = None, *, device: str = "auto") -> Predictor:
    """The continual model of the latest run in the store at `url` (any method with a recipe that it ran)."""
    recipe = recipe_of(method)  # before the store is opened
    store = open_store(url)
    try:
        summary = store.read_run("latest")
    except StoreError:
        raise NoModel(f"no run in store {store.url} yet: run `many run --store {url}` first") from None
    check_task(recipe, method, task, summary["tasks"])  # before anything is fetched
    return Predictor(store_parts(store, summary, method), recipe, method, task, device=device)


def load(export: str | None, store: str | None, method: str, task: str | None, device: str) -> Predictor:
    """The model of `--export DIR` or else of the store `--store URL` (default ./many-store)."""
    from many.inference import load as load_export

    if export is not None and store is not None:
        raise ValueError("give --export DIR or --store URL, not both")
    if export is not None:
        check_task(recipe_of(method), method, task)  # the arguments first, then the export (which may serve fewer)
        return load_export(export, method, task, device=device)
    return load_store(store or "./many-store", method, task, device=device)


def routing_line(predictor: Predictor, weights: dict[str, float] | None) -> str:
    """`routing: chart-qa 0.97, style-cls 0.02, …` (highest first), or why there is none."""
    if weights is None:
        if predictor.task is not None:
            return f"routing: none (method {predictor.method}: task {predictor.task}'s own adapter and projector)"
        return f"routing: none (method {predictor.method}: one projector for every image)"
    return "routing: " + ", ".join(f"{task} {weight:.2f}" for task, weight in weights.items())


def answer_record(predictor: Predictor, image: str, question: str) -> dict[str, Any]:
    """One answer as the `--json` object."""
    answer, weights = predictor.generate(image, question, return_routing=True)
    return {"image": image, "question": question, "answer": answer, "routing": weights, "method": predictor.method,
            "task": predictor.task, "tasks": list(predictor.tasks), "tau": predictor.tau}


def interact(predictor: Predictor, image: str, lines: Any, out: Any, err: Any, *, as_json: bool) -> None:
    """Answer one question per line of `lines` about `image`; `:image PATH` switches the image, `:quit` ends.
    A bad line (an unreadable image, an empty question) is reported on `err` and the session goes on."""
    import json

    from many.inference import read_image

    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in (":quit", ":q"):
            break
        try:
            if line.startswith(":image"):
                path = line.removeprefix(":image").strip()
                read_image(path)
                image = path
                print(f"image: {image}", file=err)
                continue
            record = answer_record(predictor, image, line)
        except ValueError as error:
            print(f"many: error: {error}", file=err)
            continue
        if as_json:
            print(json.dumps(record), file=out, flush=True)
        else:
            print(record["answer"], file=out)
            print(routing_line(predictor, record["routing"]), file=out, flush=True)
