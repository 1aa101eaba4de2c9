"""HyperVQ models as transformers `PreTrainedModel`s.

- `HyperVQVAEModel`: the image tokenizer, a VQ-VAE (Sonnet/zalando architecture, docs/method.md#vq-vae-backbone)
  whose quantizer is any of the five in quantizers.py; pixels -> `image_tokens` (B, h, w) -> pixels.
- `HyperVQVAEForImageClassification`: the paper's frozen-feature classifier on a tokenizer's quantized latents.
- `HyperVQSAForImageClassification`: VQ-SA (Yang et al., CVPR 2023) on a transformers ResNet, with HyperVQ as
  its quantizer.

References: Goswami et al., "HyperVQ", arXiv 2403.13015; van den Oord et al., "Neural Discrete Representation
Learning", NeurIPS 2017; Yang et al., "Vector Quantization with Self-Attention for Quality-Independent Representation
Learning" (VQ-SA), CVPR 2023.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, ResNetForImageClassification, ResNetModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.utils import ModelOutput, can_return_tuple

from .checks import check_ids
from .configuration_hypervq import HyperVQPriorConfig, HyperVQSAConfig, HyperVQVAEConfig
from .quantizers import QUANTIZERS, VectorQuantizer


# The `from_pretrained` options that say where a config comes from.
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_CONFIG_CLASSES = {config.model_type: config for config in (HyperVQVAEConfig, HyperVQSAConfig, HyperVQPriorConfig)}
# The remote-code name (file.class) of the tokenizer, as `save_pretrained` copies it.
_AUTO_MODEL = "modeling_hypervq.HyperVQVAEModel"


def check_pixel_values(pixel_values, channels: int, weight: torch.Tensor, multiple_of: int = 1) -> None:
    """`pixel_values` must be a `(batch, channels, height, width)` float tensor of the dtype of `weight` (the model's
    first layer), with height and width positive multiples of `multiple_of` (a conv would otherwise fail with a
    message about its weights). Neither may be on the meta device, which holds no values: a conv with meta weights
    returns garbage on a real input, and a meta input fails inside autocast."""
    sizes = f"multiples of {multiple_of}" if multiple_of > 1 else "at least 1"
    expected = f"(batch, {channels}, height, width) with height and width {sizes}"
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        got = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise TypeError(f"`pixel_values` must be a float tensor of shape {expected}; got {got}")
    if pixel_values.is_meta:  # it holds no values: autocast and the quantizer would fail on it with a torch error
        raise ValueError("`pixel_values` is on the meta device, which holds no data: pass images on a real device")
    if weight.is_meta:
        raise ValueError(
            "the model's weights are on the meta device (it was built under `torch.device('meta')`), so it has none "
            "to run: load it with `from_pretrained`, or build it on a real device"
        )
    shape = tuple(pixel_values.shape)
    if (
        len(shape) != 4
        or shape[1] != channels
        or min(shape[2:]) < 1
        or shape[2] % multiple_of
        or shape[3] % multiple_of
    ):
        raise ValueError(f"`pixel_values` must have shape {expected}; got {shape}")
    dtype = weight.dtype
    if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise TypeError(f"`pixel_values` are {pixel_values.dtype} but the model's weights {dtype}: pass "
                        f"`pixel_values.to({dtype})`")  # fmt: skip


def build_quantizer(config, dim: int) -> VectorQuantizer:
    """The quantizer a config asks for, with the options its type takes (`quantizers.QUANTIZERS`)."""
    spec = QUANTIZERS[config.quantizer_type]
    return spec.cls(dim, config.codebook_size, **spec.options(config))


@dataclass
class HyperVQVAEEncoderOutput(ModelOutput):
    """Output of `HyperVQVAEModel.encode`.

    Args:
        latents (`torch.FloatTensor` of shape `(batch_size, embedding_dim, height, width)`):
            The encoder's output before quantization, z_e.
        quantized_latents (`torch.FloatTensor` of shape `(batch_size, embedding_dim, height, width)`):
            The code vectors the decoder receives, z_q.
        image_tokens (`torch.LongTensor` of shape `(batch_size, height, width)`):
            The code ids.
        quantizer_loss (`torch.FloatTensor` of shape `()`):
            The quantizer's own (weighted) loss terms.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the batch's code histogram.
        logits (`torch.FloatTensor` of shape `(batch_size, height, width, codebook_size)`, *optional*):
            The quantizer's code scores (MLR/Gumbel quantizers only).
    """

    latents: torch.FloatTensor | None = None
    quantized_latents: torch.FloatTensor | None = None
    image_tokens: torch.LongTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@dataclass
class HyperVQVAEModelOutput(ModelOutput):
    """Output of `HyperVQVAEModel.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `reconstruction_loss + quantizer_loss`, the training objective.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            The decoded images, in the image processor's normalised range.
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Mean squared error between `reconstruction` and `pixel_values`.
        quantizer_loss (`torch.FloatTensor` of shape `()`):
            The quantizer's own (weighted) loss terms.
        image_tokens (`torch.LongTensor` of shape `(batch_size, height / f, width / f)`):
            The code ids, f being `config.downsampling_factor`.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the batch's code histogram.
        latents (`torch.FloatTensor` of shape `(batch_size, embedding_dim, height / f, width / f)`):
            The encoder's output before quantization.
        quantized_latents (`torch.FloatTensor` of shape `(batch_size, embedding_dim, height / f, width / f)`):
            The code vectors the decoder received.
        logits (`torch.FloatTensor` of shape `(batch_size, height / f, width / f, codebook_size)`, *optional*):
            The quantizer's code scores (MLR/Gumbel quantizers only; float32).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None
    image_tokens: torch.LongTensor | None = None
    perplexity: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    quantized_latents: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@dataclass
class HyperVQSAImageClassifierOutput(ModelOutput):
    """Output of `HyperVQSAForImageClassification`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy plus the quantizer's loss, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Classification scores.
        image_tokens (`torch.LongTensor` of shape `(batch_size,)`):
            The code of each image's pooled feature.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the batch's code histogram.
        attentions (`torch.FloatTensor` of shape `(batch_size, 2, 2)`, *optional*):
            The two-token attention weights (queries × keys, code first), with `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_tokens: torch.LongTensor | None = None
    perplexity: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None


class HyperVQPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the precision policy shared by every HyperVQ model."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The ball's math is unsafe in half precision (docs/method.md#half-precision): the quantizer stays float32 when a
    # model is loaded with `dtype=torch.bfloat16`/`float16` (the plain `_keep_in_fp32_modules` only covers float16).
    _keep_in_fp32_modules_strict = ["quantizer"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Only `transformers.initialization` functions: they skip tensors that `from_pretrained` already loaded.
        if getattr(module, "kaiming_normal_init", False):  # VQ-SA's attention projections
            init.kaiming_normal_(module.weight)  # as VQ-SA
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            # PyTorch's own default, as in the Sonnet/zalando VQ-VAE (transformers' default is normal(0, 0.02))
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, VectorQuantizer):
            module.reset_parameters()
            if isinstance(getattr(module, "num_updates", None), torch.Tensor):
                # The Gumbel schedule's update count: a new model starts at tau_max. Loaded, it keeps its value.
                init.zeros_(module.num_updates)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' `from_pretrained`, but a folder or repo holding another kind of model is an error: the
        plain method only warns, then hands back a model with random weights (a prior loaded as a tokenizer, a
        tokenizer as a prior). A local folder that is not there, or a damaged `config.json` or weights file, is
        one error that names it (`check_pretrained_source`), and so is a codebook whose size differs from the
        config's (`check_codebook_size`). `pretrained_model_name_or_path=None`, with `config` and `state_dict`, is
        transformers' way to build a model from a state dict, and works as there."""
        check_pretrained_source(pretrained_model_name_or_path)
        hub_options = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
        config = kwargs.get("config")
        if pretrained_model_name_or_path is not None and not isinstance(config, PreTrainedConfig):
            config, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub_options)
            found, expected = config.get("model_type"), cls.config_class.model_type
            if found != expected:
                held = f"a {found!r} model" if found else "a config.json without `model_type`"
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds {held}; {cls.__name__} loads {expected!r} models"
                )
        codebook_size = kwargs.get("codebook_size")
        if codebook_size is None and isinstance(config, PreTrainedConfig):
            codebook_size = getattr(config, "codebook_size", None)
        elif codebook_size is None and isinstance(config, dict) and hasattr(cls.config_class, "codebook_size"):
            codebook_size = config.get("codebook_size", cls.config_class.codebook_size)
        loads_a_file = pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None
        if loads_a_file and codebook_size is not None and not kwargs.get("ignore_mismatched_sizes"):
            folder = Path(pretrained_model_name_or_path).expanduser() / (kwargs.get("subfolder") or "")
            check_codebook_size(folder, codebook_size, default=getattr(cls.config_class, "codebook_size", None))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:  # a truncated or overwritten weights file
            raise OSError(f"the weights in {pretrained_model_name_or_path} are damaged: {error}") from None

    def set_num_updates(self, num_updates: int) -> None:
        """Step the quantizer's schedule (the Gumbel temperature); call after every optimizer update."""
        for module in self.modules():
            if isinstance(module, VectorQuantizer):
                module.set_num_updates(num_updates)


