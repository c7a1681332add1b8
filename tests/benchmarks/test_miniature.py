"""benchmarks/miniature.py's settings, table and figure on fixed measurements (no pipeline run)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.miniature import METHODS, Measured, TaskMeasured, grid, markdown, plot, setting
from flows.config import RunConfig


def test_a_setting_scales_the_text_model_and_the_lora_and_keeps_the_rest() -> None:
    config = setting(RunConfig(), hidden=256, rank=4)
    assert (config.base.tiny.text_hidden, config.base.tiny.text_intermediate) == (256, 512)
    assert (config.finetune.lora.rank, config.finetune.lora.alpha) == (4, 8.0)  # the LoRA scale stays 2
    assert config.methods == METHODS and config.tasks == RunConfig().tasks
    assert config.base.tiny.vision_hidden == RunConfig().base.tiny.vision_hidden
    assert config.finetune.lr == RunConfig().finetune.lr  # no learning rate given: the config's
    slower = setting(RunConfig(), hidden=128, rank=2, lr=5e-4)
    assert (slower.finetune.lr, slower.finetune.projector_lr) == (5e-4, RunConfig().finetune.projector_lr)


def test_other_learning_rates_run_at_the_first_rank_only() -> None:
    assert grid([128, 256], [2, 8], 2e-3, [5e-4, 2e-3, 5e-4]) == [
        (128, 2, 2e-3), (128, 8, 2e-3), (128, 2, 5e-4), (256, 2, 2e-3), (256, 8, 2e-3), (256, 2, 5e-4)]
    assert grid([64], [4], 1e-3, []) == [(64, 4, 1e-3)]


def test_table_and_figure(tmp_path: Path) -> None:
    rows = [Measured(hidden=128, rank=r, lr=lr, tasks=6, update_mean=0.3, update_max=1.0, leakage=None,
                     fit_error=0.2, zero_shot=1.4, individual=70.0, many=30.0 + r, lpm_own=35.0, many_norm=61.25,
                     lpm_own_norm=None, seconds=3.0,
                     per_task=(TaskMeasured("caption", 0.5, 0.0, 160.0, 30.0, 40.0), TaskMeasured("qa", 0.2, 1.0, 0.0, 5.0, 6.0)))
            for r in (2, 8) for lr in (2e-3, 5e-4)]
    assert rows[0].sigma == 6 * 2 / 128
    text = markdown(rows, ["a", "b"])
    assert ("| 128 | 2 | 0.0005 | 0.094 | 0.300 (1.000) |  | 0.20 | 1.4 | 70.0 | 32.0 | 35.0 | 38.0 | 35.0 | 61.2 "
            "|  | 3 |") in text
    assert "| 128 | 8 | 0.002 | caption | 0.500 | 0.0 | 160.0 | 30.0 | 40.0 | 19 |" in text
    assert "| 128 | 8 | 0.002 | qa | 0.200 | 1.0 | 0.0 | 5.0 | 6.0 |  |" in text  # individual 0: no ratio
    assert "| LLaVA-1.5-7B, UCIT reference (r = 64) | 4096 | 64 | 0.094 |" in text
    plot(rows, tmp_path / "figure" / "gap.png")
    assert (tmp_path / "figure" / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
