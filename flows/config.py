"""The run config of `many run` (docs/design.md §5): one YAML file validated by frozen pydantic models.

Every section is the sub-config of the stages that read it, and goes unchanged into their cache keys
(docs/design.md §2). A typo is an error (`extra="forbid"`); `load_config` turns any problem into one
`ConfigError` line naming the file and the key. With no file, `RunConfig()` is the built-in mini-UCIT
default: the six UCIT-like tasks, the tiny LLaVA and every default method row. The choices of `methods`, and the
top-level sections that belong to method rows (tasks.rows.MethodSettings), come from the registry of rows
(tasks.rows); the opt-in rows train once more per task, so they cost a run more training time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, PositiveInt, ValidationError, field_validator, model_validator

from many.config import (
    BaseConfig,
    CPMConfig,
    EvalConfig,
    FinetuneConfig,
    Frozen,
    LPMConfig,
    StatsConfig,
)
from many.data import TASK_KINDS, UCIT_ORDER, Metric, MiniUcitConfig
from tasks.rows import DEFAULT_METHODS, ROWS, MethodSettings, get_row


def _known_method(name: str) -> str:
    get_row(name)  # ValueError listing the known rows
    return name


Method = Annotated[str, AfterValidator(_known_method)]  # a name in the registry of method rows (tasks.rows)


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the file and the key."""


