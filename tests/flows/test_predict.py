"""`many predict`, `many.load` and the export's model card (docs/design.md §5.3, §5.5).

Fast: the command line's bad inputs (one line, exit 2) before any model loads. Slow: one tiny pipeline run per
module (3 tasks; more pretraining and fine-tuning than examples/tiny.yaml, so that MAny's answers are not all
empty) and its export; the model asked through `many.load`, the store and the CLI answers every test image as the
run's eval stage predicted it; the model card; PEFT's AutoPeftModel loads the merged adapter by itself."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import main
from tests.flows.e2e import TINY, write_config

TASKS = ["style-cls", "chart-qa", "icon-qa"]
METHODS = ["many", "many_lpm_only", "many_r", "many_r_cos", "individual", "average"]  # SeqLoRA's chain would double the fine-tuning
PER_TASK = 4  # test images asked per task


def test_predict_without_a_question_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    assert "give a QUESTION, or --interactive" in capsys.readouterr().err


@pytest.mark.parametrize(("case", "argv", "message"), [
    ("missing_image", ["predict", "{missing}", "q", "--export", "{dir}"], "image {missing}: no such file"),
    ("not_an_image", ["predict", "{text}", "q", "--export", "{dir}"], "not a readable image"),
    ("missing_export", ["predict", "{png}", "q", "--export", "{missing}"], "export {missing}: no such directory"),
    ("not_an_export", ["predict", "{png}", "q", "--export", "{dir}"], "no base/ in it"),
    ("unknown_method", ["predict", "{png}", "q", "--method", "magic", "--export", "{dir}"], "unknown method 'magic'"),
    ("cram_is_not_served", ["predict", "{png}", "q", "--method", "cram", "--store", "{dir}"],
     "method 'cram' builds its model its own way"),
    ("individual_needs_a_task", ["predict", "{png}", "q", "--method", "individual", "--export", "{dir}"], "give the task"),
    ("not_in_an_export", ["predict", "{png}", "q", "--method", "seqlora", "--export", "{export}"],
     "method 'seqlora' is not in export {export} (it serves many, individual)"),
    ("no_store", ["predict", "{png}", "q", "--store", "{missing}"], "no store at {missing}"),
    ("store_without_run", ["predict", "{png}", "q", "--store", "{dir}"], "no run in store"),
    ("both_sources", ["predict", "{png}", "q", "--store", "{dir}", "--export", "{dir}"], "not both"),
])
def test_bad_predict_input_is_one_line_and_exit_2(case: str, argv: list[str], message: str, tmp_path: Path,
                                                  capsys) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("not an image")
    export = tmp_path / "export"  # an export's inference.json names the methods it serves (flows/export.py)
    (export / "base").mkdir(parents=True)
    (export / "inference.json").write_text(json.dumps({"tasks": ["a"], "methods": {
        "many": {"update": "merged", "projector": "cpm"}, "individual": {"update": "task", "projector": "own"}}}))
    names = {"missing": tmp_path / "missing", "dir": tmp_path, "png": tmp_path / "a.png", "text": tmp_path / "a.txt",
             "export": export}
    code = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert message.format(**names) in err, err
    assert not (tmp_path / "missing").exists()  # a missing store is not created by asking it


@dataclass(frozen=True)
class Pipeline:
    store: str
    export: Path
    summary: dict
    images: dict[str, list[tuple[Path, str, str]]]  # task → (PNG file, prompt, sample_id) of its first test samples
    predictions: dict[str, dict[tuple[str, str], str]]  # method → (task, sample_id) → eval's prediction at the last task


@pytest.fixture(scope="module")
def pipeline(harness, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One run of the tiny stream with the methods predict serves from a store, its export, and the last eval's
    predictions of every method."""
    import pyarrow.parquet as pq

    from many.data import MiniUcitConfig, make_task
    from tasks.store import Store

    root = tmp_path_factory.mktemp("predict")
    config = write_config(root / "tiny.yaml", tasks=TASKS, methods=METHODS,
                          base={**TINY["base"], "pretrain_steps": 60},
                          finetune={**TINY["finetune"], "steps": 120})
    store = str(root / "store")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--json", "--config", str(config), "--store", store]) == 0
    summary = json.loads(out.getvalue())
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--store", store, "--out", str(root / "export")]) == 0
    data = MiniUcitConfig(**TINY["data"]["mini_ucit"])
    images = {}
    for task in TASKS:
        images[task] = []
        for sample in make_task(task, data).test[:PER_TASK]:
            path = root / f"{sample.sample_id.replace('/', '_')}.png"
            path.write_bytes(sample.image)
            images[task].append((path, sample.prompt, sample.sample_id))
    opened = Store.open(store)
    predictions = {}
    for entry in summary["stages"]:
        if entry["stage"] == "eval" and entry["task"] == TASKS[-1]:
            manifest = opened.read_manifest("eval", entry["key"])
            table = pq.read_table(opened.materialize(manifest.outputs["predictions"], context="test"))
            predictions[entry["method"]] = {(r["task"], r["sample_id"]): r["prediction"] for r in table.to_pylist()}
    return Pipeline(store, root / "export", summary, images, predictions)


