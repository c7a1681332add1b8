"""Cross-modal projection merging (CPM) — MAny (arXiv 2604.14016), docs/design.md §1.

Each task i trains its own projector P_i (vision → LLM connector) and has a visual prototype
μ_i = normalize(mean_j normalize(f(x_j))) over its training images, f = the frozen vision encoder's pooled
feature. At inference, with no task id, an image is routed by w = softmax(cos(f(x), μ_i) / τ) (optionally
kept to the top-k tasks) and its visual tokens are H = Σ_i w_i P_i(z(x)).

τ is calibrated from the training features alone (`calibrate_tau`): the largest τ for which every task's
own images put, on average, at least `target` weight on that task. Too soft a τ leaks weight into wrong
projectors when prototypes are close (docs/design.md §8).

`cpm.metric: mahalanobis` (issue #16 lever 4c; docs/design.md §1.2) replaces the cosine by the log-likelihood of a
Gaussian per task with one covariance shared by all tasks (linear discriminant analysis on x̂ = normalize(f(x))):

    s_i(x) = −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i) / (2D),     w = softmax(s(x) / τ)

with m_i the mean of task i's normalised training features and Σ their pooled within-task covariance, shrunk
towards (tr Σ / D)·I by the Ledoit–Wolf rule (`shared_gaussian`: no setting to tune). The 1/(2D) keeps s on the
cosine's scale, so one τ search serves both. Task i's own images are described by where they lie relative to its
spread, not only by the direction of their mean: a task whose images vary widely (style-cls's renditions) is no
longer claimed by a tighter neighbour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TAU_MIN = 1e-4  # bounds of calibrate_tau's search
TAU_MAX = 1.0
_GRID_POINTS = 41  # 10 per decade
_BISECTION_STEPS = 40


def _features(value: Tensor, name: str) -> Tensor:
    """`value` as a finite (N, D) matrix, or a ValueError saying what is wrong."""
    if not isinstance(value, Tensor):
        raise ValueError(f"CPM: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"CPM: {name} must be 2-D (N, D), got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"CPM: {name} contains NaN or Inf")
    return value


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"CPM: tau must be a finite number > 0, got {tau!r}")


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"CPM: top_k must be ≥ 1 or None, got {top_k}")


def _check_weights(weights: Tensor, tasks: int) -> None:
    if not isinstance(weights, Tensor) or weights.ndim != 2 or weights.shape[1] != tasks:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"CPM: weights must have shape (B, {tasks}), got {shape}")
    if not torch.isfinite(weights).all():
        raise ValueError("CPM: weights contain NaN or Inf")


def _prototypes(prototypes: Tensor, dim: int) -> Tensor:
    prototypes = _features(prototypes, "prototypes")
    if prototypes.shape[0] == 0:
        raise ValueError("CPM: no task prototypes (empty task list)")
    if prototypes.shape[1] != dim:
        raise ValueError(f"CPM: features have dimension {dim} but prototypes {tuple(prototypes.shape)}")
    return prototypes


def _cosine(features: Tensor, prototypes: Tensor) -> Tensor:
    """(N, T) cosine similarities, in float64 so that cos/τ stays accurate for small τ."""
    return F.normalize(features.to(torch.float64), dim=1) @ F.normalize(prototypes.to(torch.float64), dim=1).T


def _similarity(features: Tensor, prototypes: Tensor, precision: Tensor | None) -> Tensor:
    """(N, T) routing logits before τ: the cosine, or with a shared `precision` Σ⁻¹ (D, D) the scaled Gaussian
    log-likelihood −(x̂ − m_i)ᵀ Σ⁻¹ (x̂ − m_i) / (2D) of x̂ = normalize(f) (module doc), in float64."""
    if precision is None:
        return _cosine(features, prototypes)
    dim = features.shape[1]
    if tuple(precision.shape) != (dim, dim):
        raise ValueError(f"CPM: precision must be ({dim}, {dim}) for features of dimension {dim}, got {tuple(precision.shape)}")
    x = F.normalize(features.to(torch.float64), dim=1)
    diff = x[:, None, :] - prototypes.to(torch.float64)[None]  # (N, T, D)
    return -torch.einsum("ntd,de,nte->nt", diff, precision.to(torch.float64), diff) / (2 * dim)


def shared_gaussian(features_by_task: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(means (T, D), precision Σ⁻¹ (D, D)), float64, of `cpm.metric: mahalanobis` (module doc): each task's mean of
    its normalised features, and the inverse of their pooled within-task covariance S shrunk by Ledoit–Wolf,

        Σ = ρ·(tr S / D)·I + (1 − ρ)·S,   ρ = min(b², d²) / d²,   d² = ‖S − (tr S / D)·I‖²_F,
        b² = (1/n²) Σ_k ‖x_k x_kᵀ − S‖²_F      over the n centred feature vectors x_k (Ledoit & Wolf, 2004)."""
    features = [F.normalize(_features(f, f"features of task {i}").to(torch.float64), dim=1)
                for i, f in enumerate(features_by_task)]
    if not features or any(f.shape[0] == 0 for f in features):
        raise ValueError("CPM: shared_gaussian needs at least one image per task")
    means = torch.stack([f.mean(dim=0) for f in features])  # (T, D)
    centred = torch.cat([f - m for f, m in zip(features, means, strict=True)])  # (n, D)
    n, dim = centred.shape
    S = centred.T @ centred / n
    scale = S.diagonal().mean()
    d2 = (S - scale * torch.eye(dim, dtype=S.dtype)).square().sum()
    norms = centred.square().sum(dim=1)  # ‖x_k‖²
    b2 = (norms.square() - 2 * torch.einsum("kd,de,ke->k", centred, S, centred) + S.square().sum()).sum() / n**2
    rho = float(torch.clamp(b2 / d2, max=1.0)) if d2 > 0 else 1.0
    covariance = rho * scale * torch.eye(dim, dtype=S.dtype) + (1 - rho) * S
    return means, torch.linalg.inv(covariance)


