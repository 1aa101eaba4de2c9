"""The five vector quantizers of the HyperVQ paper, behind one interface (`VectorQuantizer` -> `QuantizerOutput`).

- `HyperVQ`: the paper's method. Latents go onto the Poincaré ball, a hyperbolic MLR scores the K codes, a hard
  Gumbel-softmax sample picks one in training (argmax in eval), and the codebook vector is the hyperplane's
  representative point mapped back to the tangent space, ``r_k * a_k / ||a_k||``.
- `KmeansVQ`: the original VQ-VAE (nearest neighbour, codebook + commitment loss, straight-through).
- `GumbelVQ`: vq-wav2vec's Gumbel quantizer (linear logits, separate codebook matrix).
- `HyperKmeansVQ` and `HyperEmbMatVQ`: the paper's ablations (nearest neighbour in hyperbolic distance; hyperbolic
  MLR with a separate codebook matrix). The paper does not define them further; our choices are in their docstrings.

Every quantizer takes channel-last input `(..., dim)` in any float dtype, computes in float32 with autocast
disabled (the ball's math is not safe in half precision, docs/method.md#half-precision), and returns a
`QuantizerOutput` whose `quantized` has the input's dtype.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .checks import check_finite, check_ids, nonfinite_marker
from .hyperbolic import (
    expmap0_projected,
    first_order_only,
    fold_hyperplanes,
    fold_latents,
    folded_mlr_logits,
    logmap0,
)
from .kernels import (
    argmax,
    draw_seed,
    gumbel_backward,
    gumbel_forward,
    mlr_gumbel_backward,
    mlr_gumbel_forward,
    mlr_logits_and_argmax,
)


@dataclass
class QuantizerOutput(ModelOutput):
    """What every quantizer returns.

    Args:
        quantized (`torch.Tensor` of shape `(..., dim)`):
            The codebook vectors of the chosen codes, in the input's dtype. In training they carry the
            quantizer's straight-through gradient.
        indices (`torch.LongTensor` of shape `(...)`):
            The chosen code ids, in `[0, codebook_size)`.
        loss (`torch.Tensor` of shape `()`):
            The quantizer's own loss terms, already weighted (zero where the method has none).
        perplexity (`torch.Tensor` of shape `()`):
            `exp(entropy)` of the code histogram of this call: 1 when one code is used, `codebook_size` at most.
        logits (`torch.Tensor` of shape `(..., codebook_size)`, *optional*):
            The code scores of the MLR/Gumbel quantizers (float32); `None` for the nearest-neighbour ones.
    """

    quantized: torch.Tensor | None = None
    indices: torch.LongTensor | None = None
    loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class _StraightThrough(torch.autograd.Function):
    """Returns `codes` exactly, and hands the incoming gradient to `z` unchanged (VQ-VAE's `z + sg(codes - z)`,
    without the rounding error of computing that sum)."""

    @staticmethod
    def forward(ctx, z, codes):
        return codes.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GumbelStraightThrough(torch.autograd.Function):
    """Hard Gumbel-softmax: draws a code per row, returns its codebook vector, and backpropagates the
    straight-through estimator of `F.gumbel_softmax(logits, tau, hard=True) @ codebook`.

    Same estimator as `F.gumbel_softmax`, rewritten because on CPU its `exponential_` noise costs 20× a matmul
    and it materialises the one-hot matrix (docs/performance.md#gumbel-noise): the noise is counter-based
    (`kernels.gumbel_noise`, computed in the fused kernel), the forward gathers rows instead of multiplying by a
    one-hot, and the backward is written out.
    """

    @staticmethod
    def forward(ctx, logits, codebook, inv_temperature, seed):
        indices, weights, inverse_total = gumbel_forward(logits, seed, inv_temperature)
        ctx.save_for_backward(weights, inverse_total, indices, codebook, inv_temperature)
        ctx.mark_non_differentiable(indices)
        return codebook.index_select(0, indices), indices

    @staticmethod
    @first_order_only  # the backward uses saved softmax weights as constants
    def backward(ctx, grad_quantized, grad_indices):
        weights, inverse_total, indices, codebook, inv_temperature = ctx.saved_tensors
        grad_logits = grad_codebook = None
        if ctx.needs_input_grad[0]:
            grad_soft = grad_quantized @ codebook.T  # (N, K)
            grad_logits = gumbel_backward(grad_soft, weights, inverse_total, inv_temperature)
        if ctx.needs_input_grad[1]:
            grad_codebook = _code_gradient(codebook, indices, grad_quantized)
        return grad_logits, grad_codebook, None, None


class _MLRGumbelStraightThrough(torch.autograd.Function):
    """HyperVQ's training step from the folded MLR operands (`hyperbolic.fold_mlr`): the logits
    `scale * asinh(x_folded @ w_folded.T)`, then `_GumbelStraightThrough` on them, with the N×K work of both in one
    fused kernel each way (`kernels.mlr_gumbel_forward` / `mlr_gumbel_backward`). Returns
    `(quantized, indices, logits)`; values and gradients equal `folded_mlr_logits` followed by `_GumbelStraightThrough`."""

    @staticmethod
    def forward(ctx, x_folded, w_folded, scale, codebook, inv_temperature, seed):
        y = x_folded @ w_folded.T  # (N, K)
        logits, indices, weights, inverse_total = mlr_gumbel_forward(y, scale, seed, inv_temperature)
        ctx.save_for_backward(x_folded, w_folded, scale, codebook, inv_temperature, logits, weights, inverse_total,
                              indices)  # fmt: skip
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)  # unused logits get no N×K tensor of zeros as their gradient
        return codebook.index_select(0, indices), indices, logits

    @staticmethod
    @first_order_only  # the backward uses saved softmax weights as constants
    def backward(ctx, grad_quantized, grad_indices, grad_logits):
        x_folded, w_folded, scale, codebook, inv_temperature, logits, weights, inverse_total, indices = (
            ctx.saved_tensors
        )
        if grad_quantized is None:  # only the logits were used
            grad_quantized = codebook.new_zeros(len(indices), codebook.shape[1])
        grad_soft = grad_quantized @ codebook.T  # (N, K)
        grad_y, grad_x_last, grad_w_last, grad_scale = mlr_gumbel_backward(
            grad_soft,
            grad_logits,
            logits,
            weights,
            inverse_total,
            scale,
            inv_temperature,
            w_folded[:, -1],
            x_folded[:, -1],
        )
        grad_x = torch.cat([grad_y @ w_folded[:, :-1], grad_x_last], 1) if ctx.needs_input_grad[0] else None
        grad_w = torch.cat([grad_y.T @ x_folded[:, :-1], grad_w_last[:, None]], 1) if ctx.needs_input_grad[1] else None
        grad_codebook = _code_gradient(codebook, indices, grad_quantized) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_scale, grad_codebook, None, None


def _code_gradient(codebook, indices, grad_quantized):
    # The straight-through one-hot equals the hard one-hot in value: each row's gradient goes to its code.
    return torch.zeros_like(codebook).index_add_(0, indices, grad_quantized)


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `indices`, `(codebook_size,)` int64. Unlike `torch.bincount`, whose output
    size depends on the values, this never waits for the device and compiles without a graph break."""
    flat = indices.reshape(-1)
    return torch.zeros(codebook_size, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def code_perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """`exp(entropy)` of the histogram of `indices` (docs/method.md#codebook-metrics)."""
    counts = code_counts(indices, codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


class VectorQuantizer(nn.Module):
    """Base class: argument checks, the float32 region, reshaping, perplexity and `indices_to_codes`.

    Parameters are created in float32 whatever `torch.get_default_dtype()` is: the models keep the quantizer in
    float32 (`_keep_in_fp32_modules_strict`), and a model built under a float16 default must not start otherwise.

    Subclasses implement `codebook` and `_quantize(z)` on a float32 `(N, dim)` matrix, returning
    `(quantized, indices, loss, logits)`.
    """

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}")
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"`codebook_size` must be an integer >= 2, got {codebook_size!r}")
        self.dim = dim
        self.codebook_size = codebook_size

    @property
    def codebook(self) -> torch.Tensor:
        """`(codebook_size, dim)`: the Euclidean vectors the decoder receives."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}"

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize `z` of shape `(..., dim)`; see `QuantizerOutput`."""
        # A training step is not stopped by a non-finite latent (an fp16 overflow): its loss becomes NaN instead,
        # and a GradScaler skips the step (`checks.nonfinite_marker`). Evaluation and tokenization raise.
        self._check_input(z, values=not self.training)
        leading_shape = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.reshape(-1, self.dim).float()  # (N, dim)
            quantized, indices, loss, logits = self._quantize(flat)
            if self.training:
                loss = loss + nonfinite_marker(flat)
        return QuantizerOutput(
            quantized=quantized.view(z.shape).to(z.dtype),
            indices=indices.view(leading_shape),
            loss=loss,
            perplexity=code_perplexity(indices, self.codebook_size),
            logits=None if logits is None else logits.view(*leading_shape, self.codebook_size),
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors `(..., dim)` of code ids `(...)`; equal to the eval-mode `quantized` for those ids."""
        check_ids(indices, "indices", self.codebook_size)
        return F.embedding(indices.long(), self.codebook)

    def set_num_updates(self, num_updates: int) -> None:
        """Called by the training loop after every optimizer update; a no-op without a schedule."""
        _check_num_updates(num_updates)

    def _check_input(self, z, values: bool = True) -> None:
        name = type(self).__name__
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} expects `z` to be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} expects a floating-point `z`, got dtype {z.dtype}")
        if z.ndim == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"{name} expects `z` of shape (..., dim={self.dim}), got {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError(f"{name} expects at least one vector in `z`, got shape {tuple(z.shape)}")
        if z.is_meta:  # it holds no values: the float32 region and the checks would fail with a torch error
            raise ValueError(f"{name} got `z` on the meta device, which holds no data: pass latents on a real device")
        if values:
            check_finite(z, name)

    def _quantize(self, z: torch.Tensor):
        raise NotImplementedError


class _GumbelTemperature:
    """What the three Gumbel quantizers (GumbelVQ and the hyperbolic MLR quantizers) share: the temperature
    schedule and the optional diversity loss (`codebook_diversity_loss`).

    After `j` optimizer updates the temperature is `tau_j = max(tau_max * decay**j, tau_min)` (paper, Algorithm 1;
    fairseq's `set_num_updates`). The update count `j` is a buffer, `num_updates`, so it is saved with the weights: a
    model reloaded with `from_pretrained` (or a checkpoint) and trained further goes on from its temperature instead
    of restarting at `tau_max`. Each training step computes tau from the buffer on the device, so no Python number
    changes from one update to the next: a compiled model does not recompile, and nothing waits for the device."""

    def _init_temperature(self, temperature: tuple[float, float, float], diversity_weight: float) -> None:
        self.temperature = _check_temperature(temperature)
        self.diversity_weight = _check_diversity_weight(diversity_weight)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _add_diversity_loss(self, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """`loss` plus the weighted diversity loss of this call's `(N, K)` logits, in training with a weight > 0."""
        if self.training and self.diversity_weight:
            return loss + self.diversity_weight * codebook_diversity_loss(logits)
        return loss

    def extra_repr(self) -> str:
        extra = f", diversity_weight={self.diversity_weight}" if self.diversity_weight else ""
        return super().extra_repr() + extra

    def set_num_updates(self, num_updates: int) -> None:
        """Set the Gumbel temperature for the `num_updates`-th optimizer update."""
        _check_num_updates(num_updates)
        self.num_updates.fill_(num_updates)

    @property
    def current_temperature(self) -> float:
        """tau at the current update count, as a Python float (for logs; it reads the buffer)."""
        return float(self._temperature())

    def _temperature(self) -> torch.Tensor:
        tau_max, tau_min, decay = self.temperature
        # decay**j as exp(j log decay): a float32 decay**j would be ~2% off at j = 3e5 (decay's rounding, to the j)
        return (self.num_updates.float() * math.log(decay)).exp().mul(tau_max).clamp_min(tau_min)

    def _gumbel_inputs(self, z: torch.Tensor):
        """`(1 / tau, seed)` for a training step's Gumbel draw, both device tensors."""
        return 1 / self._temperature(), draw_seed(z.device)

    def _pick_codes(self, logits: torch.Tensor, codebook: torch.Tensor):
        """Training: a hard Gumbel-softmax sample with the straight-through gradient. Eval: argmax, no noise."""
        if self.training:
            return _GumbelStraightThrough.apply(logits, codebook, *self._gumbel_inputs(logits))
        indices = argmax(logits)
        return codebook.index_select(0, indices), indices


def codebook_diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""wav2vec 2.0's codebook diversity loss of `(N, K)` logits: :math:`(K - \exp H(\bar p)) / K`, where
    :math:`\bar p` is the softmax of the logits (no Gumbel noise, no temperature) averaged over all N rows and H its
    entropy. It is 0 when the average softmax is uniform over the K codes and approaches 1 - 1/K when one code takes
    it all, so minimising it spreads the probability mass, and with it the hard samples, over the codebook.

    The term of wav2vec 2.0 (Baevski et al., NeurIPS 2020) as fairseq computes it, with one group:
    `GumbelVectorQuantizer.forward`'s `prob_perplexity` (the exponentiated entropy of `avg_probs`, the batch mean of
    the softmax) in `Wav2Vec2Model.get_extra_losses`' `(num_vars - prob_perplexity) / num_vars`. (The paper's Eq. 4
    writes it with :math:`-H(\bar p)` instead of the perplexity; both are smallest for a uniform :math:`\bar p`.)
    In float32, on the device, without a host synchronisation: the softmax through `log_softmax` (no overflow
    whatever the logits), and :math:`\bar p` clamped to float32's smallest normal number inside the log, where
    fairseq adds 1e-7 (a code without mass then adds exactly 0 to the entropy)."""
    num_codes = logits.shape[-1]
    mean_probs = torch.log_softmax(logits.float(), dim=-1).exp().mean(dim=0)  # (K,)
    entropy = -(mean_probs * mean_probs.clamp_min(torch.finfo(torch.float32).tiny).log()).sum()
    return (num_codes - entropy.exp()) / num_codes


def _check_num_updates(num_updates) -> None:
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
        raise ValueError(f"`num_updates` must be an integer >= 0, got {num_updates!r}")


def decay_for_run(tau_max: float, tau_min: float, num_updates: int) -> float:
    """The per-update decay with which the last of a run's `num_updates` optimizer updates is made at `tau_min`:
    `(tau_min / tau_max) ** (1 / (num_updates - 1))`.

    The training loop (and `hf_hypervq.training.study`) calls `set_num_updates(j)` after update `j`, so update `j` (1-based)
    runs at `tau_max * decay ** (j - 1)`: the first at `tau_max`, the last at `tau_max * decay ** (num_updates - 1)`
    = `tau_min`. A run of a single update has only the one at `tau_max`, whatever the decay; it gets
    `tau_min / tau_max`, so that training continued past it goes on at `tau_min`.

    vq-wav2vec's decay of 0.999995 is made for ~300k updates: in a run of a few thousand the temperature stays near
    `tau_max` and the hard samples stay close to uniform draws. Scaling the decay to the run's length is the
    `run_length` schedule of the training scripts (`results/ABLATIONS.md`, row `per_update`, is the run without it)."""
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
        raise ValueError(f"`num_updates` must be a positive integer, got {num_updates!r}")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got tau_max={tau_max!r}, tau_min={tau_min!r}")
    return (tau_min / tau_max) ** (1 / max(num_updates - 1, 1))


def _check_curvature(curvature: float) -> float:
    if isinstance(curvature, bool) or not isinstance(curvature, (int, float)) or not 0 < curvature < math.inf:
        raise ValueError(f"`curvature` must be a finite number > 0, got {curvature!r}")
    return float(curvature)


def _check_ball_eps(ball_eps: float | None) -> float | None:
    if ball_eps is not None and not 0 < ball_eps < 1:
        raise ValueError(f"`ball_eps` must lie in (0, 1), got {ball_eps!r}")
    return ball_eps


# The value checks of the quantizers' arguments; the configs run the same ones on their fields (`name` is the
# argument's name where it is called, so each message names what the user set).


def _check_temperature(temperature, name: str = "temperature") -> tuple[float, float, float]:
    try:
        tau_max, tau_min, decay = (float(t) for t in temperature)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be (tau_max, tau_min, decay), got {temperature!r}") from None
    if not (0 < tau_min <= tau_max and 0 < decay <= 1):
        raise ValueError(f"`{name}` must satisfy 0 < tau_min <= tau_max and 0 < decay <= 1, got {temperature!r}")
    return tau_max, tau_min, decay


def _check_normal_init_scale(value: float) -> float:
    value = _check_weight("normal_init_scale", value)
    if value == 0:
        raise ValueError("`normal_init_scale` must be > 0: a zero normal defines no hyperplane")
    return value


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
    return float(value)


def _check_diversity_weight(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"`diversity_weight` must be a finite number >= 0 (0 turns the term off), got {value!r}")
    return float(value)


def _check_feature_clip(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"`feature_clip` must be a finite number > 0, or None for no clipping, got {value!r}")
    return float(value)


class _PoincareBall:
    """What the hyperbolic quantizers share: the ball's curvature and projection margin (checked once), the map of
    Euclidean latents onto the ball, and the repr."""

    def _init_ball(self, curvature: float, ball_eps: float | None, commitment_weight: float) -> None:
        self.curvature = _check_curvature(curvature)
        self.ball_eps = _check_ball_eps(ball_eps)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)

    def _to_ball(self, z: torch.Tensor) -> torch.Tensor:
        return expmap0_projected(z, c=self.curvature, eps=self.ball_eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, curvature={self.curvature}, commitment_weight={self.commitment_weight}"


class HyperVQ(_GumbelTemperature, _PoincareBall, VectorQuantizer):
    r"""HyperVQ (arXiv 2403.13015): vector quantization as multinomial logistic regression on the Poincaré ball.

    1. Project: :math:`x = \operatorname{project}(\exp_0^c(z))`, at most :math:`(1 - \epsilon)/\sqrt{c}` from
       the origin.
    2. Score: the unidirectional hyperbolic MLR of HNN++ gives K logits (`hyperbolic.mlr_logits`).
    3. Pick: training draws a hard Gumbel-softmax sample (straight-through gradient to the logits and the
       codebook); eval takes the argmax, without noise.
    4. Emit: code k's vector is :math:`r_k a_k / \|a_k\|`, the tangent vector of the point where hyperplane k is
       closest to the origin (the paper's Eq. 9; computed directly, not as :math:`\log_0(\exp_0(\cdot))`).

    Args:
        dim (`int`): size of the latent vectors.
        codebook_size (`int`): number of codes K (>= 2).
        curvature (`float`, *optional*, defaults to 1.0): the ball's curvature c > 0, fixed (not learned),
            as in HNN++.
        commitment_weight (`float`, *optional*, defaults to 0.0): weight of an optional commitment loss
            :math:`\|z - \operatorname{sg}(z_q)\|^2` (mean). The paper trains on the reconstruction loss alone
            (its Algorithm 1), and so do we by default: the term pulls the latents towards the ball's centre,
            where the MLR logits are flat, so the hard samples become near-uniform draws and eval uses a handful
            of codes (`results/ABLATIONS.md`, row `beta_0.25`). There is no codebook loss: the codes learn
            through the decoder's gradient and the logits.
        temperature (`tuple[float, float, float]`, *optional*, defaults to `(2.0, 0.5, 0.999995)`):
            `(tau_max, tau_min, decay)` of the Gumbel temperature, stepped by `set_num_updates` (vq-wav2vec's
            values). With this decay tau reaches 0.5 only after ~277k updates; `scripts/train_vqvae.py` passes
            a decay sized to the run instead (docs/method.md#gumbel-temperature).
        ball_eps (`float`, *optional*): the projection margin; defaults to 4e-3 (geoopt/HNN++ in float32).
        offset_init_scale (`float`, *optional*, defaults to 1.0): the offsets start Uniform(0, s/sqrt(c·dim))
            with this s; 0 gives HNN++'s zeros. It sets the initial norms of the code vectors, which equal
            :math:`r_k` (`results/ABLATIONS.md`, rows `offsets_0`, `offsets_x8`).
        normal_init_scale (`float`, *optional*, defaults to 1.0): multiplies HNN++'s standard deviation of the
            normals, and with it the initial scale of the logits (`results/ABLATIONS.md`, rows `normals_x0.25`,
            `normals_x4`).
        diversity_weight (`float`, *optional*, defaults to 0.0): weight of wav2vec 2.0's codebook diversity loss,
            :math:`(K - \exp H(\bar p)) / K` with :math:`\bar p` the softmax of the logits averaged over the call's
            latents (`codebook_diversity_loss`), added to `loss` in training only. 0, the paper's setting, turns it
            off.
        feature_clip (`float`, *optional*): feature clipping (Guo et al., "Clipped Hyperbolic Classifiers Are
            Super-Hyperbolic Classifiers", CVPR 2022): each latent is rescaled to
            :math:`\min(1, r / \|z\|)\, z` with this radius r before the map onto the ball, in training and eval
            alike (the gradient is autograd's of that expression). With r below about :math:`3.1/\sqrt{c}` (the
            float32 projection margin, :math:`\operatorname{atanh}(1 - \epsilon)/\sqrt{c}`) no latent reaches the
            margin, whose clamp passes no radial gradient. `None`, the paper's setting, does not clip. The
            commitment loss still compares the unclipped latent with its code.

    Choices where the paper is silent, each a documented decision:

    - The normals use HNN++'s weight norm, :math:`a_k = g_k v_k/\|v_k\|` (`normal_scales` g, `normal_directions`
      v; `normals` gives :math:`a_k`), initialised as HNN++ does: v entries :math:`\mathcal{N}(0, 1/(c \cdot dim))`,
      :math:`g_k = \|v_k\|` (so :math:`\|a_k\| \approx 1/\sqrt{c}`). The forward equals plain :math:`a_k`
      parameters, but Adam then moves a norm by about one learning rate per step instead of :math:`\sqrt{dim}`:
      with plain :math:`a_k` the norms of the most used codes grow fastest, their logits win more latents, and
      usage drops (`tests/test_codebook_usage.py`, K = 128, 3 seeds: eval perplexity 30.5 on average against 26.6).
    - The offsets :math:`r_k` start Uniform(0, :math:`1/\sqrt{c \cdot dim}`), not at HNN++'s zero and never
      negative. With :math:`r_k \ge 0` the origin is on the negative side of every hyperplane, so at step 0 the
      codes split the ball by direction and each code vector points into the region its code wins. A negative
      :math:`r_k` puts the origin on code k's positive side, and the most negative offset then wins every latent
      near the origin. Measured on scikit-learn's digits (`tests/test_codebook_usage.py`'s tiny autoencoder, K = 32,
      300 steps, seeds 0-2): eval perplexity 5.4, 12.4, 12.2 with this init against 5.9-7.2 for symmetric offsets
      and 3.8-10.3 for zeros, medians 12.2, 5.9 and 7.1 (with zeros every code vector is also 0 at step 0).
    - Gumbel noise is float32 and the estimator is the hard straight-through one of `F.gumbel_softmax`
      (docs/method.md#gradient-paths). The encoder learns through the logits (and the commitment term when
      its weight is > 0); there is no :math:`z + \operatorname{sg}(z_q - z)` path, as in GumbelVQ.

    Example:

    ```python
    >>> q = HyperVQ(dim=64, codebook_size=512)
    >>> out = q(torch.randn(8, 16, 64))
    >>> out.quantized.shape, out.indices.shape, out.logits.shape
    (torch.Size([8, 16, 64]), torch.Size([8, 16]), torch.Size([8, 16, 512]))
    ```
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        curvature: float = 1.0,
        commitment_weight: float = 0.0,
        temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        ball_eps: float | None = None,
        offset_init_scale: float = 1.0,
        normal_init_scale: float = 1.0,
        diversity_weight: float = 0.0,
        feature_clip: float | None = None,
    ):
        super().__init__(dim, codebook_size)
        self._init_ball(curvature, ball_eps, commitment_weight)
        self._init_temperature(temperature, diversity_weight)
        self.offset_init_scale = _check_weight("offset_init_scale", offset_init_scale)
        self.normal_init_scale = _check_normal_init_scale(normal_init_scale)
        self.feature_clip = _check_feature_clip(feature_clip)
        self.normal_directions = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))  # HNN++'s weight_v
        self.normal_scales = nn.Parameter(torch.empty(codebook_size, dtype=torch.float32))  # HNN++'s weight_g
        self.offsets = nn.Parameter(torch.empty(codebook_size, dtype=torch.float32))
        self._reset_hyperplanes()

    def reset_parameters(self) -> None:
        self._reset_hyperplanes()

    def _reset_hyperplanes(self) -> None:
        scale = (self.curvature * self.dim) ** -0.5
        init.normal_(self.normal_directions, std=scale * self.normal_init_scale)
        init.copy_(self.normal_scales, self.normal_directions.detach().norm(dim=-1))
        init.uniform_(self.offsets, 0.0, scale * self.offset_init_scale)

    @property
    def normals(self) -> torch.Tensor:
        """`(K, dim)`: the hyperplanes' normals a_k, their norms included (`normal_scales * unit directions`)."""
        directions = self.normal_directions.float()
        return (
            self.normal_scales.float()[:, None] * directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-15)
        )

    @property
    def codebook(self) -> torch.Tensor:
        normals = self.normals
        return self.offsets.float()[:, None] * normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-15)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The hyperbolic MLR logits `(..., codebook_size)` of latents `z` `(..., dim)`, in float32."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._logits(z.float())

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        logits = folded_mlr_logits(*self._folded_mlr(z.reshape(-1, self.dim)))
        return logits.view(*z.shape[:-1], self.codebook_size)

    def _folded_mlr(self, z: torch.Tensor):
        """The logits' matmul operands: `hyperbolic.fold_mlr` of `_to_ball(z)` (of the clipped z with a
        `feature_clip`), with the latents folded in one step (`hyperbolic.fold_latents`: faster, and more accurate
        near the boundary)."""
        return (
            fold_latents(self._clip_features(z), c=self.curvature, eps=self.ball_eps),
            *fold_hyperplanes(self.normals, self.offsets.float(), c=self.curvature),
        )

    def _clip_features(self, z: torch.Tensor) -> torch.Tensor:
        """`min(1, r / ||z||) * z` per row with r = `feature_clip`; `z` itself without one. Written as
        `r / max(||z||, r)`: the factor is exactly 1 for short rows, and nothing divides by a tiny norm (whose
        gradient would overflow for a zero latent)."""
        if self.feature_clip is None:
            return z
        norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        return z * (self.feature_clip / norms.clamp_min(self.feature_clip))

    def extra_repr(self) -> str:
        extra = f", feature_clip={self.feature_clip}" if self.feature_clip is not None else ""
        return super().extra_repr() + extra

    def _quantize(self, z):
        if self.training:  # the logits and the Gumbel draw fused: the values of `_logits` then `_pick_codes`
            quantized, indices, logits = _MLRGumbelStraightThrough.apply(
                *self._folded_mlr(z), self.codebook, *self._gumbel_inputs(z)
            )
        elif torch.is_grad_enabled():
            logits = self._logits(z)  # (N, K)
            quantized, indices = self._pick_codes(logits, self.codebook)
        else:  # tokenization: the logits and their argmax in one pass
            x_folded, w_folded, scale = self._folded_mlr(z)
            logits, indices = mlr_logits_and_argmax(x_folded @ w_folded.T, scale)
            quantized = self.codebook.index_select(0, indices)
        loss = (
            self.commitment_weight * F.mse_loss(z, quantized.detach()) if self.commitment_weight else z.new_zeros(())
        )
        # in training the logits are the fused function's output: the term's gradient reaches them as its
        # `grad_logits`, and through the MLR's backward the latents and the hyperplanes
        return quantized, indices, self._add_diversity_loss(loss, logits), logits


