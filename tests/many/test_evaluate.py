"""One harness for every method: W0 + ΔW, the projector(s), generate, score (docs/design.md §1, §2 eval[t])."""

import copy
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from many import cpm
from many.adapters import lora_factors, projector_state, save_task
from many.config import EvalConfig, FinetuneConfig, LoraConfig
from many.data.schema import TaskData
from many.evaluate import (
    Assembly,
    EvalResult,
    Router,
    assemble,
    evaluate,
    generate_answers,
    lora_deltas,
    routing_accuracy,
    write_predictions,
)
from many.model.chat import encode_for_training
from many.model.load import load_base
from many.model.parts import projector_of
from many.prototypes import image_features
from many.training import finetune
from tests.conftest import FIXTURE_BASE, make_samples

EVAL = EvalConfig(batch_size=16, max_new_tokens=4)
Q_PROJ = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """(base, processor, task, task_dir, peft model): one LoRA + projector, 160 steps on a colour task (the fixture's
    byte-level vocabulary has 315 output rows: 80 steps at 5e-3 only learn the most frequent colour)."""
    base, processor = load_base(tiny_base_dir, FIXTURE_BASE)
    task = TaskData("colour", "exact_match", make_samples(64, seed=10), make_samples(32, seed=11))
    cfg = FinetuneConfig(steps=160, batch_size=16, lr=1e-2, projector_lr=1e-2, warmup_steps=5,
                         lora=LoraConfig(rank=4, alpha=8))
    model = finetune(base, processor, task.train, cfg, progress=False)
    task_dir = save_task(model, tmp_path_factory.mktemp("colour-task"))
    return base, processor, task, task_dir, model


def _oracle(task_dir: Path) -> Assembly:
    return Assembly(lora_deltas(lora_factors(task_dir / "adapter")), (projector_state(task_dir),))


def test_task_oracle_beats_the_base_and_matches_its_peft_model(trained):
    base, processor, task, task_dir, peft_model = trained
    oracle = evaluate(assemble(base, _oracle(task_dir)), processor, task, EVAL)
    untuned = evaluate(assemble(base, Assembly()), processor, task, EVAL)
    assert oracle.score > untuned.score + 20
    assert [p for _, p, _ in oracle.predictions] == generate_answers(peft_model, processor, task.test, EVAL)
    assert [(i, r) for i, _, r in oracle.predictions] == [(s.sample_id, s.answer) for s in task.test]


