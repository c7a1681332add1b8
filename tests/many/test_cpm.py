"""CPM (many/cpm.py): prototypes, routing weights, τ calibration, projector mixing, and a table of bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from many.cpm import (
    TAU_MAX,
    RoutedProjector,
    calibrate_tau,
    mix_projectors,
    prototype,
    routing_weights,
    shared_gaussian,
)

DIM = 16


def clustered_features(tasks: int = 3, per_task: int = 50, spread: float = 0.35, seed: int = 0):
    """Per-task features scattered around distinct centres (shared offset: prototypes are close but separable)."""
    generator = torch.Generator().manual_seed(seed)
    offset = 3.0 * torch.randn(DIM, generator=generator)
    centres = offset + torch.randn(tasks, DIM, generator=generator)
    return [c + spread * torch.randn(per_task, DIM, generator=generator) for c in centres]


def projectors(count: int, seed: int = 0, vision: int = 8, hidden: int = 6) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(vision, hidden), nn.GELU(), nn.Linear(hidden, hidden)) for _ in range(count)]


def correct_weight(features_by_task, prototypes, tau, top_k=None) -> list[float]:
    """Mean weight each task's own images put on that task (float64: calibration sits right at the target)."""
    return [
        routing_weights(f.double(), prototypes, tau, top_k)[:, i].mean().item() for i, f in enumerate(features_by_task)
    ]


def test_prototype_is_the_normalised_mean_direction():
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(prototype(features), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # Scaling one image does not move the prototype: each image is normalised first.
    torch.testing.assert_close(prototype(features * torch.tensor([[10.0], [1.0]])), prototype(features))


@pytest.mark.parametrize("top_k", [None, 1, 2, 5])
def test_weights_are_a_distribution(top_k):
    features = torch.cat(clustered_features(tasks=4))
    prototypes = torch.stack([prototype(f) for f in clustered_features(tasks=4)])
    weights = routing_weights(features, prototypes, tau=0.05, top_k=top_k)
    assert weights.shape == (features.shape[0], 4) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(features.shape[0]))


