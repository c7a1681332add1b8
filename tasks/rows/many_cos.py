"""MAny-cos (issue #16, the ablation of lever 4c; many.cpm, docs/design.md §1.2): MAny with the paper's CPM routing,
the cosine to each task's prototype, instead of the default Gaussian routing. Opt-in.

The same LPM merge and projectors as `many`; only the routing weights differ:

    w = softmax(cos(f(x), μ_i) / τ)                                   (this row: MAny's CPM as published)
    w = softmax(s(x) / τ),   s_i(x) = −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i) / (2D)  (`cpm.metric: mahalanobis`, the default)

The Gaussian became the default because it won on all 3 seeds × 2 orders, for MAny, MAny-R and CRAM's experts
alike (BENCHMARKS.md, quality section); this row keeps the published routing measurable beside it in one run.
"""

from __future__ import annotations

from tasks.rows import many
from tasks.rows.row import Row, routed_by

ROW = Row(
    name="many_cos",
    summary="MAny-cos: MAny with the published cosine CPM routing instead of the default Gaussian (opt-in)",
    evaluate=many.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=many.LPM_CHAIN,
    routed=True,
    routing=routed_by("cosine"),
    default=False,
    recipe=many.ROW.recipe,  # from a store only: an export holds the run's one `cpm` routing (flows.export)
)
