"""Average (docs/design.md §1 "Comparison methods"): a batch merge of the adapters of tasks ≤ t (many.merging.average)
with the averaged projector."""

from tasks.rows.batch import batch_chain, batch_row

CHAIN = batch_chain("average")
ROW = batch_row(CHAIN, "the element-wise mean of the task updates")