def check_pretrained_source(name_or_path, flag: str | None = None) -> None:
    """Fail with one line naming the problem, where transformers would fail with a misleading one: a local path
    that does not exist (transformers reads it as a malformed Hub id), a folder without `config.json`, a
    `config.json` that is not JSON, has no `model_type` or holds invalid values, or a truncated `model.safetensors`.
    A Hub id is left to transformers, and so is None (`from_pretrained(None, config=..., state_dict=...)`).
    `flag` (e.g. "--tokenizer") prefixes the message."""
    if name_or_path is None:
        return
    where = f"{flag} {name_or_path}" if flag else str(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        text = str(name_or_path)
        if isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1:
            raise FileNotFoundError(f"{where}: no such folder")
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{where}: the folder has no config.json, so it holds no saved model")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is damaged (not JSON: {error})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_file} has no `model_type`, so no model class can read it")
    config_class = _CONFIG_CLASSES.get(config["model_type"])
    if config_class is not None:
        try:
            config_class.from_dict(config)
        except (ValueError, TypeError) as error:  # our configs check their values
            raise ValueError(f"{config_file}: {error}") from None
    weights = path / "model.safetensors"
    if weights.is_file():
        try:
            with safe_open(weights, framework="pt"):  # reads the header, which a truncated file fails
                pass
        except SafetensorError as error:
            raise OSError(f"{weights} is damaged: {error}") from None


def check_codebook_size(folder: Path, codebook_size: int, default: int | None = None) -> None:
    """The codebook in `folder`'s `model.safetensors` must have `codebook_size` codes, the size the model will be
    built with (`default`: the config class's default size). Otherwise transformers fails with a report of every
    mismatched tensor; this is one line with the cause, read from the file's header only. A folder without that file
    (a Hub id, a sharded checkpoint) is not checked."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return
    with safe_open(weights, framework="pt") as checkpoint:
        # Every quantizer parameter has one row per code (`num_updates` is a scalar); a prior has no quantizer.
        shapes = [
            checkpoint.get_slice(key).get_shape()
            for key in checkpoint.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
            if key.rpartition(".")[0].endswith("quantizer")
        ]
    sizes = {shape[0] for shape in shapes if shape}
    if len(sizes) != 1 or codebook_size in sizes:
        return
    (found,) = sizes
    config_file = folder / "config.json"
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        saved = None
    if codebook_size == default and isinstance(saved, dict) and "codebook_size" not in saved:
        raise ValueError(
            f"{weights} holds a codebook of {found} codes, but {config_file} has no `codebook_size`, so the default "
            f'{codebook_size} applies: add `"codebook_size": {found}` to it'
        )
    raise ValueError(
        f"{weights} holds a codebook of {found} codes, but the config says codebook_size={codebook_size}: pass the "
        "checkpoint's size, or `ignore_mismatched_sizes=True` to start a new codebook of this size"
    )


class HyperVQVAEResidualStack(nn.Module):
    """`num_residual_layers` × [ReLU, conv 3×3 (no bias), ReLU, conv 1×1 (no bias)] with identity skips, then ReLU."""

    def __init__(self, config: HyperVQVAEConfig):
        super().__init__()
        hidden, bottleneck = config.hidden_size, config.residual_hidden_size
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(hidden, bottleneck, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(bottleneck, hidden, 1, bias=False),
            )
            for _ in range(config.num_residual_layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = hidden_states + layer(hidden_states)
        return F.relu(hidden_states)


def _trunk_widths(config: HyperVQVAEConfig) -> list[int]:
    """Output channels of the strided convs: each has half the next one's width, the last `hidden_size`."""
    n = config.num_downsamples
    return [config.hidden_size // 2 ** (n - 1 - i) for i in range(n)]


class HyperVQVAEEncoder(nn.Module):
    """Stride-2 convs 4×4 (+ReLU), a conv 3×3, the residual stack, and a 1×1 conv to `embedding_dim`."""

    def __init__(self, config: HyperVQVAEConfig):
        super().__init__()
        layers, channels = [], config.num_channels
        for width in _trunk_widths(config):
            layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU()]
            channels = width
        layers += [nn.Conv2d(channels, channels, 3, padding=1), HyperVQVAEResidualStack(config)]
        self.layers = nn.Sequential(*layers)
        self.projection = nn.Conv2d(channels, config.embedding_dim, 1)  # sets the latents' scale before the ball

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layers(pixel_values))


