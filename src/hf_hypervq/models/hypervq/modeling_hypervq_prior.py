"""The token prior: a Gated PixelCNN over the token grids of a HyperVQ-VAE tokenizer, to generate images.

Reference: van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu, "Conditional Image Generation with
PixelCNN Decoders", NeurIPS 2016 (gated layers with vertical and horizontal stacks, which remove PixelCNN's blind
spot); used as the VQ-VAE prior by van den Oord et al. 2017 and by the HyperVQ paper (Table 2).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, can_return_tuple

from .checks import check_ids
from .configuration_hypervq import HyperVQPriorConfig
from .modeling_hypervq import HyperVQPreTrainedModel


@dataclass
class HyperVQPriorOutput(ModelOutput):
    """Output of `HyperVQPriorModel.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean cross-entropy (nats per token) of each token given the tokens before it in raster order.
        logits (`torch.FloatTensor` of shape `(batch_size, codebook_size, height, width)`):
            The distribution of each token given the tokens before it.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class HyperVQPriorGatedLayer(nn.Module):
    """One gated layer: a vertical stack that sees the rows above, a horizontal stack that sees the tokens to the
    left in the same row (and, through a 1×1 link, the vertical stack), `tanh(a) * sigmoid(b)` gates, an optional
    class bias, and a residual connection on the horizontal stack.

    Causality comes from the kernel shapes and crops: the vertical kernel covers `kernel // 2` rows above and the
    current row, the horizontal one `kernel // 2` columns to the left and the current column. The first layer
    (`blind=True`, PixelCNN's mask "A") also drops the current row and column, so no output depends on its own token;
    later layers may see the current position, which then only carries information from before it.
    """

    def __init__(self, hidden_size: int, kernel_size: int, blind: bool, num_classes: int):
        super().__init__()
        half = kernel_size // 2
        self.blind = blind
        self.vertical = nn.Conv2d(hidden_size, 2 * hidden_size, (half + 1, kernel_size), padding=(half, half))
        self.horizontal = nn.Conv2d(hidden_size, 2 * hidden_size, (1, half + 1), padding=(0, half))
        self.vertical_to_horizontal = nn.Conv2d(2 * hidden_size, 2 * hidden_size, 1)
        self.horizontal_out = nn.Conv2d(hidden_size, hidden_size, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * hidden_size) if num_classes else None

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor, drop: str) -> torch.Tensor:
        weight = conv.weight
        if self.blind:  # mask "A": drop the kernel's current row (vertical) or current column (horizontal)
            weight = weight.clone()
            if drop == "row":
                weight[:, :, -1] = 0
            else:
                weight[:, :, :, -1] = 0
        return F.conv2d(x, weight, conv.bias, padding=conv.padding)

    def forward(self, vertical, horizontal, class_labels=None):
        height, width = vertical.shape[-2:]
        bias = 0 if self.class_bias is None else self.class_bias(class_labels)[:, :, None, None]
        vertical_pre = self._conv(self.vertical, vertical, "row")[:, :, :height]  # rows <= i (< i if blind)
        horizontal_pre = self._conv(self.horizontal, horizontal, "column")[:, :, :, :width]  # columns <= j
        vertical_out = self._gate(vertical_pre + bias)
        gated = self._gate(horizontal_pre + self.vertical_to_horizontal(vertical_pre) + bias)
        horizontal_out = self.horizontal_out(gated)
        if not self.blind:  # the first layer's input includes the current token: no residual there
            horizontal_out = horizontal_out + horizontal
        return vertical_out, horizontal_out


class HyperVQPriorModel(HyperVQPreTrainedModel):
    """A Gated PixelCNN prior over HyperVQ token grids: `forward(image_tokens)` gives each token's distribution
    given the tokens before it (raster order) and the cross-entropy loss; `sample(...)` draws new token grids, which
    the tokenizer's `decode_tokens` turns into images.

    Example:

    ```python
    >>> prior = HyperVQPriorModel(HyperVQPriorConfig(codebook_size=512, grid_size=[8, 8]))
    >>> loss = prior(image_tokens=tokenizer.get_image_tokens(pixel_values)).loss
    >>> images = tokenizer.decode_tokens(prior.sample(16, temperature=1.0, seed=0))
    ```
    """

    config: HyperVQPriorConfig
    base_model_prefix = "prior"
    main_input_name = "image_tokens"
    _keep_in_fp32_modules_strict = []

    def __init__(self, config: HyperVQPriorConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.codebook_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HyperVQPriorGatedLayer(
                config.hidden_size,
                config.first_kernel_size if i == 0 else config.kernel_size,
                blind=i == 0,
                num_classes=config.num_classes,
            )
            for i in range(config.num_layers)
        )
        self.head = nn.Sequential(
            nn.Conv2d(config.hidden_size, config.head_hidden_size, 1),
            nn.ReLU(),
            nn.Conv2d(config.head_hidden_size, config.codebook_size, 1),
        )
        self.post_init()

    def _check_inputs(self, image_tokens, class_labels) -> None:
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.ndim != 3 or image_tokens.is_floating_point():
            got = tuple(image_tokens.shape) if isinstance(image_tokens, torch.Tensor) else type(image_tokens).__name__
            raise ValueError(f"`image_tokens` must be an integer tensor of shape (batch, height, width); got {got}")
        check_ids(image_tokens, "image_tokens", self.config.codebook_size)
        if self.config.num_classes and class_labels is None:
            raise ValueError(
                f"this prior is class-conditional ({self.config.num_classes} classes): pass `class_labels`"
            )
        if class_labels is not None and not self.config.num_classes:
            raise ValueError("this prior is unconditional: `class_labels` must be None")
        if class_labels is not None:
            check_ids(class_labels, "class_labels", self.config.num_classes, len(image_tokens))

    @can_return_tuple
    def forward(
        self,
        image_tokens: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HyperVQPriorOutput:
        r"""image_tokens (`torch.LongTensor` of shape `(batch_size, height, width)`): token grids.
        class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): classes, for a conditional prior."""
        self._check_inputs(image_tokens, class_labels)
        hidden = self.embedding(image_tokens).permute(0, 3, 1, 2)  # (B, hidden, h, w)
        vertical = horizontal = hidden
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal, class_labels)
        logits = self.head(horizontal)  # (B, K, h, w)
        return HyperVQPriorOutput(loss=F.cross_entropy(logits.float(), image_tokens), logits=logits)

    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        grid_size: tuple[int, int] | None = None,
        temperature: float = 1.0,
        class_labels: torch.LongTensor | None = None,
        seed: int | None = None,
    ) -> torch.LongTensor:
        """Draw `num_images` token grids `(num_images, height, width)`, token by token in raster order.

        Args:
            num_images: how many grids.
            grid_size: `(height, width)`; defaults to `config.grid_size`, the size it was trained on.
            temperature: divides the logits; below 1 gives safer, less diverse samples.
            class_labels: `(num_images,)` classes, required by a class-conditional prior.
            seed: makes the draw reproducible (a private generator; the global RNG is left alone).
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}")
        if not 0 < temperature < math.inf:  # also NaN
            raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}")
        height, width = grid_size or self.config.grid_size
        device = self.embedding.weight.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        tokens = torch.zeros(num_images, height, width, dtype=torch.long, device=device)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device)
        for i in range(height):
            for j in range(width):
                logits = self(image_tokens=tokens, class_labels=class_labels).logits[:, :, i, j]  # (B, K)
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tokens[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return tokens
