"""CRAM and Fwd-Prompt as method rows of the pipeline (docs/design.md §1 "Comparison methods", §2 caching contract).

Fast: the run config selects them and validates their sections (a typo is an error; both train with the run's
finetune budget unless their section says otherwise); their stages are keyed by config and by earlier links.
Slow: the tiny stream of examples/tiny.yaml with methods [cram, fwd_prompt] — cold, fully cached rerun, one more
task (exactly its chain links and eval rows), a CRAM hyper-parameter (exactly the CRAM chain and its evals), and
the report with both rows and their trainable-parameter counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import DEFAULT_METHODS, ConfigError, parse_config
from many.methods.cram import CramConfig
from many.methods.fwd_prompt import FwdPromptConfig
from tasks.store import Store
from tests.flows import e2e
from tests.flows.e2e import TINY, computed, run, stored_losses

SYSTEMS = ["cram", "fwd_prompt"]


# -- fast: config and stage keys ------------------------------------------------------------------------------


def test_both_systems_are_opt_in_methods_with_their_own_sections() -> None:
    assert not set(SYSTEMS) & set(DEFAULT_METHODS)
    config = parse_config({"methods": ["many", *SYSTEMS], "cram": {"r_max": 4, "ortho_weight": 0.5},
                           "fwd_prompt": {"n_prompts": 4, "project": False}})
    assert config.methods == ("many", "cram", "fwd_prompt")
    assert (config.cram.r_max, config.cram.ortho_weight) == (4, 0.5)
    assert (config.fwd_prompt.n_prompts, config.fwd_prompt.project) == (4, False)


def test_both_train_with_the_run_finetune_budget_unless_their_section_sets_one() -> None:
    config = parse_config({"finetune": {"steps": 30, "batch_size": 8, "seed": 3}, "cram": {"r_min": 1}})
    assert config.cram.finetune == config.finetune and config.cram.r_min == 1
    assert (config.fwd_prompt.steps, config.fwd_prompt.batch_size, config.fwd_prompt.seed) == (30, 8, 3)
    own = parse_config({"finetune": {"steps": 30}, "cram": {"finetune": {"steps": 5}}, "fwd_prompt": {"steps": 7}})
    assert (own.cram.finetune.steps, own.fwd_prompt.steps, own.fwd_prompt.batch_size) == (5, 7, 16)
    assert parse_config({}).cram == CramConfig() and parse_config({}).fwd_prompt == FwdPromptConfig()


BAD_SECTIONS = [
    ("method_typo", {"methods": ["cram", "fwd_promt"]}, "methods.1: unknown method 'fwd_promt'; known: "),
    ("cram_key_typo", {"cram": {"r_mim": 2}}, "cram.r_mim: unknown key"),
    ("cram_nested_typo", {"cram": {"finetune": {"stepz": 3}}}, "cram.finetune.stepz: unknown key"),
    ("cram_rank_bounds", {"cram": {"r_min": 8, "r_max": 4}}, "r_min (8) > r_max (4)"),
    ("fwd_prompt_key_typo", {"fwd_prompt": {"n_prompt": 4}}, "fwd_prompt.n_prompt: unknown key"),
    ("fwd_prompt_energy", {"fwd_prompt": {"energy_core": 1.5}}, "fwd_prompt.energy_core: Input should be less than"),
    ("finetune_typo_still_named", {"finetune": {"stepz": 3}}, "finetune.stepz: unknown key"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD_SECTIONS, ids=[c[0] for c in BAD_SECTIONS])
def test_bad_sections_are_one_line_errors(case: str, data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, "run.yaml")
    assert str(error.value).startswith("run.yaml: ") and message in str(error.value), str(error.value)


# -- slow: the tiny stream end to end --------------------------------------------------------------------------


def write_config(path: Path, **changes) -> Path:
    return e2e.write_config(path, **{"methods": SYSTEMS, **changes})


def eval_scores(store_url: str, summary: dict, task: str, method: str) -> dict:
    from tasks.dispatch import read_json_output
    from tasks.store import Store

    store = Store.open(store_url)
    entry = next(s for s in summary["stages"] if (s["stage"], s["task"], s["method"]) == ("eval", task, method))
    return read_json_output(store, store.read_manifest("eval", entry["key"]), "scores")


def stored_parameters(store_url: str, summary: dict, task: str) -> int:
    """Every tensor element of cram[task]'s stored expert: its LoRA A and B and its projector."""
    from safetensors.torch import load_file

    from tasks.store import Store

    store = Store.open(store_url)
    entry = next(s for s in summary["stages"] if (s["stage"], s["task"]) == ("cram", task))
    expert = store.materialize(store.read_manifest("cram", entry["key"]).outputs["expert"], context="test")
    files = [expert / "projector.safetensors", *sorted((expert / "adapter").glob("*.safetensors"))]
    return sum(t.numel() for f in files for t in load_file(str(f)).values())


