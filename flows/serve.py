"""`many serve` (DESIGN.md §5): a Prefect deployment that reruns the continual update on a schedule.

The deployment's parameter is the config as plain JSON (deployments store parameters in the Prefect API);
each scheduled run validates it and calls `continual_update`, so only new tasks' stages compute.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.deployments.runner import RunnerDeployment

from flows.config import parse_config
from flows.pipeline import continual_update


@flow(name="scheduled-update", persist_result=False)
def scheduled_update(config: dict[str, Any]) -> dict[str, Any]:
    """Validate the config and run the stream; the run summary lands in the store as usual."""
    return continual_update(parse_config(config, "deployment parameter 'config'"))


def deployment(config: dict[str, Any], cron: str, name: str = "many") -> RunnerDeployment:
    """The deployment `many serve` serves: `scheduled_update(config)` on the cron schedule."""
    return scheduled_update.to_deployment(name=name, cron=cron, parameters={"config": config})
