"""MAny-all (issue #16, the ablation of lever 4a; docs/design.md §1): MAny's merge on all-token Grams, λ = 0, as MAny
was published. Opt-in.

The default LPM merge (`many`) weighs each task's Gram towards the positions that predict its answer tokens,

    G_i = G_all,i + λ_i·G_answer,i      (λ_i = lpm.answer: 1 by default)

because that beat λ = 0 in all 3 seeds × 2 orders (BENCHMARKS.md, quality section). This row keeps λ = 0 measurable
beside it in one run: the chain `merge_all` is merge[t] with `lpm.answer.weight` 0 (the rest of `lpm` as configured),
reading the all-token Grams only; its eval is MAny's (the merged LoRA, projectors routed by CPM).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from many.config import AnswerWeightConfig
from tasks.rows import many
from tasks.rows.row import Row

ALL_TOKENS_CHAIN = replace(
    many.LPM_CHAIN,
    stage="merge_all",
    method="many_all",
    config=lambda config, task: config.lpm.model_copy(update={"answer": AnswerWeightConfig(weight=0.0)}),
    link=partial(many.lpm_link, answer=False),
)


ROW = Row(
    name="many_all",
    summary="MAny-all: MAny's LPM merge on all-token Grams (λ = 0, as published), not answer-weighted ones (opt-in)",
    evaluate=many.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=ALL_TOKENS_CHAIN,
    routed=True,
    default=False,
    recipe=many.ROW.recipe,
)
