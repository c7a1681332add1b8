"""`many gc` on the command line (docs/design.md §3.4, §5.1): retention from --keep-last or the config's
store.keep_last, --dry-run and --json, the one-line summary, a missing store (exit 2, nothing created), and a
run in progress (nothing deleted). The retention rule and lease handshake are tested in tests/tasks/test_store_gc.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tasks.store import Store
from tasks.store import lease as leases
from tests.tasks.test_store_gc import F, Stages, manifest_rel, write_run


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, set[str]]:
    """A local store with two runs of one config on the same tasks; returns it and the manifests only the older lists."""
    root = tmp_path / "store"
    store = Store.open(str(root), cache_dir=tmp_path / "cache")
    s = Stages(store, tmp_path)
    base = s.add("base", {"model": {"weights.safetensors": b"w" * 4000}})
    old = [s.add("merge", {"state": {"C.safetensors": b"old" * 500}}, base=base), s.add("eval", {"scores": b"1"})]
    new = [s.add("merge", {"state": {"C.safetensors": b"new" * 500}}, base=base), s.add("eval", {"scores": b"2"})]
    write_run(store, "r1", [base, *old], ["a"])
    write_run(store, "r2", [base, *new], ["a"], latest=True)
    return root, {manifest_rel(m) for m in old}


def files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def gc(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["gc", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_keep_last_from_the_config_dry_run_then_delete(two_runs, tmp_path: Path, capsys) -> None:
    root, old = two_runs
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": str(root), "keep_last": 1}}))
    before = files(root)

    code, out, err = gc(capsys, "--config", str(config), "--dry-run", "--json", "--min-age-seconds", "0")
    assert code == 0, err
    report = json.loads(out)
    assert report["store"] == f"file://{root}" and report["keep_last"] == 1 and report["deleted"] is False
    assert set(report["removed"]["stages"]) == old and report["removed"]["runs"] == ["runs/r1.json"]
    assert report["runs_kept"] == ["r2"] and report["counts"]["stages"] == 2 and report["counts"]["blobs"] == 3
    removed = [p for paths in report["removed"].values() for p in paths]
    assert report["bytes_freed"] == sum(before[p] for p in removed)
    assert files(root) == before

    code, out, err = gc(capsys, "--config", str(config), "--keep-last", "2", "--json", "--min-age-seconds", "0")
    assert code == 0 and json.loads(out)["keep_last"] == 2 and json.loads(out)["bytes_freed"] == 0  # the flag wins

    code, out, err = gc(capsys, "--store", str(root), "--keep-last", "1", "--min-age-seconds", "0")
    assert code == 0, err
    assert sorted(out.split()) == sorted(removed)
    assert re.fullmatch(rf"deleted 2 stages, 1 runs, 3 blobs and 0 partial files \(3\.\d kB\) in "
                        rf"file://{root}, keeping the newest 1 per config: 1 runs", err.strip()), err
    assert set(before) - set(files(root)) == set(removed)


def test_without_keep_last_gc_collects_only_orphans(two_runs, capsys) -> None:
    root, _ = two_runs
    before = files(root)
    code, out, err = gc(capsys, "--store", str(root), "--min-age-seconds", "0")
    assert code == 0 and out == "" and err.startswith("deleted 0 stages, 0 runs, 0 blobs") and files(root) == before


def test_a_run_in_progress_stops_the_delete(two_runs, tmp_path: Path, capsys) -> None:
    root, _ = two_runs
    store = Store.open(str(root), cache_dir=tmp_path / "cache")
    with leases.hold(store, "run", "r3"):
        before = files(root)
        code, out, err = gc(capsys, "--store", str(root), "--keep-last", "1", "--min-age-seconds", "0")
        assert code == 0 and files(root) == before
        assert "deleted nothing: in progress in file://" in err and "run r3 on host" in err


@pytest.mark.parametrize("argv", [[], ["--dry-run"], ["--json", "--keep-last", "1"]], ids=["delete", "dry-run", "json"])
def test_gc_on_a_missing_store_is_exit_2_and_creates_nothing(argv: list[str], tmp_path: Path, capsys) -> None:
    code, out, err = gc(capsys, "--store", str(tmp_path / "nowhere"), *argv)
    assert code == 2 and out == ""
    assert err.strip() == f"many: error: no store at {tmp_path / 'nowhere'}: {tmp_path / 'nowhere'} does not exist; check --store (or the config's store.url)"
    assert not (tmp_path / "nowhere").exists()


def test_gc_on_a_missing_s3_prefix_is_exit_2(new_bucket: str, capsys) -> None:
    code, _, err = gc(capsys, "--store", f"s3://{new_bucket}/none/here")
    assert code == 2 and err.strip().startswith(f"many: error: no store at s3://{new_bucket}/none/here: nothing is stored")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_keep_last_must_be_a_whole_number_of_at_least_one(value: str, tmp_path: Path, capsys) -> None:
    code, _, err = gc(capsys, "--store", str(tmp_path), f"--keep-last={value}")
    assert code == 2 and f"argument --keep-last: '{value}' is not a whole number ≥ 1" in err


def test_config_keep_last_is_validated(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": str(tmp_path), "keep_last": 0}}))
    code, _, err = gc(capsys, "--config", str(config))
    assert code == 2 and "store.keep_last: Input should be greater than 0" in err


def test_a_run_summary_records_its_config_fingerprint_and_tasks_are_not_part_of_it() -> None:
    from flows.config import parse_config
    from flows.retention import config_fingerprint

    base = parse_config({"tasks": ["chart-qa"]})
    assert config_fingerprint(base) == config_fingerprint(parse_config({"tasks": ["chart-qa", "icon-qa"], "retries": 0,
                                                                        "store": {"url": "/x", "keep_last": 2}}))
    assert config_fingerprint(base) != config_fingerprint(parse_config({"tasks": ["chart-qa"], "cpm": {"tau": 0.1}}))
    assert len(config_fingerprint(base)) == 64 and F != config_fingerprint(base)
