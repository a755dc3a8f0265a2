"""The 2-D Gaussian mixture that the sampler and Self-Flow tests reproduce (test_sampling, test_selfflow)."""

import torch

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.3


def _mixture_stats(points):
    """Weights (3,), means (3, 2) and mean stds (3,) of `points` (N, 2) assigned to the nearest mixture mean."""
    assign = torch.cdist(points, MEANS).argmin(dim=1)
    weights = torch.bincount(assign, minlength=3).float() / len(points)
    means = torch.stack([points[assign == k].mean(0) for k in range(3)])
    stds = torch.stack([points[assign == k].std(0).mean() for k in range(3)])
    return weights, means, stds
