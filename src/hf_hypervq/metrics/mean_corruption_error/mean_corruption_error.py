"""Corruption errors and mCE normalised by AlexNet (Hendrycks & Dietterich 2019), with VQ-SA's known/unknown split."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """Robustness to the ImageNet-C corruptions. From the top-1 error `E_{c,s}` of a classifier under
each corruption c and severity s, the corruption error `CE_c = 100 · mean_s E_{c,s} / mean_s E^AlexNet_{c,s}`,
normalised by AlexNet's errors (Hendrycks & Dietterich 2019), the mCE over the 15 common corruptions ("known": VQ-SA
trains on them) and the "unknown" mCE over the 4 extra ones, plus the mean accuracies of the two groups (VQ-SA's
Table 6 columns). The corruptions must be applied to the 224-pixel centre crops, as ImageNet-C was made, for the
numbers to compare with published ones."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): top-1 error rates in [0, 1], one per (corruption, severity).
    references (`list[str]`): the corruption name of each error rate (bethgelab/imagecorruptions names).

Returns:
    corruption_errors (`dict[str, float]`): CE per corruption, in percent.
    mCE, unknown_mCE (`float` or None): means over the common / extra corruptions present.
    known_accuracy, unknown_accuracy (`float` or None): mean accuracy over those (corruption, severity) pairs.

Example:
    >>> mce = evaluate.load("mean_corruption_error")
    >>> mce.compute(predictions=[0.443, 0.443], references=["gaussian_noise", "gaussian_noise"])["mCE"]
    50.0
"""

_CITATION = """@inproceedings{hendrycks2019benchmarking,
  title     = {Benchmarking Neural Network Robustness to Common Corruptions and Perturbations},
  author    = {Hendrycks, Dan and Dietterich, Thomas},
  booktitle = {ICLR},
  year      = {2019}
}"""

# bethgelab/imagecorruptions order: 15 common corruptions ("known") and 4 extra ones ("unknown").
COMMON_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# AlexNet's top-1 error (%) per corruption, averaged over the 5 severities (Hendrycks & Dietterich 2019, as in
# yangzhou321/VQSA's imagenet_dataset.py).
ALEXNET_ERRORS = dict(
    zip(
        COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS,
        (88.6, 89.4, 92.3, 82.0, 82.6, 78.6, 79.8, 86.7, 82.7, 81.9, 56.5, 85.3, 64.6, 71.8, 60.7,
         84.5, 78.7, 71.8, 65.8),
    )
)  # fmt: skip


def mean_corruption_error(errors: dict) -> dict:
    """The module's result from `{corruption: [error per severity]}` (rates in [0, 1])."""
    unknown = set(errors) - set(ALEXNET_ERRORS)
    if unknown:
        raise ValueError(f"unknown corruptions {sorted(unknown)}; expected names from {list(ALEXNET_ERRORS)}")
    ce = {name: 100 * float(np.mean(rates)) / (ALEXNET_ERRORS[name] / 100) for name, rates in errors.items()}

    def average(names, values):
        present = [value for name in names if name in values for value in np.atleast_1d(values[name])]
        return float(np.mean(present)) if present else None

    accuracies = {name: [1 - rate for rate in rates] for name, rates in errors.items()}
    return {
        "corruption_errors": ce,
        "mCE": average(COMMON_CORRUPTIONS, ce),
        "unknown_mCE": average(EXTRA_CORRUPTIONS, ce),
        "known_accuracy": average(COMMON_CORRUPTIONS, accuracies),
        "unknown_accuracy": average(EXTRA_CORRUPTIONS, accuracies),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanCorruptionError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/hendrycks/robustness"],
        )

    def _compute(self, predictions, references):
        if any(not 0 <= rate <= 1 for rate in predictions):
            raise ValueError("`predictions` must be top-1 error rates in [0, 1]")
        errors: dict = {}
        for rate, name in zip(predictions, references):
            errors.setdefault(name, []).append(rate)
        return mean_corruption_error(errors)