@pytest.mark.slow
def test_cram_and_fwd_prompt_run_cache_grow_and_report(harness, tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    config = write_config(tmp_path / "systems.yaml")
    two = ["style-cls", "chart-qa"]

    cold = run(capsys, "--config", str(config), "--store", store, "--tasks", "2")
    assert {s["status"] for s in cold["stages"]} == {"computed"}
    assert {s["stage"] for s in cold["stages"]} == {"base", "data", "prototypes", "cram", "fwd_prompt", "eval"}
    assert computed(cold) >= {(m, t, m) for m in SYSTEMS for t in two} | {("eval", t, m) for m in SYSTEMS for t in two}
    report = cold["report"]
    assert list(report["methods"]) == SYSTEMS
    for row in report["methods"].values():
        assert set(row) == {"matrix", "MFT", "MFN", "MAA", "BWT", "trainable_parameters", "bytes_per_task"}
        assert row["matrix"][0][1] is None and all(v is not None for v in row["matrix"][1])
    n_prompts, hidden = FwdPromptConfig().n_prompts, TINY["base"]["tiny"]["text_hidden"]
    assert report["methods"]["fwd_prompt"]["trainable_parameters"] == n_prompts * hidden
    assert report["methods"]["fwd_prompt"]["bytes_per_task"] == n_prompts * hidden * 4 // 2  # the prompts, float32
    cram = eval_scores(store, cold, "chart-qa", "cram")
    assert cram["parameters_per_task"] == [stored_parameters(store, cold, t) for t in two]
    assert report["methods"]["cram"]["trainable_parameters"] == sum(cram["parameters_per_task"])
    assert all(CramConfig().r_min <= r <= CramConfig().r_max for r in cram["ranks"]) and len(cram["ranks"]) == 2
    for entry in (s for s in cold["stages"] if s["stage"] in SYSTEMS):  # their loss curves: a row per step
        assert stored_losses(Store.open(store), entry)["step"] == list(range(1, TINY["finetune"]["steps"] + 1))

    cached = run(capsys, "--config", str(config), "--store", store, "--tasks", "2")
    assert cached["ray_started"] is False
    assert {s["status"] for s in cached["stages"]} == {"cached"}
    assert [s["key"] for s in cached["stages"]] == [s["key"] for s in cold["stages"]]
    assert cached["report"] == report

    grown = run(capsys, "--config", str(config), "--store", store)  # + icon-qa
    assert computed(grown) == {("data", "icon-qa", None), ("prototypes", "icon-qa", None)} | {
        (stage, "icon-qa", m) for m in SYSTEMS for stage in (m, "eval")}
    for method, row in grown["report"]["methods"].items():
        assert row["matrix"][:2] == [r[:2] + [None] for r in report["methods"][method]["matrix"]]
    assert len(eval_scores(store, grown, "icon-qa", "cram")["ranks"]) == 3

    three = ["style-cls", "chart-qa", "icon-qa"]
    lda = run(capsys, "--config", str(write_config(tmp_path / "lda.yaml", methods=[*SYSTEMS, "cram_lda"])), "--store", store)
    assert computed(lda) == {("eval", t, "cram_lda") for t in three}  # CRAM's experts serve it as they are
    assert lda["report"]["methods"]["cram_lda"]["trainable_parameters"] == grown["report"]["methods"]["cram"][
        "trainable_parameters"]

    retuned = run(capsys, "--config", str(write_config(tmp_path / "ortho.yaml", cram={"ortho_weight": 0.5})),
                  "--store", store)
    # every link's key holds the penalty weight, but the first expert has no old experts to be orthogonal to: it
    # retrains to the same bytes, so its eval is a cache hit by content (single-threaded CPU training is exact)
    assert computed(retuned) == {("cram", t, "cram") for t in three} | {("eval", t, "cram") for t in three[1:]}

    capsys.readouterr()
    assert main(["report", "--store", store, "--json", "--out", str(tmp_path / "report")]) == 0
    assert json.loads(capsys.readouterr().out) == retuned["report"]
    assert "trainable_parameters" in (tmp_path / "report" / "report.md").read_text()
