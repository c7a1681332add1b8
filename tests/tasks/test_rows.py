"""The registry of method rows (tasks.rows): what each row declares, the eval stage's input contract, config
choices taken from the registry, no method name outside it — and (slow) a toy row registered from outside the
package running through the whole pipeline."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from flows.config import ConfigError, parse_config
from many.config import FinetuneConfig
from many.inference import Recipe
from many.methods.cram import CramConfig
from many.methods.fwd_prompt import FwdPromptConfig
from tasks.cache import cache_key
from tasks.catalog import stage_def
from tasks.rows import BUILT_IN, DEFAULT_METHODS, ROWS, chains, get_row
from tasks.rows.cram import CramStageConfig
from tasks.rows.fwd_prompt import FwdPromptStageConfig
from tasks.rows.row import EvalInputs, PerTask, Reuse
from tasks.store import BlobRef
from tests.tasks import toy_row

ROOT = Path(__file__).resolve().parents[2]


def test_every_built_in_module_declares_one_row_under_its_own_name() -> None:
    assert [f"tasks.rows.{name}" for name in ROWS] == list(BUILT_IN)
    for module in BUILT_IN:
        assert importlib.import_module(module).ROW is ROWS[module.rsplit(".", 1)[1]]


def test_rows_sharing_a_chain_share_one_object_and_every_chain_is_a_stage() -> None:
    assert ROWS["many"].chain is ROWS["many_lpm_only"].chain
    assert ROWS["many_cpm_only"].chain is ROWS["average"].chain
    assert set(chains()) == {chain.stage for row in ROWS.values() for chain in (row.chain, *row.extras) if chain}
    for name, chain in chains().items():
        definition = stage_def(name, {"base": None})
        assert (definition.version, definition.outputs) == (chain.version, chain.outputs)
        assert chain.read in chain.outputs


def test_the_lpm_rows_declare_the_diagnostics_chain_which_follows_the_merge() -> None:
    from tasks.rows.many import DIAGNOSTICS_CHAIN, LPM_CHAIN

    for name in ("many", "many_lpm_only"):
        assert ROWS[name].extras == (DIAGNOSTICS_CHAIN,)
        assert ROWS[name].chains() == (LPM_CHAIN, DIAGNOSTICS_CHAIN)  # the followed chain first
        assert ROWS[name].chains(parse_config({})) == (LPM_CHAIN, DIAGNOSTICS_CHAIN)
        assert ROWS[name].chains(parse_config({"lpm": {"diagnostics": False}})) == (LPM_CHAIN,)
    assert DIAGNOSTICS_CHAIN.follows is LPM_CHAIN and DIAGNOSTICS_CHAIN.group == "merge"
    assert chains()["merge_diagnostics"] is DIAGNOSTICS_CHAIN
    assert all(row.extras == () for name, row in ROWS.items() if name not in ("many", "many_lpm_only"))


def test_an_extra_that_follows_a_chain_is_submitted_after_it_even_if_listed_alone() -> None:
    from dataclasses import replace

    from tasks.rows.many import DIAGNOSTICS_CHAIN, LPM_CHAIN

    row = replace(toy_row.ROW, extras=(DIAGNOSTICS_CHAIN,))
    assert row.chain is None and row.chains() == (LPM_CHAIN, DIAGNOSTICS_CHAIN)
    assert row.needs == {"finetune", "stats"}
    assert row.chains(parse_config({"lpm": {"diagnostics": False}})) == ()


def test_two_chains_of_one_stage_name_are_an_error(monkeypatch) -> None:
    from dataclasses import replace

    from tasks.rows.many import LPM_CHAIN

    impostor = replace(toy_row.ROW, chain=replace(LPM_CHAIN, version="99"))
    monkeypatch.setitem(ROWS, "base_only", impostor)
    with pytest.raises(ValueError, match="two chains are named 'merge' \\(again in method row 'base_only'\\)"):
        chains()


def test_diagnostics_link_t_reads_merge_t_and_every_task_up_to_t() -> None:
    links, _ = _links("many", 3, extra="merge_diagnostics")
    stage, t, upstream = links[2]
    assert (stage, t) == ("merge_diagnostics", 2)
    assert upstream["merge"] == (("merge", 2, _links("many", 3)[0][2][2]), "adapter")
    assert sorted(upstream) == ["finetune_0", "finetune_1", "finetune_2", "merge", "stats_0", "stats_1", "stats_2"]
    assert upstream["stats_1"] == ("st1", "grams") and upstream["finetune_2"] == ("ft2", "task")
    definition = stage_def("merge_diagnostics", upstream)
    assert definition.outputs == ("diagnostics",) and definition.version == chains()["merge_diagnostics"].version


def test_the_diagnostics_switch_is_not_in_the_merge_key() -> None:
    """lpm.diagnostics decides whether a stage runs, not what the merge computes: merge keys stay as they were."""
    from many.config import LPMConfig
    from tasks.cache import config_json

    merge = stage_def("merge", {"finetune": REF, "grams": REF})
    on, off = parse_config({}), parse_config({"lpm": {"diagnostics": False}})
    assert on.lpm.diagnostics is True and off.lpm.diagnostics is False
    assert config_json(merge, off.lpm) == config_json(merge, on.lpm) == {
        "a": 1.0, "gamma": 1e-4, "gamma_mode": "relative", "rank": None, "state_dtype": "float64",
        "answer": {"weight": 1.0, "tasks": {}}}  # state_form "auto": unkeyed
    inputs = {"finetune": REF, "grams": REF}
    assert cache_key(merge, off.lpm, inputs) == cache_key(merge, LPMConfig(), inputs)
    # a forced state form is keyed (it changes what is stored), the default "auto" is not (merge version 4 marks it)
    assert cache_key(merge, LPMConfig(state_form="thin"), inputs) != cache_key(merge, LPMConfig(), inputs)


def test_needs_include_the_chains_inputs() -> None:
    assert ROWS["regmean"].needs == {"finetune", "stats"} and ROWS["regmean"].reads == {"finetune"}
    assert ROWS["many"].needs == {"finetune", "prototypes", "stats"}
    assert ROWS["fwd_prompt"].needs == set() and ROWS["cram"].needs == {"prototypes"}
    assert ROWS["seqlora"].needs == {"finetune"}  # its first link is finetune[0]


def _links(row_name: str, T: int, extra: str | None = None) -> list:
    """Submit a row's chains as the flow does, with strings for handles; the links of its own chain, or of the
    chain named `extra`."""
    shared = PerTask("base", [f"data{t}" for t in range(T)], [f"ft{t}" for t in range(T)], [f"pr{t}" for t in range(T)],
                     [f"st{t}" for t in range(T)])
    submitted: dict[str, list] = {}
    for chain in ROWS[row_name].chains():
        links = submitted[chain.stage] = []
        for t in range(T):
            upstream = chain.upstream(t, shared, links, submitted)
            links.append(upstream.handle if isinstance(upstream, Reuse) else (chain.stage, t, upstream))
    return submitted[extra or ROWS[row_name].chain.stage], shared


def test_chain_links_read_their_earlier_links() -> None:
    links, _ = _links("seqlora", 3)
    assert links[0] == "ft0"  # reused, not computed again
    assert links[2][2]["previous"] == (links[1], "task")
    links, _ = _links("cram", 3)
    assert sorted(links[2][2]) == ["base", "data", "expert_0", "expert_1"]
    links, _ = _links("regmean", 2)
    assert sorted(links[1][2]) == ["finetune_0", "finetune_1", "stats_0", "stats_1"]


REF, OTHER = BlobRef(digest="a" * 64, size=1), BlobRef(digest="b" * 64, size=1)


def test_a_chain_link_is_keyed_by_its_config_and_every_earlier_link() -> None:
    inputs = {"base": REF, "data": REF, "expert_0": REF, "expert_1": REF}
    cram = stage_def("cram", inputs)
    assert cram.inputs == ("base", "data", "expert_0", "expert_1") and cram.outputs == ("expert", "losses")
    config = CramStageConfig(cram=CramConfig(finetune=FinetuneConfig(steps=30)))
    key = cache_key(cram, config, inputs)
    assert key != cache_key(cram, config, {**inputs, "expert_0": OTHER})
    assert key != cache_key(cram, CramStageConfig(cram=CramConfig(ortho_weight=0.5)), inputs)
    chained = {"base": REF, "data": REF, "previous": REF}
    fwd = stage_def("fwd_prompt", chained)
    assert fwd.outputs == ("state", "losses")
    first = cache_key(fwd, FwdPromptStageConfig(fwd_prompt=FwdPromptConfig()), chained)
    assert first != cache_key(fwd, FwdPromptStageConfig(fwd_prompt=FwdPromptConfig(lr=0.5)), chained)
    assert first != cache_key(fwd, FwdPromptStageConfig(fwd_prompt=FwdPromptConfig()), {**chained, "previous": OTHER})


@pytest.mark.parametrize("name", list(ROWS))
def test_eval_inputs_round_trip_through_their_names(name: str) -> None:
    """What the flow names eval[t]'s inputs is exactly what the row reads back (EvalInputs.parse)."""
    row, T, t = ROWS[name], 3, 1
    links, shared = _links(name, T) if row.chain else (None, _links("many", T)[1])
    upstream = row.eval_upstream(t, shared, {row.chain.stage: links} if row.chain else {})
    local = {input_name: Path(f"/{input_name}") for input_name in upstream}
    parsed = EvalInputs.parse(local)
    assert parsed.base == Path("/base") and len(parsed.data) == t + 1
    for kind in ("finetune", "prototypes", "stats"):
        assert len(getattr(parsed, kind)) == (t + 1 if kind in row.reads else 0), kind
    expected = 0 if row.chain is None else (t + 1 if row.chain_links == "all" else 1)
    assert len(parsed.chain) == expected
    if row.chain is not None:
        handle, output = upstream["chain" if row.chain_links == "last" else f"chain_{t}"]
        assert handle == links[t] and output == row.chain.read
    config = parse_config({})
    routing = (row.routing(config) if row.routing else config.cpm) if row.routed else None
    assert row.eval_config(config).cpm == routing


