"""Retention beside real runs (issue #15, docs/design.md §3.4), on a copy of the reference store of the small
stream ([style-cls, chart-qa], MAny only):

1. a second run replaces chart-qa's data under the same name (icon-qa images): same config, same task names, so it
   supersedes the reference run, whose chart-qa stages — its merge state among them — `gc --keep-last 1` would drop;
2. a third run goes back to chart-qa and adds a task: it finds those stages cached and, while it fine-tunes the new
   task, a `many gc --keep-last 1` deletes nothing (the run's lease is live) although it names them; the run then
   completes, its merge reading the state gc would have deleted;
3. gc again: the second run's stages (its merge state and eval) go with the blobs only they referenced, and so do
   the kept run's superseded merge states (every one but the newest: the next merge read it); the bytes it
   reports are the bytes that left the disk, and a rerun of the kept run computes nothing and starts no Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tests.reliability.conftest import (
    assert_store_sound,
    finish,
    kill_session,
    listing,
    many,
    many_env,
    start_many,
    write_config,
)

pytestmark = pytest.mark.slow
REPLACED = [{"name": "style-cls", "kind": "style-cls"}, {"name": "chart-qa", "kind": "icon-qa"}]
GROWN = [{"name": "style-cls", "kind": "style-cls"}, {"name": "chart-qa", "kind": "chart-qa"},
         {"name": "count-math", "kind": "count-math"}]


def manifests_of(summary: dict) -> set[str]:
    return {f"stages/{s['stage']}/{s['key']}.json" for s in summary["stages"]}


def gc(capsys, root: Path, *argv: str) -> dict:
    capsys.readouterr()
    code = main(["gc", "--store", str(root), "--keep-last", "1", "--min-age-seconds", "0", "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_gc_beside_a_run_in_progress_then_superseded_merge_states_go_and_a_rerun_computes_nothing(
    reference: tuple[str, dict], tmp_path: Path, capsys
) -> None:
    root = tmp_path / "store"
    shutil.copytree(Path(reference[0].removeprefix("file://")), root)
    store = f"file://{root}"
    first = reference[1]

    second = many(["run", "--json", "--config", str(write_config(tmp_path / "replaced.yaml", tasks=REPLACED)),
                   "--store", store], many_env(tmp_path / "second"))
    assert second.code == 0, second.err
    stored = [json.loads((root / "runs" / f"{s['run_id']}.json").read_text()) for s in (first, second.summary)]
    assert stored[0]["config_fingerprint"] == stored[1]["config_fingerprint"]  # one config
    only_first = manifests_of(first) - manifests_of(second.summary)
    assert {p.split("/")[1] for p in only_first} == {"data", "finetune", "prototypes", "stats", "merge", "merge_diagnostics", "eval"}
    dry = gc(capsys, root, "--dry-run")
    assert set(dry["removed"]["stages"]) == only_first and dry["removed"]["runs"] == [f"runs/{first['run_id']}.json"]

    grown_config = write_config(tmp_path / "grown.yaml", tasks=GROWN)
    argv = ["run", "--json", "--config", str(grown_config), "--store", store]
    process = start_many(argv, many_env(tmp_path / "third"))
    try:
        lines: list[str] = []
        for line in process.stderr:  # progress lines: wait until the new task's fine-tune is running
            lines.append(line)
            if line.split()[:1] == ["finetune"] and "count-math" in line and "running" in line:
                break
        assert list((root / "leases").glob("*.json")), "".join(lines)
        during = gc(capsys, root)
        assert during["deleted"] is False and during["in_progress"] and "run " in during["in_progress"][0]
        assert set(during["removed"]["stages"]) >= only_first  # what it would have deleted, had it not waited
        assert all((root / path).exists() for kind in ("stages", "blobs", "runs") for path in during["removed"][kind])
        third = finish(process, err_lines=lines)
    finally:
        kill_session(process)
    assert third.code == 0, third.err
    status = {(s["stage"], s["task"]): s["status"] for s in third.summary["stages"]}
    assert {key for key, value in status.items() if value == "computed"} == {
        (stage, "count-math") for stage in ("data", "finetune", "prototypes", "stats", "merge", "merge_diagnostics", "eval")}
    assert manifests_of(third.summary) >= only_first  # the stages it read were the ones gc named

    before = listing(root)
    after_run = gc(capsys, root)
    after = listing(root)
    assert after_run["deleted"] is True and after_run["in_progress"] == [] and after_run["runs_kept"] == [third.summary["run_id"]]
    only_second = manifests_of(second.summary) - manifests_of(third.summary)
    assert set(after_run["removed"]["stages"]) == only_second
    assert any(path.startswith("stages/merge/") for path in only_second)  # a superseded merge state
    assert sorted(after_run["removed"]["runs"]) == sorted(f"runs/{s['run_id']}.json" for s in (first, second.summary))
    # merge[0]'s state (style-cls): the kept run's merge[1] read it, so it goes; the newest merge state stays
    merges = [s["key"] for s in third.summary["stages"] if s["stage"] == "merge"]
    assert f"merge/{merges[0]}:state" in after_run["removed"]["outputs"]
    assert not any(entry.startswith(f"merge/{merges[-1]}:") for entry in after_run["removed"]["outputs"])
    removed = [path for kind, paths in after_run["removed"].items() if kind != "outputs" for path in paths]
    assert set(before) - set(after) == set(removed)
    assert after_run["bytes_freed"] == sum(before[path][0] for path in removed) > 0
    assert after_run["counts"]["blobs"] > 0 and after_run["counts"]["stages"] == len(only_second)
    assert_store_sound(store)

    rerun = many(argv, many_env(tmp_path / "rerun"))
    assert rerun.code == 0, rerun.err
    assert rerun.summary["ray_started"] is False and {s["status"] for s in rerun.summary["stages"]} == {"cached"}
    assert gc(capsys, root)["removed"]["stages"] == []
