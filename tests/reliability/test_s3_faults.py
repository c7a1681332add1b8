"""S3 faults (issue #9.2) and the secrets half of security (#9.6), on a real S3 server (moto over HTTP on
loopback) behind the fault-injecting proxy of tests/tasks (`FaultyS3`).

Transient faults — 500s, 503s, connection resets, answers lost after S3 applied the request, stalls — hit
a fraction of all requests of a whole `many run`: the run completes, the proxy counts the faults it
injected, the stages count the retries their workers made, no manifest points at a missing or corrupt blob, and the merged adapter is bit-identical to the
local reference run's. A permanent fault (403 on every request) ends with one line and exit 1, the store
unchanged; a deleted bucket is a bad store URL (exit 2). The fake credentials given through the environment
appear nowhere: not in the store, the run's output and logs, the Prefect database or the export, and the
export holds safetensors, Parquet and JSON files only (plus the HF tokenizer's text files and the model card).
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from tasks.store import Store
from tests.reliability.conftest import final_adapter_digest, many, many_env, write_config
from tests.s3 import FAKE_KEY_ID, FAKE_SECRET, FaultyS3, stored_objects

pytestmark = pytest.mark.slow
FAULT_FRACTION = 0.08
# What a HF model dir holds besides safetensors and JSON (the tokenizer's chat template is plain text).
EXPORT_SUFFIXES = {".safetensors", ".parquet", ".json", ".jinja", ".txt", ".md"}  # .md: the model card


def secrets_in(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and
            any(s.encode() in p.read_bytes() for s in (FAKE_KEY_ID, FAKE_SECRET))]


def test_transient_faults_are_retried_permanent_ones_fail_cleanly_and_no_secret_leaks(
    reference: tuple[str, dict], new_bucket: str, faulty_s3: FaultyS3, s3_endpoint: str, tmp_path: Path, record_property
) -> None:
    reference_store, reference_summary = reference
    url = f"s3://{new_bucket}/many"
    env = many_env(tmp_path, AWS_ENDPOINT_URL=faulty_s3.endpoint)
    argv = ["run", "--json", "--config", str(write_config(tmp_path / "small.yaml")), "--store", url]

    faulty_s3.fail_randomly(FAULT_FRACTION, seed=9)
    outcome = many(argv, env)
    faulty_s3.fail_randomly(0)
    assert outcome.code == 0, outcome.err
    injected = dict(faulty_s3.injected)
    assert sum(injected.values()) >= 10 and set(injected) == {"500", "503", "reset", "lost", "stall"}, injected
    retried = sum(s["s3_retries"] for s in outcome.summary["stages"])
    assert retried > 0 and "S3 retries)" in outcome.err, retried  # counted per stage, shown on the progress line
    record_property("figure", f"S3 faults injected into {faulty_s3.requests} requests: {dict(sorted(injected.items()))}; "
                              f"the stages' workers retried {retried} requests")  # benchmarks/reliability.py

    store = Store.open(url, endpoint_url=s3_endpoint, cache_dir=tmp_path / "verify")
    for entry in outcome.summary["stages"]:
        manifest = store.read_manifest(entry["stage"], entry["key"])
        assert all(store.verify(ref) == [] for ref in [*manifest.inputs.values(), *manifest.outputs.values()])
    reference_digest = final_adapter_digest(reference_store, reference_summary)
    last_merge = [s for s in outcome.summary["stages"] if s["stage"] == "merge"][-1]
    assert store.read_manifest("merge", last_merge["key"]).outputs["adapter"].digest == reference_digest

    exported = many(["export", "--store", url, "--out", str(tmp_path / "export")], env)
    assert exported.code == 0, exported.err
    files = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= EXPORT_SUFFIXES, sorted({p.suffix for p in files})
    objects = stored_objects(url)
    assert not [k for k, v in objects.items() if FAKE_KEY_ID.encode() in v or FAKE_SECRET.encode() in v]
    logs = outcome.out + outcome.err + exported.out + exported.err
    assert FAKE_KEY_ID not in logs and FAKE_SECRET not in logs
    assert not secrets_in(tmp_path)  # the export, the Prefect home (its database: logs, artifacts), the cache
    assert not secrets_in(Path(env["RAY_TMPDIR"]))  # Ray's session logs

    faulty_s3.fail_next(10**6, 403, "AccessDenied")
    denied = many(argv, env)
    assert denied.code == 1 and denied.last_line.startswith("many: failed (StoreError): access denied to bucket"), denied.err
    assert len(denied.err.strip().splitlines()) == 1
    faulty_s3.fail_next(0, 0, "")
    assert stored_objects(url) == objects

    s3 = boto3.resource("s3", endpoint_url=s3_endpoint).Bucket(new_bucket)
    s3.objects.all().delete()
    s3.delete()
    gone = many(argv, env)
    assert gone.code == 2 and f"bucket '{new_bucket}' does not exist" in gone.last_line, gone.err
