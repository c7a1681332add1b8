"""A Ray `worker_process_setup_hook` for tests/reliability/test_bad_inputs.py: every worker's base stage sleeps
$MANY_SLOW_BASE_SECONDS before computing, standing in for the minutes of pretraining a real base takes."""

from __future__ import annotations

import os
import time


def install() -> None:
    from tasks import stages

    compute = stages.COMPUTES["base"]

    def slow_base(*args, **kwargs):
        time.sleep(float(os.environ.get("MANY_SLOW_BASE_SECONDS", "600")))
        return compute(*args, **kwargs)

    stages.COMPUTES["base"] = slow_base
