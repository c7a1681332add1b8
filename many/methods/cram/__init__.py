"""CRAM baseline: task-isolated LoRA experts with adaptive rank, an orthogonality penalty and centroid routing
(seed system of docs/design.md §1 "Comparison methods"; run in the same harness as MAny).

CRAM isolates each task in its own module to avoid forgetting; it sizes each new expert by the capability gap
between the existing experts and the new task's demands (adaptive-rank instantiation, `rank`), keeps new updates
out of the old experts' directions with an orthogonality penalty (`penalty`), and at inference activates the
expert whose task centroid is nearest to the image (centroid-guided routing, `routing`). `expert` trains, saves
and loads one expert. Our interpretation of each part is documented in its module.

The package is lazy (PEP 562): `CramConfig` (many.methods.cram.config) loads without torch, so the run config
validates without it; every other name loads its module (torch, peft, transformers) on first use.
"""

from __future__ import annotations

from many.lazy import lazy_attributes
from many.methods.cram.config import CramConfig

_LAZY = {
    "CramExpert": "expert",
    "load_expert": "expert",
    "save_expert": "expert",
    "train_expert": "expert",
    "trainable_parameters": "expert",
    "lora_A": "penalty",
    "orthogonality_penalty": "penalty",
    "RankAllocation": "rank",
    "allocate_rank": "rank",
    "capability_gap": "rank",
    "estimate_gradients": "rank",
    "expert_bases": "rank",
    "evaluate_cram": "routing",
    "route": "routing",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "CramConfig",
    "CramExpert",
    "RankAllocation",
    "allocate_rank",
    "capability_gap",
    "estimate_gradients",
    "evaluate_cram",
    "expert_bases",
    "load_expert",
    "lora_A",
    "orthogonality_penalty",
    "route",
    "save_expert",
    "train_expert",
    "trainable_parameters",
]
