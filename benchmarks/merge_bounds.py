"""Issue #17's goals in one run: the merge state bounded by the dense RLS form, store growth linear in t with
superseded merge states collected, half-precision Grams, and one 7B-shaped merge step of all 32 blocks on a simulated
3-node Ray cluster. The parts `stream`, `grams` and `7b-cluster` of benchmarks.perf (see its docstring), with their
goals table; the per-layer step cost against the dense RLS step is in benchmarks.merge_cost.

    python -m benchmarks.merge_bounds [--smoke] [any benchmarks.perf option]
"""

from __future__ import annotations

import sys

from benchmarks import perf

PARTS = "stream,grams,7b-cluster"


def main(argv: list[str] | None = None) -> int:
    return perf.main(["--parts", PARTS, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
