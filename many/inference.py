"""Ask a continual model a question (docs/design.md §5.5): `many.load(export_dir)` → a `Predictor`.

    predictor = many.load("export")                  # MAny: the LPM-merged LoRA + CPM-routed projectors
    predictor.generate("chart.png", "which bar is highest?")        → "b"
    predictor.route("chart.png")                     → {"chart-qa": 0.97, "style-cls": 0.02, …}  (sorted)
    predictor.generate(image, question, return_routing=True)        → ("b", {"chart-qa": 0.97, …})
    many.load("export", method="individual", task="chart-qa")       # the task-id oracle

A method's model is built from `Parts` — local files: the base, the tasks' own adapters and projectors, their
prototypes, the method's merged update — by the method's `Recipe`, as its eval stage builds it
(`many.evaluate.assemble`; each row of tasks/rows/ declares its recipe, an export's inference.json lists those it
serves), and answers come from `many.evaluate.generate_answers` with the eval's `max_new_tokens`: greedy, cut at EOS.
So a test image gets the answer the pipeline predicted for it.

`load` reads an export directory (flows/export.py, docs/design.md §5.3); flows/predict.py builds `Parts` from a
store's latest run (the files of an eval stage's inputs), which covers more methods than an export holds.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from many.config import CPMConfig

if TYPE_CHECKING:
    from PIL import Image

    ImageInput = Image.Image | str | Path | bytes

INFERENCE_FILE = "inference.json"  # in an export dir: tasks, methods, max_new_tokens, dtype, tau, top_k, …
UPDATES = ("merged", "task", "routed")
PROJECTORS = ("cpm", "average", "own")


@dataclass(frozen=True)
class Recipe:
    """How a method's model is assembled from `Parts`.

    update:    "merged" — ΔW of `Parts.merged` (a PEFT adapter dir, a deltas.safetensors or a task dir);
               "task" — the asked task's own adapter (`Parts.task_dirs`);
               "routed" — every task's own adapter, mixed per image by the CPM weights that also mix the projectors
               (MAny-R in its exact form, each task keeping its own factors: many.residual, docs/design.md §1.4).
    projector: "cpm" — every task's projector, routed per image; "average" — their element-wise mean;
               "own" — the projector of the task dir the update came from.

    Each method row declares its recipe (tasks/rows/, `Row.recipe`); an export names the recipes of the methods it
    serves in its inference.json (`"methods": {name: {"update": …, "projector": …}}`).
    """

    update: Literal["merged", "task"]
    projector: Literal["cpm", "average", "own"]

    def __post_init__(self) -> None:
        if self.update not in UPDATES or self.projector not in PROJECTORS:
            raise ValueError(f"bad recipe: update {self.update!r} (one of {', '.join(UPDATES)}), "
                             f"projector {self.projector!r} (one of {', '.join(PROJECTORS)})")
        if self.update == "routed" and self.projector != "cpm":
            raise ValueError(f"bad recipe: a routed update is mixed by CPM's weights; its projector must be 'cpm', "
                             f"not {self.projector!r}")

    def to_json(self) -> dict[str, str]:
        return {"update": self.update, "projector": self.projector}

    @classmethod
    def from_json(cls, value: Any) -> Recipe:
        if not isinstance(value, Mapping) or set(value) != {"update", "projector"}:
            raise ValueError(f"bad recipe {value!r}: expected {{\"update\": …, \"projector\": …}}")
        return cls(value["update"], value["projector"])


@dataclass(frozen=True)
class Parts:
    """The local files a method's model is built from (`build`)."""

    base: Path  # HF model dir
    tasks: tuple[str, ...]  # in stream order
    task_dirs: tuple[Path, ...] = ()  # per task, in order: adapter/ (PEFT LoRA) + projector.safetensors
    prototypes: tuple[Path, ...] = ()  # Parquet prototype tables (many.prototypes), together covering `tasks`
    merged: Path | None = None  # the method's update: PEFT adapter dir, deltas .safetensors, or a task dir
    tau: float | None = None  # CPM's τ; None: calibrated from the prototypes' image rows
    top_k: int | None = None
    calibration_target: float = 0.9
    metric: str = CPMConfig.model_fields["metric"].default
    max_new_tokens: int = 24
    dtype: str = "float32"


def _deltas(path: Path) -> dict[str, Any]:
    """ΔW (out, in) per PEFT module name of a PEFT adapter dir, a task dir (its adapter/) or a deltas file."""
    from safetensors.torch import load_file

    from many.adapters import CONFIG_FILE, lora_factors
    from many.evaluate import lora_deltas

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    adapter = path if (path / CONFIG_FILE).is_file() else path / "adapter"
    return lora_deltas(lora_factors(adapter))


def _own_factors(task_dir: Path) -> dict[str, Any]:
    """A task's own update ΔW = s·B·A as routed factors {PEFT module name: (s·B (out, r), A (r, in))}."""
    from many.adapters import lora_factors
    from many.residual import own_factors

    return own_factors(lora_factors(Path(task_dir) / "adapter"))


