"""Cluster quality of a tokenizer's latent vectors with their code ids as clusters: silhouette and Davies-Bouldin."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import davies_bouldin_score, silhouette_score


_DESCRIPTION = """How well a quantizer's codes separate the encoder's latent vectors (HyperVQ paper, Table 5): the
latents are points, their code ids the clusters. The silhouette score (Rousseeuw 1987; -1 to 1, higher is better)
and the Davies-Bouldin index (Davies & Bouldin 1979; >= 0, lower is better), with Euclidean distances, computed by
scikit-learn's `silhouette_score` (chunked, so memory stays bounded) and `davies_bouldin_score` in float64."""

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
        labels = np.asarray(predictions, dtype=np.int64)
        points = np.asarray(references, dtype=np.float64).reshape(len(labels), -1)
        num_clusters = len(np.unique(labels))
        defined = 2 <= num_clusters <= len(labels) - 1
        return {
            "silhouette": float(silhouette_score(points, labels)) if defined else None,
            "davies_bouldin": float(davies_bouldin_score(points, labels)) if defined else None,
            "num_points": len(labels),
            "num_clusters": num_clusters,
        }