def test_routing_defaults_to_the_gaussian_and_the_cosine_rows_key_evals_as_a_cosine_store_did() -> None:
    config = parse_config({"cpm": {"top_k": 2}})
    cos, many = ROWS["many_cos"].eval_config(config).cpm, ROWS["many"].eval_config(config).cpm
    assert (cos.metric, cos.top_k, many.metric) == ("cosine", 2, "mahalanobis")
    assert "metric" not in cos.model_dump() and many.model_dump()["metric"] == "mahalanobis"
    cosine = parse_config({"cpm": {"metric": "cosine"}})
    assert ROWS["many"].eval_config(cosine).cpm == ROWS["many_cos"].eval_config(cosine).cpm


def test_a_stored_config_reads_back_as_the_config_that_was_keyed() -> None:
    """A manifest's config JSON leaves out what UNKEYED names (the cosine metric): `from_keyed` reads it back as the
    config that wrote it (a recompute of a collected link must run what was keyed), `model_validate` would not."""
    from tasks.rows.row import EvalStageConfig

    stored = ROWS["many_cos"].eval_config(parse_config({})).model_dump(mode="json")
    assert "metric" not in stored["cpm"]
    assert EvalStageConfig.from_keyed(stored).cpm.metric == "cosine"
    assert EvalStageConfig.model_validate(stored).cpm.metric == "mahalanobis"  # the default: not what was keyed
    gaussian = ROWS["many"].eval_config(parse_config({}))
    assert EvalStageConfig.from_keyed(gaussian.model_dump(mode="json")) == gaussian