class HyperVQVAEDecoder(nn.Module):
    """The encoder's mirror: a conv 3×3 from `embedding_dim`, the residual stack, stride-2 transposed convs 4×4."""

    def __init__(self, config: HyperVQVAEConfig):
        super().__init__()
        widths = _trunk_widths(config)[::-1]  # e.g. [128, 64]
        layers = [nn.Conv2d(config.embedding_dim, widths[0], 3, padding=1), HyperVQVAEResidualStack(config)]
        for width, next_width in zip(widths, [*widths[1:], config.num_channels]):
            layers += [nn.ConvTranspose2d(width, next_width, 4, stride=2, padding=1), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])  # no ReLU after the last layer

    def forward(self, quantized_latents: torch.Tensor) -> torch.Tensor:
        return self.layers(quantized_latents)


def check_labels(labels: torch.Tensor, config, batch_size: int) -> None:
    """Class ids are checked where the loss will read them as such: `config.problem_type` single-label, or unset
    with integer labels and several classes (the loss infers the problem type as every transformers
    `*ForImageClassification` does: one label is regression, float labels multi-label)."""
    inferred = config.problem_type is None and config.num_labels > 1
    integer = isinstance(labels, torch.Tensor) and labels.dtype in (torch.long, torch.int)
    if config.problem_type == "single_label_classification" or (inferred and integer):
        check_ids(labels, "labels", config.num_labels, batch_size)
    elif config.problem_type == "multi_label_classification" or inferred:
        wanted = (batch_size, config.num_labels)
        if not isinstance(labels, torch.Tensor) or not labels.is_floating_point() or tuple(labels.shape) != wanted:
            got = (
                f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels)
            )
            raise TypeError(
                f"`labels` must be an integer tensor of ids in [0, {config.num_labels}) of shape ({batch_size},), or "
                f"for multi-label classification a float tensor of shape {wanted}; got {got}"
            )


