"""The reliability suite (issue #9, tests/reliability/) as a BENCHMARKS.md section: every fault test's outcome
and seconds, and the figures the tests record (`record_property("figure", …)`: kills landed, S3 faults
injected and retried), read from pytest's JUnit XML.

The full run is `pytest -m slow tests/reliability` (kill -9 anywhere, S3 faults, concurrency, corruption, data
bad inputs: ~10 min on two cores); `--smoke` runs the fast cases (config, store URL, GPU and user-adapter bad
inputs, the security scan). Exits non-zero if a test fails.

    python -m benchmarks.reliability [--smoke]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
    return "passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the fast bad-input and security tests only")
    args = parser.parse_args(argv)

    marker = "not slow" if args.smoke else "slow"
    with tempfile.TemporaryDirectory(prefix="many-reliability-") as scratch:
        junit = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                   f"--junitxml={junit}", "-o", "junit_family=xunit1", "tests/reliability"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if not junit.exists():
            print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
            return done.returncode or 1
        cases = ET.parse(junit).getroot().iter("testcase")
        rows, figures = [], []
        for case in cases:
            rows.append((case.get("classname", "").rsplit(".", 1)[-1], case.get("name", ""), outcome(case), float(case.get("time", 0))))
            figures += [p.get("value", "") for p in case.iter("property") if p.get("name") == "figure"]

    print(f"`pytest -m '{marker}' tests/reliability`: {sum(r[2] == 'passed' for r in rows)} of "
          f"{len(rows)} passed in {sum(r[3] for r in rows):.0f} s (test time; OMP_NUM_THREADS=1)\n")
    print("| module | test (parametrized cases folded) | passed | seconds |\n|---|---|---:|---:|")
    folded: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for module, name, result, seconds in rows:
        folded.setdefault((module, name.split("[")[0]), []).append((result, seconds))
    for (module, name), results in folded.items():
        passed = sum(result == "passed" for result, _ in results)
        print(f"| {module} | {name} | {passed} / {len(results)} | {sum(s for _, s in results):.1f} |")
    if figures:
        print("\nFigures recorded by the tests:\n")
        print("\n".join(f"- {figure}" for figure in figures))
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