class HyperEmbMatVQ(HyperVQ):
    r"""Ablation HyperEmbMatVQ: HyperVQ's hyperbolic MLR and Gumbel sampling, but the code vectors are a separate
    learnable matrix (as in GumbelVQ) instead of the hyperplanes' representative points.

    Takes the arguments of `HyperVQ`. The paper defines it in one sentence; our choices: the matrix is
    initialised Uniform[0, 1) like GumbelVQ's (fairseq), and the loss (none by default) is the same as HyperVQ's,
    so the ablation changes only where code vectors come from. The offsets :math:`r_k` still place the hyperplanes.
    """

    def __init__(self, dim: int, codebook_size: int, **kwargs):
        super().__init__(dim, codebook_size, **kwargs)
        # Drawn after the hyperplanes, which are drawn once: for the same seed they equal HyperVQ's, so the
        # ablation against HyperVQ is paired.
        self.embedding = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))
        init.uniform_(self.embedding, 0.0, 1.0)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        init.uniform_(self.embedding, 0.0, 1.0)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.float()


class KmeansVQ(VectorQuantizer):
    r"""KmeansVQ: the original VQ-VAE quantizer (van den Oord et al. 2017), without EMA.

    The nearest code in Euclidean distance is chosen; the decoder's gradient goes straight through to `z`.
    `loss = ||sg(z) - e||^2 + commitment_weight * ||z - sg(e)||^2` (means): the first term moves the codebook,
    the second the encoder.

    Args:
        dim (`int`): size of the latent vectors.
        codebook_size (`int`): number of codes K (>= 2).
        commitment_weight (`float`, *optional*, defaults to 0.25): the VQ-VAE's beta.

    The codebook starts Uniform(-1/K, 1/K), as in the Sonnet/zalando VQ-VAE.
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25):
        super().__init__(dim, codebook_size)
        self.commitment_weight = _check_weight("commitment_weight", commitment_weight)
        self.embedding = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.uniform_(self.embedding, -1 / self.codebook_size, 1 / self.codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.float()

    def _quantize(self, z):
        codebook = self.codebook
        # ||z - e||^2 without ||z||^2, which is the same for every code of a row: (N, K)
        distances = torch.addmm(codebook.pow(2).sum(-1), z, codebook.T, alpha=-2)
        indices = distances.argmin(dim=-1)
        # index_select, not codebook[indices]: on CPU the backward of indexing accumulates in a nondeterministic
        # order, so a seeded run would not repeat itself; index_select's backward (index_add_) does.
        codes = codebook.index_select(0, indices)  # (N, dim)
        loss = F.mse_loss(codes, z.detach()) + self.commitment_weight * F.mse_loss(z, codes.detach())
        return _StraightThrough.apply(z, codes), indices, loss, None


class GumbelVQ(_GumbelTemperature, VectorQuantizer):
    r"""GumbelVQ (vq-wav2vec, Baevski et al. 2020): linear logits, a hard Gumbel-softmax sample in training
    (argmax in eval), and a separate codebook matrix.

    Args:
        dim (`int`): size of the latent vectors.
        codebook_size (`int`): number of codes K (>= 2).
        temperature (`tuple[float, float, float]`, *optional*, defaults to `(2.0, 0.5, 0.999995)`):
            `(tau_max, tau_min, decay)`, as for `HyperVQ`.
        diversity_weight (`float`, *optional*, defaults to 0.0): weight of wav2vec 2.0's codebook diversity loss
            (`codebook_diversity_loss`), added to `loss` in training only, as for `HyperVQ`. 0 turns it off.

    As in fairseq's `GumbelVectorQuantizer` with one group and a one-layer projection: the
    projection weight starts Normal(0, 1), its bias 0, the codebook Uniform[0, 1). By default there is no extra loss
    (vq-wav2vec's Gumbel recipe has no diversity term; wav2vec 2.0 added it), so `loss` is 0.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        diversity_weight: float = 0.0,
    ):
        super().__init__(dim, codebook_size)
        self._init_temperature(temperature, diversity_weight)
        self.projection_weight = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))
        self.projection_bias = nn.Parameter(torch.empty(codebook_size, dtype=torch.float32))
        self.embedding = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.projection_weight, std=1.0)
        init.zeros_(self.projection_bias)
        init.uniform_(self.embedding, 0.0, 1.0)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.float()

    def _quantize(self, z):
        logits = torch.addmm(self.projection_bias.float(), z, self.projection_weight.float().T)  # (N, K)
        quantized, indices = self._pick_codes(logits, self.codebook)
        return quantized, indices, self._add_diversity_loss(z.new_zeros(()), logits), logits


