"""MAny-LDA (issue #16, lever 4c; many.cpm, docs/design.md §1.2): MAny with CPM routing by a Gaussian per task with
one shared covariance (linear discriminant analysis on the normalised visual features) instead of the cosine to a
prototype. Opt-in.

The same LPM merge and projectors as `many`; only the routing weights differ:

    w = softmax(s(x) / τ),   s_i(x) = −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i) / (2D),   x̂ = normalize(f(x))

m_i the mean of task i's normalised training features and Σ their pooled within-task covariance with Ledoit–Wolf
shrinkage, both computed at eval[t] from the prototypes stages' image rows of tasks ≤ t (no new stage). τ is
calibrated by the same rule as the cosine's. The run's `cpm` section applies otherwise (`cpm.metric:
mahalanobis` routes every routed row this way; this row exists to compare the two in one run).
"""

from __future__ import annotations

from typing import Any

from tasks.rows import many
from tasks.rows.row import Row


def routing(config: Any) -> Any:
    return config.cpm.model_copy(update={"metric": "mahalanobis"})


ROW = Row(
    name="many_lda",
    summary="MAny-LDA: MAny with CPM routed by shared-covariance Gaussians (LDA) instead of the cosine (opt-in)",
    evaluate=many.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=many.LPM_CHAIN,
    routed=True,
    routing=routing,
    default=False,
    recipe=many.ROW.recipe,  # from a store only: an export holds the run's one `cpm` routing (flows.export)
)