def _expected(pipeline: Pipeline, method: str, task: str) -> list[str]:
    return [pipeline.predictions[method][(task, sample_id)] for _, _, sample_id in pipeline.images[task]]


@pytest.mark.slow
def test_many_load_on_the_export_answers_as_the_pipeline_predicted(pipeline: Pipeline) -> None:
    import many

    model = many.load(pipeline.export, device="cpu")
    assert model.tasks == tuple(TASKS) and model.routed
    assert model.tau == json.loads((pipeline.export / "merged" / "merge.json").read_text())["tau"]
    answers = []
    for task in TASKS:
        got = []
        for path, prompt, _ in pipeline.images[task]:
            answer, weights = model.generate(path, prompt, return_routing=True)
            got.append(answer)
            assert list(weights) == sorted(weights, key=weights.get, reverse=True) and set(weights) == set(TASKS)
            assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
            assert model.route(path) == pytest.approx(weights, abs=1e-6)  # route = what the answer was routed by
        assert got == _expected(pipeline, "many", task), task
        answers += got
    assert any(answers), "every answer is empty: the comparison would prove nothing; train the tiny model longer"
    from PIL import Image

    path, prompt, _ = pipeline.images[TASKS[1]][0]
    assert model.generate(Image.open(path), prompt) == model.generate(path, prompt)  # a PIL image or a path


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_the_store_serves_each_method_as_its_eval_scored_it(pipeline: Pipeline, method: str) -> None:
    from flows.predict import load_store

    for task in TASKS if method == "individual" else [None]:
        model = load_store(pipeline.store, method, task, device="cpu")
        assert model.routed == (method in ("many", "many_r", "many_r_cos"))
        for asked in [task] if task else TASKS:
            answers = [model.generate(path, prompt) for path, prompt, _ in pipeline.images[asked]]
            assert answers == _expected(pipeline, method, asked), (method, asked)


@pytest.mark.slow
def test_the_export_serves_many_r_as_the_tasks_own_adapters_routed_per_image(pipeline: Pipeline) -> None:
    import many
    from many.inference import export_methods

    served = export_methods(pipeline.export)
    assert served["many_r"].update == "routed" and "many_r_cos" not in served  # its routing is not the export's
    model = many.load(pipeline.export, "many_r", device="cpu")
    assert model.routed
    for task in TASKS:
        assert [model.generate(path, prompt) for path, prompt, _ in pipeline.images[task]] == _expected(
            pipeline, "many_r", task), task


