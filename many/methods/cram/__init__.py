"""CRAM baseline: task-isolated LoRA experts with adaptive rank, an orthogonality penalty and centroid routing
(seed system of docs/design.md §1 "Comparison methods"; run in the same harness as MAny).

CRAM isolates each task in its own module to avoid forgetting; it sizes each new expert by the capability gap
between the existing experts and the new task's demands (adaptive-rank instantiation, `rank`), keeps new updates
out of the old experts' directions with an orthogonality penalty (`penalty`), and at inference activates the
expert whose task centroid is nearest to the image (centroid-guided routing, `routing`). `expert` trains, saves
and loads one expert. Our interpretation of each part is documented in its module.
"""

from many.methods.cram.config import CramConfig
from many.methods.cram.expert import CramExpert, load_expert, save_expert, train_expert, trainable_parameters
from many.methods.cram.penalty import lora_A, orthogonality_penalty
from many.methods.cram.rank import (
    RankAllocation,
    allocate_rank,
    capability_gap,
    estimate_gradients,
    expert_bases,
)
from many.methods.cram.routing import evaluate_cram, route

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
