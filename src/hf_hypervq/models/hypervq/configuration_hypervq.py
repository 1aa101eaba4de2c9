"""Configurations of the HyperVQ models: the VQ-VAE tokenizer (and its frozen-feature classifier) and the VQ-SA head."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .quantizers import (
    QUANTIZER_TYPES,
    _check_curvature,
    _check_diversity_weight,
    _check_feature_clip,
    _check_normal_init_scale,
    _check_temperature,
    _check_weight,
)


def _check_quantizer_fields(config) -> None:
    """Value checks of the configs that own a quantizer, raised when the config is built: the quantizers' own checks
    (quantizers.py), run on the config's fields."""
    if config.quantizer_type not in QUANTIZER_TYPES:
        raise ValueError(f"`quantizer_type` must be one of {QUANTIZER_TYPES}, got {config.quantizer_type!r}")
    if config.codebook_size < 2:
        raise ValueError(f"`codebook_size` must be >= 2, got {config.codebook_size}")
    _check_curvature(config.curvature)
    if config.commitment_weight is not None:  # None: the quantizer's own default
        _check_weight("commitment_weight", config.commitment_weight)
    _check_weight("offset_init_scale", getattr(config, "offset_init_scale", 1.0))
    _check_normal_init_scale(getattr(config, "normal_init_scale", 1.0))
    if hasattr(config, "diversity_weight"):  # the VQ-VAE's fields; VQ-SA keeps the quantizers' defaults
        config.diversity_weight = _check_diversity_weight(config.diversity_weight)
        config.feature_clip = _check_feature_clip(config.feature_clip)
    config.gumbel_temperature = list(_check_temperature(config.gumbel_temperature, name="gumbel_temperature"))


