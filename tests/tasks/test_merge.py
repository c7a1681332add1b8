"""The merge stage's files and fan-out (tasks/merge.py, writing many/lpm_files.py's state files): one state file per
input group with C stored once, every module's state loadable from it, and the same bytes whether the groups run one
after another or as Ray tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks.synthetic import ALL_TOKENS, Shape, write_task
from many.adapters import lora_factors
from many.config import LPMConfig
from many.lpm import batch_merge, solve
from many.lpm_files import load_group, state_files, state_gammas, state_modules
from many.stats import load_grams, save_grams
from tasks.merge import job_bytes, merge_step, plan_groups

SHAPE = Shape(layers=2, hidden=16, intermediate=24, rank=2)


def chain(tmp_path: Path, tasks: int, config: LPMConfig = ALL_TOKENS, fan_out: bool | None = False,
          shape: Shape = SHAPE) -> list[dict[str, Path]]:
    """merge[1..tasks] of the synthetic tasks, each step's outputs in its own workdir under tmp_path."""
    outputs: list[dict[str, Path]] = []
    for t in range(1, tasks + 1):
        task_dir, grams = write_task(shape, seed=t, out=tmp_path / "inputs")
        inputs = {"finetune": task_dir, "grams": grams}
        if outputs:
            inputs["previous"] = outputs[-1]["state"]
        workdir = tmp_path / f"merge-{t}"
        workdir.mkdir()
        outputs.append(merge_step(inputs, workdir, config, fan_out=fan_out))
    return outputs


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_state_has_one_file_per_input_group_and_every_module_loads(tmp_path: Path) -> None:
    outputs = chain(tmp_path, 2)
    state = outputs[-1]["state"]
    files = state_files(state)
    assert len(files) == 4 * SHAPE.layers  # q/k/v, o, gate/up, down per block
    modules = state_modules(state)
    assert set(modules) == set(SHAPE.modules())
    assert set(state_gammas(state)) == set(SHAPE.modules())
    qkv = [m for m in modules if ".layers.0.self_attn." in m and not m.endswith("o_proj")]
    assert len({modules[m] for m in qkv}) == 1
    with safe_open(str(modules[qkv[0]]), framework="pt") as f:
        assert sorted(f.keys()).count("C") == 1 and "R" not in f.keys()
    group = load_group(modules[qkv[0]])
    assert len({id(s.C) for s in group.values()}) == 1
    # Each module's state loads on its own and merges as the batch formula says.
    tasks = [write_task(SHAPE, seed=t, out=tmp_path / "again") for t in (1, 2)]
    loras = [lora_factors(task_dir / "adapter") for task_dir, _ in tasks]
    grams = [load_grams(path) for _, path in tasks]
    for module, path in modules.items():
        layer = load_group(path)[module]
        assert layer.tasks == 2
        expected = batch_merge([lora[module] for lora in loras], [g[module] for g in grams], LPMConfig(), module)
        torch.testing.assert_close(solve(layer, module), expected, rtol=1e-6, atol=1e-9)


def test_float32_C_halves_the_state(tmp_path: Path) -> None:
    exact = chain(tmp_path / "f64", 1)[0]
    compact = chain(tmp_path / "f32", 1, ALL_TOKENS.model_copy(update=dict(state_dtype="float32")))[0]
    size = {name: sum(len(b) for b in file_bytes(out["state"]).values()) for name, out in (("f64", exact), ("f32", compact))}
    c_elements, files = 0, state_files(compact["state"])
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            assert f.get_slice("C").get_dtype() == "F32"
            c_elements += f.get_slice("C").get_shape()[0] ** 2
    # Only C changed, 8 → 4 bytes an entry (give or take the JSON headers' few bytes).
    assert 0 <= size["f64"] - size["f32"] - 4 * c_elements <= 16 * len(files)
    # The merged adapter of the step itself is computed in float64 either way.
    assert file_bytes(exact["adapter"]) == file_bytes(compact["adapter"])


def test_state_grouped_otherwise_than_the_grams_is_rejected(tmp_path: Path) -> None:
    state = chain(tmp_path, 1)[0]["state"]
    previous = state_modules(state)
    regrouped = {layer: layer for layer in previous}  # as if the Grams were stored one per layer
    with pytest.raises(ValueError, match="groups them differently; recompute the merge chain"):
        plan_groups(list(previous), regrouped, previous)


