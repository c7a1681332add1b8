"""Security (issue #9.6), fast part: no pickle anywhere in the code, and no name read from a config, a run
summary or a directory listing can make `many` write outside the store, its cache or the export dir.
The slow part (credentials never stored or logged, exports are safetensors/Parquet/JSON only) runs on the
S3 pipeline run of test_s3_faults.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flows.export import export
from tasks.store import BadName, CorruptArtifact, DirListing, Store, canonical_json
from tests.reliability.conftest import ROOT, listing

# Spelled in pieces so this file does not match itself.
UNSAFE = {
    "pickle module": re.compile(r"\b(c?" + "pickle|dill|joblib|shelve|marshal" + r")\b\s*(\.|import)|import\s+(c?" + "pickle|dill|joblib|shelve)"),
    "torch.load without weights_only=True": re.compile(r"torch\.lo" + r"ad\((?![^)]*weights_only\s*=\s*True)"),
    "numpy allow_pickle": re.compile(r"allow_pic" + r"kle\s*=\s*True"),
    "torch.save (pickle format)": re.compile(r"torch\.sa" + r"ve\("),
    "pandas pickle I/O": re.compile(r"(read|to)_pic" + r"kle\("),
}
SCANNED = ("many", "tasks", "flows", "benchmarks", "deploy", "tests")


def test_no_pickle_or_unsafe_torch_load_in_the_repository() -> None:
    files = [p for d in SCANNED for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".sh", ".toml")]
    assert len(files) > 50  # the scan really looked at the code
    found = [
        f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for what, pattern in UNSAFE.items()
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("bad", [p.replace("X", "pickle") for p in ["import X", "from X import loads", "X.dumps(x)"]]
                         + ["torch.lo" + "ad(f)", "torch.lo" + "ad(f, weights_only=False)"])
def test_the_scan_catches_what_it_looks_for(bad: str) -> None:
    assert any(pattern.search(bad) for pattern in UNSAFE.values())


def test_safe_torch_load_passes_the_scan() -> None:
    assert not any(pattern.search("torch.lo" + "ad(f, map_location='cpu', weights_only=True)") for pattern in UNSAFE.values())


@pytest.mark.parametrize("task", ["../../escape", "/tmp/abs", "a/b", "..", "."])
def test_export_refuses_task_names_that_leave_the_export_dir(task: str, tmp_path: Path) -> None:
    """A run summary is data read from a (possibly shared) store: its task names are never trusted as paths."""
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    summary = {"tasks": [task], "stages": [], "methods": []}
    store.write_run("latest", summary)
    out = tmp_path / "deep" / "export"
    before = listing(tmp_path)
    with pytest.raises(BadName, match="bad task name"):
        export(store, store.read_run("latest"), out)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("rel", ["../../outside.txt", "/tmp/outside.txt", "a/../../outside.txt"])
def test_a_directory_listing_cannot_place_files_outside_the_cache(rel: str, tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    blob = store.put_bytes(b"payload")
    forged = DirListing.model_construct(files={rel: blob})
    listing_ref = store.put_bytes(canonical_json(forged.model_dump(mode="json")))
    ref = listing_ref.model_copy(update={"kind": "dir"})
    with pytest.raises(CorruptArtifact, match="unsafe path"):
        store.materialize(ref, context="test")
    assert not list(tmp_path.rglob("outside.txt")) and not Path("/tmp/outside.txt").exists()


@pytest.mark.parametrize("run_id", ["../escape", "/abs", "a/b", ".."])
def test_run_ids_cannot_leave_the_runs_dir(run_id: str, tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    with pytest.raises(BadName):
        store.write_run(run_id, {"stages": []})
    with pytest.raises(BadName):
        store.read_run(run_id)
    assert not (tmp_path / "store" / "runs").exists() and not (tmp_path / "escape.json").exists()


def test_config_task_names_are_path_safe() -> None:
    """Every accepted task name is a single safe path component (the config pattern vs the store's rule)."""
    from flows.config import TaskSpec
    from tasks.store import validate_name

    for name in ["style-cls", "a.b_c-1", "x" * 60]:
        assert validate_name("task", TaskSpec(name=name, kind="style-cls").name) == name
    for name in ["../x", "/abs", "a/b", "a\\b", "", "a b"]:
        with pytest.raises(ValueError):
            TaskSpec(name=name, kind="style-cls")
    assert json.loads(canonical_json({"k": 1})) == {"k": 1}
