"""Fwd-Prompt's subspaces and gradient projection (Zheng et al., "Beyond Anti-Forgetting: Multimodal Continual
Instruction Tuning with Positive Forward Transfer", arXiv 2401.09181; docs/design.md §1 "Comparison methods").

Pure float64 linear algebra on d-dimensional LLM input embeddings; every basis has orthonormal columns.

Energy basis — the top singular directions of X (N, d) covering a share `energy` of its squared singular values,
read from the Gram G = XᵀX / N (d, d) = V diag(σ²/N) Vᵀ, so X is never held:

    k = min { k : Σ_{j≤k} σ_j² ≥ energy · Σ_j σ_j² },     basis = V[:, :k]

Core subspace (anti-forgetting), grown task by task as in GPM (Saha et al. 2021): with U (d, k) the core of the
earlier tasks and G the new task's Gram, the directions U already captures are not counted twice,

    captured = tr(Uᵀ G U),   G_res = (I − UUᵀ) G (I − UUᵀ) = V_res diag(λ_res) V_resᵀ
    U ← [U, V_res[:, :m]],   m = min { m : captured + Σ_{j≤m} λ_res,j ≥ energy · tr(G) }

so the union stays orthonormal by construction (V_res ⊥ U) and tasks with a shared input space add few directions.

Projection (our reading of "projects the prompt gradient to the residual space to minimize interference between
tasks and to the pre-trained subspace for reusing pre-trained knowledge"): the update must lie in BOTH the residual
space span(U)^⊥ of the core and the pre-trained subspace span(P), P (d, k_p) the energy basis of the base model's
token-embedding matrix. The gradient is projected orthogonally onto their intersection:

    g ← g Q Qᵀ,     Q = P N,   N (k_p, m) = orthonormal basis of null(Uᵀ P)

(x = P a is ⊥ U iff Uᵀ P a = 0, so span(Q) = span(P) ∩ span(U)^⊥; Q Qᵀ is the closest-point projector onto it.)
Without a core (the first task) Q = P. Sequential projections — g (I − UUᵀ) P Pᵀ — would leave the update in P
but not ⊥ U (the two projectors do not commute); the intersection satisfies both constraints exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Singular values of Uᵀ P are cosines of principal angles: only structurally zero ones (rounding, ~1e-15) mean
# "orthogonal"; a small but real cosine is a direction of P that still overlaps the core and must be excluded.
NULL_TOLERANCE = 1e-12
ORTHONORMAL_TOLERANCE = 1e-8  # max |BᵀB − I| accepted for a stored float64 basis


def _square_symmetric(gram: Tensor, where: str) -> Tensor:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{where}: the Gram must be square (d, d), got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError(f"{where}: the Gram contains NaN or Inf; check the input embeddings")
    gram = gram.to(torch.float64)
    return (gram + gram.T) / 2  # remove rounding asymmetry before eigh


def _check_energy(energy: float, where: str) -> None:
    if not 0 < energy <= 1:
        raise ValueError(f"{where}: energy must be in (0, 1], got {energy}")


def check_basis(basis: Tensor, d: int, where: str) -> None:
    """`basis` (d, k) float64 with orthonormal columns (k may be 0)."""
    if basis.ndim != 2 or basis.shape[0] != d:
        raise ValueError(f"{where}: a basis must have shape ({d}, k), got {tuple(basis.shape)}")
    if basis.dtype != torch.float64:
        raise ValueError(f"{where}: a basis must be float64, got {basis.dtype}")
    if basis.shape[1] > d:
        raise ValueError(f"{where}: a basis of R^{d} has at most {d} columns, got {basis.shape[1]}")
    error = (basis.T @ basis - torch.eye(basis.shape[1], dtype=torch.float64, device=basis.device)).abs()
    if basis.shape[1] and float(error.max()) > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"{where}: basis columns are not orthonormal (max |BᵀB − I| = {float(error.max()):.2e})")


def extend_core(core: Tensor, gram: Tensor, energy: float) -> Tensor:
    """U (d, k) → [U, V_res[:, :m]] (d, k + m): the GPM update of the module docstring, float64."""
    gram = _square_symmetric(gram, "extend_core")
    _check_energy(energy, "extend_core")
    d = gram.shape[0]
    check_basis(core, d, "extend_core core")
    core = core.to(gram.device)
    total = torch.trace(gram)
    if total <= 0:
        raise ValueError("extend_core: the Gram is zero (no input tokens?); nothing to add to the core")
    residual = torch.eye(d, dtype=torch.float64, device=gram.device) - core @ core.T  # (d, d)
    captured = torch.trace(core.T @ gram @ core)
    values, vectors = torch.linalg.eigh(residual @ gram @ residual)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    positive = int((values > total * d * NULL_TOLERANCE).sum())  # energy outside U beyond rounding
    need = energy * total - captured
    added = min(positive, int((torch.cumsum(values[:positive], 0) < need).sum()) + 1) if need > 0 else 0
    return torch.cat([core, vectors[:, :added]], dim=1)


def energy_basis(gram: Tensor, energy: float) -> Tensor:
    """The top singular directions of X covering `energy` of Σσ², from G = XᵀX/N: V[:, :k] (d, k) float64."""
    d = gram.shape[0] if gram.ndim == 2 else 0
    return extend_core(torch.zeros(d, 0, dtype=torch.float64, device=gram.device), gram, energy)


def update_basis(core: Tensor, pretrained: Tensor) -> Tensor:
    """Q (d, m): orthonormal basis of span(P) ∩ span(U)^⊥ — the directions a prompt may move in."""
    d = pretrained.shape[0]
    check_basis(pretrained, d, "update_basis pretrained")
    check_basis(core, d, "update_basis core")
    core = core.to(pretrained.device)
    if core.shape[1] == 0:
        return pretrained
    _, cosines, vh = torch.linalg.svd(core.T @ pretrained, full_matrices=True)  # (k, k_p) → vh (k_p, k_p)
    overlapping = int((cosines > NULL_TOLERANCE).sum())
    return pretrained @ vh[overlapping:].T  # (d, k_p) @ (k_p, m)


def project_gradient(grad: Tensor, core: Tensor, pretrained: Tensor) -> Tensor:
    """g ← g Q Qᵀ (n, d): the prompt gradient moved into span(P) ∩ span(U)^⊥, computed in float64."""
    if grad.ndim != 2 or grad.shape[1] != pretrained.shape[0]:
        raise ValueError(f"project_gradient: grad must be (n, {pretrained.shape[0]}), got {tuple(grad.shape)}")
    return project_onto(grad, update_basis(core, pretrained))


def project_onto(grad: Tensor, basis: Tensor) -> Tensor:
    """g Q Qᵀ (n, d) in float64, returned in grad's dtype: the training hook's form, with Q computed once per task."""
    return ((grad.to(torch.float64) @ basis) @ basis.T).to(grad.dtype)
