"""The paper's metrics in plain torch (offline; `evaluate.load("accuracy")` needs the network).

- reconstruction MSE and top-1 accuracy;
- codebook perplexity and the fraction of codes used (Table 4);
- silhouette score and Davies-Bouldin index of pre-quantization embeddings clustered by code id (Table 5), also after
  perturbing the inputs (`perturb`: random rotations, flips, Gaussian noise);
- corruption errors and mCE normalised by AlexNet, with VQ-SA's known/unknown split (docs/method.md#corruption-error).
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def reconstruction_mse(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over every pixel and channel."""
    return F.mse_loss(reconstruction.double(), target.double()).item()


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose highest logit is the label."""
    return (logits.argmax(-1) == labels).double().mean().item()


def codebook_usage(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """`perplexity` (exp of the entropy of the code histogram; 1 to K), `codes_used` (fraction of the K codes
    that occur) and `dead_codes` (how many of the K never occur) of a set of code ids."""
    return usage_from_counts(torch.bincount(tokens.reshape(-1).long(), minlength=codebook_size))


def usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """`codebook_usage` from a histogram `(K,)` of code counts."""
    counts = counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "perplexity": entropy.exp().item(),
        "codes_used": (counts > 0).double().mean().item(),
        "dead_codes": int((counts == 0).sum()),
    }


def logit_confidence_per_row(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logit_confidence` before the mean: the largest softmax probability and the top-1 − top-2 gap of each row of
    `logits` `(..., K)`, each `(N,)` in float64 (for gathering across processes before averaging)."""
    logits = logits.reshape(-1, logits.shape[-1]).double()
    top2 = logits.topk(2, dim=-1).values
    return logits.softmax(-1).amax(-1), top2[:, 0] - top2[:, 1]


def logit_confidence(logits: torch.Tensor) -> dict[str, float]:
    """How decided an MLR/Gumbel quantizer's choice is, from its logits `(..., K)`: `mean_max_probability` (mean
    over rows of the largest softmax probability: 1/K for flat logits, 1 for a sure choice) and `logit_margin` (mean
    gap between the largest and second-largest logit). Flat logits make the training-time Gumbel sample a near-uniform
    draw, whatever the argmax is."""
    max_probability, margin = logit_confidence_per_row(logits)
    return {"mean_max_probability": max_probability.mean().item(), "logit_margin": margin.mean().item()}


