"""RegMean (docs/design.md §1 "Comparison methods"): a batch merge of the adapters of tasks ≤ t (many.merging.regmean)
with the averaged projector."""

from tasks.rows.batch import batch_chain, batch_row

CHAIN = batch_chain("regmean", grams=True)
ROW = batch_row(CHAIN, "RegMean: the batch least-squares merge with the tasks' Grams, no CPM")
