"""Concurrency (issue #9.3, docs/design.md §3 "create-exclusive manifests"): two identical `many run` processes
on one store at once both succeed with identical results, every manifest exists once and parses (no torn
file, no leftover temp file), and the result is the reference's bit for bit; a run with a different config
on the same base then finds every stage it shares (base, data, finetune, prototypes, stats) cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import (
    assert_store_sound,
    final_adapter_digest,
    finish,
    many,
    many_env,
    start_many,
    write_config,
)

pytestmark = pytest.mark.slow
SHARED = {"base", "data", "finetune", "prototypes", "stats"}


def test_two_identical_runs_at_once_then_a_different_config_shares_the_base(
    reference: tuple[str, dict], tmp_path: Path
) -> None:
    reference_store, reference_summary = reference
    store = f"file://{tmp_path / 'store'}"
    argv = ["run", "--json", "--config", str(write_config(tmp_path / "small.yaml")), "--store", store]
    first, second = (start_many(argv, many_env(tmp_path / name)) for name in ("first", "second"))
    outcomes = [finish(first), finish(second)]
    for outcome in outcomes:
        assert outcome.code == 0, outcome.err
    keys = [[(s["stage"], s["task"], s["key"]) for s in o.summary["stages"]] for o in outcomes]
    assert keys[0] == keys[1] == [(s["stage"], s["task"], s["key"]) for s in reference_summary["stages"]]
    assert outcomes[0].summary["report"] == outcomes[1].summary["report"] == reference_summary["report"]

    root = Path(tmp_path / "store")
    found = assert_store_sound(store)  # every manifest parses and its blobs re-hash
    assert sorted(found) == sorted(f"{s}/{k}" for s, _, k in keys[0])  # one manifest per stage, no strays
    assert not [p for p in (root / "stages").rglob("*") if p.name.startswith(".")]  # no temp file left
    assert final_adapter_digest(store, outcomes[0].summary) == final_adapter_digest(reference_store, reference_summary)

    other = many(["run", "--json", "--config", str(write_config(tmp_path / "gamma.yaml", lpm={"gamma": 1e-3})),
                  "--store", store], many_env(tmp_path / "other"))
    assert other.code == 0, other.err
    status = {(s["stage"], s["task"]): s["status"] for s in other.summary["stages"]}
    assert {k for k, v in status.items() if v == "cached"} == {k for k in status if k[0] in SHARED}
    assert {k for k, v in status.items() if v == "computed"} == {
        k for k in status if k[0] in {"merge", "merge_diagnostics", "eval"}}