def _projector(task_dir: Path) -> dict[str, Any]:
    from many.adapters import projector_state

    return projector_state(task_dir)


def _average(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Element-wise mean in float64, stored in the first state's dtypes (tasks/rows/parts.averaged_projector)."""
    return {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def read_image(image: ImageInput) -> bytes:
    """The image as bytes PIL can decode; ValueError for a missing file or bytes that are not an image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG")  # lossless: the pixels the model sees are the given ones
        return buffer.getvalue()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image {path}: no such file")
        data = path.read_bytes()
        name = str(path)
    elif isinstance(image, bytes):
        data, name = image, "bytes"
    else:
        raise TypeError(f"image must be a PIL image, a path or bytes, got {type(image).__name__}")
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {name}: not a readable image ({error})") from None
    return data


class Predictor:
    """One method's continual model, ready to answer: `generate(image, question)`, `route(image)`."""

    def __init__(self, parts: Parts, recipe: Recipe, method: str, task: str | None = None, *,
                 device: str = "auto") -> None:
        import pyarrow.parquet as pq

        from many.config import BaseConfig, CPMConfig, EvalConfig
        from many.evaluate import Assembly, assemble, cpm_router
        from many.model.load import load_base
        from many.prototypes import read_prototypes

        check_task(recipe, method, task, parts.tasks)
        if task is not None and task not in parts.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {', '.join(parts.tasks)}")
        self.method, self.task, self.tasks = method, task, tuple(parts.tasks)
        self.tau: float | None = None
        self.max_new_tokens = parts.max_new_tokens

        needs_tasks = recipe.update in ("task", "routed") or recipe.projector in ("cpm", "average")
        if needs_tasks and len(parts.task_dirs) != len(parts.tasks):
            raise ValueError(f"method {method!r} needs every task's adapter and projector; "
                                 f"{len(parts.task_dirs)} of {len(parts.tasks)} given")
        if recipe.update == "merged" and parts.merged is None:
            raise ValueError(f"method {method!r} needs its merged update, which this source does not have")
        source = parts.task_dirs[parts.tasks.index(task)] if task is not None else parts.merged
        deltas = {} if recipe.update == "routed" else _deltas(source)
        router = None
        if recipe.projector == "cpm":
            if not parts.prototypes:
                raise ValueError(f"method {method!r} routes by CPM and needs the tasks' prototypes, which this source does not have")
            tables = [pq.read_table(path) for path in parts.prototypes]
            routed_tasks = read_prototypes(tables)[0]
            if routed_tasks != self.tasks:
                raise ValueError(f"the prototypes cover tasks {list(routed_tasks)}, the model {list(self.tasks)}")
            cfg = CPMConfig(tau=parts.tau, top_k=parts.top_k, calibration_target=parts.calibration_target,
                            metric=parts.metric)
            router = cpm_router(tables, cfg)
            self.tau = router.tau
            residuals = tuple(_own_factors(d) for d in parts.task_dirs) if recipe.update == "routed" else ()
            assembly = Assembly(deltas, tuple(_projector(d) for d in parts.task_dirs), router, residuals)
        elif recipe.projector == "average":
            assembly = Assembly(deltas, (_average([_projector(d) for d in parts.task_dirs]),))
        else:
            assembly = Assembly(deltas, (_projector(source),))
        self._router = router
        base_model, self.processor = load_base(parts.base, BaseConfig(dtype=parts.dtype, device=device))
        self.model = assemble(base_model, assembly, copy_base=False)  # the base is ours: no second copy in memory
        self._eval = EvalConfig(batch_size=1, max_new_tokens=parts.max_new_tokens)

    @property
    def routed(self) -> bool:
        """Whether the projector depends on the image (CPM); `route` returns None otherwise."""
        return self._router is not None

    def _weights(self, row: Any) -> dict[str, float]:
        pairs = sorted(zip(self.tasks, (float(w) for w in row.tolist()), strict=True), key=lambda p: -p[1])
        return dict(pairs)

    def route(self, image: ImageInput) -> dict[str, float] | None:
        """CPM's weight of every task for this image, highest first; None for a method that does not route."""
        from PIL import Image

        from many.prototypes import pooled_features

        if self._router is None:
            return None
        picture = Image.open(io.BytesIO(read_image(image))).convert("RGB")
        pixel_values = self.processor.image_processor([picture], return_tensors="pt")["pixel_values"]
        return self._weights(self._router.weights(pooled_features(self.model, pixel_values))[0])

    def generate(
        self, image: ImageInput, question: str, *, return_routing: bool = False
    ) -> str | tuple[str, dict[str, float] | None]:
        """The model's answer (greedy, cut at EOS); with `return_routing`, also the weights it routed the image by."""
        from many.data.schema import Sample
        from many.evaluate import generate_answers

        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        sample = Sample("question", read_image(image), question, "")
        (answer,) = generate_answers(self.model, self.processor, [sample], self._eval, routing=self._router)
        if not return_routing:
            return answer
        if self._router is None:
            return answer, None
        weights = self.model.model.multi_modal_projector.weights  # (1, T): what this answer was routed by
        return answer, self._weights(weights[0])

    def __repr__(self) -> str:
        task = f", task={self.task!r}" if self.task else ""
        return f"Predictor(method={self.method!r}{task}, tasks={list(self.tasks)})"


def check_task(recipe: Recipe, method: str, task: str | None, tasks: Sequence[str] = ()) -> None:
    """ValueError for a task missing where the recipe answers with one task's own model, or given where it does not
    (`method`: the method's name, for the message)."""
    if task is None and recipe.update == "task":
        known = f" (one of {', '.join(tasks)})" if tasks else ""
        raise ValueError(f"method {method!r} answers with one task's own model: give the task{known}")
    if task is not None and recipe.update != "task":
        raise ValueError(f"method {method!r} answers every task with one model; a task is only for a method that "
                         "answers with one task's own model")


def export_methods(export_dir: str | Path) -> dict[str, Recipe]:
    """The methods an export directory serves, with their recipes (its inference.json's "methods")."""
    root = Path(export_dir)
    if not (root / "base").is_dir():
        hint = "no such directory" if not root.exists() else "no base/ in it"
        raise ValueError(f"export {root}: {hint}; write one with `many export --out {root}`")
    settings = _settings(root)
    methods = settings.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"export {root}: its {INFERENCE_FILE} names no methods; re-export it with `many export`")
    try:
        return {str(name): Recipe.from_json(recipe) for name, recipe in methods.items()}
    except ValueError as error:
        raise ValueError(f"export {root}: {INFERENCE_FILE}: {error}") from None


def _settings(root: Path) -> dict[str, Any]:
    path = root / INFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def export_recipe(export_dir: str | Path, method: str) -> Recipe:
    """The recipe of `method` in an export; ValueError listing what the export serves if it does not serve it."""
    methods = export_methods(export_dir)
    if method not in methods:
        raise ValueError(f"method {method!r} is not in export {export_dir} (it serves {', '.join(methods)}); "
                         f"a store serves every method its run evaluated: `many predict --store URL --method {method}`")
    return methods[method]


def export_parts(export_dir: str | Path, recipe: Recipe) -> Parts:
    """`Parts` of an export directory (docs/design.md §5.3) for a method of `recipe`; ValueError names what is
    missing."""
    root = Path(export_dir)
    settings = _settings(root)
    merge_file = root / "merged" / "merge.json"
    merge = json.loads(merge_file.read_text()) if merge_file.is_file() else {}
    tasks = settings.get("tasks") or merge.get("tasks")
    if not tasks:
        raise ValueError(f"export {root}: no {INFERENCE_FILE} or merged/merge.json naming its tasks; re-export it")
    tau = settings.get("tau", merge.get("tau"))
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"export {root}: bad tau {tau!r}")
    task_dirs = tuple(root / "tasks" / t for t in tasks)
    missing = [str(d) for d in task_dirs if not (d / "projector.safetensors").is_file()]
    if missing:
        raise ValueError(f"export {root}: no task adapter and projector in {', '.join(missing)}")
    merged = root / "merged" / "adapter"
    prototypes = root / "prototypes.parquet"
    if recipe.update == "merged" and not merged.is_dir():
        raise ValueError(f"export {root} has no merged/adapter: the run had no LPM merge")
    if recipe.projector == "cpm" and not prototypes.is_file():
        raise ValueError(f"export {root} has no prototypes.parquet: the run had no routed method")
    return Parts(
        base=root / "base", tasks=tuple(tasks), task_dirs=task_dirs,
        prototypes=(prototypes,) if prototypes.is_file() else (), merged=merged if merged.is_dir() else None,
        tau=tau, top_k=settings.get("top_k"), calibration_target=settings.get("calibration_target", 0.9),
        metric=settings.get("metric", CPMConfig.UNKEYED["metric"]),  # an export older than the field
        max_new_tokens=settings.get("max_new_tokens", 24), dtype=settings.get("dtype", "float32"),
    )


def load(source: str | Path, method: str = "many", task: str | None = None, *, device: str = "auto") -> Predictor:
    """The continual model of an export directory (`many export --out DIR`), ready to answer.

    method: one the export serves (its inference.json's "methods"), e.g. "many" (default: LPM-merged LoRA +
    CPM-routed projectors), "many_lpm_only" (with the averaged projector) or "individual" with `task` (that task's
    own adapter and projector). A store's latest run serves more methods: flows.predict.load_store. device: "auto"
    (cuda if visible), "cpu" or "cuda".
    """
    recipe = export_recipe(source, method)
    check_task(recipe, method, task)  # the arguments before the files
    return Predictor(export_parts(source, recipe), recipe, method, task, device=device)


def build(parts: Parts, recipe: Recipe, method: str, task: str | None = None, *, device: str = "auto") -> Predictor:
    """A Predictor of the method called `method` (for messages), assembled from explicit parts by `recipe`
    (flows/predict.py builds them from a store, the recipe from the method's row)."""
    return Predictor(parts, recipe, method, task, device=device)
