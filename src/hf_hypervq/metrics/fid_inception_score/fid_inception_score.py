"""FID and Inception Score from the features and class probabilities of a named feature extractor."""

import datasets
import evaluate
import torch


_DESCRIPTION = """Fréchet Inception Distance (Heusel et al. 2017) between real and generated images, and Inception
Score (Salimans et al. 2016) of the generated ones, from features and class probabilities computed beforehand. FID is
`|mu_r - mu_g|² + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))` of Gaussians fitted to the two feature sets (float64; the trace
of the square root is taken from the eigenvalues of `S_r^(1/2) S_g S_r^(1/2)`); IS is `exp(E_x KL(p(y|x) || p(y)))`
over `splits` equal parts of the generated images, mean and standard deviation. Both depend entirely on the feature
extractor, so its name (and ideally a hash of its weights) is a required argument and is returned with the scores:
numbers from different extractors are not comparable."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): one feature vector per image (real and generated, in any order).
    references (`list[int]`): 1 for a generated image, 0 for a real one.
    probabilities (`list[list[float]]`, *optional*): the extractor's class probabilities of the generated images,
        in their order; gives the Inception Score.
    feature_extractor (`str`): what made the features, e.g. "google/inception_v3 (sha256 ...)". Required.
    splits (`int`, *optional*, defaults to 10): parts for the Inception Score's spread.

Returns:
    fid (`float`), inception_score and inception_score_std (`float`, with `probabilities`), num_real,
    num_generated (`int`), feature_extractor (`str`).

Example:
    >>> fid = evaluate.load("fid_inception_score")
    >>> fid.compute(predictions=[[0.0], [1.0], [0.0], [1.0]], references=[0, 0, 1, 1], feature_extractor="toy")["fid"]
    0.0
"""

_CITATION = """@inproceedings{heusel2017gans,
  title     = {GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author    = {Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle = {NeurIPS},
  year      = {2017}
}
@inproceedings{salimans2016improved,
  title     = {Improved Techniques for Training GANs},
  author    = {Salimans, Tim and Goodfellow, Ian and Zaremba, Wojciech and Cheung, Vicki and Radford, Alec and Chen, Xi},
  booktitle = {NeurIPS},
  year      = {2016}
}"""


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `(N, F)`, in float64."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over `splits` parts of `exp(E_x KL(p(y|x) || p(y)))`."""
    p = probabilities.double().clamp_min(1e-12)
    scores = []
    for part in p.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        scores.append((part * (part.log() - marginal.log())).sum(1).mean().exp().item())
    mean = sum(scores) / len(scores)
    return mean, (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FidInceptionScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://github.com/mseitzer/pytorch-fid"],
        )

    def _compute(self, predictions, references, feature_extractor=None, probabilities=None, splits: int = 10):
        if not feature_extractor or not isinstance(feature_extractor, str):
            raise ValueError("`feature_extractor` is required: FID and IS mean nothing without the extractor's name")
        features = torch.as_tensor(predictions, dtype=torch.float64)
        generated = torch.as_tensor(references, dtype=torch.bool)
        real, fake = features[~generated], features[generated]
        if len(real) < 2 or len(fake) < 2:
            raise ValueError(f"FID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
        result = {"fid": frechet_distance(real, fake), "num_real": len(real), "num_generated": len(fake)}
        if probabilities is not None:
            probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
            if len(probabilities) != len(fake):
                raise ValueError(f"`probabilities` must have one row per generated image ({len(fake)})")
            result["inception_score"], result["inception_score_std"] = inception_score(probabilities, splits)
        return {**result, "feature_extractor": feature_extractor}
