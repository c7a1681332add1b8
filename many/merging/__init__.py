"""The merge baselines of docs/design.md §1 ("Comparison methods"), one module each, in a plain registry
(mergekit style; docs/design.md §11 "Registries over if-chains").

Every merger works on ONE layer:

    merge(deltas: T × (out, in), grams: T × (in, in) | None, cfg) -> (out, in)

with ΔW_i = s_i B_i A_i the tasks' dense LoRA updates and G_i = X_iᵀX_i / N_i their input Grams (only
RegMean reads them). `merge_layer` validates one layer's inputs and names it in every error;
`merge_model` applies a merger layer by layer over dicts keyed by PEFT module name (both in
`many.merging.registry`). Adding a method = one module + its config class in `many.merging.config` + one line
in MERGERS and CONFIGS.

The package is lazy (PEP 562): `many.merging.config` holds the hyper-parameter classes without torch, so the run
config validates without loading it; the names below load `many.merging.registry` (and torch) on first use.
"""

from __future__ import annotations

from typing import Any

_REGISTRY = ("CONFIGS", "MERGERS", "Merger", "get_merger", "merge_layer", "merge_model")


def __getattr__(name: str) -> Any:
    if name in _REGISTRY:
        from many.merging import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'many.merging' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_REGISTRY})


__all__ = ["CONFIGS", "MERGERS", "Merger", "get_merger", "merge_layer", "merge_model"]
