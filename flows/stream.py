"""A growing task stream (docs/design.md §5 `many serve`): the tasks of a run read from a directory or S3 prefix.

    <source>/manifest.yaml   optional: a YAML list of spec file names — the stream's order
    <source>/<file>.yaml     one task spec each: a TaskSpec mapping (`name` defaults to the file stem),
                             or a bare mini-UCIT kind (`chart-qa`)

Without a manifest the order is the file names' order (name them `001-….yaml`, `002-….yaml`). With one,
only the files it lists are in the stream, so a spec can be uploaded first and published by appending its
name. The stream only grows: merges are a chain (docs/design.md §2), so each scheduled run computes just the
stages of the tasks that appeared since the last run; reordering or removing a task recomputes every merge
after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.config import ConfigError, RunConfig, TaskSourceConfig, TaskSpec, load_config, parse_config
from tasks.store.backend import open_backend

MANIFEST = "manifest.yaml"
SUFFIXES = (".yaml", ".yml")


def read_stream(source: TaskSourceConfig) -> tuple[TaskSpec, ...]:
    """The task specs at `source`, in stream order; one-line ConfigError naming the source and file."""
    url = source.url
    if "://" not in url or url.startswith("file://"):
        if not Path(url.removeprefix("file://")).expanduser().is_dir():
            raise ConfigError(f"task_source {url}: no such directory; create it and add one YAML spec per task")
    backend = open_backend(url, endpoint_url=source.endpoint_url, region=source.region, profile=source.profile)
    fs, root = backend.fs, backend.root
    try:
        files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        files = []  # an S3 prefix with no objects yet
    specs = [f for f in files if f.endswith(SUFFIXES) and f != MANIFEST]
    if MANIFEST in files:
        order = _load(fs, f"{root}/{MANIFEST}", f"{backend.url}/{MANIFEST}")
        if not isinstance(order, list) or not all(isinstance(f, str) for f in order):
            raise ConfigError(f"{backend.url}/{MANIFEST}: must be a YAML list of spec file names")
        missing = [f for f in order if f not in specs]
        if missing:
            raise ConfigError(f"{backend.url}/{MANIFEST}: lists {missing[0]}, which is not in {backend.url}; upload it first")
        specs = order
    if not specs:
        raise ConfigError(f"task_source {backend.url}: no task specs yet; add one YAML file per task")
    return tuple(_spec(_load(fs, f"{root}/{f}", f"{backend.url}/{f}"), f, backend.url) for f in specs)


def with_stream(config: RunConfig) -> RunConfig:
    """`config` with `tasks` read from its `task_source` (unchanged when it has none), validated again."""
    if config.task_source is None:
        return config
    specs = read_stream(config.task_source)
    data = config.model_dump(mode="json", exclude={"task_source"})
    data["tasks"] = [spec.model_dump(mode="json") for spec in specs]
    return parse_config(data, f"task_source {config.task_source.url}")


def _load(fs: Any, path: str, where: str) -> Any:
    try:
        return yaml.safe_load(fs.cat_file(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: malformed YAML: {getattr(error, 'problem', None) or 'not valid YAML'}") from None


def _spec(data: Any, file: str, url: str) -> TaskSpec:
    stem = file.rsplit(".", 1)[0]
    if isinstance(data, str):
        data = {"name": stem, "kind": data}
    elif isinstance(data, dict) and "name" not in data:
        data = {**data, "name": stem}
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{url}/{file}: {where + ': ' if where else ''}{message}") from None


def run_config(config_path: str | None, store_url: str | None = None) -> RunConfig:
    """The run's config: the file (None: built-in mini-UCIT), the store URL override, the stream read now."""
    config = load_config(config_path)
    if store_url:
        config = config.model_copy(update={"store": config.store.model_copy(update={"url": store_url})})
    return with_stream(config)