def test_each_merge_link_weighs_its_tasks_answer_grams_and_many_all_reads_none() -> None:
    """G_t = G_all,t + λ_t·G_answer,t: merge[t] reads stats[t]'s two Grams, keyed by its own task's λ (a change of
    another task's λ leaves its key alone); many_all's chain is the same merge at λ = 0 on the all-token Grams."""
    from tasks.rows.many import LPM_CHAIN
    from tasks.rows.many_all import ALL_TOKENS_CHAIN

    links, _ = _links("many", 2)
    assert links[1][2]["grams"] == ("st1", "grams") and links[1][2]["answer_grams"] == ("st1", "answer_grams")
    assert sorted(_links("many_all", 2)[0][1][2]) == ["finetune", "grams", "previous"]
    config = parse_config({"lpm": {"answer": {"weight": 0.5, "tasks": {"style-cls": 2.0}}}})
    assert LPM_CHAIN.config(config, "style-cls").answer.model_dump() == {"weight": 2.0, "tasks": {}}
    assert LPM_CHAIN.config(config, "chart-qa").answer.model_dump() == {"weight": 0.5, "tasks": {}}
    other = parse_config({"lpm": {"answer": {"weight": 0.5, "tasks": {"style-cls": 3.0}}}})
    assert LPM_CHAIN.config(other, "chart-qa") == LPM_CHAIN.config(config, "chart-qa")
    assert ALL_TOKENS_CHAIN.config(config, "style-cls").answer.weight == 0.0
    assert ALL_TOKENS_CHAIN.compute is LPM_CHAIN.compute and ALL_TOKENS_CHAIN.stage != LPM_CHAIN.stage
    assert parse_config({}).lpm.answer.weight == 1.0  # the default merge is answer-weighted
    with pytest.raises(ConfigError, match="lpm.answer.tasks names 'style-cl', not a task of the stream"):
        parse_config({"lpm": {"answer": {"tasks": {"style-cl": 2.0}}}})


