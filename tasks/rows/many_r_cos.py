"""MAny-R-cos (issue #16, the ablation of lever 4c on MAny-R; docs/design.md §1.2, §1.4): MAny-R routed by the
published cosine CPM instead of the default Gaussian routing. Opt-in.

The same residual chain as `many_r` (so the same `residual[t]` stages, computed once for both rows); only the CPM
weights that mix the residuals and the projectors per image differ:

    w = softmax(cos(f(x), μ_i) / τ)

MAny-R hands each image the update of the tasks its weights name, so, unlike MAny (whose LoRA is the same for
every image), its score follows the routing's accuracy; this row measures how much the cosine's misroutes cost it.
"""

from __future__ import annotations

from tasks.rows import many_r
from tasks.rows.row import Row, routed_by

ROW = Row(
    name="many_r_cos",
    summary="MAny-R-cos: MAny-R with its residuals and projectors routed by the published cosine CPM (opt-in)",
    evaluate=many_r.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=many_r.RESIDUAL_CHAIN,
    routed=True,
    routing=routed_by("cosine"),
    default=False,
    recipe=many_r.ROW.recipe,  # from a store only: an export holds the run's one `cpm` routing (flows.export)
)
