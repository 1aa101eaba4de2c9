"""Cluster quality of a tokenizer's latent vectors with their code ids as clusters: silhouette and Davies-Bouldin."""

import math

import datasets
import evaluate
import torch
import torch.nn.functional as F


_DESCRIPTION = """How well a quantizer's codes separate the encoder's latent vectors (HyperVQ paper, Table 5): the
latents are points, their code ids the clusters. The silhouette score (Rousseeuw 1987; -1 to 1, higher is better)
and the Davies-Bouldin index (Davies & Bouldin 1979; >= 0, lower is better) use Euclidean distances and equal
scikit-learn's `silhouette_score` and `davies_bouldin_score`, computed in float64 torch with `chunk_size × N`
memory instead of scikit-learn's N × N."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): the code id (cluster) of each latent vector.
    references (`list[list[float]]`): the latent vectors, one per code id.

Returns:
    silhouette (`float`), davies_bouldin (`float`), num_points (`int`), num_clusters (`int`).
    Both scores need 2 <= clusters <= points - 1; otherwise they are None.

Example:
    >>> quality = evaluate.load("cluster_quality")
    >>> quality.compute(predictions=[0, 0, 1, 1], references=[[0.0], [0.1], [1.0], [1.1]])["davies_bouldin"]
    0.1111...
"""

_CITATION = """@article{rousseeuw1987silhouettes,
  title   = {Silhouettes: A graphical aid to the interpretation and validation of cluster analysis},
  author  = {Rousseeuw, Peter J.},
  journal = {Journal of Computational and Applied Mathematics},
  volume  = {20},
  pages   = {53--65},
  year    = {1987}
}
@article{davies1979cluster,
  title   = {A Cluster Separation Measure},
  author  = {Davies, David L. and Bouldin, Donald W.},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  number  = {2},
  pages   = {224--227},
  year    = {1979}
}"""


def _compact(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    unique, compact = torch.unique(labels.reshape(-1), return_inverse=True)
    return compact, len(unique)


def silhouette_score(points: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> float:
    """Mean over points of `(b - a) / max(a, b)`, `a` the mean distance to the point's own cluster and `b` the
    smallest mean distance to another cluster; 0 for a point alone in its cluster (as scikit-learn)."""
    x = points.reshape(len(points), -1).double()
    clusters, num_clusters = _compact(labels)
    one_hot = F.one_hot(clusters, num_clusters).double()  # (N, C)
    sizes = one_hot.sum(0)
    scores = []
    for start in range(0, len(x), chunk_size):
        distance_sums = torch.cdist(x[start : start + chunk_size], x) @ one_hot  # (chunk, C)
        own = clusters[start : start + chunk_size]
        own_size = sizes[own]
        a = distance_sums.gather(1, own[:, None])[:, 0] / (own_size - 1).clamp_min(1)
        b = (distance_sums / sizes).scatter(1, own[:, None], math.inf).min(1).values
        s = (b - a) / torch.maximum(a, b)
        scores.append(torch.where(own_size > 1, torch.nan_to_num(s), torch.zeros_like(s)))
    return torch.cat(scores).mean().item()


def davies_bouldin_index(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over clusters of the largest `(S_i + S_j) / d(c_i, c_j)`, `S_i` the mean distance of cluster i's points
    to its centroid `c_i` (as scikit-learn)."""
    x = points.reshape(len(points), -1).double()
    clusters, num_clusters = _compact(labels)
    one_hot = F.one_hot(clusters, num_clusters).double()
    centroids = (one_hot.T @ x) / one_hot.sum(0)[:, None]
    scatter = (one_hot.T @ (x - centroids[clusters]).norm(dim=1)) / one_hot.sum(0)
    # The exact pairwise form: cdist's matmul shortcut leaves ~1e-8 on the diagonal, and S_i / 1e-8 would swamp it.
    distances = torch.cdist(centroids, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    if torch.allclose(scatter, torch.zeros_like(scatter)) or torch.allclose(distances, torch.zeros_like(distances)):
        return 0.0
    distances[distances == 0] = math.inf  # the diagonal, and coinciding centroids (as scikit-learn)
    return ((scatter[:, None] + scatter[None, :]) / distances).max(1).values.mean().item()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClusterQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Sequence(datasets.Value("float64"))}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/clustering.html#clustering-evaluation"],
        )

    def _compute(self, predictions, references):
        labels = torch.as_tensor(predictions, dtype=torch.long)
        points = torch.as_tensor(references, dtype=torch.float64)
        num_clusters = len(labels.unique())
        defined = 2 <= num_clusters <= len(labels) - 1
        return {
            "silhouette": silhouette_score(points, labels) if defined else None,
            "davies_bouldin": davies_bouldin_index(points, labels) if defined else None,
            "num_points": len(labels),
            "num_clusters": num_clusters,
        }
