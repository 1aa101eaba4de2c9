"""Metrics the `evaluate` modules (`hf_hypervq.metrics`) do not cover: top-1 accuracy, how decided a quantizer's
logits are (`logit_confidence`, a collapse diagnostic), and the perturbation of the cluster metrics' noisy condition
(paper Table 5: random rotations, flips, Gaussian noise). Codebook usage, reconstruction, cluster quality, mCE and
FID/IS are computed by the modules.
"""

import math

import torch
import torch.nn.functional as F


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose highest logit is the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def logit_confidence_per_row(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logit_confidence` before the mean: the largest softmax probability and the top-1 − top-2 gap of each row of
    `logits` `(..., K)`, each `(N,)` in float32 (for gathering across processes before averaging). The largest
    probability is `1 / sum_k exp(l_k - l_max)`, a log-sum-exp that float32 holds to rounding (the sum is at least 1),
    with no N×K softmax kept and no float64, which MPS lacks."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    top2 = logits.topk(2, dim=-1).values
    return (logits - top2[:, :1]).exp_().sum(-1).reciprocal_(), top2[:, 0] - top2[:, 1]


def logit_confidence(logits: torch.Tensor) -> dict[str, float]:
    """How decided an MLR/Gumbel quantizer's choice is, from its logits `(..., K)`: `mean_max_probability` (mean
    over rows of the largest softmax probability: 1/K for flat logits, 1 for a sure choice) and `logit_margin` (mean
    gap between the largest and second-largest logit). Flat logits make the training-time Gumbel sample a near-uniform
    draw, whatever the argmax is."""
    max_probability, margin = logit_confidence_per_row(logits)
    return {"mean_max_probability": max_probability.mean().item(), "logit_margin": margin.mean().item()}


def perturb(pixel_values: torch.Tensor, generator: torch.Generator, max_degrees: float = 30.0, noise_std: float = 0.1):
    """The noisy condition of Table 5: each image is rotated by a random angle in `±max_degrees`, flipped left-right
    with probability 1/2, and gets Gaussian noise of standard deviation `noise_std` (in the normalised range)."""
    batch = len(pixel_values)
    angles = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(max_degrees)
    flips = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = angles.cos(), angles.sin()
    theta = torch.stack(
        [
            torch.stack([cos * flips, -sin, torch.zeros(batch)], -1),
            torch.stack([sin * flips, cos, torch.zeros(batch)], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta.to(pixel_values), list(pixel_values.shape), align_corners=False)
    rotated = F.grid_sample(pixel_values, grid, padding_mode="border", align_corners=False)
    noise = torch.randn(pixel_values.shape, generator=generator).to(pixel_values)
    return rotated + noise_std * noise
