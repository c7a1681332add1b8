"""MAny-R as a method row of the pipeline (tasks/rows/many_r.py; many.residual): opt-in, its `residual` chain follows
the LPM merge, `many_r.rank` keys only that chain and its evals. Slow: the tiny stream of examples/tiny.yaml — with
k = r (the default) each task keeps its own factors (exact, the merge cancels), and with top-1 routing each test image is answered
by the model of the task it is routed to, exactly that task's own adapter and projector: on images routed to their
own task MAny-R answers as `individual` does. k < r truncates ΔW_i − M_t instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import DEFAULT_METHODS, parse_config
from tests.flows.e2e import computed, run, write_config
from tests.flows.test_methods import eval_scores

METHODS = ["many", "many_r", "individual"]


def test_many_r_is_a_default_row_with_its_own_rank() -> None:
    assert "many_r" in DEFAULT_METHODS
    assert parse_config({}).many_r.rank is None  # each task's own rank: exact, as many bytes per task as its own LoRA
    assert parse_config({"methods": ["many_r"], "many_r": {"rank": 3}}).many_r.rank == 3


def _output(store_url: str, summary: dict, stage: str, task: str | None, output: str, method: str | None = None) -> Path:
    from tasks.store import Store

    store = Store.open(store_url)
    entry = next(s for s in summary["stages"] if (s["stage"], s["task"]) == (stage, task)
                 and (method is None or s["method"] == method))
    return store.materialize(store.read_manifest(stage, entry["key"]).outputs[output], context="test")


def _predictions(store_url: str, summary: dict, task: str, method: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(_output(store_url, summary, "eval", task, "predictions", method)).to_pylist()
    return {r["sample_id"]: r["prediction"] for r in table}


def _routed_to(store_url: str, summary: dict, tasks: list[str]) -> dict[str, int]:
    """The task (index) top-1 CPM routing sends each test image of `tasks` to: argmax_i cos(f(x), μ_i)."""
    from many.config import BaseConfig
    from many.cpm import routing_weights
    from many.data import read_task
    from many.model.load import load_base
    from many.prototypes import image_features, read_prototypes

    base, processor = load_base(_output(store_url, summary, "base", None, "model"), BaseConfig(device="cpu"))
    _, prototypes, _ = read_prototypes([_output(store_url, summary, "prototypes", t, "prototypes") for t in tasks])
    routed = {}
    for t in tasks:
        test = read_task(_output(store_url, summary, "data", t, "task")).test
        choice = routing_weights(image_features(base, processor, test), prototypes, tau=1.0).argmax(dim=1)
        routed |= {sample.sample_id: int(i) for sample, i in zip(test, choice, strict=True)}
    return routed


@pytest.mark.slow
def test_exact_residuals_with_top1_routing_answer_as_the_routed_tasks_own_model(harness, tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    two = ["style-cls", "chart-qa"]
    exact = write_config(tmp_path / "exact.yaml", methods=METHODS, cpm={"top_k": 1})  # many_r.rank unset: k = r
    cold = run(capsys, "--config", str(exact), "--store", store, "--tasks", "2")
    assert {(s["stage"], s["task"]) for s in cold["stages"] if s["method"] == "many_r"} == {
        ("residual", t) for t in two} | {("eval", t) for t in two}
    scores = eval_scores(store, cold, "chart-qa", "many_r")
    assert (scores["residual_form"], scores["residual_error"]) == ("own", 0.0)  # k = r: the tasks' own factors
    # per task a file of 8 × (out + in) float32 per LoRA layer, plus a header: the bytes of its own LoRA
    assert scores["residual_bytes_per_task"] > 8 * 4 * (32 + 32)
    own, answers = _predictions(store, cold, "chart-qa", "individual"), _predictions(store, cold, "chart-qa", "many_r")
    routed_to = _routed_to(store, cold, two)
    home = [k for k in own if routed_to[k] == two.index(k.split("/")[0])]  # images routed to their own task
    assert len(home) >= len(own) // 4, "too few images routed home for the check to mean anything"
    assert [answers[k] for k in home] == [own[k] for k in home]

    rerouted = write_config(tmp_path / "cos.yaml", methods=[*METHODS, "many_r_cos"], cpm={"top_k": 1})
    cos = run(capsys, "--config", str(rerouted), "--store", store, "--tasks", "2")
    assert computed(cos) == {("eval", t, "many_r_cos") for t in two}  # MAny-R's residual stages serve it as they are
    assert eval_scores(store, cos, "chart-qa", "many_r_cos")["residual_form"] == "own"

    truncated = write_config(tmp_path / "k1.yaml", methods=METHODS, many_r={"rank": 1}, cpm={"top_k": 1})
    retuned = run(capsys, "--config", str(truncated), "--store", store, "--tasks", "2")
    assert computed(retuned) == {(stage, t, "many_r") for t in two for stage in ("residual", "eval")}
    truncated_scores = eval_scores(store, retuned, "chart-qa", "many_r")
    assert truncated_scores["residual_form"] == "residual" and 0 < truncated_scores["residual_error"] < 1
