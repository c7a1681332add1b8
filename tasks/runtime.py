"""Where stages run (docs/design.md §4): the store every process reopens from its URL, and a Ray cluster
started lazily — only when some stage must compute — or joined at a configured address.

A Ray task asking for GPUs on a GPU-less cluster would wait forever, so `check_resources` fails fast
with a message instead. Each worker sets `torch.set_num_threads` to the CPUs it was granted, so parallel
stages share cores instead of thrashing them.

A local cluster is reachable from this machine only: every Ray process binds its servers to 127.0.0.1
(`_loopback_only`), and it gets a token of its own for Ray's token authentication (`_local_token`). Joining a cluster on the network is
the explicit `ray.address`, with the cluster's token (deploy/README.md).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.store import Store

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StoreSpec:
    """How to (re)open the store in any process: the URL and the S3 connection settings."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    def open(self) -> Store:
        return _open_store(self)


_stores: dict[StoreSpec, Store] = {}
_stores_lock = threading.Lock()


def _open_store(spec: StoreSpec) -> Store:
    with _stores_lock:
        if spec not in _stores:
            _stores[spec] = Store.open(spec.url, endpoint_url=spec.endpoint_url, region=spec.region, profile=spec.profile)
        return _stores[spec]


class ClusterError(RuntimeError):
    """The Ray cluster cannot run a stage (no GPU for a GPU stage, unreachable address, ...)."""


_ray_lock = threading.Lock()
_ray_used = False  # a stage asked for Ray since the last `shutdown_ray`
_ray_initialized_here = False  # this module called ray.init (so it also shuts Ray down)


def ray_started() -> bool:
    """Whether any stage needed Ray since the last `shutdown_ray` (a fully cached run never does)."""
    return _ray_used


def _local_token() -> None:
    """Token authentication for a local cluster, set before Ray is imported (it reads RAY_AUTH_MODE then).

    Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset, writing a token to
    ~/.ray/auth_token; instead the cluster gets a fresh token in this process's environment, which Ray's processes
    inherit and nothing writes down. RAY_AUTH_MODE set by the caller (`disabled`, or `token` with its own token) is
    respected."""
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Around the `ray.init` that starts a local cluster: every Ray process binds to 127.0.0.1.

    Ray binds its servers (GCS, raylet and object manager, core workers, agents) to the node IP, which on Linux
    it takes from the machine's routable address: reachable from the network. With multi-node clusters off
    (`ray_constants.ENABLE_RAY_CLUSTER`, the macOS/Windows default, env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) the
    node IP is 127.0.0.1. It is off only while the cluster starts, so a later `ray.address` in this process still
    joins over the network. tests/tasks/test_runtime.py checks every socket of such a cluster, and
    tests/reliability/test_signals.py every socket of a whole `many run`."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ensure_ray(address: str | None, num_cpus: int | None, object_store_mb: int) -> None:
    """Connect to Ray once per process: join `address`, or start a local cluster of `num_cpus` CPUs (loopback
    only, with a token of its own).

    A connection made by the caller beforehand (e.g. `ray.init` in a notebook) is used as it is."""
    global _ray_used, _ray_initialized_here
    with _ray_lock:
        if not address:
            _local_token()
        import ray
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False  # after shutdown_ray a Ray call fails: no default cluster
        _ray_used = True
        if ray.is_initialized():
            return
        # Local workers import `tasks` and `many` by module name, also when the project is not pip-installed.
        paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        try:
            if address:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                with _loopback_only():
                    ray.init(
                        num_cpus=num_cpus or os.cpu_count() or 1,
                        object_store_memory=object_store_mb * 2**20,
                        include_dashboard=False,
                        logging_level=logging.ERROR,
                        log_to_driver=False,
                    )
        except ConnectionError as error:
            raise ClusterError(f"cannot join the Ray cluster at {address!r}: {error}") from None
        _ray_initialized_here = True


def shutdown_ray() -> None:
    """End this run's use of Ray: disconnect (stopping a local cluster) if this module connected."""
    global _ray_used, _ray_initialized_here
    with _ray_lock:
        import ray

        if _ray_initialized_here and ray.is_initialized():
            ray.shutdown()
        _ray_used = _ray_initialized_here = False


def check_resources(stage: str, num_cpus: float, num_gpus: float) -> None:
    """Fail fast when the cluster can never grant a stage's request (Ray would queue it forever).

    Counts the resources of the nodes up now: an autoscaling cluster must keep its GPU group's
    `min_workers` ≥ 1 for GPU stages to pass (deploy/README.md)."""
    import ray

    total = ray.cluster_resources()
    if num_gpus > total.get("GPU", 0.0):
        raise ClusterError(
            f"stage {stage} asks for {num_gpus:g} GPU(s) but the Ray cluster has {total.get('GPU', 0.0):g}; "
            f"set resources.{stage}.num_gpus: 0 to run it on CPU"
        )
    if num_cpus > total.get("CPU", 0.0):
        raise ClusterError(
            f"stage {stage} asks for {num_cpus:g} CPUs but the Ray cluster has {total.get('CPU', 0.0):g}; "
            f"lower resources.{stage}.num_cpus"
        )


def ray_get(refs: Any) -> Any:
    """`ray.get`, re-raising a failed task's own exception rather than Ray's wrapper (a bad input's ValueError
    stays a ValueError, which the flow does not retry).

    The other tasks of `refs` are left to finish before the error is raised, not cancelled: in Ray 2.x a
    `ray.cancel` racing a task's completion can abort the driver (RAY_CHECK "Tried to retry task that was not
    pending", ray-project/ray#54798), which left `many run` hanging instead of exiting 2."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(refs, list):
            ray.wait(refs, num_returns=len(refs))
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def node_name() -> str:
    """The node a stage ran on, as recorded in manifests and the run summary: the host name, and inside a
    Ray worker also the Ray node id's first 12 hex digits (several Ray nodes may share one host)."""
    is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)  # None too while a thread imports ray
    if is_initialized is not None and is_initialized():
        import ray

        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    return socket.gethostname()
