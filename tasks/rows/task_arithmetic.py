"""Task Arithmetic (docs/design.md §1 "Comparison methods"): a batch merge of the adapters of tasks ≤ t (many.merging.task_arithmetic)
with the averaged projector."""

from tasks.rows.batch import batch_chain, batch_row

CHAIN = batch_chain("task_arithmetic")
ROW = batch_row(CHAIN, "task arithmetic: the scaled sum of the task updates")
