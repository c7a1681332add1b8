"""CRAM-LDA (issue #16, lever 4c applied to the comparison system): CRAM's experts, each image answered by the
expert the Gaussian routing (`cpm.metric: mahalanobis`, MAny's default) picks instead of its nearest centroid by the
cosine, CRAM's own routing. Opt-in.

The same `cram` chain (the same experts, trained once for both rows); only the top-1 choice differs:

    e(x) = argmax_i −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i)        (many.cpm.shared_gaussian, x̂ = normalize(f(x)))

Beside `many_r` it separates what the routing is worth from what the experts are: both rows answer each image
with one task's own adapter, chosen by the same router.
"""

from __future__ import annotations

from tasks.rows import cram
from tasks.rows.row import Row, routed_by

ROW = Row(
    name="cram_lda",
    summary="CRAM-LDA: CRAM's experts routed top-1 by shared-covariance Gaussians instead of the cosine (opt-in)",
    evaluate=cram.evaluate,
    reads=frozenset({"prototypes"}),
    chain=cram.CHAIN,
    chain_links="all",
    routed=True,
    routing=routed_by("mahalanobis"),
    default=False,
)