def _check_positive(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {getattr(config, name)}")


@strict
class HyperVQVAEConfig(PreTrainedConfig):
    r"""Configuration of `HyperVQVAEModel` (the image tokenizer) and `HyperVQVAEForImageClassification` (a
    frozen-feature classifier on its codes). Defaults are the Sonnet/zalando CIFAR VQ-VAE
    (docs/method.md#vq-vae-backbone) with HyperVQ: 32×32 images become an 8×8 grid of codes from a codebook of 512.

    Args:
        quantizer_type (`str`, *optional*, defaults to `"hyperbolic"`):
            The quantizer: `"hyperbolic"` (HyperVQ), `"kmeans"` (VQ-VAE), `"gumbel"` (vq-wav2vec),
            `"hyperbolic_kmeans"` or `"hyperbolic_embedding"` (the paper's ablations HyperKmeansVQ, HyperEmbMatVQ).
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input images.
        embedding_dim (`int`, *optional*, defaults to 64):
            Size of each latent vector, the quantizer's `dim`.
        codebook_size (`int`, *optional*, defaults to 512):
            Number of codes K.
        hidden_size (`int`, *optional*, defaults to 128):
            Channels of the encoder and decoder trunks (the last strided conv and the residual stack).
        residual_hidden_size (`int`, *optional*, defaults to 32):
            Bottleneck channels inside each residual block.
        num_residual_layers (`int`, *optional*, defaults to 2):
            Residual blocks in the encoder's stack, and in the decoder's.
        num_downsamples (`int`, *optional*, defaults to 2):
            Stride-2 convolutions in the encoder (transposed ones in the decoder): the token grid is the image
            divided by `2 ** num_downsamples` in each direction.
        curvature (`float`, *optional*, defaults to 1.0):
            Curvature c of the Poincaré ball (hyperbolic quantizers only).
        commitment_weight (`float`, *optional*):
            Weight of the commitment loss (all quantizers but `"gumbel"`, which has none). `None` (the default)
            takes the quantizer's own default: 0 for HyperVQ and HyperEmbMatVQ (the paper trains them on the
            reconstruction loss alone), VQ-VAE's 0.25 for KmeansVQ and HyperKmeansVQ.
        offset_init_scale (`float`, *optional*, defaults to 1.0):
            HyperVQ/HyperEmbMatVQ: the hyperplane offsets start Uniform(0, s/sqrt(c·dim)); 0 gives HNN++'s zeros.
        normal_init_scale (`float`, *optional*, defaults to 1.0):
            HyperVQ/HyperEmbMatVQ: multiplies HNN++'s standard deviation of the hyperplane normals.
        diversity_weight (`float`, *optional*, defaults to 0.0):
            Gumbel quantizers (HyperVQ, HyperEmbMatVQ, GumbelVQ): weight of wav2vec 2.0's codebook diversity loss
            `(K - exp(H(p))) / K`, with p the softmax of the logits averaged over the batch's latents, added to the
            quantizer's loss in training only. 0, the paper's setting, turns it off.
        feature_clip (`float`, *optional*):
            HyperVQ/HyperEmbMatVQ: feature clipping (Guo et al., CVPR 2022): latents are rescaled to
            `min(1, r / ||z||) * z` with this radius r before the map onto the ball, in training and eval alike.
            `None`, the paper's setting, does not clip.
        gumbel_temperature (`list[float]`, *optional*, defaults to `[2.0, 0.5, 0.999995]`):
            `(tau_max, tau_min, decay)` of the Gumbel temperature, `tau_j = max(tau_max * decay**j, tau_min)` after
            j optimizer updates (Gumbel quantizers only).
        classifier_hidden_size (`int`, *optional*, defaults to 128):
            Width of the frozen-feature classifier's head (conv 3×3 + ReLU, global average pool, two linear
            layers; docs/method.md#vq-vae-backbone); unused by the tokenizer.
        classifier_normalize_features (`bool`, *optional*, defaults to `False`):
            The frozen-feature classifier: put a BatchNorm without affine parameters (as MAE's linear probe does)
            between the frozen features and the head, so that the head does not depend on the scale of the code
            vectors, which differs by a factor of 50 between quantizers. `False` is the paper's head;
            `scripts/train_classifier.py` turns it on by default.

    Example:

    ```python
    >>> from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel
    >>> config = HyperVQVAEConfig(quantizer_type="hyperbolic", codebook_size=512)
    >>> model = HyperVQVAEModel(config)
    ```
    """

    model_type = "hypervq_vae"

    quantizer_type: str = "hyperbolic"
    num_channels: int = 3
    embedding_dim: int = 64
    codebook_size: int = 512
    hidden_size: int = 128
    residual_hidden_size: int = 32
    num_residual_layers: int = 2
    num_downsamples: int = 2
    curvature: float = 1.0
    commitment_weight: float | None = None
    gumbel_temperature: list[float | int] | tuple[float | int, ...] = (2.0, 0.5, 0.999995)
    offset_init_scale: float = 1.0
    normal_init_scale: float = 1.0
    diversity_weight: float | int = 0.0
    feature_clip: float | int | None = None
    classifier_hidden_size: int = 128
    classifier_normalize_features: bool = False

    def __post_init__(self, **kwargs):
        _check_quantizer_fields(self)
        _check_positive(
            self, "num_channels", "embedding_dim", "hidden_size", "residual_hidden_size", "classifier_hidden_size"
        )
        if self.num_residual_layers < 0 or self.num_downsamples < 1:
            raise ValueError(
                "`num_residual_layers` must be >= 0 and `num_downsamples` >= 1, got "
                f"{self.num_residual_layers} and {self.num_downsamples}"
            )
        if self.hidden_size % 2 ** (self.num_downsamples - 1):
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by 2**(num_downsamples - 1) "
                f"({2 ** (self.num_downsamples - 1)}): each strided conv before the last has half the next one's width"
            )
        super().__post_init__(**kwargs)

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per token, in each direction."""
        return 2**self.num_downsamples


@strict
class HyperVQSAConfig(PreTrainedConfig):
    r"""Configuration of `HyperVQSAForImageClassification`: VQ-SA (Yang et al., CVPR 2023; docs/method.md#vq-sa) with a
    HyperVQ quantizer. A ResNet's pooled feature is quantized, the code and the feature attend to each other as two
    tokens, and the fused result feeds the classifier.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The transformers ResNet; defaults to ResNet-50 (`ResNetConfig()`).
        quantizer_type (`str`, *optional*, defaults to `"hyperbolic"`):
            As in `HyperVQVAEConfig`; `"kmeans"` is the Euclidean VQ of the original VQ-SA.
        codebook_size (`int`, *optional*, defaults to 1000):
            Number of codes K (VQ-SA's recommended value).
        feature_scale (`str`, *optional*, defaults to `"sqrt_dim"`):
            How the pooled feature f is scaled before the quantizer and the attention
            (docs/method.md#feature-scale). ResNet features are non-negative with norms far above 1, so with c = 1
            raw features all land on the ball's boundary and only their direction survives. `"sqrt_dim"` uses
            `f / sqrt(dim)` (norms near 1 for ResNet-50), `"l2"` uses `f / ||f||` (direction only, like VQ-SA's
            cosine selection), `"none"` uses f.
        curvature (`float`, *optional*, defaults to 1.0):
            Curvature c of the Poincaré ball (hyperbolic quantizers only).
        commitment_weight (`float`, *optional*):
            Weight of the commitment loss; `None` takes the quantizer's default, as in `HyperVQVAEConfig`.
        gumbel_temperature (`list[float]`, *optional*, defaults to `[2.0, 0.5, 0.999995]`):
            `(tau_max, tau_min, decay)` of the Gumbel temperature (Gumbel quantizers only).
        attention_scale (`float`, *optional*, defaults to `2 ** -0.5`):
            Scale of the two-token attention scores: VQ-SA's 1/sqrt(2), applied in training and eval alike (the
            released code drops it in eval).
        freeze_backbone (`bool`, *optional*, defaults to `False`):
            Keep the ResNet frozen (and in eval mode); VQ-SA fine-tunes it.

    Example:

    ```python
    >>> from hf_hypervq import HyperVQSAConfig
    >>> config = HyperVQSAConfig(num_labels=1000)   # ResNet-50 backbone, HyperVQ with K = 1000
    ```
    """

    model_type = "hypervq_sa"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    backbone_config: dict | PreTrainedConfig | None = None
    quantizer_type: str = "hyperbolic"
    codebook_size: int = 1000
    feature_scale: str = "sqrt_dim"
    curvature: float = 1.0
    commitment_weight: float | None = None
    gumbel_temperature: list[float | int] | tuple[float | int, ...] = (2.0, 0.5, 0.999995)
    attention_scale: float = 2**-0.5
    freeze_backbone: bool = False

    def __post_init__(self, **kwargs):
        _check_quantizer_fields(self)
        if self.feature_scale not in ("sqrt_dim", "l2", "none"):
            raise ValueError(f"`feature_scale` must be 'sqrt_dim', 'l2' or 'none', got {self.feature_scale!r}")
        if not self.attention_scale > 0:
            raise ValueError(f"`attention_scale` must be > 0, got {self.attention_scale}")
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            self.backbone_config = {**self.backbone_config, "model_type": "resnet"}  # a plain dict of ResNet fields
        super().__post_init__(**kwargs)
        if self.backbone_config.model_type != "resnet":
            raise ValueError(f"`backbone_config` must be a ResNet config, got {self.backbone_config.model_type!r}")

    @property
    def feature_dim(self) -> int:
        """Size of the backbone's pooled feature (2048 for ResNet-50)."""
        return self.backbone_config.hidden_sizes[-1]


@strict
class HyperVQPriorConfig(PreTrainedConfig):
    r"""Configuration of `HyperVQPriorModel`, a Gated PixelCNN (van den Oord et al. 2016) over a tokenizer's token
    grids; the paper's generative experiment trains a 15-layer one (Table 2).

    Args:
        codebook_size (`int`, *optional*, defaults to 512):
            Number of codes K of the tokenizer whose tokens are modelled.
        hidden_size (`int`, *optional*, defaults to 64):
            Channels of the gated layers (and size of the token embedding).
        num_layers (`int`, *optional*, defaults to 15):
            Gated masked convolution layers.
        kernel_size (`int`, *optional*, defaults to 3):
            Kernel size of every gated layer but the first, which uses `first_kernel_size`.
        first_kernel_size (`int`, *optional*, defaults to 7):
            Kernel size of the first (type "A", current-token-blind) layer.
        head_hidden_size (`int`, *optional*, defaults to 256):
            Width of the 1×1-conv output head.
        num_classes (`int`, *optional*, defaults to 0):
            Number of classes for class-conditional generation; 0 for an unconditional prior.
        grid_size (`list[int]`, *optional*, defaults to `[8, 8]`):
            `(height, width)` of the token grids it was trained on, the default for sampling.
        tokenizer_name_or_path (`str`, *optional*):
            The tokenizer whose tokens it models (a Hub id, or on the machine that trained it a folder), so samples can
            be decoded to images.
        tokenizer_revision (`str`, *optional*):
            The commit of the tokenizer's Hub repo it was trained with.

    Example:

    ```python
    >>> from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel
    >>> prior = HyperVQPriorModel(HyperVQPriorConfig(codebook_size=512, grid_size=[8, 8]))
    ```
    """

    model_type = "hypervq_prior"

    codebook_size: int = 512
    hidden_size: int = 64
    num_layers: int = 15
    kernel_size: int = 3
    first_kernel_size: int = 7
    head_hidden_size: int = 256
    num_classes: int = 0
    grid_size: list[int] | tuple[int, ...] = (8, 8)
    tokenizer_name_or_path: str | None = None
    tokenizer_revision: str | None = None

    def __post_init__(self, **kwargs):
        if self.codebook_size < 2:
            raise ValueError(f"`codebook_size` must be >= 2, got {self.codebook_size}")
        _check_positive(self, "hidden_size", "num_layers", "head_hidden_size")
        for name in ("kernel_size", "first_kernel_size"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"`{name}` must be a positive odd number, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"`num_classes` must be >= 0, got {self.num_classes}")
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"`grid_size` must be (height, width) with positive sizes, got {self.grid_size}")
        self.grid_size = [int(s) for s in self.grid_size]
        super().__post_init__(**kwargs)
