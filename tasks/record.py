"""What a finished stage hands back to the flow (docs/design.md §5.2 `--json` stage entry): small references only.

Kept apart from tasks.dispatch (which imports Prefect) so that reading a run's results — the report of a cached
rerun that starts neither Prefect nor Ray (flows/cached.py) — imports neither.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.progress import PRINT_LOCK
from tasks.store import BlobRef, Manifest, Store


@dataclass(frozen=True)
class StageRecord:
    """What a stage run returns to the flow: small references only (docs/design.md §5 `--json` stage entry)."""

    stage: str
    task: str | None
    method: str | None
    key: str
    status: Literal["computed", "cached"]
    seconds: float
    node: str
    outputs: Mapping[str, BlobRef] = field(default_factory=dict)
    s3_retries: int = 0  # S3 requests its worker retried after a transient failure (tasks.store.backend)

    def summary(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "task": self.task, "method": self.method, "key": self.key,
            "status": self.status, "seconds": round(self.seconds, 3), "node": self.node, "s3_retries": self.s3_retries,
        }


def read_json_output(store: Store, record_or_manifest: StageRecord | Manifest, output: str) -> Any:
    """A small JSON output of a finished stage (e.g. eval scores), verified."""
    ref = record_or_manifest.outputs[output]
    return json.loads(store.get_bytes(ref.digest, context=f"stage {record_or_manifest.stage}, output {output}"))


def print_stage_line(stage: str, task: str | None, method: str | None, status: str, tail: str = "") -> None:
    """A stage's line on stderr ("running", "computed", "cached"), under the one print lock of every stage line
    (tasks.progress's too: lines never interleave)."""
    where = task or ""
    if method:
        where = f"{where} [{method}]" if where else f"[{method}]"
    with PRINT_LOCK:
        print(f"  {stage:<22} {where:<34} {status:<8} {tail}".rstrip(), file=sys.stderr, flush=True)
