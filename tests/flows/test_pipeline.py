"""End to end (slow): the real flow on a real Prefect test harness and a real local Ray, on the tiny stream
of examples/tiny.yaml. Asserts on the `--json` stage list of `many run` (docs/design.md §2 caching contract):
cold → every stage computed; rerun → every stage cached and Ray never started; one more task → exactly that
task's stages, merges and eval row; a new τ → only the routed methods' evals; a new LPM γ → only the LPM
merges and their evals; export → the merged adapter
reloads with PEFT and reproduces the pipeline's predictions; the merge diagnostics of every step and their report;
the same flow against a moto S3 server."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flows.cli import main
from tests.flows.e2e import TINY, computed, run, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("harness")]


METHODS = ["many", "many_lpm_only", "many_r", "individual", "seqlora", "average", "task_arithmetic", "ties", "regmean"]
BASELINES = ["average", "task_arithmetic", "ties", "regmean"]


def new_task_stages(task: str) -> set[tuple[str, str | None, str | None]]:
    """What adding `task` to a stream (not its first task) must compute, and nothing else."""
    return (
        {("data", task, None), ("finetune", task, None), ("prototypes", task, None), ("stats", task, None),
         ("merge", task, "many"), ("merge_diagnostics", task, "many"), ("residual", task, "many_r"),
         ("seqlora", task, "seqlora")}
        | {(f"merge_{m}", task, m) for m in BASELINES}
        | {("eval", task, m) for m in METHODS}
    )


def test_cold_cached_incremental_tau_export_report(tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    config = write_config(tmp_path / "tiny.yaml")

    cold = run(capsys, "--config", str(config), "--store", store, "--tasks", "2")
    assert cold["ray_started"] is True
    assert {s["status"] for s in cold["stages"]} == {"computed"}
    assert {s["stage"] for s in cold["stages"]} >= {"base", "data", "finetune", "prototypes", "stats", "merge", "eval"}
    assert all(set(s) >= {"stage", "task", "key", "status", "seconds", "node"} for s in cold["stages"])
    report = cold["report"]
    assert report["tasks"] == ["style-cls", "chart-qa"] and report["task_metrics"] == ["exact_match", "exact_match"]
    assert set(report["methods"]) == set(METHODS)
    for row in report["methods"].values():
        assert row["matrix"][0][1] is None and all(v is not None for v in row["matrix"][1])
        assert set(row) == {"matrix", "MFT", "MFN", "MAA", "BWT", "trainable_parameters", "bytes_per_task"}
    sizes = {m: (row["trainable_parameters"], row["bytes_per_task"]) for m, row in report["methods"].items()}
    # every row built from the per-task fine-tunes trained the same parameters; SeqLoRA trained one set of them
    assert len({sizes[m][0] for m in METHODS if m != "seqlora"}) == 1
    assert sizes["seqlora"][0] * 2 == sizes["individual"][0]
    assert sizes["individual"][1] == 4 * sizes["individual"][0] // 2  # float32, per task
    # the merged LoRA of rank Σr holds as much as the tasks' own LoRAs; MAny adds every projector and a prototype
    assert sizes["individual"][1] < sizes["many"][1] < sizes["individual"][1] * 1.1
    assert sizes["many_lpm_only"][1] < sizes["many"][1]
    check_diagnostics(store, cold)

    cached = run(capsys, "--config", str(config), "--store", store, "--tasks", "2")
    assert cached["ray_started"] is False
    assert {s["status"] for s in cached["stages"]} == {"cached"}
    assert [s["key"] for s in cached["stages"]] == [s["key"] for s in cold["stages"]]
    assert cached["report"] == cold["report"]

    grown = run(capsys, "--config", str(config), "--store", store)  # all three tasks
    assert computed(grown) == new_task_stages("icon-qa")
    for method, row in grown["report"]["methods"].items():
        assert row["matrix"][:2] == [r[:2] + [None] for r in cold["report"]["methods"][method]["matrix"]]

    retuned = run(capsys, "--config", str(write_config(tmp_path / "tau.yaml", cpm={"tau": 0.05})), "--store", store)
    assert computed(retuned) == {("eval", task, m) for task in ["style-cls", "chart-qa", "icon-qa"] for m in ("many", "many_r")}

    reridged = run(capsys, "--config", str(write_config(tmp_path / "gamma.yaml", lpm={"gamma": 1e-3})), "--store", store)
    tasks = ["style-cls", "chart-qa", "icon-qa"]
    assert computed(reridged) == {(stage, t, "many") for t in tasks for stage in ("merge", "merge_diagnostics")} | {
        ("residual", t, "many_r") for t in tasks} | {("eval", t, m) for t in tasks for m in ("many", "many_lpm_only", "many_r")}
    check_diagnostics(store, reridged)

    capsys.readouterr()
    assert main(["report", "--store", store, "--json", "--out", str(tmp_path / "report")]) == 0
    assert json.loads(capsys.readouterr().out) == reridged["report"]
    assert all((tmp_path / "report" / name).stat().st_size > 0
               for name in ("report.html", "forgetting.png", "heatmap_many.png", "timeline.png", "diagnostics.png"))
    assert main(["ls", "--store", store]) == 0
    capsys.readouterr()
    assert main(["ls", "--json", "--store", store]) == 0  # every stage of the newest run, as that run names it
    listed = {(r["stage"], r["key"]): (r["task"], r["method"]) for r in json.loads(capsys.readouterr().out)}
    assert all(listed[s["stage"], s["key"]] == (s["task"], s["method"]) for s in reridged["stages"])
    assert main(["gc", "--store", store, "--dry-run"]) == 0

    out = tmp_path / "export"
    assert main(["export", "--store", store, "--out", str(out)]) == 0
    check_export(out, store, reridged)


def check_diagnostics(store_url: str, summary: dict) -> None:
    """merge_diagnostics[t] per task t: one finite e_i ≥ 0 per task ≤ t and a (t+1)×(t+1) leakage for every LoRA
    layer of the tasks' adapters; the report summarises the last step."""
    import math

    from many.adapters import lora_factors
    from tasks.store import Store

    store = Store.open(store_url)
    tasks = summary["tasks"]
    by_stage = {(s["stage"], s["task"]): s for s in summary["stages"]}
    for t, task in enumerate(tasks):
        assert by_stage["merge_diagnostics", task]["method"] == "many"
        manifest = store.read_manifest("finetune", by_stage["finetune", task]["key"])
        layers = set(lora_factors(store.materialize(manifest.outputs["task"], context="test") / "adapter"))
        manifest = store.read_manifest("merge_diagnostics", by_stage["merge_diagnostics", task]["key"])
        stored = json.loads(store.get_bytes(manifest.outputs["diagnostics"].digest, context="test"))
        assert stored["tasks"] == t + 1
        groups = stored["groups"].values()
        assert sorted(layer for group in groups for layer in group["layers"]) == sorted(layers)
        for group in groups:
            for layer in group["layers"]:
                errors, leakage = group["fit_error"][layer], group["leakage"][layer]
                assert len(errors) == t + 1 and all(math.isfinite(e) and e >= 0.0 for e in errors), (layer, errors)
                assert [len(row) for row in leakage] == [t + 1] * (t + 1)
                assert all(math.isfinite(v) and v >= 0.0 for row in leakage for v in row)
    diagnostics = summary["report"]["diagnostics"]
    assert diagnostics["after"] == tasks[-1] and diagnostics["tasks"] == tasks
    assert set(diagnostics["fit_error"]["layers"]) == layers
    assert math.isfinite(diagnostics["fit_error"]["mean"]) and len(diagnostics["fit_error"]["worst"]) == 5
    assert math.isfinite(diagnostics["leakage"]["mean"])


