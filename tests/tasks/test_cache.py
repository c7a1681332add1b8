"""Stage cache keys and `run_stage` (docs/design.md §2 "Cache key", §3; issue #5) on a local and an S3 store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from many.config import LPMConfig
from tasks.cache import Stage, cache_key, lookup, run_stage
from tasks.store import BadName, BlobRef, CorruptArtifact, Store, StoreError
from tests.s3 import blob_rel, overwrite

ROOT = Path(__file__).resolve().parents[2]
MERGE = Stage(name="merge", version="3", inputs=("previous", "adapter"), outputs=("state", "merged"))
PREV = BlobRef(digest="1" * 64, size=10, kind="dir")
ADAPTER = BlobRef(digest="2" * 64, size=20, kind="file")
INPUTS = {"previous": PREV, "adapter": ADAPTER}
CONFIG = {"a": 1.0, "gamma": 1e-4, "gamma_mode": "relative", "rank": None, "layers": ["q", "v"]}

KEY_IN_FRESH_PROCESS = """
import json, sys
from tasks.cache import Stage, cache_key
from tasks.store import BlobRef
stage = Stage(name="merge", version="3", inputs=("previous", "adapter"), outputs=("state", "merged"))
inputs = {"adapter": BlobRef(digest="2" * 64, size=20), "previous": BlobRef(digest="1" * 64, size=10, kind="dir")}
config = {"rank": None, "layers": ["q", "v"], "gamma_mode": "relative", "gamma": 0.0001, "a": 1.0}
print(cache_key(stage, config, inputs))
"""


def test_key_is_stable_across_fresh_processes() -> None:
    keys = {
        subprocess.run(
            [sys.executable, "-c", KEY_IN_FRESH_PROCESS],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert keys == {cache_key(MERGE, CONFIG, INPUTS)}


def test_key_of_a_typed_config_equals_key_of_its_json() -> None:
    assert cache_key(MERGE, LPMConfig(), INPUTS) == cache_key(MERGE, LPMConfig().model_dump(mode="json"), INPUTS)


@pytest.mark.parametrize(
    ("change", "stage", "config", "inputs"),
    [
        ("float value", MERGE, {**CONFIG, "gamma": 2e-4}, INPUTS),
        ("float last digit", MERGE, {**CONFIG, "gamma": 0.00010000000000000002}, INPUTS),
        ("int vs float", MERGE, {**CONFIG, "a": 1}, INPUTS),
        ("None vs value", MERGE, {**CONFIG, "rank": 8}, INPUTS),
        ("list order", MERGE, {**CONFIG, "layers": ["v", "q"]}, INPUTS),
        ("added field", MERGE, {**CONFIG, "tau": 0.01}, INPUTS),
        ("code version", Stage(name="merge", version="4", inputs=MERGE.inputs, outputs=MERGE.outputs), CONFIG, INPUTS),
        ("stage name", Stage(name="merge2", version="3", inputs=MERGE.inputs, outputs=MERGE.outputs), CONFIG, INPUTS),
        ("input digest", MERGE, CONFIG, {**INPUTS, "adapter": BlobRef(digest="3" * 64, size=20)}),
        ("swapped inputs", MERGE, CONFIG, {"previous": ADAPTER, "adapter": PREV}),
    ],
)
def test_any_change_gives_another_key(change: str, stage: Stage, config: dict, inputs: dict) -> None:
    assert cache_key(stage, config, inputs) != cache_key(MERGE, CONFIG, INPUTS), change


def test_key_ignores_what_is_not_content() -> None:
    same_digest_other_size = {**INPUTS, "adapter": BlobRef(digest="2" * 64, size=999)}
    reordered = dict(reversed(list(CONFIG.items())))
    assert cache_key(MERGE, reordered, same_digest_other_size) == cache_key(MERGE, CONFIG, INPUTS)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "../merge"}, BadName, r"bad stage name '\.\./merge'"),
        ({"name": "a/b"}, BadName, r"bad stage name 'a/b'"),
        ({"name": "x..y"}, BadName, r"bad stage name 'x\.\.y'"),
        ({"version": ""}, ValueError, r"stage 'merge' needs a non-empty code version string"),
        ({"inputs": ["a"]}, ValueError, r"stage 'merge': inputs must be a tuple of names"),
        ({"inputs": ("a/b",)}, BadName, r"bad input artifact name 'a/b'"),
        ({"outputs": ("x", "x")}, ValueError, r"stage 'merge' lists an output name twice"),
        ({"outputs": ()}, ValueError, r"stage 'merge' declares no outputs"),
    ],
)
def test_bad_stage_descriptions_are_rejected(kwargs: dict, error: type, message: str) -> None:
    fields = {"name": "merge", "version": "3", "inputs": ("a",), "outputs": ("b",), **kwargs}
    with pytest.raises(error, match=message):
        Stage(**fields)


@pytest.mark.parametrize(
    ("config", "inputs", "message"),
    [
        (CONFIG, {"previous": PREV}, r"stage 'merge' expects inputs \['adapter', 'previous'\], got \['previous'\]"),
        (CONFIG, {**INPUTS, "extra": ADAPTER}, r"expects inputs \['adapter', 'previous'\], got \['adapter', 'extra', 'previous'\]"),
        (CONFIG, {**INPUTS, "adapter": "2" * 64}, r"input 'adapter' of stage 'merge' must be a BlobRef"),
        ({"gamma": float("nan")}, INPUTS, r"config of stage 'merge' is not plain JSON .*Out of range float"),
        ({"layers": {"q", "v"}}, INPUTS, r"config of stage 'merge' is not plain JSON .*set is not JSON serializable"),
    ],
)
def test_bad_keys_inputs_are_rejected(config: dict, inputs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cache_key(MERGE, config, inputs)


# -- run_stage on a real store ------------------------------------------------------------------------

FINETUNE = Stage(name="finetune", version="1", inputs=("base", "data"), outputs=("adapter", "projector"))


def put_inputs(store: Store, tmp_path: Path) -> dict[str, BlobRef]:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "config.json").write_text('{"hidden": 64}')
    (base / "sub" / "weights.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "data.parquet").write_bytes(b"rows")
    return {"base": store.put(base), "data": store.put(tmp_path / "data.parquet")}


class Finetune:
    """A deterministic fake fine-tune: counts its calls and checks what it was given."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, local: dict[str, Path], workdir: Path) -> dict[str, Path]:
        self.calls += 1
        assert (local["base"] / "sub" / "weights.safetensors").read_bytes() == b"w" * 1000
        assert local["data"].read_bytes() == b"rows"
        assert not any(workdir.iterdir())  # a fresh directory
        (workdir / "adapter").mkdir()
        (workdir / "adapter" / "adapter_config.json").write_text('{"r": 8}')
        (workdir / "adapter" / "adapter_model.safetensors").write_bytes(b"lora" * 100)
        (workdir / "projector.safetensors").write_bytes(b"proj" * 10)
        return {"adapter": workdir / "adapter", "projector": workdir / "projector.safetensors"}