def _compact_labels(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    unique, compact = torch.unique(labels.reshape(-1), return_inverse=True)
    return compact, len(unique)


def silhouette_score(embeddings: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) with Euclidean distances, as scikit-learn computes it: for each
    point, `(b - a) / max(a, b)` with `a` its mean distance to its own cluster and `b` the smallest mean distance
    to another cluster; 0 for points alone in their cluster. Memory is `chunk_size × N`, never N×N."""
    x = embeddings.reshape(len(embeddings), -1).double()
    clusters, num_clusters = _compact_labels(labels)
    if not 2 <= num_clusters <= len(x) - 1:
        raise ValueError(
            f"silhouette needs 2 <= clusters <= samples - 1, got {num_clusters} clusters, {len(x)} points"
        )
    one_hot = F.one_hot(clusters, num_clusters).double()  # (N, C)
    sizes = one_hot.sum(0)  # (C,)
    scores = []
    for start in range(0, len(x), chunk_size):
        distance_sums = torch.cdist(x[start : start + chunk_size], x) @ one_hot  # (chunk, C)
        own = clusters[start : start + chunk_size]
        own_size = sizes[own]
        a = distance_sums.gather(1, own[:, None])[:, 0] / (own_size - 1).clamp_min(1)
        mean_to_others = (distance_sums / sizes).scatter(1, own[:, None], math.inf)
        b = mean_to_others.min(1).values
        s = (b - a) / torch.maximum(a, b)
        scores.append(torch.where(own_size > 1, torch.nan_to_num(s), torch.zeros_like(s)))
    return torch.cat(scores).mean().item()


def davies_bouldin_index(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Davies-Bouldin index (lower is better), as scikit-learn computes it: the mean over clusters of the largest
    `(S_i + S_j) / d(c_i, c_j)`, with `S_i` the mean distance of cluster i's points to its centroid `c_i`."""
    x = embeddings.reshape(len(embeddings), -1).double()
    clusters, num_clusters = _compact_labels(labels)
    if not 2 <= num_clusters <= len(x) - 1:
        raise ValueError(f"Davies-Bouldin needs 2 <= clusters <= samples - 1, got {num_clusters} clusters")
    one_hot = F.one_hot(clusters, num_clusters).double()
    centroids = (one_hot.T @ x) / one_hot.sum(0)[:, None]  # (C, D)
    scatter = (one_hot.T @ (x - centroids[clusters]).norm(dim=1)) / one_hot.sum(0)  # (C,)
    # The exact pairwise form: cdist's matmul shortcut (taken above 25 rows) leaves ~1e-8 on the diagonal instead of 0,
    # and S_i / 1e-8 would swamp the index.
    centroid_distances = torch.cdist(centroids, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    if torch.allclose(scatter, torch.zeros_like(scatter)) or torch.allclose(
        centroid_distances, torch.zeros_like(centroid_distances)
    ):
        return 0.0
    centroid_distances[centroid_distances == 0] = math.inf  # the diagonal, and coinciding centroids (as scikit-learn)
    ratios = (scatter[:, None] + scatter[None, :]) / centroid_distances
    return ratios.max(1).values.mean().item()


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


# ImageNet-C corruptions (bethgelab/imagecorruptions order): 15 common ones, used in training ("known"), and 4 extra
# ones never trained on ("unknown"). AlexNet's top-1 error (%) per corruption, averaged over the 5 severities
# (Hendrycks & Dietterich 2019, as in yangzhou321/VQSA imagenet_dataset.py), normalises the corruption errors.
COMMON_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALEXNET_ERRORS = dict(
    zip(
        COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS,
        (
            88.6,
            89.4,
            92.3,
            82.0,
            82.6,
            78.6,
            79.8,
            86.7,
            82.7,
            81.9,
            56.5,
            85.3,
            64.6,
            71.8,
            60.7,
            84.5,
            78.7,
            71.8,
            65.8,
        ),
    )
)


def mean_corruption_error(errors: Mapping[str, Sequence[float]]) -> dict:
    """Corruption errors normalised by AlexNet (Hendrycks & Dietterich 2019).

    Args:
        errors: top-1 error rates in [0, 1] per corruption name, one per severity (1-5).

    Returns:
        `{"corruption_errors": {name: CE}, "mCE": ..., "unknown_mCE": ...}` in percent, where
        `CE_c = 100 * mean_s E_{c,s} / mean_s E^AlexNet_{c,s}`, `mCE` averages the common (known) corruptions and
        `unknown_mCE` the extra (unknown) ones present; a group with no corruption present gives None.
    """
    unknown = set(errors) - set(ALEXNET_ERRORS)
    if unknown:
        raise ValueError(f"unknown corruptions {sorted(unknown)}; expected names from {list(ALEXNET_ERRORS)}")
    ce = {name: 100 * (sum(rates) / len(rates)) / (ALEXNET_ERRORS[name] / 100) for name, rates in errors.items()}

    def average(names):
        present = [ce[n] for n in names if n in ce]
        return sum(present) / len(present) if present else None

    return {"corruption_errors": ce, "mCE": average(COMMON_CORRUPTIONS), "unknown_mCE": average(EXTRA_CORRUPTIONS)}


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `(N, F)` (FID when the features are
    Inception-v3's pool features): `|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`, in float64. The trace of
    the matrix square root is the sum of the square roots of the eigenvalues of `S_a^(1/2) S_b S_a^(1/2)`."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of class probabilities `(N, C)`: `exp(E_x KL(p(y|x) || p(y)))`,
    mean and standard deviation over `splits` equal parts, as usually reported."""
    p = probabilities.double().clamp_min(1e-12)
    scores = []
    for part in p.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        scores.append((part * (part.log() - marginal.log())).sum(1).mean().exp().item())
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return mean, std
