"""Codebook usage of a vector quantizer: perplexity, fraction of codes used, dead codes."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """How much of a vector quantizer's codebook is in use, from the code ids it chose: the perplexity of
the code histogram (exp of its entropy; 1 when one code is used for everything, K when all K codes are used equally
often), the fraction of the K codes that occur, and the number of dead codes (never chosen)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): code ids, one per token (flatten the token grids of every image).
    codebook_size (`int`): K, the number of codes.

Returns:
    perplexity (`float`): 1 to K.
    codes_used (`float`): fraction of the K codes that occur, 0 to 1.
    dead_codes (`int`): how many of the K codes never occur.
    num_tokens (`int`): how many code ids were counted.

Example:
    >>> usage = evaluate.load("codebook_usage")
    >>> usage.compute(predictions=[0, 1, 1, 3], codebook_size=4)
    {'perplexity': 2.828..., 'codes_used': 0.75, 'dead_codes': 1, 'num_tokens': 4}
"""

_CITATION = """@article{goswami2024hypervq,
  title   = {HyperVQ: MLR-based Vector Quantization in Hyperbolic Space},
  author  = {Goswami, Nabarun and Mukuta, Yusuke and Harada, Tatsuya},
  journal = {arXiv preprint arXiv:2403.13015},
  year    = {2024}
}"""


def usage_from_counts(counts) -> dict:
    """The usage numbers from a histogram `(K,)` of code counts."""
    counts = np.asarray(counts, dtype=np.float64)
    probabilities = counts[counts > 0] / max(counts.sum(), 1.0)
    entropy = -(probabilities * np.log(probabilities)).sum()
    return {
        "perplexity": float(np.exp(entropy)),
        "codes_used": float((counts > 0).mean()),
        "dead_codes": int((counts == 0).sum()),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodebookUsage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, codebook_size: int):
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) or codebook_size < 1:
            raise ValueError(f"`codebook_size` must be a positive integer, got {codebook_size!r}")
        ids = np.asarray(predictions, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= codebook_size):
            raise ValueError(f"code ids must lie in [0, {codebook_size}); got {ids.min()} to {ids.max()}")
        counts = np.bincount(ids, minlength=codebook_size)
        return {**usage_from_counts(counts), "num_tokens": int(ids.size)}
