"""`many.load` and the Predictor (docs/design.md §5.5) on a hand-made export of the fixture model: two tasks with
random LoRAs and perturbed projectors, their summed LoRA as the "merged" adapter, prototypes from the base's tower.
Whether the answers equal the pipeline's eval predictions is tests/flows/test_predict.py's (slow) question."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import many
from many import cpm
from many.adapters import (
    lora_factors,
    projector_state,
    read_adapter_config,
    save_task,
    write_lora_adapter,
)
from many.config import FinetuneConfig, LoraConfig
from many.data.schema import Sample
from many.evaluate import Assembly, assemble, lora_deltas
from many.inference import Parts, Recipe, build, load
from many.model.chat import encode_for_generation
from many.model.load import load_base
from many.model.parts import projector_of
from many.prototypes import (
    image_features,
    pooled_features,
    prototype_table,
    read_prototypes,
)
from many.training import prepare
from tests.conftest import FIXTURE_BASE, make_samples

TASKS = ("colour", "shape")
SERVED = {"many": {"update": "merged", "projector": "cpm"},
          "many_lpm_only": {"update": "merged", "projector": "average"},
          "individual": {"update": "task", "projector": "own"}}  # what flows/export.py writes for such an export


@pytest.fixture(scope="module")
def export(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_base_dir, root / "base")
    base, processor = load_base(tiny_base_dir, FIXTURE_BASE)
    tables = []
    for index, task in enumerate(TASKS):
        torch.manual_seed(index)
        model = prepare(base, FinetuneConfig(lora=LoraConfig(rank=2, alpha=4)))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.3)
            for parameter in projector_of(model).parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))
        save_task(model, root / "tasks" / task)
        samples = make_samples(6, task, seed=index)
        tables.append(prototype_table(task, samples, image_features(base, processor, samples)))
    pq.write_table(pa.concat_tables(tables), root / "prototypes.parquet")
    factors = [lora_factors(root / "tasks" / t / "adapter") for t in TASKS]
    merged = {m: (torch.cat([f[m][2] * f[m][0] for f in factors], 1), torch.cat([f[m][1] for f in factors], 0))
              for m in factors[0]}
    write_lora_adapter(merged, read_adapter_config(root / "tasks" / TASKS[0] / "adapter"), root / "merged" / "adapter")
    (root / "inference.json").write_text(json.dumps({"tasks": list(TASKS), "methods": SERVED, "max_new_tokens": 4,
                                                     "tau": 0.05}))
    return root


@pytest.fixture(scope="module")
def image(export: Path) -> Path:
    path = export.parent / "question.png"
    path.write_bytes(make_samples(1, seed=7)[0].image)
    return path


@pytest.fixture(scope="module")
def model(export: Path):
    return load(export, device="cpu")


def _logits(predictor, image: Path, question: str = "what colour is the shape?") -> torch.Tensor:
    """The predictor's logits on one prompt, its projector routed as `generate` routes the image."""
    if predictor.routed:
        from many.residual import RoutedResidual

        weights = predictor.route(image)
        row = torch.tensor([[weights[t] for t in predictor.tasks]])
        predictor.model.model.multi_modal_projector.route(row)
        for module in predictor.model.modules():
            if isinstance(module, RoutedResidual):  # MAny-R's layers: the tasks' updates, mixed by the same weights
                module.route(row)
    return _logits_of(predictor.model, predictor.processor, image, question)


def _logits_of(model, processor, image: Path, question: str = "what colour is the shape?") -> torch.Tensor:
    batch = encode_for_generation(processor, [Sample("q", image.read_bytes(), question, "")])
    with torch.no_grad():
        return model(**batch).logits


def test_import_many_is_cheap_and_load_comes_on_first_use() -> None:
    code = "import sys, many; assert 'torch' not in sys.modules, 'torch'; from many.inference import load; assert many.load is load"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, many.inference; assert 'torch' not in sys.modules, 'torch'"  # tasks/rows/ declare Recipes
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'lode'"):
        many.lode  # noqa: B018