class HyperKmeansVQ(_PoincareBall, VectorQuantizer):
    r"""Ablation HyperKmeansVQ: the VQ-VAE mechanism with codes on the Poincaré ball and hyperbolic distance.

    `z` and the codes go onto the ball with :math:`\operatorname{project} \circ \exp_0^c`; the code nearest in
    geodesic distance is chosen; the decoder receives its tangent vector :math:`\log_0^c(e_k)` with a
    straight-through gradient to `z`.

    Args:
        dim (`int`): size of the latent vectors.
        codebook_size (`int`): number of codes K (>= 2).
        curvature (`float`, *optional*, defaults to 1.0): the ball's curvature c > 0.
        commitment_weight (`float`, *optional*, defaults to 0.25): the VQ-VAE's beta.
        ball_eps (`float`, *optional*): the projection margin; defaults to 4e-3 in float32.

    Choices (the paper gives one sentence): the codes are Euclidean parameters :math:`w_k` (tangent
    vectors at the origin, so plain Adam is correct), initialised Uniform(-1/K, 1/K) like KmeansVQ; the nearest
    code minimises :math:`\|x - e_k\|^2 / (1 - c\|e_k\|^2)`, which orders codes exactly as the geodesic distance
    does for a fixed :math:`x` (one matmul, no N×K×dim Möbius sum); and the codebook and commitment losses are
    KmeansVQ's, in the tangent space.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        curvature: float = 1.0,
        commitment_weight: float = 0.25,
        ball_eps: float | None = None,
    ):
        super().__init__(dim, codebook_size)
        self._init_ball(curvature, ball_eps, commitment_weight)
        self.embedding = nn.Parameter(torch.empty(codebook_size, dim, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.uniform_(self.embedding, -1 / self.codebook_size, 1 / self.codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        return logmap0(self._to_ball(self.embedding.float()), c=self.curvature)

    def _quantize(self, z):
        c = self.curvature
        x = self._to_ball(z)  # (N, dim)
        codes_on_ball = self._to_ball(self.embedding.float())  # (K, dim)
        code_sq_norms = codes_on_ball.pow(2).sum(-1)  # (K,)
        # ||x - e_k||^2 / (1 - c ||e_k||^2): monotone in d_c(x, e_k) for a fixed x, (N, K)
        scores = torch.addmm(code_sq_norms, x, codes_on_ball.T, alpha=-2).add_(x.pow(2).sum(-1, keepdim=True))
        scores.div_((1 - c * code_sq_norms).clamp_min(1e-15))
        indices = scores.argmin(dim=-1)
        codes = logmap0(codes_on_ball, c=c).index_select(0, indices)  # (N, dim); index_select as in KmeansVQ
        loss = F.mse_loss(codes, z.detach()) + self.commitment_weight * F.mse_loss(z, codes.detach())
        return _StraightThrough.apply(z, codes), indices, loss, None


@dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer as the library knows it: the name a config uses (`quantizer_type`), the name the paper uses,
    its class, and the config fields it takes, which `options` turns into the class's keyword arguments."""

    name: str
    paper_name: str
    cls: type[VectorQuantizer]
    config_fields: tuple[str, ...]

    def options(self, config) -> dict:
        """The keyword arguments for `cls` from `config`; a field set to None (or missing) keeps the class default."""
        options = {}
        for field in self.config_fields:
            value = getattr(config, field, None)
            if value is not None:
                options[_KEYWORDS.get(field, field)] = tuple(value) if isinstance(value, list) else value
        return options


_KEYWORDS = {"gumbel_temperature": "temperature"}  # config field -> keyword, where the names differ
_HYPERBOLIC_MLR = (
    "curvature",
    "gumbel_temperature",
    "offset_init_scale",
    "normal_init_scale",
    "commitment_weight",
    "diversity_weight",
    "feature_clip",
)
# The one table of quantizers: the config, the models, the scripts, the model card and the report read it.
QUANTIZERS = {
    spec.name: spec
    for spec in (
        QuantizerSpec("hyperbolic", "HyperVQ", HyperVQ, _HYPERBOLIC_MLR),
        QuantizerSpec("kmeans", "KmeansVQ", KmeansVQ, ("commitment_weight",)),
        QuantizerSpec("gumbel", "GumbelVQ", GumbelVQ, ("gumbel_temperature", "diversity_weight")),
        QuantizerSpec("hyperbolic_kmeans", "HyperKmeansVQ", HyperKmeansVQ, ("curvature", "commitment_weight")),
        QuantizerSpec("hyperbolic_embedding", "HyperEmbMatVQ", HyperEmbMatVQ, _HYPERBOLIC_MLR),
    )
}
QUANTIZER_TYPES = tuple(QUANTIZERS)
