"""The quality table on examples/stress.yaml (issue #16): the same runs, rows and goals as benchmarks/quality.py, on
the mini-UCIT stream with the earlier rank-8 LoRAs (Σr/d = 0.375, four times LLaVA-1.5-7B's), so what a too-small
model costs the merge stays visible beside the default's table.

    python -m benchmarks.quality_stress [any benchmarks.quality option]

`--smoke` streams examples/tiny.yaml through `--config` (one task): the stress stream has no small size.
"""

from __future__ import annotations

import sys

from benchmarks import quality
from benchmarks.common import EXAMPLES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stream = [str(EXAMPLES / "tiny.yaml"), "--tasks", "1"] if "--smoke" in argv else [str(EXAMPLES / "stress.yaml")]
    return quality.main(["--config", *stream, *argv])


if __name__ == "__main__":
    sys.exit(main())