def test_first_run_computes_then_reruns_are_cached(store: Store, tmp_path: Path) -> None:
    inputs, compute = put_inputs(store, tmp_path), Finetune()
    assert lookup(store, FINETUNE, {"steps": 600}, inputs) is None
    first = run_stage(store, FINETUNE, {"steps": 600}, inputs, compute, host="node-1")
    assert first.status == "computed" and compute.calls == 1
    manifest = first.manifest
    assert (manifest.stage, manifest.host, manifest.code_version, manifest.config) == ("finetune", "node-1", "1", {"steps": 600})
    assert manifest.inputs == inputs and manifest.outputs["adapter"].kind == "dir"
    assert manifest.outputs["projector"] == BlobRef(digest=manifest.outputs["projector"].digest, size=40)
    assert store.read_manifest("finetune", manifest.key) == manifest == lookup(store, FINETUNE, {"steps": 600}, inputs)
    adapter = store.materialize(manifest.outputs["adapter"], context="test")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"lora" * 100

    again = run_stage(store, FINETUNE, {"steps": 600}, inputs, compute, host="node-2")
    assert (again.status, again.manifest, compute.calls) == ("cached", manifest, 1)
    changed = run_stage(store, FINETUNE, {"steps": 601}, inputs, compute, host="node-2")
    assert changed.status == "computed" and changed.manifest.key != manifest.key and compute.calls == 2
    assert changed.manifest.outputs == manifest.outputs  # same bytes, same blobs: deduplicated


