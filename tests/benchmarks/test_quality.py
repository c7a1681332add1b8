"""benchmarks/quality.py's aggregation and goal checks on fixed reports (no pipeline run)."""

from __future__ import annotations

import pytest

from benchmarks.quality import aggregate, goals, markdown, seeded
from flows.config import RunConfig
from many.report import report_from_matrices

TASKS = ["a", "b"]


def report(many: float, seqlora: float, ties: float, individual: float) -> dict:
    def diagonal(last: float) -> list[list[float | None]]:
        return [[last, None], [last, last]]

    return report_from_matrices(TASKS, {"many": [[80.0, None], [many, 80.0]], "seqlora": diagonal(seqlora),
                                         "ties": diagonal(ties), "individual": diagonal(individual),
                                         "many_r": [[80.0, None], [many + 4, 80.0]], "cram": diagonal(77.0)},
                                extras={"many": {"trainable_parameters": 1234, "bytes_per_task": 4936}})


def test_normalised_last_leaves_out_tasks_individual_scores_zero_on_and_needs_individual() -> None:
    from benchmarks.quality import normalised_last

    zero = report_from_matrices(TASKS, {"many": [[5.0, None], [5.0, 40.0]], "individual": [[0.0, None], [0.0, 80.0]]})
    assert normalised_last(zero, "many") == pytest.approx(50.0)
    assert normalised_last(report_from_matrices(TASKS, {"many": [[1.0, None], [1.0, 1.0]]}), "many") is None


def test_mean_std_and_goals() -> None:
    table = aggregate([report(70.0, 40.0, 60.0, 80.0), report(74.0, 44.0, 80.0, 80.0)])
    assert table["many"]["Last"] == pytest.approx((76.0, 2 ** 0.5))  # Last = mean(72, 80) = 76 ± √2
    assert table["many"]["BWT"] == pytest.approx((-8.0, 2 * 2 ** 0.5))
    assert table["seqlora"]["Last"] == pytest.approx((42.0, 2 * 2 ** 0.5))
    checks = {goal: met for goal, _, met in goals(table)}
    assert checks == {"MAny Last ≥ SeqLoRA Last + 15": True, "MAny Last > best merge baseline (ties)": True,
                      "MAny Last ≥ individual Last − 3": False, "MAny BWT ≥ −2": False,
                      "MAny Last ≥ individual Last − 10 (issue #16)": True,
                      "best MAny-family Last (many_r) ≥ individual Last − 3": True,  # 78 vs 80
                      "best MAny-family BWT (many_r) ≥ −2": False,  # −4
                      "best MAny-family Last (many_r) > cram": True}  # 78 vs 77
    # normalised Last: mean over tasks of many / individual = (70/80 + 80/80) / 2 and (74/80 + 1) / 2
    assert table["many"]["Last / ind."] == pytest.approx((95.0, 1.25 * 2 ** 0.5))
    assert table["individual"]["Last / ind."] == (100.0, 0.0)
    text = markdown("ucit", TASKS, 2, table)
    assert "| many | 76.0 ± 1.4 | 95.0 ± 1.8 | 80.0 ± 0.0 | 78.0 ± 0.7 | -8.0 ± 2.8 | 1,234 | 4,936 |" in text
    assert "| seqlora | 42.0 ± 2.8 | 52.5 ± 3.5 |" in text and text.count("|  |  |") == 5  # no sizes reported
    assert "| MAny BWT ≥ −2 | -8.0 | no |" in text


def test_seeded_config_sets_every_seed_and_the_order() -> None:
    config = seeded(RunConfig(), seed=2, order="reverse", tasks=3, store="/tmp/x")
    assert [t.name for t in config.tasks] == ["noisy-caption", "chart-qa", "style-cls"]
    assert (config.base.seed, config.finetune.seed, config.data.mini_ucit.seed) == (2, 2, 2)
    assert config.store.url == "/tmp/x"
