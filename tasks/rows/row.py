"""What a method row is (docs/design.md §10): the declaration every method of the comparison table makes.

A row says which shared per-task stages it reads (finetune, prototypes, stats), its own chain stage if it has
one (and extra chains its eval does not read, like the LPM merge's diagnostics), whether its eval routes projectors
by CPM, how its eval builds and scores its model, and (its `recipe`) how `many predict` builds that model from
local files. flows/pipeline.py wires rows without knowing any of them; the eval stage calls `Row.evaluate`. Both
sides of the eval stage's inputs — how they are named in the store and how the row reads them back — are written
here once (`eval_upstream`, `EvalInputs.parse`), so no input name is an unwritten contract between two layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from many.config import CPMConfig, EvalConfig, Frozen
from many.inference import Recipe

# The shared per-task stages a row (or its chain) may read, and the output of each it reads.
SHARED = {"finetune": "task", "prototypes": "prototypes", "stats": "grams"}
Shared = Literal["finetune", "prototypes", "stats"]

Upstream = dict[str, tuple[Any, str]]  # input name → (upstream handle: a Prefect future or a record, its output)
Compute = Callable[..., dict[str, Path]]  # (local inputs, workdir, *, config, device) → {output: local path}


@dataclass(frozen=True)
class PerTask:
    """The flow's handles of the shared stages, one list per stage kind in task order (None: not submitted)."""

    base: Any
    data: Sequence[Any]
    finetune: Sequence[Any] | None = None
    prototypes: Sequence[Any] | None = None
    stats: Sequence[Any] | None = None


def routed_by(metric: str) -> Callable[[Any], CPMConfig]:
    """A row's `routing`: the run's `cpm` section with its metric pinned (the ablation rows of the CPM metric)."""
    return lambda config: config.cpm.model_copy(update={"metric": metric})


@dataclass(frozen=True)
class Reuse:
    """A chain link that is exactly an existing stage's output (SeqLoRA's first link is finetune[0])."""

    handle: Any


def indexed(name: str, handles: Sequence[Any], output: str) -> Upstream:
    """Inputs name_0 … name_{n−1}: one per task, in task order."""
    return {f"{name}_{j}": (handle, output) for j, handle in enumerate(handles)}


def indexed_paths(inputs: Mapping[str, Path], prefix: str) -> list[Path]:
    """The local paths of inputs prefix_0, prefix_1, … in index order (the inverse of `indexed`)."""
    found = {int(name.rsplit("_", 1)[1]): path for name, path in inputs.items() if name.rsplit("_", 1)[0] == prefix}
    return [found[i] for i in range(len(found))]


@dataclass(frozen=True)
class Chain:
    """A method's own per-task stage kind: link t reads its inputs at t and earlier links of the chain.

    Several rows may read one chain (the LPM merge serves MAny and MAny-without-CPM); the flow submits each chain
    once. `method` labels its stage records (`many ls`, `run --json`); `group` picks its Ray resources.

    A chain may follow another (`follows`): the flow submits the followed chain first, and `link` gets its links as
    a fourth argument, `link(t, shared, links, followed)` (the LPM merge's diagnostics read merge[t]). `enabled` lets
    the run config turn off a row's extra chain (`Row.extras`); a row's own chain is always submitted.

    `recomputable` names outputs that only the next link reads (the LPM merge's state): once that link is done,
    `many gc --keep-last` collects their blobs, and a stage that needs one again recomputes it (tasks.restore).
    """

    stage: str  # the stage's name: its namespace in the store
    version: str  # bump when the compute would write other bytes: the chain's cache keys change
    outputs: tuple[str, ...]
    read: str  # the output a row's eval reads
    method: str
    group: Literal["finetune", "stats", "merge"]  # its Ray resources: the run config's resources.<group>
    needs: frozenset[Shared]  # the shared stages its links read
    config: Callable[[Any, str], Frozen]  # (run config, task name) → link t's sub-config (its cache key)
    link: Callable[..., Upstream | Reuse]  # (t, shared stages, links < t[, the followed chain's links]) → link t
    compute: Compute
    follows: Chain | None = None  # the chain whose links `link` also reads; submitted before this one
    enabled: Callable[[Any], bool] | None = None  # run config → whether an extra chain is submitted (None: always)
    recomputable: tuple[str, ...] = ()  # outputs only link t + 1 reads: gc collects them once it is done

    def upstream(self, t: int, shared: PerTask, links: Sequence[Any], submitted: Mapping[str, Sequence[Any]]) -> Upstream | Reuse:
        """Link t's inputs; `submitted`: the links of every chain submitted so far, by stage name."""
        if self.follows is None:
            return self.link(t, shared, links)
        return self.link(t, shared, links, submitted[self.follows.stage])