def test_many_r_cos_is_many_r_on_the_same_chain_routed_by_the_cosine() -> None:
    config = parse_config({})
    r, r_cos = ROWS["many_r"], ROWS["many_r_cos"]
    assert r_cos.chain is r.chain and r_cos.evaluate is r.evaluate
    assert (r.eval_config(config).cpm.metric, r_cos.eval_config(config).cpm.metric) == ("mahalanobis", "cosine")


def test_cram_lda_is_crams_experts_routed_by_the_gaussian_even_where_the_run_routes_by_the_cosine() -> None:
    config = parse_config({"cpm": {"metric": "cosine"}})
    cram, cram_lda = ROWS["cram"], ROWS["cram_lda"]
    assert cram_lda.chain is cram.chain and cram_lda.evaluate is cram.evaluate
    assert cram.eval_config(config).cpm is None  # CRAM's own cosine routing: its evals keep their keys
    assert cram_lda.eval_config(config).cpm.metric == "mahalanobis"


def test_the_default_methods_are_many_its_residual_form_and_the_baselines() -> None:
    assert DEFAULT_METHODS == ("many", "many_lpm_only", "many_r", "individual", "seqlora", "average",
                               "task_arithmetic", "ties", "regmean")


def test_each_row_declares_the_recipe_its_model_is_served_by() -> None:
    from flows.export import served_methods

    recipes = {name: row.recipe and (row.recipe.update, row.recipe.projector) for name, row in ROWS.items()}
    assert recipes == {"many": ("merged", "cpm"), "many_lpm_only": ("merged", "average"),
                       "many_cpm_only": ("merged", "cpm"), "individual": ("task", "own"), "seqlora": ("merged", "own"),
                       "average": ("merged", "average"), "task_arithmetic": ("merged", "average"),
                       "ties": ("merged", "average"), "regmean": ("merged", "average"), "cram": None, "cram_lda": None,
                       "fwd_prompt": None, "many_r": ("routed", "cpm"), "many_r_cos": ("routed", "cpm"),
                       "many_all": ("merged", "cpm"),
                       "many_cos": ("merged", "cpm"),
                       "many_xl": ("merged", "cpm")}
    # an export holds the tasks' own parts, the LPM chain's last link if the run merged, prototypes if it made them
    assert list(served_methods(merged=True, routed=True)) == ["many", "many_lpm_only", "many_r", "individual"]
    assert list(served_methods(merged=True, routed=False)) == ["many_lpm_only", "individual"]
    assert list(served_methods(merged=False, routed=True)) == ["many_r", "individual"]
    # MAny-R is served exactly (each task's own adapter, routed), so not for a run that scored it truncated
    assert list(served_methods(merged=True, routed=True, truncated=True)) == ["many", "many_lpm_only", "individual"]
    assert served_methods(merged=True, routed=True)["many"] is ROWS["many"].recipe


def test_config_choices_come_from_the_registry(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"methods.0: unknown method 'base_only'; known: many, "):
        parse_config({"methods": ["base_only"]}, "run.yaml")
    monkeypatch.setitem(ROWS, "base_only", toy_row.ROW)
    assert parse_config({"methods": ["base_only", "many"]}).methods == ("base_only", "many")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_row("nope")


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_no_method_name_in_flows_or_tasks_outside_the_registry() -> None:
    # "many" is also the tool's name (the CLI's prog, the deployment name), so it is the one row not checked here.
    names = set(ROWS) - {"many"}
    files = [p for d in ("flows", "tasks") for p in (ROOT / d).rglob("*.py") if "rows" not in p.relative_to(ROOT).parts]
    assert len(files) > 10
    found = {str(p.relative_to(ROOT)): sorted(_string_constants(p) & names) for p in files}
    assert {f: n for f, n in found.items() if n} == {}