def test_many_routes_every_image_over_the_tasks_by_cpm(model, export: Path, image: Path) -> None:
    assert model.method == "many" and model.routed and model.tasks == TASKS and model.tau == 0.05
    weights = model.route(image)
    assert list(weights) == sorted(weights, key=weights.get, reverse=True) and set(weights) == set(TASKS)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    _, prototypes, _ = read_prototypes([export / "prototypes.parquet"])
    pixels = model.processor.image_processor([Image.open(image)], return_tensors="pt")["pixel_values"]
    expected = cpm.routing_weights(pooled_features(model.model, pixels), prototypes, 0.05)[0]
    assert [weights[t] for t in TASKS] == pytest.approx(expected.tolist(), abs=1e-6)
    answer, routed = model.generate(image, "what colour is the shape?", return_routing=True)
    assert isinstance(answer, str) and routed == pytest.approx(weights, abs=1e-6)


def test_an_image_is_a_path_a_pil_image_or_bytes(model, image: Path) -> None:
    question = "what colour is the shape?"
    answer = model.generate(image, question)
    assert model.generate(str(image), question) == answer
    assert model.generate(Image.open(image), question) == answer
    assert model.generate(image.read_bytes(), question) == answer
    with pytest.raises(ValueError, match="no such file"):
        model.generate(image.parent / "missing.png", question)
    with pytest.raises(ValueError, match="not a readable image"):
        model.generate(b"not a png", question)
    with pytest.raises(TypeError, match="a PIL image, a path or bytes"):
        model.generate(3, question)
    with pytest.raises(ValueError, match="the question is empty"):
        model.generate(image, "  ")


def test_many_is_the_merged_lora_with_routed_projectors_and_lpm_only_averages_them(model, export: Path,
                                                                                   image: Path) -> None:
    lpm_only = load(export, "many_lpm_only", device="cpu")
    assert not lpm_only.routed and lpm_only.route(image) is None
    assert lpm_only.generate(image, "what is the shape?", return_routing=True)[1] is None
    deltas = lora_deltas(lora_factors(export / "merged" / "adapter"))
    base, _ = load_base(export / "base", FIXTURE_BASE)
    modules = dict(base.named_modules())
    for name, delta in deltas.items():  # W0 + ΔW of the merged adapter on every layer, in both
        layer = name.removeprefix("base_model.model.")
        for predictor in (model, lpm_only):
            torch.testing.assert_close(dict(predictor.model.named_modules())[layer].weight, modules[layer].weight + delta)
    states = [projector_state(export / "tasks" / t) for t in TASKS]
    routed = model.model.model.multi_modal_projector
    assert isinstance(routed, cpm.RoutedProjector)
    for projector, state in zip(routed.projectors, states, strict=True):  # in the prototypes' task order
        torch.testing.assert_close(projector.state_dict(), state)
    averaged = lpm_only.model.model.multi_modal_projector.state_dict()
    torch.testing.assert_close(averaged, {k: (states[0][k] + states[1][k]) / 2 for k in averaged})


def test_individual_answers_with_one_tasks_own_model(export: Path, image: Path) -> None:
    with pytest.raises(ValueError, match=r"give the task"):
        load(export, "individual")
    with pytest.raises(ValueError, match=r"unknown task 'poetry'; this model knows colour, shape"):
        load(export, "individual", "poetry", device="cpu")
    with pytest.raises(ValueError, match="'many' answers every task with one model"):
        load(export, "many", "shape")
    own = load(export, "individual", "shape", device="cpu")
    assert own.route(image) is None and own.task == "shape"
    base, _ = load_base(export / "base", FIXTURE_BASE)
    task_dir = export / "tasks" / "shape"
    reference = assemble(base, Assembly(lora_deltas(lora_factors(task_dir / "adapter")), (projector_state(task_dir),)))
    torch.testing.assert_close(_logits(own, image), _logits_of(reference, own.processor, image))


def test_a_routed_update_is_each_tasks_own_adapter_mixed_per_image(export: Path, image: Path) -> None:
    """MAny-R's recipe: every task's own LoRA and projector, mixed by the same CPM weights; routed top-1, an image
    is answered by exactly the model of the task it is routed to."""
    with pytest.raises(ValueError, match="a routed update is mixed by CPM's weights; its projector must be 'cpm'"):
        Recipe("routed", "own")
    parts = Parts(base=export / "base", tasks=TASKS, task_dirs=tuple(export / "tasks" / t for t in TASKS),
                  prototypes=(export / "prototypes.parquet",), tau=0.05, top_k=1, max_new_tokens=4)
    routed = build(parts, Recipe("routed", "cpm"), "many_r", device="cpu")
    weights = routed.route(image)
    chosen = max(weights, key=weights.get)
    assert weights[chosen] == 1.0
    torch.testing.assert_close(_logits(routed, image), _logits(load(export, "individual", chosen, device="cpu"), image))
    with pytest.raises(ValueError, match="'many_r' answers every task with one model"):
        build(parts, Recipe("routed", "cpm"), "many_r", "shape", device="cpu")


