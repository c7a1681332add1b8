"""What the benchmarks share: the examples directory, a quiet, offline, per-run environment, the Prefect warm-up
and a timer."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def quiet_environment(scratch: Path) -> None:
    """Offline Prefect/Ray settings, Prefect home and store cache under `scratch`; values already set win."""
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_HOME": str(scratch / "prefect"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": "/tmp/ray-bench",
        "MANY_CACHE_DIR": str(scratch / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def stream_config(smoke: bool):
    """The run config a pipeline benchmark streams: examples/tiny.yaml when `smoke`, else the embedded mini-UCIT
    defaults (call after `quiet_environment`: it imports flows)."""
    from flows.config import RunConfig, load_config

    return load_config(EXAMPLES / "tiny.yaml") if smoke else RunConfig()


def seed_count(parser, seeds: int | None, smoke: bool) -> int:
    """--seeds N (default 3, smoke 1), at least one."""
    seeds = seeds or (1 if smoke else 3)
    if seeds < 1:
        parser.error(f"--seeds {seeds}: need at least one seed")
    return seeds


def warm_up_prefect() -> None:
    """Run an empty flow, so the ephemeral Prefect server starts outside every measurement (call after
    `quiet_environment`: it imports prefect)."""
    from prefect import flow

    @flow(name="bench-warm-up", persist_result=False)
    def warm_up() -> None:
        """Starts the ephemeral Prefect server outside every measurement."""

    warm_up()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """What `call()` returns, and the seconds it took."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start