def _softmax_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Row softmax over the `top_k` largest logits; the others get exactly 0."""
    if top_k is None or top_k >= logits.shape[1]:
        return logits.softmax(dim=1)
    kept = logits.topk(top_k, dim=1).indices
    masked = torch.full_like(logits, -math.inf).scatter(1, kept, logits.gather(1, kept))
    return masked.softmax(dim=1)


def prototype(features: Tensor) -> Tensor:
    """μ = normalize(mean_j normalize(f_j)) of one task's (N, D) image features → (D,)."""
    features = _features(features, "features")
    if features.shape[0] == 0:
        raise ValueError("CPM: cannot build a prototype from 0 features")
    return F.normalize(F.normalize(features, dim=1).mean(dim=0), dim=0)


def routing_weights(features: Tensor, prototypes: Tensor, tau: float, top_k: int | None = None,
                    precision: Tensor | None = None) -> Tensor:
    """(B, T) weights softmax(cos(f, μ_i) / τ) per image — or, with a shared `precision`, softmax(s_i(f) / τ) of the
    Gaussian routing (module doc; `prototypes` are then the tasks' means) — kept to the top-k tasks when `top_k` is set.

    Computed in float64; returned in float32, or float64 for float64 features.
    """
    _check_tau(tau)
    _check_top_k(top_k)
    features = _features(features, "features")
    prototypes = _prototypes(prototypes, features.shape[1])
    weights = _softmax_top_k(_similarity(features, prototypes, precision) / tau, top_k)
    return weights.to(torch.promote_types(features.dtype, torch.float32))


