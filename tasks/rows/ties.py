"""TIES (docs/design.md §1 "Comparison methods"): a batch merge of the adapters of tasks ≤ t (many.merging.ties)
with the averaged projector."""

from tasks.rows.batch import batch_chain, batch_row

CHAIN = batch_chain("ties")
ROW = batch_row(CHAIN, "TIES: trim, elect sign, disjoint mean of the task updates")