def test_concurrent_runs_of_one_stage_agree_on_one_manifest(store: Store, tmp_path: Path) -> None:
    inputs = put_inputs(store, tmp_path)
    results = []
    barrier = threading.Barrier(3)

    def run(i: int) -> None:
        def compute(local: dict[str, Path], workdir: Path) -> dict[str, Path]:
            barrier.wait()  # all three compute before any writes its manifest
            return Finetune()(local, workdir)

        results.append(run_stage(store, FINETUNE, {}, inputs, compute, host=f"node-{i}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == ["computed"] * 3
    assert len({r.manifest.host for r in results}) == 1


def test_repair_recomputes_a_stage_whose_blobs_are_corrupt(store: Store, store_url: str, tmp_path: Path) -> None:
    inputs, compute = put_inputs(store, tmp_path), Finetune()
    manifest = run_stage(store, FINETUNE, {}, inputs, compute, host="node-1").manifest
    listing = store.read_listing(manifest.outputs["adapter"], context="test")
    damaged = listing.files["adapter_model.safetensors"]
    overwrite(store_url, blob_rel(damaged.digest), b"LORA" * 100)

    cached = run_stage(store, FINETUNE, {}, inputs, compute, host="node-2")
    assert cached.status == "cached" and compute.calls == 1  # without --repair nothing is re-read
    with pytest.raises(CorruptArtifact, match=rf"blob {damaged.digest} \(.*file adapter_model.safetensors\)"):
        store.materialize(cached.manifest.outputs["adapter"], context=f"stage finetune, key {manifest.key}, output adapter")

    repaired = run_stage(store, FINETUNE, {}, inputs, compute, host="node-2", repair=True)
    assert repaired.status == "computed" and compute.calls == 2
    assert repaired.manifest.host == "node-2" and repaired.manifest.outputs == manifest.outputs
    assert store.read_manifest("finetune", manifest.key) == repaired.manifest
    assert store.verify(repaired.manifest.outputs["adapter"]) == []
    healthy = run_stage(store, FINETUNE, {}, inputs, compute, host="node-3", repair=True)
    assert (healthy.status, compute.calls) == ("cached", 2)


def test_repair_replaces_an_unreadable_manifest(store: Store, store_url: str, tmp_path: Path) -> None:
    inputs, compute = put_inputs(store, tmp_path), Finetune()
    key = run_stage(store, FINETUNE, {}, inputs, compute, host="n").manifest.key
    overwrite(store_url, f"stages/finetune/{key}.json", b"{torn")
    with pytest.raises(CorruptArtifact, match=r"is not a valid manifest"):
        run_stage(store, FINETUNE, {}, inputs, compute, host="n")
    assert run_stage(store, FINETUNE, {}, inputs, compute, host="n", repair=True).status == "computed"
    assert store.read_manifest("finetune", key).key == key


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"adapter": "x"}, r"stage 'finetune' returned outputs \['adapter'\], expected \['adapter', 'projector'\]"),
        (None, r"stage 'finetune' returned outputs None, expected"),
        ({"adapter": "missing-dir", "projector": "missing.bin"}, r"cannot store .*missing-dir: it is neither a file nor a directory"),
    ],
)
def test_bad_compute_results_fail_without_a_manifest(store: Store, tmp_path: Path, returned: object, message: str) -> None:
    inputs = put_inputs(store, tmp_path)

    def compute(local: dict[str, Path], workdir: Path) -> object:
        return {k: workdir / v for k, v in returned.items()} if isinstance(returned, dict) else returned

    with pytest.raises(StoreError, match=message):
        run_stage(store, FINETUNE, {}, inputs, compute, host="n")
    assert store.ls() == []
