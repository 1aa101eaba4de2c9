"""ImageNet-C corruptions (Hendrycks & Dietterich 2019) for VQ-SA training and robustness evaluation.

The corruptions come from `imagecorruptions` as packaged by `imagecorruptions-imaug` (a maintained fork of
bethgelab/imagecorruptions that runs on NumPy 2 and current scikit-image; the original 1.1.2 fails on glass_blur,
gaussian_blur and fog there). Install it with `pip install "hf-hypervq[vqsa]"`.
"""

import numpy as np
from PIL import Image

from ..metrics.mean_corruption_error.mean_corruption_error import COMMON_CORRUPTIONS


def _corrupt():
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise ImportError(
            "ImageNet-C corruptions need the `imagecorruptions-imaug` package: pip install 'hf-hypervq[vqsa]'"
        ) from None
    return corrupt


# The library refuses smaller images.
MIN_SIZE = 32


def corrupt_image(image: Image.Image, corruption: str, severity: int) -> Image.Image:
    """`image` (as RGB) with one ImageNet-C corruption at severity 1-5; an image under 32 pixels a side is
    upscaled to 32 first (the library's minimum)."""
    if not 1 <= severity <= 5:
        raise ValueError(f"`severity` must be 1-5, got {severity}")
    image = image.convert("RGB")
    if min(image.size) < MIN_SIZE:
        scale = MIN_SIZE / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    corrupted = _corrupt()(np.asarray(image), corruption_name=corruption, severity=severity)
    return Image.fromarray(np.uint8(corrupted)).resize(image.size)


def corrupted_after_crop(processor, corruption: str, severity: int):
    """ImageNet-C's protocol: the corruption applies to the image as the model sees it, resized and centre-cropped
    (224 pixels for ImageNet), before rescaling and normalisation; corrupting the full-size image first would not
    give errors comparable to published (AlexNet-normalised) ones. Returns `(image_transform, processor)` for
    `with_image_transform`: the transform resizes, crops and corrupts, the processor then only rescales and
    normalises."""
    if not 1 <= severity <= 5:
        raise ValueError(f"`severity` must be 1-5, got {severity}")
    normalise = type(processor)(**{**processor.to_dict(), "do_resize": False, "do_center_crop": False})

    def transform(image: Image.Image, key=None) -> Image.Image:
        cropped = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        pixels = np.moveaxis(cropped[0], 0, -1)
        cropped = Image.fromarray(np.uint8(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
        corrupted = corrupt_image(cropped, corruption, severity).convert(cropped.mode)
        return corrupted.resize(cropped.size, Image.BILINEAR)  # small crops were upscaled to the library's minimum

    return transform, normalise


class CorruptionAugmentation:
    """VQ-SA's training augmentation (docs/method.md#training-recipe): each image is left clean or gets one of the 15
    common corruptions, at severity 1-5. Within an epoch, every block of 80 consecutive example indices gets the 16 ×
    5 = 80 (corruption, severity) pairs in a shuffled order, so every pair comes up equally often; the order is
    drawn from (seed, epoch, block) of the example's `SampleKey`, so it does not depend on loader workers or
    resumes."""

    def __init__(self, corruptions: tuple[str, ...] = COMMON_CORRUPTIONS):
        _corrupt()  # fail early if the library is missing
        self.pairs = [(name, severity) for name in (None, *corruptions) for severity in range(1, 6)]

    def pair(self, key) -> tuple[str | None, int]:
        block, position = divmod(key.index, len(self.pairs))
        order = np.random.default_rng([key.seed, key.epoch, block]).permutation(len(self.pairs))
        return self.pairs[order[position]]

    def __call__(self, image: Image.Image, key) -> Image.Image:
        corruption, severity = self.pair(key)
        return image if corruption is None else corrupt_image(image, corruption, severity)
