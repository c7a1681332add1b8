"""Scheduled continual updates (docs/design.md §5 `many serve`): a Prefect deployment that reruns the stream.

The deployment's parameters are the config file's path and the store URL (deployments keep parameters in
the Prefect API as JSON). Each scheduled run loads the config, reads the task stream — a growing directory
or S3 prefix when the config has a `task_source` (flows/stream.py) — and calls `continual_update`: the stage
cache makes it compute only the stages of tasks that appeared since the last run. deploy/prefect.yaml
declares the same deployment for `prefect deploy`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.deployments.runner import RunnerDeployment

from flows.pipeline import continual_update
from flows.stream import run_config

__all__ = ["deployment", "run_config", "scheduled_update"]


@flow(name="scheduled-update", persist_result=False)
def scheduled_update(config_path: str | None = None, store_url: str | None = None) -> dict[str, Any]:
    """One scheduled run: the stream as it is now through the cached pipeline; returns the run summary. Its stages'
    progress goes to the run's Prefect logs (the UI) and the serving process's stderr (tasks/progress.py)."""
    return continual_update(run_config(config_path, store_url), progress=True)


def deployment(
    config_path: str | None, store_url: str | None, cron: str | None = None, name: str = "many", interval: float | None = None
) -> RunnerDeployment:
    """The deployment `many serve` serves: `scheduled_update(config_path, store_url)` on the cron schedule or
    every `interval` seconds (exactly one of the two). One run at a time: a run falling due while the previous one
    still runs is cancelled, not queued — the next one reads the whole stream anyway, so nothing is lost, and a
    schedule shorter than a run cannot build a backlog."""
    if (cron is None) == (interval is None):
        raise ValueError("a deployment needs exactly one schedule: cron or interval")
    return scheduled_update.to_deployment(
        name=name, cron=cron, interval=interval, parameters={"config_path": config_path, "store_url": store_url},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
    )
