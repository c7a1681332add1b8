"""Overhead of the artifact store (docs/design.md §3) against a plain fsspec copy, on a local directory and on
an S3 server (moto over HTTP), in the same run.

One round trip = put a safetensors file, then read it back to a local path as a stage reads its inputs. Through
the store, put is what a stage does with its outputs (tasks.cache.run_stage, `put(owned=True)`): stream the file
through sha256, check whether the blob exists, and store it atomically — into a local store on the same filesystem
as a hard link of the output (the stage's work dir is deleted next), to S3 as an upload; the
read is `materialize` (what every stage does with its inputs, tasks.cache.run_stage): from a local store on the
cache's filesystem a hard link to the blob, verified by one sha256 pass, then stamped; elsewhere a download to a temp
file, re-hashed and renamed into place. The plain side is `fs.put_file` + `fs.get_file`. Goal: store / plain ≤
1.2. Each store round trip uses a fresh store root and a fresh cache, so put really uploads (no dedup) and the read
really fetches. Rounds alternate plain and store so both share the machine's noise; each number is a median. The
"copying get" column is the put and read as they were before linking (put: hash, then copy; `get_file`: copy, then
hash), for comparison.

Locally the copy itself is a kernel copy (tens of ms for 50 MB) while sha256 runs at ~1.5 GB/s, so the two
hashes (one per direction: the address, and the price of verified reads) are what the local ratio measures; the
"sha256" figure shows that floor. On S3 the network dominates.

    python -m benchmarks.store_overhead [--smoke] [--json PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import boto3
import fsspec
import numpy as np
from moto.server import ThreadedMotoServer
from safetensors.numpy import save_file

from benchmarks.common import timed
from tasks.store import Store, hash_file

GOAL = 1.2
FULL_BYTES = 50 * 2**20
SMOKE_BYTES = 2**20


def make_safetensors(path: Path, size: int, seed: int) -> None:
    values = np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)
    save_file({"weight": values}, str(path))


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """A local S3 server with fake credentials, for this process only."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's markdown
        server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def measure(backend: str, src: Path, scratch: Path, endpoint: str, repeats: int) -> dict:
    if backend == "local":
        fs = fsspec.filesystem("file")
        base = (scratch / "local").as_posix()
        store_url = lambda name: f"file://{base}/{name}"  # noqa: E731
    else:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        base = bucket
        store_url = lambda name: f"s3://{bucket}/{name}"  # noqa: E731
    plain_times, store_times, copying_times = [], [], []
    for round_ in range(repeats + 1):  # round 0 warms up both sides and is not counted
        out = scratch / f"out-{backend}-{round_}"
        plain_dest = f"{base}/plain-{round_}/{src.name}"
        fs.makedirs(f"{base}/plain-{round_}", exist_ok=True)
        _, plain = timed(lambda: (fs.put_file(str(src), plain_dest), fs.get_file(plain_dest, str(out) + ".plain")))
        store = Store.open(store_url(f"store-{round_}"), endpoint_url=endpoint, cache_dir=scratch / f"cache-{backend}-{round_}")
        output = scratch / f"work-{backend}-{round_}" / src.name  # a stage's output, written before the put
        output.parent.mkdir()
        shutil.copyfile(src, output)
        local, through_store = timed(lambda: store.materialize(store.put_file(output, owned=True), context="benchmark"))
        assert local.read_bytes() == Path(str(out) + ".plain").read_bytes()
        store = Store.open(store_url(f"copying-{round_}"), endpoint_url=endpoint, cache_dir=scratch / "cache")
        _, copying = timed(
            lambda: store.get_file(store.put_file(src).digest, Path(str(out) + ".store"), context="benchmark")
        )
        if round_:
            plain_times.append(plain)
            store_times.append(through_store)
            copying_times.append(copying)
    plain_s, store_s = statistics.median(plain_times), statistics.median(store_times)
    return {"backend": backend, "plain_s": plain_s, "store_s": store_s, "ratio": store_s / plain_s,
            "copying_s": statistics.median(copying_times), "copying_ratio": statistics.median(copying_times) / plain_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 1 MB file, a few seconds")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--repeats", type=int, help="timed round trips per backend (default 5, smoke 2)")
    args = parser.parse_args(argv)
    size = SMOKE_BYTES if args.smoke else FULL_BYTES
    repeats = args.repeats or (2 if args.smoke else 5)
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="many-bench-store-") as tmp:
            scratch = Path(tmp)
            src = scratch / "weights.safetensors"
            make_safetensors(src, size, seed=0)
            megabytes = src.stat().st_size / 2**20
            sha256_s = statistics.median(timed(lambda: hash_file(src))[1] for _ in range(3))
            rows = [measure(backend, src, scratch, endpoint, repeats) for backend in ("local", "s3")]
    finally:
        server.stop()
    print(f"put + get of a {megabytes:.0f} MB safetensors file, median of {repeats}; sha256 of it alone: {sha256_s * 1e3:.0f} ms\n")
    print("| backend | plain fsspec (ms) | store: put + materialize (ms) | store / plain | goal | copying get (ms) | copying / plain |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        verdict = "met" if row["ratio"] <= GOAL else "missed"
        print(f"| {row['backend']} | {row['plain_s'] * 1e3:.0f} | {row['store_s'] * 1e3:.0f} | {row['ratio']:.2f}× | "
              f"≤ {GOAL}× ({verdict}) | {row['copying_s'] * 1e3:.0f} | {row['copying_ratio']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"file_bytes": size, "repeats": repeats, "sha256_s": sha256_s, "goal": GOAL, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