def calibrate_tau(
    features_by_task: Sequence[Tensor], prototypes: Tensor, target: float = 0.9, top_k: int | None = None,
    precision: Tensor | None = None,
) -> float:
    """The largest τ in [TAU_MIN, TAU_MAX] at which every task's own training images put, on average, at least
    `target` weight on that task: min over tasks of (mean over the task's images of w_task) ≥ target.

    The minimum over tasks (rather than one mean over all images) keeps a small or hard task from being
    outvoted by a large easy one. Search: a log grid (10 points per decade), then bisection in log τ between
    the largest grid point that meets the target and the next one. If no τ on the grid meets it (too many
    images are closer to another task's prototype), a warning is raised and the grid τ with the best score
    is returned. One task: TAU_MAX (its weight is 1 for any τ).
    """
    if len(features_by_task) == 0:
        raise ValueError("CPM: calibrate_tau needs at least one task (empty task list)")
    if not 0 < target < 1:
        raise ValueError(f"CPM: target must lie in (0, 1), got {target}")
    _check_top_k(top_k)
    features = [_features(f, f"features of task {i}") for i, f in enumerate(features_by_task)]
    prototypes = _prototypes(prototypes, features[0].shape[1])
    if prototypes.shape[0] != len(features):
        raise ValueError(f"CPM: {len(features)} feature sets but {prototypes.shape[0]} prototypes")
    for i, f in enumerate(features):
        if f.shape[0] == 0:
            raise ValueError(f"CPM: task {i} has no features")
        if f.shape[1] != prototypes.shape[1]:
            raise ValueError(f"CPM: features of task {i} have dimension {f.shape[1]}, prototypes {prototypes.shape[1]}")
    if len(features) == 1:
        return TAU_MAX
    cosines = [_similarity(f, prototypes, precision) for f in features]  # (N_i, T) logits before τ

    def score(tau: float) -> float:
        return min(_softmax_top_k(cos / tau, top_k)[:, i].mean().item() for i, cos in enumerate(cosines))

    grid = torch.logspace(math.log10(TAU_MIN), math.log10(TAU_MAX), _GRID_POINTS, dtype=torch.float64).tolist()
    scores = [score(tau) for tau in grid]
    meeting = [i for i, s in enumerate(scores) if s >= target]
    if not meeting:
        best = max(range(len(grid)), key=lambda i: (scores[i], i))
        warnings.warn(
            f"CPM: no tau in [{TAU_MIN:g}, {TAU_MAX:g}] puts {target:g} mean weight on every task's own images "
            f"(best {scores[best]:.3f} at tau = {grid[best]:.3g}); prototypes are too close",
            stacklevel=2,
        )
        return grid[best]
    last = meeting[-1]
    if last == len(grid) - 1:
        return TAU_MAX
    low, high = grid[last], grid[last + 1]  # low meets the target, high does not
    for _ in range(_BISECTION_STEPS):
        middle = math.sqrt(low * high)
        if score(middle) >= target:
            low = middle
        else:
            high = middle
    return low


def mix_projectors(projectors: Sequence[nn.Module], z: Tensor, weights: Tensor) -> Tensor:
    """H = Σ_i w_i P_i(z) for vision features z (B, P, Dv) and weights (B, T) → (B, P, H).

    A projector only sees the images that give it non-zero weight, and is skipped when none does (top-k).
    """
    if len(projectors) == 0:
        raise ValueError("CPM: no projectors to mix (empty task list)")
    _check_weights(weights, len(projectors))
    if z.shape[0] != weights.shape[0]:
        raise ValueError(f"CPM: {z.shape[0]} images in z but {weights.shape[0]} rows of weights")
    if z.shape[0] == 0:
        return projectors[0](z)
    weights = weights.to(z.device)
    mixed: Tensor | None = None
    for projector, column in zip(projectors, weights.T):
        rows = column.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        projected = projector(z if rows.numel() == z.shape[0] else z[rows])
        term = column[rows].to(projected.dtype).view(-1, *[1] * (projected.ndim - 1)) * projected
        if mixed is None:
            mixed = projected.new_zeros((z.shape[0], *projected.shape[1:]))
        mixed = mixed.index_add(0, rows, term)
    if mixed is None:
        raise ValueError("CPM: every routing weight is zero")
    return mixed


class RoutedProjector(nn.Module):
    """Drop-in for a LLaVA's `multi_modal_projector` that mixes the task projectors per image.

    LLaVA calls its projector with the vision features only, so the caller computes the routing weights
    of the batch (`routing_weights` on the pooled vision features) and sets them with `route(weights)`
    before the forward pass (or `generate`); they stay in force until the next `route`.
    """

    def __init__(self, projectors: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(projectors) == 0:
            raise ValueError("CPM: RoutedProjector needs at least one projector (empty task list)")
        self.projectors = nn.ModuleList(projectors)
        self.weights: Tensor | None = None  # a plain attribute, so it never enters the state dict

    def route(self, weights: Tensor) -> RoutedProjector:
        """Set the (B, T) weights of the next batch; returns self."""
        _check_weights(weights, len(self.projectors))
        self.weights = weights.detach()
        return self

    def forward(self, z: Tensor) -> Tensor:
        if self.weights is None:
            raise RuntimeError("CPM: RoutedProjector.route(weights) must be called before forward")
        return mix_projectors(self.projectors, z, self.weights)