class HyperVQVAEPreTrainedModel(HyperVQPreTrainedModel):
    config: HyperVQVAEConfig
    base_model_prefix = "hypervq"
    _no_split_modules = ["HyperVQVAEEncoder", "HyperVQVAEDecoder"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A classifier checkpoint holds a whole tokenizer: let `AutoModel` load it as one, also through
        # `trust_remote_code=True` where hf_hypervq is not installed.
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": _AUTO_MODEL}
        return super().save_pretrained(save_directory, *args, **kwargs)


class HyperVQVAEModel(HyperVQVAEPreTrainedModel):
    """The HyperVQ-VAE image tokenizer: `encode` / `get_image_tokens` turn pixels into a grid of code ids,
    `decode` / `decode_tokens` turn codes back into pixels, `forward` does both and computes the training loss.

    Example:

    ```python
    >>> model = HyperVQVAEModel(HyperVQVAEConfig()).eval()
    >>> tokens = model.get_image_tokens(torch.randn(2, 3, 32, 32))   # (2, 8, 8)
    >>> images = model.decode_tokens(tokens)                         # (2, 3, 32, 32)
    ```
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The `image-tokenization` pipeline travels with every tokenizer, as `Pipeline.save_pretrained` would save it:
        # `pipeline("image-tokenization", model=repo, trust_remote_code=True)` then works without hf_hypervq.
        if self._auto_class is not None:
            from transformers.dynamic_module_utils import custom_object_save

            from .pipeline_hypervq import ImageTokenizationPipeline

            self.config.custom_pipelines = {
                "image-tokenization": {
                    "impl": "pipeline_hypervq.ImageTokenizationPipeline",
                    "pt": ["AutoModel"],
                    "type": "image",
                }
            }
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            custom_object_save(ImageTokenizationPipeline, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def __init__(self, config: HyperVQVAEConfig):
        super().__init__(config)
        self.encoder = HyperVQVAEEncoder(config)
        self.quantizer = build_quantizer(config, dim=config.embedding_dim)
        self.decoder = HyperVQVAEDecoder(config)
        self.post_init()

    def encode(self, pixel_values: torch.Tensor) -> HyperVQVAEEncoderOutput:
        """Encode and quantize `pixel_values` `(B, C, H, W)`."""
        check_pixel_values(
            pixel_values, self.config.num_channels, self.encoder.layers[0].weight, self.config.downsampling_factor
        )
        latents = self.encoder(pixel_values)  # (B, D, h, w)
        quantized = self.quantizer(latents.permute(0, 2, 3, 1))  # channel-last: (B, h, w, D)
        return HyperVQVAEEncoderOutput(
            latents=latents,
            quantized_latents=quantized.quantized.permute(0, 3, 1, 2),  # (B, D, h, w)
            image_tokens=quantized.indices,
            quantizer_loss=quantized.loss,
            perplexity=quantized.perplexity,
            logits=quantized.logits,
        )

    def decode(self, quantized_latents: torch.Tensor) -> torch.Tensor:
        """Decode code vectors `(B, embedding_dim, h, w)` into images `(B, C, h * f, w * f)`."""
        dim = self.config.embedding_dim
        if not isinstance(quantized_latents, torch.Tensor) or quantized_latents.ndim != 4:
            got = (
                tuple(quantized_latents.shape)
                if isinstance(quantized_latents, torch.Tensor)
                else type(quantized_latents).__name__
            )
            raise ValueError(f"`quantized_latents` must be a tensor of shape (batch, {dim}, height, width); got {got}")
        if quantized_latents.shape[1] != dim:
            raise ValueError(
                f"`quantized_latents` must have {dim} channels (`embedding_dim`), got {quantized_latents.shape[1]}: "
                "pass code vectors channel-first, as `encode(...).quantized_latents` gives them"
            )
        return self.decoder(quantized_latents)

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """The code ids `(B, H / f, W / f)` of images `(B, C, H, W)`, f being `config.downsampling_factor`."""
        return self.encode(pixel_values).image_tokens

    def decode_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, h * f, w * f)` from code ids `(B, h, w)`; on an image's own tokens this equals the eval
        reconstruction of that image."""
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.ndim != 3:
            got = tuple(image_tokens.shape) if isinstance(image_tokens, torch.Tensor) else type(image_tokens).__name__
            raise ValueError(f"`image_tokens` must be an integer tensor of shape (batch, height, width); got {got}")
        if image_tokens.is_floating_point():
            raise ValueError(f"`image_tokens` must be an integer tensor of code ids; got dtype {image_tokens.dtype}")
        try:
            codes = self.quantizer.indices_to_codes(image_tokens)  # (B, h, w, D)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`image_tokens`: {error}") from None
        return self.decode(codes.permute(0, 3, 1, 2).to(self.decoder.layers[0].weight.dtype))

    def decode_codebook(self) -> torch.Tensor:
        """Every code decoded on its own, as a 1×1 latent (the paper's Figure 5): `(codebook_size, C, f, f)` images."""
        codebook = self.quantizer.codebook.detach()  # (K, D)
        return self.decode(codebook[:, :, None, None].to(self.decoder.layers[0].weight.dtype))

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> HyperVQVAEModelOutput:
        r"""Encode, quantize and decode `pixel_values` `(B, C, H, W)`; the loss is the reconstruction MSE plus the
        quantizer's loss."""
        encoded = self.encode(pixel_values)
        reconstruction = self.decode(encoded.quantized_latents)
        reconstruction_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
        return HyperVQVAEModelOutput(
            loss=reconstruction_loss + encoded.quantizer_loss,
            reconstruction=reconstruction,
            reconstruction_loss=reconstruction_loss,
            quantizer_loss=encoded.quantizer_loss,
            image_tokens=encoded.image_tokens,
            perplexity=encoded.perplexity,
            latents=encoded.latents,
            quantized_latents=encoded.quantized_latents,
            logits=encoded.logits,
        )


class HyperVQVAEForImageClassification(HyperVQVAEPreTrainedModel):
    """The paper's frozen-feature classifier (§4.3.2): the quantized latents of a trained tokenizer feed a light
    head (conv 3×3 + ReLU, global average pool, linear + ReLU, linear), optionally behind a BatchNorm without affine
    parameters (`config.classifier_normalize_features`). The tokenizer stays frozen and in eval mode; only the head
    trains.

    `HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=...)` loads a tokenizer's weights,
    freezes them and initialises the head. The whole tokenizer (decoder included) is kept, so a classifier
    checkpoint also loads as a tokenizer with `AutoModel`.
    """

    def __init__(self, config: HyperVQVAEConfig):
        super().__init__(config)
        self.hypervq = HyperVQVAEModel(config)
        hidden = config.classifier_hidden_size
        # Per-channel standardisation of the frozen features (running statistics at eval time): code vectors have
        # norm ~0.1 in HyperVQ and ~5 in GumbelVQ, and a head trained with one learning rate is not fair to both.
        self.feature_norm = (
            nn.BatchNorm2d(config.embedding_dim, eps=1e-6, affine=False)  # MAE's eps: HyperVQ's variances are ~1e-4
            if config.classifier_normalize_features
            else nn.Identity()
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(config.embedding_dim, hidden, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, config.num_labels),
        )
        self.post_init()
        self.freeze_tokenizer()

    def freeze_tokenizer(self) -> None:
        """No gradient to the tokenizer, and eval mode for it (its quantizer then draws no Gumbel noise)."""
        self.hypervq.requires_grad_(False)
        self.hypervq.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.hypervq.eval()
        return self

    def set_num_updates(self, num_updates: int) -> None:
        """The frozen tokenizer keeps its own schedule state: the head's updates are not the tokenizer's."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` gives a tuple
        model.freeze_tokenizer()  # transformers 5's loading hands every parameter back with requires_grad=True
        return loaded

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        r"""labels (`torch.Tensor` of shape `(batch_size,)`, *optional*): class ids for the cross-entropy loss; float
        targets `(batch_size, num_labels)` for `config.problem_type="multi_label_classification"`, or values for
        `"regression"` (inferred from the labels when unset, as in transformers' image classifiers)."""
        if labels is not None:
            check_labels(labels, self.config, len(pixel_values))
        with torch.no_grad():
            features = self.hypervq.encode(pixel_values).quantized_latents  # (B, D, h, w)
        logits = self.classifier(self.feature_norm(features))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


class HyperVQSAAttention(nn.Module):
    """VQ-SA's self-attention over two tokens, the code vector and the feature: bias-free query/key/value
    projections, softmax over the keys, scores scaled by `scale` (VQ-SA: 1/sqrt(2), in train and eval alike)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        # transformers 5 calls `_init_weights` only on modules with parameters of their own, so this module never
        # sees it: the projections carry the mark instead.
        for projection in (self.query, self.key, self.value):
            projection.kaiming_normal_init = True
        self.scale = scale

    def forward(self, code: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack([code, feature], dim=1)  # (B, 2, D)
        query, key, value = self.query(tokens), self.key(tokens), self.value(tokens)
        weights = torch.softmax(query @ key.transpose(1, 2) * self.scale, dim=-1)  # (B, 2 queries, 2 keys)
        return (weights @ value).flatten(1), weights  # (B, 2 * D), code token first


class HyperVQSAForImageClassification(HyperVQPreTrainedModel):
    """VQ-SA (Yang et al., CVPR 2023) with a HyperVQ quantizer (docs/method.md#vq-sa): ResNet pooled feature f →
    quantizer → self-attention over (code, f) → fuse (2·D → D) + ReLU → classifier. The loss is the cross-entropy
    plus the quantizer's loss. Build it from a ResNet image classifier with `from_resnet`.
    """

    config: HyperVQSAConfig
    base_model_prefix = "hypervq_sa"

    def __init__(self, config: HyperVQSAConfig):
        super().__init__(config)
        dim = config.feature_dim
        self.resnet = ResNetModel(config.backbone_config)
        self.quantizer = build_quantizer(config, dim=dim)
        self.attention = HyperVQSAAttention(dim, config.attention_scale)
        self.fuse = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, config.num_labels)
        self.post_init()
        if config.freeze_backbone:
            self.resnet.requires_grad_(False)

    @classmethod
    def from_resnet(cls, resnet_name_or_path: str, **config_kwargs) -> "HyperVQSAForImageClassification":
        """VQ-SA on a transformers ResNet image classifier (a folder or a Hub id such as `microsoft/resnet-50`): the
        backbone and the final linear layer are copied from it; the quantizer, attention and fuse layers are new.
        `config_kwargs` go to `HyperVQSAConfig` (e.g. `quantizer_type="kmeans"`, `codebook_size=1000`)."""
        found = ResNetForImageClassification.config_class.get_config_dict(resnet_name_or_path)[0].get("model_type")
        if found != "resnet":  # transformers would only warn, and hand back a ResNet with random weights
            raise ValueError(f"{resnet_name_or_path} holds a {found!r} model, not a transformers ResNet ('resnet')")
        resnet = ResNetForImageClassification.from_pretrained(resnet_name_or_path)
        labels = {"id2label": resnet.config.id2label, "label2id": resnet.config.label2id}
        config = HyperVQSAConfig(backbone_config=resnet.config.to_dict(), **labels, **config_kwargs)
        model = cls(config)
        model.resnet.load_state_dict(resnet.resnet.state_dict())
        model.classifier.load_state_dict(resnet.classifier[-1].state_dict())
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.freeze_backbone:  # loading hands every parameter back with requires_grad=True
            model.resnet.requires_grad_(False)
        return loaded

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.resnet.eval()  # frozen BatchNorm statistics must not drift
        return self

    def _scale_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.feature_scale == "sqrt_dim":
            return features / math.sqrt(features.shape[-1])
        if self.config.feature_scale == "l2":
            return F.normalize(features, dim=-1)
        return features

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_attentions: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HyperVQSAImageClassifierOutput:
        r"""labels (`torch.Tensor` of shape `(batch_size,)`, *optional*): class ids for the cross-entropy loss; float
        targets `(batch_size, num_labels)` for `config.problem_type="multi_label_classification"`, or values for
        `"regression"` (inferred from the labels when unset, as in transformers' image classifiers).
        output_attentions (`bool`, *optional*): also return the two-token attention weights."""
        stem = self.resnet.embedder.embedder.convolution.weight
        check_pixel_values(pixel_values, self.config.backbone_config.num_channels, stem)
        if labels is not None:
            check_labels(labels, self.config, len(pixel_values))
        features = self._scale_features(self.resnet(pixel_values).pooler_output.flatten(1))  # (B, D)
        quantized = self.quantizer(features)
        attended, weights = self.attention(quantized.quantized, features)
        logits = self.classifier(self.fuse(attended))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config) + quantized.loss
        return HyperVQSAImageClassifierOutput(
            loss=loss,
            logits=logits,
            image_tokens=quantized.indices,
            perplexity=quantized.perplexity,
            attentions=weights if output_attentions else None,
        )
