"""Image processor of the HyperVQ models (PIL backend: no torchvision needed)."""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


class HyperVQImageProcessor(PilBackend):
    r"""Resizes, rescales to [0, 1] and normalises images for the HyperVQ models, and turns reconstructions back
    into PIL images.

    The defaults suit the tokenizer: RGB, 32×32, normalised to [-1, 1] (mean 0.5, std 0.5). Every option of
    transformers' image processors can be overridden (`size`, `image_mean`, `do_center_crop`, ...), and
    `HyperVQImageProcessor.for_imagenet()` gives the ResNet/VQ-SA preprocessing. For single-channel tokenizers pass
    `do_convert_rgb=False, image_mean=[0.5], image_std=[0.5]`.

    Example:

    ```python
    >>> processor = HyperVQImageProcessor()
    >>> pixel_values = processor(images=pil_image, return_tensors="pt")["pixel_values"]   # (1, 3, 32, 32)
    >>> processor.postprocess_reconstruction(model(pixel_values).reconstruction)[0]        # a PIL image
    ```
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"height": 32, "width": 32}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs) -> "HyperVQImageProcessor":
        """The image rule of `--image_size N`: the shorter side resized to N, then the centre N×N crop. A photo keeps
        its proportions (resizing to N×N would stretch a 4:3 photo); a square image is simply resized."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}")
        rule = {"size": {"shortest_edge": image_size}, "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size}}  # fmt: skip
        return cls(**{**rule, **kwargs})

    @classmethod
    def for_imagenet(cls, **kwargs) -> "HyperVQImageProcessor":
        """ResNet/ImageNet evaluation preprocessing: shortest edge 256, centre crop 224, ImageNet mean and std."""
        defaults = {
            "size": {"shortest_edge": 256},
            "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224},
            "image_mean": list(IMAGENET_DEFAULT_MEAN),
            "image_std": list(IMAGENET_DEFAULT_STD),
        }
        return cls(**{**defaults, **kwargs})

    def preprocess(self, images, *args, **kwargs):
        for image in images if isinstance(images, (list, tuple)) else [images]:
            _check_image(image)
        return super().preprocess(images, *args, **kwargs)

    def pad(self, images: list[np.ndarray], pad_size=None, **kwargs) -> list[np.ndarray]:
        """`do_pad=True, pad_size={"height": 32, "width": 32}`: centre each (resized, normalised) image on a canvas
        of black, the value black has after rescaling and normalising, as 28×28 Fashion-MNIST or MNIST images are
        padded to 32×32. transformers' own padding puts 0, mid-grey in [-1, 1], below and to the right."""
        if pad_size is None or kwargs.get("return_mask"):
            return super().pad(images, pad_size=pad_size, **kwargs)
        target_height, target_width = pad_size.height, pad_size.width
        padded = []
        for image in images:  # (channels, height, width)
            channels, height, width = image.shape
            if height > target_height or width > target_width:
                raise ValueError(
                    f"`pad_size` {target_height}×{target_width} is smaller than an image of {height}×{width} (after "
                    "resizing to `size`)"
                )
            black = np.zeros(channels, dtype=image.dtype)
            if self.do_normalize:
                mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
                black = np.broadcast_to(-mean / std, (channels,)).astype(image.dtype)
            canvas = np.empty((channels, target_height, target_width), dtype=image.dtype)
            canvas[:] = black[:, None, None]
            top, left = (target_height - height) // 2, (target_width - width) // 2
            canvas[:, top : top + height, left : left + width] = image
            padded.append(canvas)
        return padded

    def postprocess_reconstruction(self, reconstruction: torch.Tensor) -> list[Image.Image]:
        """Undo the normalisation of model outputs `(B, C, H, W)` and return PIL images (clipped to [0, 255])."""
        if not isinstance(reconstruction, torch.Tensor) or reconstruction.ndim != 4:
            raise ValueError("`reconstruction` must be a tensor of shape (batch, channels, height, width)")
        channels = reconstruction.shape[1]
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
        pixels = (reconstruction.detach().float().cpu() * std + mean).clamp(0, 1) * 255
        arrays = pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        return [Image.fromarray(a[..., 0] if channels == 1 else np.ascontiguousarray(a)) for a in arrays]


def _check_image(image) -> None:
    """An image must be a PIL image or an array of shape (height, width, channels) or (channels, height, width) (or
    a batch of those), with no empty side; transformers would print the array in its error, or resize an empty
    image into a blank one."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"`images`: an image of size {image.size[0]}×{image.size[1]} has no pixels")
        return
    if isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(image.shape)
        if len(shape) not in (3, 4):
            hint = " (for a grey image add a channel axis: `array[..., None]`)" if len(shape) == 2 else ""
            raise ValueError(
                "`images` must be PIL images or arrays of shape (height, width, channels) or (channels, height, "
                f"width), or a batch of those; got an array of shape {shape}{hint}"
            )
        if 0 in shape:
            raise ValueError(f"`images`: an image array of shape {shape} has no pixels")