class EvalStageConfig(Frozen):
    """How row t of one method's accuracy matrix is produced; `cpm` only for the rows that route by CPM."""

    method: str
    eval: EvalConfig
    cpm: CPMConfig | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class EvalInputs:
    """The local inputs of eval[t] of one row, read back from the names `eval_upstream` gave them."""

    base: Path
    data: tuple[Path, ...]  # tasks ≤ t
    finetune: tuple[Path, ...]  # tasks ≤ t, if the row reads them (else empty)
    prototypes: tuple[Path, ...]
    stats: tuple[Path, ...]
    chain: tuple[Path, ...]  # the row's chain: every link ≤ t, or only link t

    @classmethod
    def parse(cls, inputs: Mapping[str, Path]) -> EvalInputs:
        chain = (inputs["chain"],) if "chain" in inputs else tuple(indexed_paths(inputs, "chain"))
        lists = {kind: tuple(indexed_paths(inputs, kind)) for kind in ("data", *SHARED)}
        return cls(base=inputs["base"], chain=chain, **lists)


@dataclass(frozen=True)
class EvalContext:
    """What a row's `evaluate` gets: its inputs, the base model, the test tasks ≤ t and the stage's config, and the
    `on_batch` to pass to every many.evaluate.generate_answers / evaluate call (the stage's progress; may be None)."""

    inputs: EvalInputs
    base_model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor
    tasks: Sequence[Any]  # many.data.TaskData, tasks ≤ t
    config: EvalStageConfig
    on_batch: Callable[[int, int], None] | None = None  # (answers done, answers) per generate call


EvalFields = dict[str, Any]  # row-specific fields of the scores JSON, beside method/tasks/scores/tau
Evaluate = Callable[[EvalContext], tuple[list[Any], EvalFields]]  # → (one many.evaluate.EvalResult per task, fields)


@dataclass(frozen=True)
class Row:
    """One method of the comparison table (module doc)."""

    name: str
    summary: str  # one line: what the row is
    evaluate: Evaluate
    reads: frozenset[Shared] = frozenset()  # shared stages its eval reads, tasks ≤ t
    chain: Chain | None = None
    chain_links: Literal["last", "all"] = "last"  # its eval reads link t, or links ≤ t
    routed: bool = False  # its eval reads config.cpm
    routing: Callable[[Any], CPMConfig] | None = None  # run config → the CPM config a routed row uses (None: config.cpm)
    default: bool = True  # in the default `methods`; opt-in otherwise
    extras: tuple[Chain, ...] = ()  # chains its eval does not read, submitted with the row (unless not `enabled`)
    # How `many predict` / `many.load` assemble its model from local parts (many.inference.Recipe); None: the model
    # is not one LoRA update + projector(s) (CRAM, Fwd-Prompt), and is not served.
    recipe: Recipe | None = None

    @property
    def needs(self) -> frozenset[Shared]:
        """Every shared stage this row's stages read, directly or through its chains (extras included)."""
        return self.reads.union(*(chain.needs for chain in self.chains()))

    def chains(self, config: Any = None) -> tuple[Chain, ...]:
        """The chains the flow submits for this row, each once and every followed chain before its follower: its
        own chain, then the extras that `config` enables (all of them when `config` is None)."""
        ordered: dict[str, Chain] = {}

        def add(chain: Chain) -> None:
            if chain.follows is not None:
                add(chain.follows)
            ordered.setdefault(chain.stage, chain)

        if self.chain is not None:
            add(self.chain)
        for extra in self.extras:
            if config is None or extra.enabled is None or extra.enabled(config):
                add(extra)
        return tuple(ordered.values())

    def eval_config(self, config: Any) -> EvalStageConfig:
        """The eval stage's sub-config from the run config (its cache key)."""
        cpm = (self.routing(config) if self.routing is not None else config.cpm) if self.routed else None
        return EvalStageConfig(method=self.name, eval=config.eval, cpm=cpm, dtype=config.base.dtype)

    def eval_upstream(self, t: int, shared: PerTask, chains: Mapping[str, Sequence[Any]]) -> Upstream:
        """eval[t]'s inputs: the base, the data of tasks ≤ t, what the row reads of tasks ≤ t, and its chain's
        links (`chains`: every submitted chain's links by stage name)."""
        upstream = {"base": (shared.base, "model")} | indexed("data", shared.data[: t + 1], "task")
        for kind in sorted(self.reads):
            upstream |= indexed(kind, getattr(shared, kind)[: t + 1], SHARED[kind])
        if self.chain is not None:
            links = chains[self.chain.stage]
            if self.chain_links == "all":
                upstream |= indexed("chain", links[: t + 1], self.chain.read)
            else:
                upstream["chain"] = (links[t], self.chain.read)
        return upstream