class TaskSpec(Frozen):
    """One task of the stream: a mini-UCIT task kind, or LLaVA conversation JSON + an image folder.

    In YAML a bare string is a mini-UCIT kind (`- chart-qa`). Data paths may be local or `s3://…`.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    kind: str | None = None  # a mini-UCIT task kind (many.data TASK_KINDS)
    train_json: str | None = None
    test_json: str | None = None
    image_root: str | None = None
    metric: Metric = "exact_match"  # for JSON tasks; a mini-UCIT kind knows its own
    # This task's own fine-tune, trained elsewhere: a local directory in many.adapters.save_task's layout
    # (adapter/ with a PEFT LoRA, projector.safetensors). Its finetune stage is replaced by a check against the
    # base; the data still feeds the Grams, the prototypes and the evaluation.
    adapter: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value, "kind": value}
        if isinstance(value, dict) and "name" not in value and isinstance(value.get("kind"), str):
            return {**value, "name": value["kind"]}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        json_fields = (self.train_json, self.test_json, self.image_root)
        if self.kind is not None:
            if any(f is not None for f in json_fields):
                raise ValueError(f"task {self.name!r}: give either kind (mini-UCIT) or train_json/test_json/image_root, not both")
            if self.kind not in TASK_KINDS:
                raise ValueError(f"task {self.name!r}: unknown task kind {self.kind!r}; known: {', '.join(TASK_KINDS)}")
        elif any(f is None for f in json_fields):
            raise ValueError(f"task {self.name!r}: needs a mini-UCIT kind, or all of train_json, test_json and image_root")
        if self.adapter is not None and "://" in self.adapter:
            raise ValueError(f"task {self.name!r}: adapter {self.adapter!r} must be a local directory")
        return self


class DataConfig(Frozen):
    mini_ucit: MiniUcitConfig = MiniUcitConfig()
    pretrain_samples: PositiveInt = 4000  # generic captions for the tiny base's pretraining


class StoreConfig(Frozen):
    url: str = "./many-store"  # file://…, a path, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible server; default: the AWS chain / AWS_ENDPOINT_URL
    region: str | None = None
    profile: str | None = None
    keep_last: PositiveInt | None = None  # `many gc --config`: keep the newest N runs per config (None: every run)


class TaskSourceConfig(Frozen):
    """A growing task stream (flows/stream.py): a directory or S3 prefix of task specs, one YAML per task,
    in the order of its `manifest.yaml` when present, else by file name. Replaces `tasks` at each run."""

    url: str  # a path, file://…, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible server; default: the AWS chain / AWS_ENDPOINT_URL
    region: str | None = None
    profile: str | None = None


class RayConfig(Frozen):
    address: str | None = None  # join an existing cluster ("auto", "ray://host:10001"); None: start a local one
    num_cpus: PositiveInt | None = None  # size of a local cluster (None: every core)
    object_store_mb: int = Field(200, ge=80)
    critical_path_first: bool = True  # a local cluster runs the most urgent waiting stage first (tasks/gate.py)


class Resources(Frozen):
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class ResourcesConfig(Frozen):
    """Ray resources per stage kind. `num_gpus > 0` places the stage on a node with GPUs and runs it on CUDA
    when that worker has CUDA (`torch.cuda.is_available()`), else on its CPU; `num_gpus: 0` runs on CPU."""

    data: Resources = Resources()
    base: Resources = Resources()
    finetune: Resources = Resources()
    prototypes: Resources = Resources()
    stats: Resources = Resources()
    merge: Resources = Resources()
    eval: Resources = Resources()


class RunConfig(MethodSettings):
    """The whole run; the method rows' own sections are inherited from tasks.rows.MethodSettings."""

    tasks: tuple[TaskSpec, ...] = tuple(TaskSpec(name=k, kind=k) for k in UCIT_ORDER)
    task_source: TaskSourceConfig | None = None  # read the tasks from a growing source instead (not with `tasks`)
    methods: tuple[Method, ...] = DEFAULT_METHODS
    data: DataConfig = DataConfig()
    base: BaseConfig = BaseConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    stats: StatsConfig = StatsConfig()
    lpm: LPMConfig = LPMConfig()
    cpm: CPMConfig = CPMConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()
    ray: RayConfig = RayConfig()
    resources: ResourcesConfig = ResourcesConfig()
    retries: int = Field(2, ge=0)  # Prefect retries of a stage after a transient (non-input) failure

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        if not tasks:
            raise ValueError("the task stream is empty; list at least one task")
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task names must be unique; repeated: {twice}")
        return tasks

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        if not methods:
            raise ValueError("no methods; list at least one of " + ", ".join(ROWS))
        return tuple(dict.fromkeys(methods))

    @model_validator(mode="after")
    def _tasks_or_source(self) -> RunConfig:
        if self.task_source is not None and "tasks" in self.model_fields_set:
            raise ValueError("give either tasks or task_source (a directory or S3 prefix of task specs), not both")
        return self

    @model_validator(mode="after")
    def _answer_weights_name_tasks(self) -> RunConfig:
        """A per-task λ for a name that is no task of the stream would weigh nothing, silently (a typo); a stream
        read from a task_source may still bring it."""
        unknown = sorted(set(self.lpm.answer.tasks) - {task.name for task in self.tasks})
        if unknown and self.task_source is None:
            raise ValueError(f"lpm.answer.tasks names {', '.join(map(repr, unknown))}, not a task of the stream "
                             f"({', '.join(task.name for task in self.tasks)})")
        return self

    @model_validator(mode="after")
    def _base_fits(self) -> RunConfig:
        if self.base.kind == "hf" and not self.base.hf_id:
            raise ValueError("base.kind 'hf' needs base.hf_id (a hub id or a local HF LLaVA dir)")
        if self.base.kind == "tiny" and self.base.tiny.image_size != self.data.mini_ucit.image_size:
            raise ValueError(
                f"base.tiny.image_size {self.base.tiny.image_size} differs from data.mini_ucit.image_size "
                f"{self.data.mini_ucit.image_size}; set both to the same size"
            )
        return self

    def first(self, n: int | None) -> RunConfig:
        """The same config with only the first `n` tasks of the stream (`many run --tasks N`)."""
        if n is None:
            return self
        if not 1 <= n <= len(self.tasks):
            raise ConfigError(f"--tasks {n}: the stream has {len(self.tasks)} tasks; choose 1..{len(self.tasks)}")
        return self.model_copy(update={"tasks": self.tasks[:n]})


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "<top level>"


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate a decoded YAML document; one-line ConfigError naming `source` and the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        # A section the file does not set but inherits from another (cram.finetune from finetune) repeats that
        # section's problems: report the user's own keys (the file's `finetune.stepz`, not `cram.finetune.stepz`).
        errors = [e for e in error.errors() if not e["loc"] or e["loc"][0] in data] or error.errors()
        first = errors[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {_where(first)}: {message}{more}") from None


def load_config(path: str | Path | None) -> RunConfig:
    """The run config from a YAML file, or the built-in default when `path` is None."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    return parse_config(data, str(path))