def test_the_name_scan_finds_a_method_name(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text('METHOD = "seqlora"\n')
    assert _string_constants(planted) & set(ROWS) == {"seqlora"}


@pytest.mark.slow
@pytest.mark.usefixtures("harness")
def test_a_toy_row_from_outside_the_package_runs_through_the_pipeline(tmp_path: Path, capsys, monkeypatch) -> None:
    """base_only reads no per-task stage, has no chain: the run computes base, data and its evals only, and its row
    of the report is the base model's own score on every task, recomputed here without the pipeline."""
    import pyarrow.parquet as pq

    from many.config import EvalConfig
    from many.data import read_task
    from many.evaluate import evaluate
    from tasks.runtime import StoreSpec
    from tasks.stages import load_base
    from tests.flows.e2e import TINY, run, write_config

    monkeypatch.setenv("MANY_ROWS", "tests.tasks.toy_row")  # the Ray workers load it from here
    monkeypatch.setitem(ROWS, "base_only", toy_row.ROW)  # and this process
    store = tmp_path / "store"
    summary = run(capsys, "--config", str(write_config(tmp_path / "tiny.yaml", methods=["base_only"])), "--store",
                  str(store), "--tasks", "2")
    assert {(s["stage"], s["method"]) for s in summary["stages"]} == {("base", None), ("data", None),
                                                                        ("eval", "base_only")}
    matrix = summary["report"]["methods"]["base_only"]["matrix"]

    opened = StoreSpec(str(store)).open()
    by_stage = {(s["stage"], s["task"]): s["key"] for s in summary["stages"]}
    local = {k: opened.materialize(opened.read_manifest(k[0], key).outputs["model" if k[0] == "base" else "task"],
                                   context="test") for k, key in by_stage.items() if k[0] != "eval"}
    model, processor = load_base(local[("base", None)], "float32", "cpu")
    eval_config = EvalConfig(**TINY["eval"])
    results = [evaluate(model, processor, read_task(local[("data", name)]), eval_config) for name in summary["tasks"]]
    assert matrix[-1] == pytest.approx([r.score for r in results], abs=1e-9)
    last_eval = opened.read_manifest("eval", by_stage[("eval", summary["tasks"][-1])])
    predictions = pq.read_table(opened.materialize(last_eval.outputs["predictions"], context="test")).to_pylist()
    assert [(p["sample_id"], p["prediction"]) for p in predictions] == [
        (sample_id, prediction) for r in results for sample_id, prediction, _ in r.predictions]


def test_many_r_residual_link_t_reads_merge_t_and_every_task_adapter_up_to_t() -> None:
    from tasks.rows.many import LPM_CHAIN
    from tasks.rows.many_r import RESIDUAL_CHAIN

    row = ROWS["many_r"]
    assert row.default and row.routed and row.recipe == Recipe("routed", "cpm")
    assert row.chains() == (LPM_CHAIN, RESIDUAL_CHAIN) and RESIDUAL_CHAIN.follows is LPM_CHAIN
    assert row.needs == {"finetune", "prototypes", "stats"}
    links, _ = _links("many_r", 3)
    stage, t, upstream = links[2]
    assert (stage, t) == ("residual", 2)
    assert upstream["merge"] == (("merge", 2, _links("many", 3)[0][2][2]), "adapter")
    assert sorted(upstream) == ["finetune_0", "finetune_1", "finetune_2", "merge"]
    key = stage_def("residual", upstream)
    config = parse_config({"many_r": {"rank": 4}})
    inputs = {name: REF for name in upstream}
    assert cache_key(key, RESIDUAL_CHAIN.config(config, "t2"), inputs) != cache_key(
        key, RESIDUAL_CHAIN.config(parse_config({}), "t2"), inputs)


def test_stored_counts_the_tensors_of_safetensors_files_and_directories(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tasks.rows import parts

    (tmp_path / "task" / "adapter").mkdir(parents=True)
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float64)}, str(tmp_path / "task" / "adapter" / "w.safetensors"))
    save_file({"p": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "task" / "projector.safetensors"))
    (tmp_path / "task" / "notes.json").write_text("{}")  # not a tensor file: not counted
    assert parts.stored(tmp_path / "task" / "projector.safetensors") == (5, 10)
    assert parts.stored(tmp_path / "task") == (12 + 2 + 5, 48 + 16 + 10)
    assert parts.footprint(19, 74, 2) == {"trainable_parameters": 19, "bytes_per_task": 37}
