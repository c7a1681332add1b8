"""Corruption (issue #9.4): a flipped byte in a blob, a truncated Parquet file, a truncated safetensors file.

Each case damages one blob of a copy of the reference store, and removes the manifest of one stage that
reads it (so the next run must read the damaged bytes; a fully cached run reads none of them). Without
`--repair` the read fails sha256 verification: one line naming the blob and `--repair`, exit 1, the store
unchanged. With `--repair` every cached stage is re-hashed, the damaged stage is recomputed (bit-identical:
the stages are deterministic), the reader follows, nothing else is computed, and the merged adapter is the
reference's. Every run uses an empty local cache, so reads really go to the store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.stages import OUTPUTS
from tasks.store import CorruptArtifact, Store
from tests.reliability.conftest import (
    assert_store_sound,
    final_adapter_digest,
    listing,
    many,
    many_env,
    write_config,
)


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


# (case, damaged stage, its task, file inside its output, damage, the stage whose manifest goes: it reads the file)
CASES = [
    ("flipped_byte_in_adapter", "finetune", "chart-qa", "adapter/adapter_model.safetensors", flip_byte, "stats"),
    ("truncated_parquet", "data", "style-cls", "train.parquet", truncate, "prototypes"),
    ("truncated_safetensors", "stats", "style-cls", "gram.safetensors", truncate, "merge"),
]


def entry(summary: dict, stage: str, task: str) -> dict:
    return next(s for s in summary["stages"] if (s["stage"], s["task"]) == (stage, task))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "stage", "task", "file", "damage", "reader"), CASES, ids=[c[0] for c in CASES])
def test_damaged_blob_is_detected_on_read_and_repaired_with_repair(
    case: str, stage: str, task: str, file: str, damage, reader: str, reference: tuple[str, dict], tmp_path: Path
) -> None:
    reference_store, summary = reference
    root = tmp_path / "store"
    shutil.copytree(Path(reference_store.removeprefix("file://")), root)
    store = Store.open(str(root), cache_dir=tmp_path / "inspect")
    damaged = store.read_manifest(stage, entry(summary, stage, task)["key"])
    output = damaged.outputs[OUTPUTS[stage][0]]  # the output `reader` reads (a manifest's outputs are sorted by name)
    ref = store.read_listing(output, context="test").files[file] if output.kind == "dir" else output
    blob = root / "blobs" / "sha256" / ref.digest[:2] / ref.digest[2:]
    blob.chmod(0o644)
    blob.write_bytes(damage(blob.read_bytes()))
    (root / "stages" / reader / f"{entry(summary, reader, task)['key']}.json").unlink()
    config = write_config(tmp_path / "small.yaml")
    argv = ["run", "--json", "--config", str(config), "--store", f"file://{root}"]

    before = listing(root)
    plain = many(argv, many_env(tmp_path / "plain"))
    assert plain.code == 1, plain.err
    assert f"corrupt artifact: blob {ref.digest}" in plain.last_line and "--repair" in plain.last_line, plain.last_line
    assert listing(root) == before

    repaired = many([*argv, "--repair"], many_env(tmp_path / "repair"))
    assert repaired.code == 0, repaired.err
    computed = {(s["stage"], s["task"]) for s in repaired.summary["stages"] if s["status"] == "computed"}
    assert computed == {(stage, task), (reader, task)}
    assert [s["key"] for s in repaired.summary["stages"]] == [s["key"] for s in summary["stages"]]
    assert final_adapter_digest(f"file://{root}", repaired.summary) == final_adapter_digest(reference_store, summary)
    assert_store_sound(f"file://{root}")
    assert json.loads((root / "runs" / "latest.json").read_text())["report"] == summary["report"]


def test_corrupt_artifact_error_survives_the_trip_from_a_ray_worker() -> None:
    """A stage's exception is serialised by Ray back to the driver, rebuilt from its reduce tuple (as copy
    does): the CLI's one line must still name the blob and `--repair`."""
    import copy

    error = copy.copy(CorruptArtifact("blob ab12", "stage stats, input finetune", "hashes to cd34"))
    assert str(error) == "corrupt artifact: blob ab12 (stage stats, input finetune) hashes to cd34; recompute the stage with --repair"
