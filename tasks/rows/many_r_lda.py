"""MAny-R-LDA (issue #16, levers 4b + 4c; docs/design.md §1.2, §1.4): MAny-R routed by the Gaussian routing of
`many_lda` instead of the cosine. Opt-in.

The same residual chain as `many_r` (so the same `residual[t]` stages, computed once for both rows); only the CPM
weights that mix the residuals and the projectors per image differ:

    w = softmax(s(x) / τ),   s_i(x) = −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i) / (2D)      (many.cpm.shared_gaussian)

MAny-R hands each image the update of the tasks its weights name, so, unlike MAny (whose LoRA is the same for
every image), its score follows the routing's accuracy; this row measures how much the cosine's misroutes cost it.
"""

from __future__ import annotations

from tasks.rows import many_lda, many_r
from tasks.rows.row import Row

ROW = Row(
    name="many_r_lda",
    summary="MAny-R-LDA: MAny-R with its residuals and projectors routed by shared-covariance Gaussians (opt-in)",
    evaluate=many_r.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=many_r.RESIDUAL_CHAIN,
    routed=True,
    routing=many_lda.routing,
    default=False,
    recipe=many_r.ROW.recipe,  # from a store only: an export holds the run's one `cpm` routing (flows.export)
)
