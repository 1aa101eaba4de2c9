"""Reconstruction quality of an image tokenizer: MSE, PSNR and SSIM, per image and averaged."""

import datasets
import evaluate
import numpy as np
from skimage.metrics import structural_similarity


_DESCRIPTION = """Reconstruction quality of images against their originals, each averaged over the images:
MSE (mean squared error over pixels and channels), PSNR (`10 log10(data_range² / MSE)` of each image) and SSIM
(Wang et al. 2004, from scikit-image's `structural_similarity`, per channel and averaged, with population
covariances). SSIM uses the paper's 11×11 Gaussian window (σ = 1.5) on images of at least 11 pixels a side, and
scikit-image's 7×7 uniform window on smaller ones (`ssim_window` says which); below 7 pixels it is not defined and
is None. Pass images as flattened arrays with their `image_shape` (channels, height, width) and the `data_range` of
their pixel values: 2.0 for images normalised to [-1, 1] (the tokenizer's default processor), 1.0 for [0, 1], 255
for 8-bit pixels. MSE is in those units."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): reconstructions, one flattened `(C, H, W)` array per image.
    references (`list[list[float]]`): the original images, in the same layout.
    image_shape (`tuple[int, int, int]`): `(channels, height, width)` of every image.
    data_range (`float`): the span of pixel values (maximum minus minimum possible value).
    structural_similarity (`bool`, *optional*, defaults to True): compute SSIM (the slow one); None when False.

Returns:
    mse (`float`), psnr (`float`, dB), ssim (`float`, -1 to 1, or None), ssim_window (`str`), num_images (`int`).

Example:
    >>> reconstruction = evaluate.load("reconstruction")
    >>> reconstruction.compute(predictions=[[0.0] * 64], references=[[0.5] * 64], image_shape=(1, 8, 8),
    ...                        data_range=1.0)["psnr"]
    6.0206...
"""

_CITATION = """@article{wang2004ssim,
  title   = {Image Quality Assessment: From Error Visibility to Structural Similarity},
  author  = {Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal = {IEEE Transactions on Image Processing},
  volume  = {13},
  number  = {4},
  pages   = {600--612},
  year    = {2004}
}"""


def psnr(squared_error: np.ndarray, data_range: float) -> np.ndarray:
    """PSNR in dB of per-image mean squared errors; infinite for a perfect reconstruction."""
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / squared_error)


def ssim_window(height: int, width: int) -> str | None:
    """The SSIM window used for images of this size: Gaussian where it fits, else scikit-image's 7×7 uniform one."""
    side = min(height, width)
    return "gaussian 11x11, sigma 1.5" if side >= 11 else "uniform 7x7" if side >= 7 else None


def ssim(prediction: np.ndarray, reference: np.ndarray, data_range: float) -> float:
    """SSIM of one `(C, H, W)` image pair (at least 7 pixels a side)."""
    gaussian = min(prediction.shape[1:]) >= 11
    return float(
        structural_similarity(
            prediction, reference, data_range=data_range, channel_axis=0, gaussian_weights=gaussian, sigma=1.5,
            use_sample_covariance=False,
        )
    )  # fmt: skip


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Reconstruction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://scikit-image.org/docs/stable/api/skimage.metrics.html"],
        )

    def _compute(self, predictions, references, image_shape, data_range: float, structural_similarity: bool = True):
        shape = tuple(int(n) for n in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"`image_shape` must be (channels, height, width); got {shape}")
        if not 0 < data_range < float("inf"):
            raise ValueError(f"`data_range` must be a finite number > 0, got {data_range}")
        predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, *shape)
        references = np.asarray(references, dtype=np.float64).reshape(-1, *shape)
        squared_error = ((predictions - references) ** 2).reshape(len(predictions), -1).mean(1)
        window = ssim_window(*shape[1:]) if structural_similarity else None
        structural = [ssim(p, r, data_range) for p, r in zip(predictions, references)] if window else None
        return {
            "mse": float(squared_error.mean()),
            "psnr": float(psnr(squared_error, data_range).mean()),
            "ssim": float(np.mean(structural)) if window else None,
            "ssim_window": window,
            "num_images": len(predictions),
        }
