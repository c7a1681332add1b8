"""Checks of a run config that need no stage, done in the driver before anything is written (docs/design.md §5).

A bad input found here is a `PreflightError` (a ValueError: exit 2) and leaves the store exactly as it was;
found later, inside a stage, the same problem would cost the stages before it and litter the store.

- resources: a stage asking for more GPUs (or CPUs) than a *local* Ray cluster can ever have would wait
  forever; on a joined cluster (`ray.address`) nodes may still come, so `tasks.runtime.check_resources`
  decides per stage instead.
- user adapters (`tasks[i].adapter`): every LoRA module and the projector must exist in the base with the
  same shapes, ranks must agree, every value must be finite.
- task data (`tasks[i].train_json/test_json/image_root`): each file parses as LLaVA conversation JSON with at
  least one record, every record has an image path and an answered first human turn, and every image exists —
  what the `data` stage would find minutes later, after the base (its images are decoded there, not here). A
  local image is one `stat`; an S3 image root is listed once.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from flows.config import RunConfig


class PreflightError(ValueError):
    """The config asks for something this machine or this base cannot do; the message says what to change."""


def local_gpus() -> int:
    """GPUs a local Ray cluster would find: the CUDA devices torch sees (both honour CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(config: RunConfig, gpus: int | None = None, cpus: int | None = None) -> None:
    """Every stage group's request fits the local cluster `many run` would start (no-op with `ray.address`)."""
    if config.ray.address:
        return
    cpus = cpus or config.ray.num_cpus or os.cpu_count() or 1
    for group, request in config.resources:
        if request.num_gpus > 0 and gpus is None:
            gpus = local_gpus()  # imports torch: only a config that asks for a GPU pays for it
        if request.num_gpus > (gpus or 0):
            raise PreflightError(
                f"resources.{group}.num_gpus is {request.num_gpus:g} but this machine has {gpus} GPU(s) for the local "
                f"Ray cluster; set resources.{group}.num_gpus: 0 to run it on CPU, or ray.address to join a GPU cluster"
            )
        if request.num_cpus > cpus:
            raise PreflightError(
                f"resources.{group}.num_cpus is {request.num_cpus:g} but the local Ray cluster has {cpus} CPU(s); "
                f"lower it or raise ray.num_cpus"
            )


def check_adapters(config: RunConfig) -> None:
    """Each task's own adapter (`tasks[i].adapter`) fits the configured base; see many.adapters.check_task_dir."""
    given = [t for t in config.tasks if t.adapter is not None]
    if not given:
        return
    from many.adapters import check_task_dir
    from many.model.shapes import base_shapes

    shapes = base_shapes(config.base)
    for task in given:
        try:
            check_task_dir(Path(task.adapter), shapes.linears, shapes.projector)
        except (OSError, ValueError) as error:
            raise PreflightError(f"task {task.name!r}: adapter {task.adapter}: {' '.join(str(error).split())}") from None


def check_data(config: RunConfig) -> None:
    """Every JSON task's conversation files and images, checked without decoding an image (`many.data.llava_json`
    says what a record needs); a mini-UCIT task is generated, there is nothing to check."""
    import fsspec

    from many.data.llava_json import check_llava_json, missing_image

    for task in config.tasks:
        if task.train_json is None or task.test_json is None or task.image_root is None:
            continue
        try:
            images = []
            for json_url in (task.train_json, task.test_json):
                fs, _ = fsspec.core.url_to_fs(json_url)
                images += check_llava_json(json_url, fs=fs)  # as the data stage reads it: messages name the URL
            image_fs, root = fsspec.core.url_to_fs(task.image_root)
            exists = _exists_under(image_fs, root)
            for where, image in images:
                if not exists(posixpath.join(root, image)):
                    raise missing_image(where, posixpath.join(task.image_root, image))
        except (OSError, ValueError) as error:
            raise PreflightError(f"task {task.name!r}: {' '.join(str(error).split())}") from None


def _exists_under(fs, root: str):
    """`path -> bool` for files under `root`: a stat each on the local disk, one listing of `root` elsewhere."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return os.path.isfile
    listed = {fs._strip_protocol(path) for path in fs.find(root)}
    return lambda path: fs._strip_protocol(posixpath.normpath(path)) in listed


def preflight(config: RunConfig) -> None:
    """Cheapest first: the task data (seconds at most), then resources (imports torch if a GPU is asked for), then
    user adapters."""
    check_data(config)
    check_resources(config)
    check_adapters(config)
