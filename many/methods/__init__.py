"""Continual-learning systems compared with MAny in the same harness (docs/design.md §1 "Comparison methods").

Unlike the closed-form merges of `many.merging`, these methods change how each task is trained (penalties,
gradient projection, per-task experts) and how the model is assembled at inference. One sub-package or module
per method; each reuses the shared trainer (`many.training`) and evaluation harness (`many.evaluate`).
"""