@pytest.mark.slow
def test_the_cli_prints_the_answer_and_the_routing_weights(pipeline: Pipeline, capsys) -> None:
    path, prompt, _ = pipeline.images["chart-qa"][0]
    expected = _expected(pipeline, "many", "chart-qa")[0]
    capsys.readouterr()
    assert main(["predict", str(path), prompt, "--export", str(pipeline.export)]) == 0
    answer, routing = capsys.readouterr().out.splitlines()
    assert answer == expected
    assert routing.startswith("routing: ")
    pairs = [item.rsplit(" ", 1) for item in routing.removeprefix("routing: ").split(", ")]
    assert sorted(task for task, _ in pairs) == sorted(TASKS)
    weights = [float(w) for _, w in pairs]
    assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(1.0, abs=0.02)

    assert main(["predict", str(path), prompt, "--store", pipeline.store, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["answer"] == expected and record["method"] == "many" and record["tasks"] == TASKS
    assert [w for _, w in pairs] == [f"{w:.2f}" for w in record["routing"].values()]  # the store's model = the export's

    assert main(["predict", str(path), prompt, "--store", pipeline.store, "--method", "individual", "--task",
                 "chart-qa"]) == 0
    answer, routing = capsys.readouterr().out.splitlines()
    assert answer == _expected(pipeline, "individual", "chart-qa")[0]
    assert routing == "routing: none (method individual: task chart-qa's own adapter and projector)"


@pytest.mark.slow
def test_interactive_answers_each_line_and_survives_a_bad_image(pipeline: Pipeline, capsys, monkeypatch) -> None:
    (first, prompt, _), (second, prompt2, _) = pipeline.images["icon-qa"][:2]
    lines = f"{prompt}\n:image {first.parent / 'missing.png'}\n\n:image {second}\n{prompt2}\n:quit\nignored\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    capsys.readouterr()
    assert main(["predict", str(first), "--interactive", "--json", "--export", str(pipeline.export)]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["answer"] for r in records] == _expected(pipeline, "many", "icon-qa")[:2]
    assert [r["image"] for r in records] == [str(first), str(second)]
    assert "missing.png: no such file" in err


@pytest.mark.slow
def test_the_export_carries_a_model_card_and_its_settings(pipeline: Pipeline) -> None:
    card = (pipeline.export / "README.md").read_text()
    numbered = [line for line in card.splitlines() if line[:1].isdigit() and ". `" in line]
    assert numbered == [f"{i}. `{t}`" for i, t in enumerate(TASKS, 1)]  # the tasks, in order
    report = pipeline.summary["report"]["methods"]
    row = next(line for line in card.splitlines() if line.startswith("| **many** |"))
    assert row.split(" | ")[1:5] == [f"{report['many'][k]:.1f}" for k in ("MFN", "MFT", "MAA")] + [f"{report['many']['BWT']:+.1f}"]
    assert all(f"| {m} |" in card for m in METHODS if m != "many")
    for needle in ("AutoPeftModel.from_pretrained", "many.load(", "many predict", "PeftModel.from_pretrained"):
        assert needle in card
    settings = json.loads((pipeline.export / "inference.json").read_text())
    assert settings["tasks"] == TASKS and settings["max_new_tokens"] == TINY["eval"]["max_new_tokens"]
    assert settings["tau"] == json.loads((pipeline.export / "merged" / "merge.json").read_text())["tau"]
    base = str((pipeline.export / "base").resolve())
    for adapter in [pipeline.export / "merged" / "adapter", *(pipeline.export / "tasks" / t / "adapter" for t in TASKS)]:
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base


@pytest.mark.slow
def test_auto_peft_model_loads_the_merged_adapter_from_anywhere(pipeline: Pipeline, tmp_path: Path,
                                                                monkeypatch) -> None:
    """PEFT alone (no `many`): AutoPeftModel finds the base through adapter_config.json from another working
    directory, and with the averaged projector gives the logits of many.load's MAny-without-CPM."""
    import torch
    from peft import AutoPeftModel, PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    import many
    from many.data import Sample
    from many.model.chat import encode_for_generation

    monkeypatch.chdir(tmp_path)
    model = AutoPeftModel.from_pretrained(str(pipeline.export / "merged" / "adapter")).eval()
    assert isinstance(model, PeftModel) and isinstance(model.get_base_model(), LlavaForConditionalGeneration)
    projectors = load_file(str(pipeline.export / "merged" / "projectors.safetensors"))
    keys = {k.split(".", 1)[1] for k in projectors}
    average = {k: torch.stack([projectors[f"{t}.{k}"] for t in TASKS]).double().mean(0).float() for k in keys}
    model.base_model.model.model.multi_modal_projector.load_state_dict(average)

    reference = many.load(pipeline.export, "many_lpm_only", device="cpu")
    samples = [Sample(str(path), path.read_bytes(), prompt, "") for task in TASKS for path, prompt, _ in pipeline.images[task][:2]]
    batch = encode_for_generation(reference.processor, samples)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference.model(**batch).logits, atol=1e-5, rtol=1e-5)
