"""Progress callbacks and the loss curve (many/progress.py; docs/design.md §4 "Progress"): every training loop reports
every step with the right totals and learning rate, batch loops report (done, total), and the loss curve round-trips
through its Parquet."""

from __future__ import annotations

import itertools
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from many.config import EvalConfig, FinetuneConfig, LoraConfig, StatsConfig
from many.evaluate import generate_answers
from many.loop import warmup_cosine
from many.pretrain import pretrain
from many.progress import LOSS_SCHEMA, LossCurve, Step, fan_out, read_losses
from many.training import finetune
from tests.conftest import FIXTURE_BASE, make_samples

SAMPLES = make_samples(12, "colour", seed=3)
CFG = FinetuneConfig(lora=LoraConfig(rank=2, alpha=4.0), steps=5, batch_size=4, grad_accum=2, lr=1e-3,
                     projector_lr=2e-3, warmup_steps=2)


def test_finetune_reports_every_step_with_its_total_loss_and_learning_rate(tiny_base):
    model, processor = tiny_base
    curve = LossCurve()
    finetune(model, processor, SAMPLES, CFG, progress=False, on_step=curve)
    steps = curve.steps
    assert [s.step for s in steps] == [1, 2, 3, 4, 5] and {s.total for s in steps} == {5}
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in steps)
    # the LoRA group's rate of each step: lr × warmup_cosine(step index), moved by the schedule after the step
    assert [s.lr for s in steps] == pytest.approx([CFG.lr * warmup_cosine(i, CFG.warmup_steps, CFG.steps) for i in range(5)])
    assert all(0 <= a.seconds <= b.seconds for a, b in itertools.pairwise(steps))


def test_pretrain_reports_every_step(tiny_base):
    model, processor = tiny_base
    seen: list[Step] = []
    cfg = FIXTURE_BASE.model_copy(update={"pretrain_steps": 3, "pretrain_batch_size": 4})
    pretrain(model, processor, SAMPLES, cfg, progress=False, on_step=seen.append)
    assert [(s.step, s.total) for s in seen] == [(1, 3), (2, 3), (3, 3)]


def test_loss_curve_parquet_round_trip(tmp_path):
    curve = LossCurve()
    for i in range(1, 4):
        curve(Step(i, 3, 1.0 / i, 1e-3 * i, 0.5 * i))
    table = read_losses(curve.write(tmp_path / "losses.parquet"))
    assert table.schema.equals(LOSS_SCHEMA)
    assert table.to_pydict() == {"step": [1, 2, 3], "loss": [1.0, 0.5, 1 / 3], "lr": [1e-3, 2e-3, 3e-3],
                                 "seconds": [0.5, 1.0, 1.5]}
    assert read_losses(LossCurve().write(tmp_path / "empty.parquet")).num_rows == 0  # a run of 0 steps
    pq.write_table(pa.table({"step": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="losses table has schema"):
        read_losses(tmp_path / "other.parquet")


def test_fan_out_calls_each_callback_and_is_none_without_any():
    assert fan_out(None, None) is None
    only = [].append
    assert fan_out(None, only) is only
    first, second = [], []
    fan_out(first.append, None, second.append)(7)
    assert first == second == [7]


def test_generate_answers_reports_answered_samples_after_each_batch(tiny_base):
    model, processor = tiny_base
    calls: list[tuple[int, int]] = []
    generate_answers(model, processor, SAMPLES[:5], EvalConfig(batch_size=2, max_new_tokens=2),
                     on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_collect_grams_reports_batches(tiny_base):
    from many.stats import collect_grams

    model, processor = tiny_base
    tuned = finetune(model, processor, SAMPLES, CFG.model_copy(update={"steps": 1}), progress=False)
    calls: list[tuple[int, int]] = []
    collect_grams(tuned, processor, SAMPLES[:5], StatsConfig(batch_size=2), progress=False,
                  on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