def check_export(out: Path, store_url: str, summary: dict) -> None:
    """The exported merged adapter + averaged projector on the exported base reproduce many_lpm_only's predictions."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from many.config import BaseConfig, EvalConfig
    from many.data import MiniUcitConfig, make_task
    from many.evaluate import generate_answers
    from many.model.load import load_base
    from many.model.parts import projector_of
    from tasks.store import Store

    tasks = summary["tasks"]
    for task in tasks:
        assert (out / "tasks" / task / "adapter" / "adapter_config.json").is_file()
        assert (out / "tasks" / task / "projector.safetensors").is_file()
        assert (out / "tasks" / task / "gram.safetensors").is_file()
        assert (out / "tasks" / task / "answer_gram.safetensors").is_file()
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert merge["method"] == "many" and merge["tasks"] == tasks and merge["a"] == 1.0
    assert merge["answer_weight"] == dict.fromkeys(tasks, 1.0)  # G_all + λ·G_answer, λ = 1 by default
    assert merge["tau"] is not None and all(g > 0 for g in merge["gamma"].values())
    assert pq.read_table(out / "prototypes.parquet").num_rows == sum(40 + 1 for _ in tasks)
    adapter_config = json.loads((out / "merged" / "adapter" / "adapter_config.json").read_text())
    export = merge["export"]  # merge[t]'s export.json per module: the state's form, Σr, the exported rank, its error
    assert set(export) == set(merge["gamma"])
    assert all(e["rank"] == 8 * len(tasks) and e["error"] == 0.0 for e in export.values())
    # the tiny model (hidden 32, MLP 64) is dense everywhere by t = 3: M against an identity (rank 32), the MLP
    # layers' switch step exported from their thin factors (rank Σr = 24); PEFT's r is the most common rank
    assert {e["form"] for e in export.values()} == {"dense"}
    assert adapter_config["r"] == Counter(e["exported_rank"] for e in export.values()).most_common(1)[0][0]

    base, processor = load_base(out / "base", BaseConfig(device="cpu"))
    model = PeftModel.from_pretrained(base, str(out / "merged" / "adapter")).merge_and_unload()
    projectors = load_file(str(out / "merged" / "projectors.safetensors"))
    keys = {k.split(".", 1)[1] for k in projectors}
    average = {k: torch.stack([projectors[f"{t}.{k}"] for t in tasks]).double().mean(0).float() for k in keys}
    projector_of(model).load_state_dict(average)

    store = Store.open(store_url)
    entry = next(s for s in summary["stages"] if (s["stage"], s["task"], s["method"]) == ("eval", tasks[-1], "many_lpm_only"))
    manifest = store.read_manifest("eval", entry["key"])
    expected = pq.read_table(store.materialize(manifest.outputs["predictions"], context="test")).to_pylist()
    data = MiniUcitConfig(**TINY["data"]["mini_ucit"])
    for task in tasks:
        samples = make_task(task, data).test
        answers = generate_answers(model, processor, samples, EvalConfig(**TINY["eval"]))
        assert answers == [r["prediction"] for r in expected if r["task"] == task]


def test_same_flow_against_s3(tmp_path: Path, capsys, monkeypatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="many-e2e")
        config = write_config(tmp_path / "s3.yaml", methods=["many", "many_cpm_only", "individual"],
                              tasks=["style-cls", "chart-qa"])
        cold = run(capsys, "--config", str(config), "--store", "s3://many-e2e/run")
        assert {s["status"] for s in cold["stages"]} == {"computed"}
        again = run(capsys, "--config", str(config), "--store", "s3://many-e2e/run")
        assert {s["status"] for s in again["stages"]} == {"cached"} and again["ray_started"] is False
        assert again["report"] == cold["report"]
    finally:
        server.stop()


def test_gpu_stage_on_a_joined_cpu_cluster_fails_fast_with_exit_1(tmp_path: Path, capsys) -> None:
    """On a joined cluster (`ray.address`) nodes may still come, so preflight leaves GPUs to the per-stage check:
    a runtime failure (exit 1) at the first GPU stage, not a wait forever. (A local cluster: tests/reliability.)"""
    import ray

    config = write_config(tmp_path / "gpu.yaml", tasks=["style-cls"], methods=["individual"],
                          resources={"finetune": {"num_gpus": 1}}, ray={"address": "auto"})
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)  # the cluster "auto" joins: used as it is
    try:
        capsys.readouterr()
        assert main(["run", "--config", str(config), "--store", str(tmp_path / "store")]) == 1
    finally:
        ray.shutdown()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("many: failed (ClusterError): stage finetune asks for 1 GPU(s) but the Ray cluster has 0; "
                    "set resources.finetune.num_gpus: 0 to run it on CPU")
    assert not list((tmp_path / "store" / "stages").glob("finetune/*.json"))

def test_a_task_adapter_trained_elsewhere_replaces_its_finetune_with_the_same_results(tmp_path: Path, capsys) -> None:
    """`tasks[i].adapter`: a task directory fine-tuned elsewhere (here: by a first run, then copied out of its
    store) enters a fresh store through the adapter stage instead of a finetune, and gives the same report."""
    from tasks.store import Store

    trained = run(capsys, "--config", str(write_config(tmp_path / "a.yaml", tasks=["style-cls"], methods=["individual"])),
                  "--store", str(tmp_path / "a"))
    store = Store.open(str(tmp_path / "a"), cache_dir=tmp_path / "cache")
    finetune = next(s for s in trained["stages"] if s["stage"] == "finetune")
    task_dir = store.materialize(store.read_manifest("finetune", finetune["key"]).outputs["task"], context="test")

    tasks = [{"name": "style-cls", "kind": "style-cls", "adapter": str(task_dir)}]
    config = write_config(tmp_path / "b.yaml", tasks=tasks, methods=["individual"])
    given = run(capsys, "--config", str(config), "--store", str(tmp_path / "b"))
    stages = {s["stage"]: s["status"] for s in given["stages"]}
    assert "finetune" not in stages and stages["adapter"] == "computed", stages
    assert given["report"] == trained["report"]
    again = run(capsys, "--config", str(config), "--store", str(tmp_path / "b"))
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert main(["export", "--store", str(tmp_path / "b"), "--out", str(tmp_path / "export")]) == 0
    exported = tmp_path / "export" / "tasks" / "style-cls"
    assert (exported / "adapter" / "adapter_model.safetensors").read_bytes() == (
        task_dir / "adapter" / "adapter_model.safetensors").read_bytes()