def test_weights_are_one_hot_when_tau_goes_to_zero():
    prototypes = F.normalize(torch.randn(5, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    weights = routing_weights(prototypes * 7.0, prototypes, tau=1e-6)
    assert torch.equal(weights, torch.eye(5))


def test_top_k_keeps_exactly_k_tasks():
    features = torch.cat(clustered_features(tasks=5))
    prototypes = torch.stack([prototype(f) for f in clustered_features(tasks=5)])
    full = routing_weights(features, prototypes, tau=1.0)
    kept = routing_weights(features, prototypes, tau=1.0, top_k=2)
    assert ((kept > 0).sum(dim=1) == 2).all()
    assert ((kept > 0) == (full >= full.topk(2, dim=1).values[:, 1:])).all()
    # The kept tasks keep their relative weights, renormalised.
    renormalised = torch.where(kept > 0, full, 0.0)
    torch.testing.assert_close(kept, renormalised / renormalised.sum(dim=1, keepdim=True))


def test_calibrated_tau_meets_the_target_and_a_larger_one_does_not():
    features = clustered_features(tasks=4)
    prototypes = torch.stack([prototype(f) for f in features])
    tau = calibrate_tau(features, prototypes, target=0.9)
    assert 1e-4 <= tau < TAU_MAX
    assert min(correct_weight(features, prototypes, tau)) >= 0.9
    assert min(correct_weight(features, prototypes, tau * 1.01)) < 0.9


def test_calibration_with_top_k_and_a_stricter_target():
    features = clustered_features(tasks=4, seed=3)
    prototypes = torch.stack([prototype(f) for f in features])
    loose = calibrate_tau(features, prototypes, target=0.8, top_k=2)
    strict = calibrate_tau(features, prototypes, target=0.95, top_k=2)
    assert strict < loose
    assert min(correct_weight(features, prototypes, strict, top_k=2)) >= 0.95
    assert min(correct_weight(features, prototypes, strict * 1.01, top_k=2)) < 0.95


def test_calibration_with_one_task_returns_the_default():
    features = clustered_features(tasks=1)
    assert calibrate_tau(features, prototype(features[0])[None]) == TAU_MAX


def test_calibration_warns_when_the_target_is_unreachable():
    # Two tasks drawn from the same cluster: about half the images sit closer to the other prototype.
    same = clustered_features(tasks=1, per_task=100)[0]
    features = [same[:50], same[50:]]
    prototypes = torch.stack([prototype(f) for f in features])
    with pytest.warns(UserWarning, match="no tau"):
        tau = calibrate_tau(features, prototypes, target=0.9)
    assert 1e-4 <= tau <= TAU_MAX


def test_mix_of_one_projector_is_that_projector():
    (projector,) = projectors(1)
    z = torch.randn(3, 4, 8)
    mixed = mix_projectors([projector], z, torch.ones(3, 1))
    assert torch.equal(mixed, projector(z))


def test_mix_is_the_weighted_sum_and_skips_zero_weights():
    mixers = projectors(3)
    z = torch.randn(4, 5, 8)
    weights = torch.tensor([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.3, 0.7]])
    expected = sum(weights[:, i, None, None] * p(z) for i, p in enumerate(mixers))
    torch.testing.assert_close(mix_projectors(mixers, z, weights), expected)

    calls = []
    for i, p in enumerate(mixers):
        p.register_forward_hook(lambda module, args, output, i=i: calls.append((i, args[0].shape[0])))
    mix_projectors(mixers, z, torch.tensor([[1.0, 0.0, 0.0]] * 2 + [[0.0, 0.5, 0.5]] * 2))
    assert calls == [(0, 2), (1, 2), (2, 2)]  # each projector sees only its images
    calls.clear()
    mix_projectors(mixers, z, torch.tensor([[0.0, 1.0, 0.0]] * 4))
    assert calls == [(1, 4)]


def test_routed_projector_routes_each_image():
    mixers = projectors(2)
    routed = RoutedProjector(mixers)
    assert set(routed.state_dict()) == {f"projectors.{k}" for k in nn.ModuleList(mixers).state_dict()}
    z = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="route"):
        routed(z)
    routed.route(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = routed(z)
    torch.testing.assert_close(out[0], mixers[0](z[:1])[0])
    torch.testing.assert_close(out[1], mixers[1](z[1:])[0])


def _with_nan(tensor):
    tensor = tensor.clone()
    tensor[0, 0] = math.nan
    return tensor


FEATURES = torch.randn(4, DIM)
PROTOTYPES = F.normalize(torch.randn(3, DIM), dim=1)

BAD_INPUTS = {
    "routing: tau 0": (lambda: routing_weights(FEATURES, PROTOTYPES, 0.0), "tau must be a finite number > 0"),
    "routing: tau negative": (lambda: routing_weights(FEATURES, PROTOTYPES, -0.1), "tau must be a finite number > 0"),
    "routing: tau NaN": (lambda: routing_weights(FEATURES, PROTOTYPES, math.nan), "tau must be a finite number > 0"),
    "routing: top_k 0": (lambda: routing_weights(FEATURES, PROTOTYPES, 0.1, top_k=0), "top_k must be ≥ 1"),
    "routing: dimension mismatch": (
        lambda: routing_weights(FEATURES[:, :-1], PROTOTYPES, 0.1),
        "features have dimension 15 but prototypes (3, 16)",
    ),
    "routing: NaN features": (lambda: routing_weights(_with_nan(FEATURES), PROTOTYPES, 0.1), "features contains NaN"),
    "routing: 1-D features": (lambda: routing_weights(FEATURES[0], PROTOTYPES, 0.1), "features must be 2-D"),
    "routing: no prototypes": (lambda: routing_weights(FEATURES, PROTOTYPES[:0], 0.1), "empty task list"),
    "prototype: no features": (lambda: prototype(FEATURES[:0]), "0 features"),
    "prototype: NaN features": (lambda: prototype(_with_nan(FEATURES)), "features contains NaN"),
    "calibrate: empty task list": (lambda: calibrate_tau([], PROTOTYPES), "empty task list"),
    "calibrate: count mismatch": (lambda: calibrate_tau([FEATURES] * 2, PROTOTYPES), "2 feature sets but 3 prototypes"),
    "calibrate: dimension mismatch": (
        lambda: calibrate_tau([FEATURES, FEATURES, FEATURES[:, :-1]], PROTOTYPES),
        "features of task 2 have dimension 15",
    ),
    "calibrate: NaN features": (
        lambda: calibrate_tau([FEATURES, _with_nan(FEATURES), FEATURES], PROTOTYPES),
        "features of task 1 contains NaN",
    ),
    "calibrate: empty task": (
        lambda: calibrate_tau([FEATURES, FEATURES[:0], FEATURES], PROTOTYPES),
        "task 1 has no features",
    ),
    "calibrate: target 1": (lambda: calibrate_tau([FEATURES] * 3, PROTOTYPES, target=1.0), "target must lie in (0, 1)"),
    "mix: empty task list": (lambda: mix_projectors([], torch.randn(2, 3, 8), torch.ones(2, 0)), "empty task list"),
    "mix: weights for other tasks": (
        lambda: mix_projectors(projectors(2), torch.randn(2, 3, 8), torch.ones(2, 3) / 3),
        "weights must have shape (B, 2), got (2, 3)",
    ),
    "mix: batch mismatch": (
        lambda: mix_projectors(projectors(2), torch.randn(3, 3, 8), torch.ones(2, 2) / 2),
        "3 images in z but 2 rows of weights",
    ),
    "mix: NaN weights": (
        lambda: mix_projectors(projectors(2), torch.randn(2, 3, 8), _with_nan(torch.ones(2, 2) / 2)),
        "weights contain NaN or Inf",
    ),
    "routed: empty task list": (lambda: RoutedProjector([]), "empty task list"),
    "routed: weights for other tasks": (
        lambda: RoutedProjector(projectors(2)).route(torch.ones(2, 1)),
        "(B, 2), got (2, 1)",
    ),
}


@pytest.mark.parametrize("call, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_rejected_with_a_clear_message(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# -- Gaussian routing (cpm.metric: mahalanobis, the default; many_cos routes by the cosine) ------------------------


def _elongated(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Two tasks with one shared covariance, wide along the axis the means differ on least: nearest-mean-direction
    routing confuses them, a Gaussian with their shared covariance does not."""
    spread = torch.tensor([0.05, 1.0, 0.05, 0.05])
    means = (torch.tensor([4.0, 0.0, 0.3, 0.0]), torch.tensor([4.0, 0.5, -0.3, 0.0]))
    return [m + torch.randn(n, 4, generator=generator) * spread for m in means]


def test_gaussian_routing_separates_tasks_that_share_an_elongated_spread():
    from many.evaluate import routing_accuracy

    generator = torch.Generator().manual_seed(0)
    train, test = _elongated(400, generator), _elongated(200, generator)
    means, precision = shared_gaussian(train)
    cosine = routing_accuracy(test, torch.stack([prototype(f) for f in train]))
    gaussian = routing_accuracy(test, means, precision)
    assert gaussian > 0.98 and gaussian > cosine + 0.1
    tau = calibrate_tau(train, means, 0.9, precision=precision)  # the same τ search serves it
    assert min(routing_weights(f.double(), means, tau, precision=precision)[:, i].mean().item()
               for i, f in enumerate(train)) >= 0.9 - 1e-9


def test_ledoit_wolf_shrinkage_matches_its_definition():
    features = clustered_features(tasks=2, per_task=30, spread=0.35)
    means, precision = shared_gaussian(features)
    normalised = [F.normalize(f.double(), dim=1) for f in features]
    torch.testing.assert_close(means, torch.stack([f.mean(dim=0) for f in normalised]))
    x = torch.cat([f - f.mean(dim=0) for f in normalised])  # (n, D)
    n, dim = x.shape
    S = x.T @ x / n
    mu = S.trace() / dim
    d2 = ((S - mu * torch.eye(dim, dtype=S.dtype)) ** 2).sum()
    b2 = min(sum(((torch.outer(row, row) - S) ** 2).sum() for row in x) / n**2, d2)
    expected = (b2 / d2) * mu * torch.eye(dim, dtype=S.dtype) + (1 - b2 / d2) * S
    torch.testing.assert_close(torch.linalg.inv(precision), expected)


def test_identity_precision_with_unit_prototypes_routes_as_the_cosine():
    features = clustered_features()
    prototypes = torch.stack([prototype(f) for f in features])
    test = torch.cat(features)
    cosine = routing_weights(test, prototypes, tau=1.0).argmax(dim=1)
    gaussian = routing_weights(test, prototypes, tau=1.0, precision=torch.eye(DIM)).argmax(dim=1)
    assert torch.equal(cosine, gaussian)  # −‖x̂ − μ‖²/2D = (cos − 1)/D for unit x̂, μ
    with pytest.raises(ValueError, match="precision must be"):
        routing_weights(test, prototypes, tau=1.0, precision=torch.eye(DIM + 1))