def test_assembled_logits_equal_the_peft_models(trained):
    base, processor, task, task_dir, peft_model = trained
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = assemble(base, _oracle(task_dir))
    batch = {k: v for k, v in encode_for_training(processor, task.test[:6]).items() if k != "labels"}
    with torch.no_grad():
        expected = peft_model(**batch, use_cache=False).logits
        merged = copy.deepcopy(peft_model).merge_and_unload()(**batch, use_cache=False).logits
        torch.testing.assert_close(model(**batch, use_cache=False).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "assemble changed the base"


def test_cpm_with_one_task_equals_single(trained):
    base, processor, task, task_dir, _ = trained
    oracle = _oracle(task_dir)
    prototypes = cpm.prototype(image_features(base, processor, task.train)).unsqueeze(0)  # (1, D)
    routed = Assembly(oracle.deltas, oracle.projectors, Router(prototypes, tau=0.05))
    single = generate_answers(assemble(base, oracle), processor, task.test, EVAL)
    assert generate_answers(assemble(base, routed), processor, task.test, EVAL, routing=routed.router) == single


def test_cpm_routes_each_batch_to_the_right_projector(trained):
    base, processor, task, task_dir, _ = trained
    oracle = _oracle(task_dir)
    mu = cpm.prototype(image_features(base, processor, task.train))
    base_projector = projector_of(base).state_dict()
    single = generate_answers(assemble(base, oracle), processor, task.test, EVAL)
    for order, top_k in (((0, 1), 1), ((1, 0), None)):  # trained projector first or second; hard or soft (τ small)
        projectors = (oracle.projectors[0], base_projector)
        routed = Assembly(oracle.deltas, tuple(projectors[i] for i in order),
                          Router(torch.stack([mu, -mu])[list(order)], tau=0.01, top_k=top_k))
        misrouted = Router(routed.router.prototypes.flip(0), routed.router.tau, top_k)  # every image to the base projector
        model = assemble(base, routed)
        assert generate_answers(model, processor, task.test, EVAL, routing=routed.router) == single
        assert generate_answers(model, processor, task.test, EVAL, routing=misrouted) != single


def test_generation_with_and_without_kv_cache_agrees(trained):
    base, processor, task, task_dir, _ = trained
    oracle = _oracle(task_dir)
    mu = cpm.prototype(image_features(base, processor, task.train))
    routed = Assembly(oracle.deltas, (oracle.projectors[0], projector_of(base).state_dict()),
                      Router(torch.stack([mu, mu.roll(1)]), tau=0.1))  # soft: both projectors contribute
    for assembly in (oracle, routed):
        model = assemble(base, assembly)
        cached = generate_answers(model, processor, task.test, EVAL, routing=assembly.router, use_cache=True)
        assert cached == generate_answers(model, processor, task.test, EVAL, routing=assembly.router, use_cache=False)


def test_predictions_parquet_and_routing_accuracy(trained, tmp_path):
    base, processor, task, task_dir, _ = trained
    result = evaluate(assemble(base, _oracle(task_dir)), processor, task, EvalConfig(max_samples=5, max_new_tokens=4))
    other = EvalResult("shape", 50.0, (("s-1", "circle", "square"),))
    table = pq.read_table(write_predictions([result, other], tmp_path / "predictions.parquet")).to_pydict()
    assert table == {  # one row per test sample of each task, in order
        "task": ["colour"] * 5 + ["shape"],
        "sample_id": [s.sample_id for s in task.test[:5]] + ["s-1"],
        "prediction": [p for _, p, _ in result.predictions] + ["circle"],
        "reference": [s.answer for s in task.test[:5]] + ["square"],
    }
    with pytest.raises(ValueError, match="write_predictions: no results"):
        write_predictions([], tmp_path / "none.parquet")
    features = image_features(base, processor, task.train[:8])
    mu = cpm.prototype(features)
    assert routing_accuracy([features, -features], torch.stack([mu, -mu])) == 1.0
    assert routing_accuracy([features], torch.stack([-mu])) == 1.0  # one task: always right
    assert routing_accuracy([features, -features], torch.stack([-mu, mu])) == 0.0


def _bad(base, task_dir, case):
    oracle = _oracle(task_dir)
    delta = oracle.deltas[Q_PROJ]
    projector = oracle.projectors[0]
    prototypes = torch.randn(2, 4)
    cases = {
        "unknown_module": lambda: assemble(base, Assembly({Q_PROJ.replace("layers.0", "layers.9"): delta})),
        "not_peft_name": lambda: assemble(base, Assembly({Q_PROJ.removeprefix("base_model.model."): delta})),
        "not_linear": lambda: assemble(base, Assembly({"base_model.model.model.language_model.norm": delta})),
        "shape": lambda: assemble(base, Assembly({Q_PROJ: delta.T[:, :3]})),
        "non_finite": lambda: assemble(base, Assembly({Q_PROJ: torch.full_like(delta, math.nan)})),
        "projector_keys": lambda: assemble(
            base, Assembly(projectors=({"linear_1.weight": projector["linear_1.weight"]},))
        ),
        "projector_shape": lambda: assemble(
            base, Assembly(projectors=({**projector, "linear_1.bias": torch.zeros(3)},))
        ),
        "two_unrouted": lambda: Assembly(projectors=(projector, projector)),
        "cpm_no_projector": lambda: Assembly(router=Router(prototypes, tau=0.1)),
        "cpm_wrong_count": lambda: Assembly(projectors=(projector,), router=Router(prototypes, tau=0.1)),
        "cpm_bad_tau": lambda: Router(prototypes, tau=math.inf),
        "cpm_flat_prototypes": lambda: Router(prototypes[0], tau=0.1),
    }
    return cases[case]()


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unknown_module", "unknown module .*layers.9"),
        ("not_peft_name", "unknown module"),
        ("not_linear", "not a linear layer"),
        ("shape", r"q_proj'?: delta has shape \(32, 3\), weight has shape \(32, 32\)"),
        ("non_finite", "q_proj'?: delta contains NaN or Inf"),
        ("projector_keys", "projector 0 has keys"),
        ("projector_shape", r"projector 0 'linear_1.bias' has shape \(3,\)"),
        ("two_unrouted", "2 projectors and no router"),
        ("cpm_no_projector", "knows 2 tasks but 0 projectors"),
        ("cpm_wrong_count", "knows 2 tasks but 1 projectors"),
        ("cpm_bad_tau", "tau must be finite and > 0"),
        ("cpm_flat_prototypes", r"prototypes must be \(T, D\)"),
    ],
)
def test_bad_assembly(trained, case, error):
    base, _, _, task_dir, _ = trained
    with pytest.raises(ValueError, match=error):
        _bad(base, task_dir, case)


@pytest.mark.parametrize(("routed_model", "router"), [(True, False), (False, True)])
def test_routing_must_match_the_projector(trained, routed_model, router):
    base, processor, task, task_dir, peft_model = trained
    oracle = _oracle(task_dir)
    mu = torch.randn(1, 32)
    routed = Assembly(oracle.deltas, oracle.projectors, Router(mu, tau=0.1))
    model = assemble(base, routed if routed_model else oracle)
    with pytest.raises(ValueError, match="pass routing exactly when"):
        generate_answers(model, processor, task.test[:2], EVAL, routing=routed.router if router else None)
    with pytest.raises(ValueError, match="not a PeftModel"):
        assemble(peft_model, oracle)