def test_store_parts_a_deltas_file_and_a_chains_task_dir(export: Path, image: Path, tmp_path: Path) -> None:
    """What a store's eval inputs hand `build`: a batch merge's deltas file (average, …) and SeqLoRA's task dir."""
    deltas = lora_deltas(lora_factors(export / "merged" / "adapter"))
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp_path / "deltas.safetensors"))
    task_dirs = tuple(export / "tasks" / t for t in TASKS)
    parts = Parts(base=export / "base", tasks=TASKS, task_dirs=task_dirs, merged=tmp_path / "deltas.safetensors",
                  max_new_tokens=4)
    average = build(parts, Recipe("merged", "average"), "average", device="cpu")
    lpm_only = load(export, "many_lpm_only", device="cpu")
    torch.testing.assert_close(_logits(average, image), _logits(lpm_only, image))
    seqlora = build(Parts(base=export / "base", tasks=TASKS, merged=task_dirs[1], max_new_tokens=4),
                    Recipe("merged", "own"), "seqlora", device="cpu")
    torch.testing.assert_close(_logits(seqlora, image), _logits(load(export, "individual", "shape", device="cpu"), image))


def test_an_export_says_what_it_lacks(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such directory; write one with `many export"):
        load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no base/ in it"):
        load(tmp_path)
    with pytest.raises(ValueError, match=r"'magic' is not in export .* \(it serves many, many_lpm_only, individual\)"):
        load(export, "magic")
    with pytest.raises(ValueError, match="'seqlora' is not in export"):
        load(export, "seqlora")
    with pytest.raises(ValueError, match="bad recipe: update 'mixed'"):
        Recipe("mixed", "cpm")  # type: ignore[arg-type]
    for settings, message in (({"tasks": list(TASKS)}, "names no methods; re-export it"),
                              ({"tasks": list(TASKS), "methods": {"many": {"update": "merged"}}}, "bad recipe")):
        old = tmp_path / "old"
        shutil.copytree(export, old, dirs_exist_ok=True)
        (old / "inference.json").write_text(json.dumps(settings))
        with pytest.raises(ValueError, match=message):
            load(old)
    partial = tmp_path / "partial"
    shutil.copytree(export, partial, ignore=shutil.ignore_patterns("prototypes.parquet"))
    with pytest.raises(ValueError, match="no prototypes.parquet"):
        load(partial)
    assert load(partial, "many_lpm_only", device="cpu").tasks == TASKS


@pytest.mark.filterwarnings("ignore:CPM. no tau")  # the fixture's two tasks share one image distribution
def test_without_a_recorded_tau_cpm_calibrates_it(export: Path, tmp_path: Path) -> None:
    from many.config import CPMConfig
    from many.evaluate import cpm_router

    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    (copy / "inference.json").write_text(json.dumps({"tasks": list(TASKS), "methods": SERVED}))
    model = load(copy, device="cpu")
    # an export that names no metric predates it: the cosine
    assert model.tau == cpm_router([copy / "prototypes.parquet"], CPMConfig(metric="cosine")).tau
    assert model.max_new_tokens == 24  # EvalConfig's default when the export does not say


def test_an_export_routed_by_the_gaussian_metric_routes_so(export: Path, image: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    (copy / "inference.json").write_text(json.dumps({"tasks": list(TASKS), "methods": SERVED, "max_new_tokens": 4,
                                                     "tau": 0.05, "metric": "mahalanobis"}))
    model = load(copy, device="cpu")
    _, _, features = read_prototypes([copy / "prototypes.parquet"])
    means, precision = cpm.shared_gaussian(features)
    pixels = model.processor.image_processor([Image.open(image)], return_tensors="pt")["pixel_values"]
    expected = cpm.routing_weights(pooled_features(model.model, pixels), means, 0.05, precision=precision)[0]
    weights = model.route(image)
    assert [weights[t] for t in TASKS] == pytest.approx(expected.tolist(), abs=1e-6)
    cosine = load(export, device="cpu").route(image)
    assert [weights[t] for t in TASKS] != pytest.approx([cosine[t] for t in TASKS], abs=1e-3)