@pytest.mark.parametrize("layers, grams, states, message", [
    ([], {}, None, "the task has no LoRA layers"),
    (["q", "v"], {"q": "q"}, None, "missing Grams for layers ['v']"),
    (["k"], {"k": "k"}, {"q": "q"}, "missing states for ['k'], missing LoRAs for ['q']"),
])
def test_plan_groups_checks_layer_names_as_absorb_model_does(layers, grams, states, message) -> None:
    from many.lpm import absorb_model

    with pytest.raises(ValueError) as planned:
        plan_groups(layers, grams, None if states is None else {name: Path(f"{name}.safetensors") for name in states})
    lora, gram = (torch.ones(2, 1), torch.ones(1, 2), 1.0), torch.eye(2)
    before = None if states is None else absorb_model(None, dict.fromkeys(states, lora), {"q": gram}, LPMConfig())
    with pytest.raises(ValueError) as absorbed:
        absorb_model(before, dict.fromkeys(layers, lora), dict.fromkeys(grams, gram), LPMConfig())
    assert message in str(planned.value) and str(planned.value) == str(absorbed.value)


def test_job_bytes_is_three_C_matrices_and_the_thin_factors_old_and_new(tmp_path: Path) -> None:
    from many.adapters import WEIGHTS_FILE
    from many.stats import read_gram_groups

    first = chain(tmp_path, 1)[0]
    task_dir, grams = write_task(SHAPE, seed=2, out=tmp_path / "inputs")
    modules = SHAPE.modules()  # {layer: (out, in, group)}
    for step, previous in ((1, None), (2, state_modules(first["state"]))):
        jobs = plan_groups(list(modules), read_gram_groups(grams), previous)
        assert len(jobs) == 4 * SHAPE.layers
        for job in jobs:
            n_in = modules[job.layers[0]][1]
            thin = sum(2 * (modules[layer][0] + n_in) * step * SHAPE.rank for layer in job.layers)
            assert job_bytes(job, str(task_dir / "adapter" / WEIGHTS_FILE), str(grams)) == 8 * (3 * n_in**2 + thin)
            answered = job_bytes(job, str(task_dir / "adapter" / WEIGHTS_FILE), str(grams), answer=True)
            assert answered == 8 * (4 * n_in**2 + thin)  # the answer Gram added to G


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray of 2 CPUs for this module (or the one this process is already connected to)."""
    os.environ.setdefault("MANY_CACHE_DIR", str(tmp_path_factory.mktemp("many-cache")))
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-many-test")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    from tasks.runtime import ensure_ray, shutdown_ray

    ensure_ray(None, 2, 100)
    yield
    shutdown_ray()


def test_ray_fan_out_writes_the_same_bytes_as_the_sequential_loop(tmp_path: Path, local_ray) -> None:
    import ray

    from tasks.rows.many import compute_merge

    sequential = chain(tmp_path / "sequential", 2, fan_out=False)
    fanned = chain(tmp_path / "ray", 2, fan_out=True)
    for one, other in zip(sequential, fanned):
        for output in ("state", "adapter"):
            assert file_bytes(one[output]) == file_bytes(other[output]), output
    # The stage itself fans out whenever this process is connected to Ray.
    assert ray.is_initialized()
    task_dir, grams = write_task(SHAPE, seed=3, out=tmp_path / "inputs")
    workdir = tmp_path / "stage"
    workdir.mkdir()
    out = compute_merge({"finetune": task_dir, "grams": grams, "previous": fanned[-1]["state"]}, workdir,
                        config=ALL_TOKENS, device="cpu")
    expected = chain(tmp_path / "third", 3)[-1]
    assert file_bytes(out["state"]) == file_bytes(expected["state"])
    assert file_bytes(out["adapter"]) == file_bytes(expected["adapter"])


def test_a_failing_group_raises_its_own_error_through_ray(tmp_path: Path, local_ray) -> None:
    # Zero Grams and no ridge: C = 0 is singular, and the job's ValueError reaches the caller as a ValueError.
    task_dir, grams = write_task(SHAPE, seed=1, out=tmp_path / "inputs")
    save_grams({name: torch.zeros_like(gram) for name, gram in load_grams(grams).items()}, grams)
    workdir = tmp_path / "merge"
    workdir.mkdir()
    with pytest.raises(ValueError, match="larger gamma"):
        merge_step({"finetune": task_dir, "grams": grams}, workdir,
                   ALL_TOKENS.model_copy(update=dict(gamma=0.0, gamma_mode="absolute")),
                   fan_out=True)


def test_the_stage_on_ray_stores_what_it_stores_in_process(tmp_path: Path, local_ray) -> None:
    # As the pipeline runs it: `execute` as a Ray task, its groups fanned out from inside that worker.
    from benchmarks.synthetic import merge_stream
    from tasks.store import Store

    digests = {}
    for on_ray in (False, True):
        root = tmp_path / f"store-{on_ray}"
        store = Store.open(str(root), cache_dir=tmp_path / f"cache-{on_ray}")
        _, manifest = merge_stream(store, root, SHAPE, 2, tmp_path / f"inputs-{on_ray}", on_ray=on_ray)
        digests[on_ray] = {name: ref.digest for name, ref in manifest.outputs.items()}
    assert digests[True] == digests[False]


def test_a_job_larger_than_the_node_still_runs_alone(tmp_path: Path, local_ray, monkeypatch) -> None:
    # Pinned to a node with less `memory` than it asks for, Ray refuses a job as unschedulable: the request is capped
    # at the node's, so the largest group still runs, with nothing beside it.
    import ray

    import tasks.merge

    monkeypatch.setattr(tasks.merge, "job_bytes", lambda *args: int(4 * ray.cluster_resources()["memory"]))
    expected = chain(tmp_path / "sequential", 1, fan_out=False)[0]
    fanned = chain(tmp_path / "ray", 1, fan_out=True)[0]
    assert file_bytes(fanned["adapter"]) == file_bytes(expected["adapter"])


SMALL = Shape(layers=1, hidden=8, intermediate=12, rank=2)  # q/k/v/o dense from Σr = 4 (t = 2), MLP from Σr = 6 (t = 3)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_states_turn_dense_on_their_own_and_merge_as_the_thin_chain(tmp_path: Path) -> None:
    import json

    from many.evaluate import lora_deltas
    from tasks.merge import EXPORT_FORMAT

    auto = chain(tmp_path / "auto", 4, shape=SMALL)
    thin = chain(tmp_path / "thin", 4, ALL_TOKENS.model_copy(update=dict(state_form="thin")), shape=SMALL)
    modules = SMALL.modules()
    for t, (a, b) in enumerate(zip(auto, thin), start=1):
        export = json.loads(a["export"].read_text())
        assert export["format"] == EXPORT_FORMAT and set(export["layers"]) == set(modules)
        for layer, (out, n_in, _) in modules.items():
            record = export["layers"][layer]
            dense = t * SMALL.rank * (out + n_in) >= out * n_in
            was_dense = (t - 1) * SMALL.rank * (out + n_in) >= out * n_in
            assert record["form"] == ("dense" if dense else "thin") and record["rank"] == t * SMALL.rank
            # exact: rank Σr from thin factors (also at the switch step, which still has them), else min(in, out)
            assert record["exported_rank"] == (min(out, n_in) if was_dense else t * SMALL.rank)
            assert record["error"] == 0.0
        got, expected = lora_deltas(lora_factors(a["adapter"])), lora_deltas(lora_factors(b["adapter"]))
        for layer in modules:  # the factors are stored float32
            torch.testing.assert_close(got[layer], expected[layer], rtol=1e-5, atol=1e-5 * expected[layer].abs().max())
        assert dir_bytes(a["state"]) <= dir_bytes(b["state"])
    assert dir_bytes(auto[-1]["state"]) < dir_bytes(thin[-1]["state"])
    # the next step reads a dense state and keeps it dense
    with safe_open(str(state_files(auto[-1]["state"])[0]), framework="pt") as f:
        assert any(key.startswith("R.") for key in f.keys())


@pytest.mark.parametrize("form", ["thin", "auto"])
def test_a_truncated_export_reports_its_error(tmp_path: Path, form: str) -> None:
    import json

    from many.evaluate import lora_deltas

    exact = chain(tmp_path / "exact", 3, ALL_TOKENS.model_copy(update=dict(state_form=form)), shape=SMALL)[-1]
    short = chain(tmp_path / "short", 3, ALL_TOKENS.model_copy(update=dict(state_form=form, rank=2)), shape=SMALL)[-1]
    full, cut = lora_deltas(lora_factors(exact["adapter"])), lora_deltas(lora_factors(short["adapter"]))
    records = json.loads(short["export"].read_text())["layers"]
    for layer, M in full.items():
        true = (torch.linalg.matrix_norm(M - cut[layer]) / torch.linalg.matrix_norm(M)).item()
        assert records[layer]["exported_rank"] == 2 and records[layer]["error"] > 0.01
        assert abs(records[layer]["error"] - true) <= 1e-4 * max(true, 1.0)  # float32 factors


def test_job_bytes_of_a_dense_layer_is_its_R_old_new_and_the_export(tmp_path: Path) -> None:
    from many.adapters import WEIGHTS_FILE
    from many.stats import read_gram_groups

    states = chain(tmp_path, 3, shape=SMALL)  # every layer dense after t = 3
    task_dir, grams = write_task(SMALL, seed=9, out=tmp_path / "inputs")
    modules = SMALL.modules()
    for job in plan_groups(list(modules), read_gram_groups(grams), state_modules(states[-1]["state"])):
        n_in = modules[job.layers[0]][1]
        per_layer = sum(3 * n_in * modules[layer][0] + min(n_in, modules[layer][0]) ** 2 for layer in job.layers)
        assert job_bytes(job, str(task_dir / "adapter" / WEIGHTS_FILE), str(grams)) == 8 * (3 * n_in**2 + per_layer)


def _answer_grams(grams: Path, out: Path) -> Path:
    """A second Gram per input group, grouped as `grams` (the stats stage's answer Grams stand-in): G² / ‖G‖."""
    loaded = load_grams(grams)
    scaled: dict[int, torch.Tensor] = {}
    return save_grams({name: scaled.setdefault(id(g), g @ g / g.norm()) for name, g in loaded.items()}, out)


def test_answer_weight_merges_g_all_plus_lambda_g_answer_and_zero_ignores_them(tmp_path: Path) -> None:
    """G_t = G_all,t + λ·G_answer,t (tasks.merge.task_gram): the stage's merge equals the batch formula on those Grams;
    λ = 0 writes the all-token merge's bytes, answer Grams given or not; λ > 0 without them, or a config whose
    per-task weights are unresolved, is an error naming the fix."""
    from many.config import AnswerWeightConfig

    tasks = [write_task(SHAPE, seed=t, out=tmp_path / "inputs") for t in (1, 2)]
    answers = [_answer_grams(grams, tmp_path / f"answer-{t}.safetensors") for t, (_, grams) in enumerate(tasks)]

    def run(label: str, config: LPMConfig, with_answers: bool = True) -> dict[str, Path]:
        outputs: dict[str, Path] = {}
        for t, ((task_dir, grams), answer) in enumerate(zip(tasks, answers, strict=True)):
            inputs = {"finetune": task_dir, "grams": grams} | ({"answer_grams": answer} if with_answers else {})
            inputs |= {"previous": outputs["state"]} if outputs else {}
            workdir = tmp_path / f"{label}-{t}"
            workdir.mkdir()
            outputs = merge_step(inputs, workdir, config, fan_out=False)
        return outputs

    weight = 0.5
    weighted = run("weighted", LPMConfig(answer=AnswerWeightConfig(weight=weight)))
    loras = [lora_factors(task_dir / "adapter") for task_dir, _ in tasks]
    merged = lora_factors(weighted["adapter"])
    for module in SHAPE.modules():
        grams = [load_grams(g)[module] + weight * load_grams(a)[module]
                 for (_, g), a in zip(tasks, answers, strict=True)]
        expected = batch_merge([lora[module] for lora in loras], grams, LPMConfig(), module)
        B, A, scale = merged[module]
        torch.testing.assert_close(scale * B.double() @ A.double(), expected, rtol=1e-5, atol=1e-7)
    plain = run("plain", ALL_TOKENS, with_answers=False)
    zero = run("zero", ALL_TOKENS)
    assert file_bytes(zero["adapter"]) == file_bytes(plain["adapter"]) != file_bytes(weighted["adapter"])
    with pytest.raises(ValueError, match="needs the task's answer Grams"):
        run("missing", LPMConfig(), with_answers=False)
    with pytest.raises(ValueError, match="LPMConfig.for_task"):
        run("unresolved", LPMConfig(answer=AnswerWeightConfig(tasks={"task-1": 2.0})))
