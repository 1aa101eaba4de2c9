r"""Poincaré-ball math for HyperVQ: pure functions on tensors, no modules.

The ball of curvature :math:`-c` is :math:`\mathbb{B}^d_c = \{x : c\|x\|^2 < 1\}`; every function takes the
(positive) curvature ``c`` as a keyword-only argument and works on the last dimension. Inputs may be float32
or float64 and the output has the input's dtype. Half precision is not safe here (docs/method.md#half-precision):
the quantizers call these functions in float32 with autocast disabled.

geoopt is the provider where its numerics are right (``expmap0``, ``mobius_add``, ``dist``; none of them is on a
quantizer's path, and each has a closed-form fallback should geoopt's TorchScript fail to import on a future torch);
the rest is our own, each saying why:

- :func:`project` picks its margin from the dtype; geoopt gives float16/bfloat16 a margin of ``1e-5``, which is
  below their resolution, so points land on the boundary.
- :func:`mlr_logits` computes an accurate asinh; geoopt's ``arsinh`` is ``log(x + sqrt(1 + x^2))``, which cancels
  catastrophically for large negative arguments (190% error at the float32 boundary, docs/method.md#accurate-asinh).
- :func:`logmap0` is geoopt's formula without its branch on the curvature's sign (a host synchronisation).
- :func:`expmap0_projected` and :func:`pairwise_dist` are closed forms of compositions (geoopt's ``expmap0`` then
  :func:`project`; :func:`dist` of all pairs) that cost one pass or one matmul instead of several, or an N×K×dim
  tensor; tests check them against the compositions in float64.

References:
    [1] Ganea, Bécigneul, Hofmann. "Hyperbolic Neural Networks." NeurIPS 2018.
    [2] Shimizu, Mukuta, Harada. "Hyperbolic Neural Networks++." ICLR 2021 (unidirectional MLR, §3.1).
    [3] Goswami, Mukuta, Harada. "HyperVQ: MLR-based Vector Quantization in Hyperbolic Space." arXiv 2403.13015.
"""

import functools
import math
import warnings

import torch

from .kernels import mlr_logits_backward, mlr_logits_from_matmul


def _import_geoopt_math():
    """geoopt's stereographic math, or None where it cannot be imported. Its functions are TorchScript, whose
    `@torch.jit.script` newer torch deprecates with a warning at import (every script of ours would print it first)
    and may one day remove: the warning is silenced for this import alone, and the three functions taken from geoopt
    have closed-form fallbacks (`_expmap0`, `_mobius_add`, `_dist`), with geoopt's clamps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script(_method)?` is deprecated")
        try:
            from geoopt.manifolds.stereographic import math as geoopt_math
        except Exception:  # a decorator that no longer works raises anything from TypeError to RuntimeError
            return None
    return geoopt_math


geoopt_math = _import_geoopt_math()


# Distance from the boundary, as a fraction of the radius 1/sqrt(c), that `project` keeps. float32 and float64
# follow geoopt/HNN++; half precision gets a margin above its resolution (1 - 1e-5 rounds to 1.0 in float16).
BALL_EPS = {torch.float32: 4e-3, torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Norms are clamped at this value before dividing by them (geoopt's convention).
MIN_NORM = 1e-15
# See `mlr_logits`: 2 sqrt(c) |r_k| is clamped here.
_MAX_TWO_SQRT_C_OFFSET = 30.0


def check_curvature(c) -> float:
    """`c` as a float, or a ValueError: the ball needs a finite curvature > 0 (c = 0 is flat space, c = inf a point)."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf:
        raise ValueError(f"the curvature `c` must be a finite number > 0, got {c!r}")
    return float(c)


def _curvature_as_k(c: float, like: torch.Tensor) -> torch.Tensor:
    # geoopt uses the sectional curvature k = -c, as a tensor of the input's dtype (a float32 k would cap a
    # float64 computation at float32 precision for c = 0.1).
    return torch.tensor(-check_curvature(c), dtype=like.dtype, device=like.device)


def expmap0(u: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""Exponential map at the origin, :math:`\exp_0^c(u) = \tanh(\sqrt{c}\|u\|)\, u / (\sqrt{c}\|u\|)`.

    Not projected: compose with :func:`project` to stay a safe distance from the boundary.
    """
    if geoopt_math is None:
        return _expmap0(u, c=c)
    return geoopt_math.expmap0(u, k=_curvature_as_k(c, u))


def _expmap0(u: torch.Tensor, *, c: float) -> torch.Tensor:
    sqrt_c = check_curvature(c) ** 0.5
    norm = u.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return torch.tanh((sqrt_c * norm).clamp(-15, 15)) / sqrt_c * (u / norm)


def logmap0(y: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""Logarithmic map at the origin, :math:`\log_0^c(y) = \operatorname{artanh}(\sqrt{c}\|y\|)\, y / (\sqrt{c}\|y\|)`,
    the inverse of :func:`expmap0` on the open ball.

    geoopt's formula (artanh's argument clamped below 1 - 1e-7), written out: geoopt's `artan_k` branches on
    `torch.all` of the curvature's sign, a host synchronisation and, under `torch.compile`, a graph break."""
    sqrt_c_norm = check_curvature(c) ** 0.5 * y.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return y * (torch.atanh(sqrt_c_norm.clamp_max(1 - 1e-7)) / sqrt_c_norm)


def mobius_add(x: torch.Tensor, y: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""Möbius addition,

    .. math::
        x \oplus_c y = \frac{(1 + 2c\langle x, y\rangle + c\|y\|^2)\, x + (1 - c\|x\|^2)\, y}
                            {1 + 2c\langle x, y\rangle + c^2\|x\|^2\|y\|^2}.
    """
    if geoopt_math is None:
        return _mobius_add(x, y, c=c)
    return geoopt_math.mobius_add(x, y, k=_curvature_as_k(c, x))


def _mobius_add(x: torch.Tensor, y: torch.Tensor, *, c: float) -> torch.Tensor:
    c = check_curvature(c)
    x2, y2 = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    xy = (x * y).sum(-1, keepdim=True)
    numerator = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return numerator / (1 + 2 * c * xy + c**2 * x2 * y2).clamp_min(MIN_NORM)


def dist(x: torch.Tensor, y: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""Geodesic distance :math:`d_c(x, y) = \frac{2}{\sqrt{c}} \operatorname{artanh}(\sqrt{c}\|(-x) \oplus_c y\|)`."""
    if geoopt_math is None:
        return _dist(x, y, c=c)
    return geoopt_math.dist(x, y, k=_curvature_as_k(c, x))


def _dist(x: torch.Tensor, y: torch.Tensor, *, c: float) -> torch.Tensor:
    sqrt_c = check_curvature(c) ** 0.5
    scaled = sqrt_c * _mobius_add(-x, y, c=c).norm(dim=-1)
    return (2 / sqrt_c) * torch.atanh(scaled.clamp(-1 + 1e-7, 1 - 1e-7))


def ball_margin(dtype: torch.dtype) -> float:
    """The default `project` margin for `dtype` (see `BALL_EPS`)."""
    return BALL_EPS.get(dtype, BALL_EPS[torch.float32])


def project(x: torch.Tensor, *, c: float, eps: float | None = None) -> torch.Tensor:
    r"""Pull points back inside the ball: :math:`x \mapsto x \cdot \min(1, r_{\max}/\|x\|)` with
    :math:`r_{\max} = (1 - \epsilon)/\sqrt{c}`.

    Args:
        x: points, `(..., dim)`.
        c: curvature, > 0.
        eps: margin as a fraction of the radius; defaults to `ball_margin(x.dtype)` (4e-3 for float32).

    The clipped branch has no radial gradient (the norm is pinned); the tangential gradient survives.
    """
    eps = ball_margin(x.dtype) if eps is None else eps
    max_norm = (1.0 - eps) / check_curvature(c) ** 0.5
    norm = x.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return torch.where(norm > max_norm, x / norm * max_norm, x)


def expmap0_projected(u: torch.Tensor, *, c: float, eps: float | None = None) -> torch.Tensor:
    r"""`project(expmap0(u))` in one pass: both only rescale `u`, by
    :math:`\min(\tanh(\sqrt{c}\|u\|), 1 - \epsilon) / (\sqrt{c}\|u\|)`.

    This is how the quantizers enter the ball. Composing geoopt's `expmap0` with `project` costs four passes over
    the input and a host synchronisation (its `tan_k` branches on `torch.all`); this costs one norm and one product.
    """
    eps = ball_margin(u.dtype) if eps is None else eps
    sqrt_c_norm = check_curvature(c) ** 0.5 * u.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)  # (..., 1)
    # tanh is clamped at 15 as in geoopt; the margin caps it far earlier (tanh(3.1) = 0.996)
    return u * (torch.tanh(sqrt_c_norm.clamp_max(15)).clamp_max(1.0 - eps) / sqrt_c_norm)


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""All geodesic distances between `x` `(N, dim)` and `y` `(K, dim)`, `(N, K)`, in closed form:

    .. math::
        d_c(x, y) = \frac{1}{\sqrt{c}} \operatorname{arcosh}\!\left(1 + \frac{2c\|x - y\|^2}{(1 - c\|x\|^2)(1 - c\|y\|^2)}\right),

    equal to :func:`dist` but with one matmul instead of an N×K×dim Möbius sum.
    """
    c = check_curvature(c)
    x2 = x.pow(2).sum(-1, keepdim=True)  # (N, 1)
    y2 = y.pow(2).sum(-1)  # (K,)
    sq_dist = (x2 + y2 - 2 * x @ y.T).clamp_min(0)  # (N, K)
    den = ((1 - c * x2) * (1 - c * y2)).clamp_min(MIN_NORM)
    return torch.acosh(1 + 2 * c * sq_dist / den) / c**0.5


def first_order_only(backward):
    """For a hand-written `backward` that treats saved tensors as constants: its result has no correct gradient of
    its own, so a double backward (`create_graph=True`: a Hessian-vector product, a gradient penalty) raises here.
    (`torch.autograd.function.once_differentiable` raises only where the double backward reaches its error node,
    which `torch.autograd.grad(..., inputs)` may prune: then the second derivative is silently short of a term.)"""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"hf_hypervq: {backward.__qualname__.split('.')[0].lstrip('_')} has no double backward; "
                "differentiate the plain torch composition it stands for (see its docstring) instead"
            )
        return backward(ctx, *grads)

    return checked


class _ScaledAsinhMatmul(torch.autograd.Function):
    """`scale * asinh(x @ w.T)` with a hand-written backward (`kernels.mlr_logits_backward`), which needs only the
    logits."""

    @staticmethod
    def forward(ctx, x, w, scale):
        logits = mlr_logits_from_matmul(x @ w.T, scale)  # (N, K)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, w, scale, logits)
        return logits

    @staticmethod
    @first_order_only  # the backward uses the saved logits as constants
    def backward(ctx, grad_logits):
        x, w, scale, logits = ctx.saved_tensors
        grad_y, grad_scale = mlr_logits_backward(grad_logits, logits, scale)
        grad_x = grad_y @ w if ctx.needs_input_grad[0] else None
        grad_w = grad_y.T @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_scale


def mlr_logits(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""Closed-form logits of the unidirectional Poincaré MLR of HNN++ [2] (docs/method.md#closed-form).

    For a point :math:`x` of the ball, a normal :math:`a_k` (any norm) and a signed offset :math:`r_k`,

    .. math::
        v_k(x) = \frac{2\|a_k\|}{\sqrt{c}} \operatorname{asinh}\!\left(
            \frac{2\sqrt{c}\langle x, [a_k]\rangle \cosh(2\sqrt{c} r_k) - (1 + c\|x\|^2)\sinh(2\sqrt{c} r_k)}
                 {1 - c\|x\|^2}\right),

    which equals :math:`2\|a_k\|` times the signed geodesic distance from :math:`x` to the hyperplane through
    :math:`q_k = \exp_0^c(r_k [a_k])` with normal direction :math:`[a_k] = a_k/\|a_k\|`
    (docs/method.md#hyperplane-geometry).

    The per-row factors :math:`1/(1 - c\|x\|^2)`, :math:`(1 + c\|x\|^2)` and the per-code :math:`\cosh`,
    :math:`\sinh` are folded into one `(N, dim + 1) @ (dim + 1, K)` matmul, so the N×K work is that matmul
    plus the asinh (docs/performance.md#folded-mlr-matmul); never an N×K×dim tensor.

    Args:
        x: points of the ball, `(..., dim)`; not projected here, so use :func:`project` first (a point outside
            the ball has no meaningful logits).
        normals: `(K, dim)`, the :math:`a_k`.
        offsets: `(K,)`, the :math:`r_k`.
        c: curvature, > 0.

    Returns:
        `(..., K)` logits.
    """
    leading_shape = x.shape[:-1]
    logits = folded_mlr_logits(*fold_mlr(x.reshape(-1, x.shape[-1]), normals, offsets, c=c))  # (N, K)
    return logits.view(*leading_shape, -1)


def folded_mlr_logits(x_folded: torch.Tensor, w_folded: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The MLR logits `scale * asinh(x_folded @ w_folded.T)` `(N, K)` of :func:`fold_mlr`'s operands."""
    return _ScaledAsinhMatmul.apply(x_folded, w_folded, scale)


def fold_mlr(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, *, c: float):
    r"""The operands of :func:`mlr_logits`' one matmul: `(x_folded (N, dim + 1), w_folded (K, dim + 1), scale (K,))`
    with logits `scale * asinh(x_folded @ w_folded.T)`, for points `x` `(N, dim)` of the ball."""
    return (fold_ball_points(x, c=c), *fold_hyperplanes(normals, offsets, c=c))


def fold_ball_points(x: torch.Tensor, *, c: float) -> torch.Tensor:
    r"""The points' side of :func:`fold_mlr`: :math:`[\, 2\sqrt{c}\, x / (1 - c\|x\|^2),\;
    -(1 + c\|x\|^2) / (1 - c\|x\|^2) \,]`, `(N, dim + 1)`."""
    c = check_curvature(c)
    cx2 = c * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()  # (N, 1)
    inv_den = 1 / (1 - cx2).clamp_min(MIN_NORM)
    return torch.cat([x * ((2 * c**0.5) * inv_den), -(1 + cx2) * inv_den], dim=-1)


def fold_hyperplanes(normals: torch.Tensor, offsets: torch.Tensor, *, c: float):
    r"""The hyperplanes' side of :func:`fold_mlr`: `(w_folded (K, dim + 1), scale (K,))`, with
    :math:`w_k = [\, \cosh(2\sqrt{c} r_k)\, a_k / \|a_k\|,\; \sinh(2\sqrt{c} r_k) \,]` and
    :math:`\text{scale}_k = 2\|a_k\| / \sqrt{c}`."""
    sqrt_c = check_curvature(c) ** 0.5
    normal_norms = normals.norm(dim=-1).clamp_min(MIN_NORM)  # (K,)
    # |r_k| above 15/sqrt(c) puts a hyperplane 30/sqrt(c) from the origin, far beyond the points the margin lets
    # through (12.2/sqrt(c) in float64): clamping there keeps cosh, sinh and the asinh argument's square finite.
    two_sqrt_c_r = ((2 * sqrt_c) * offsets).clamp(-_MAX_TWO_SQRT_C_OFFSET, _MAX_TWO_SQRT_C_OFFSET)
    w_folded = torch.cat(
        [normals * (torch.cosh(two_sqrt_c_r) / normal_norms)[:, None], torch.sinh(two_sqrt_c_r)[:, None]], dim=-1
    )  # (K, dim + 1)
    return w_folded, (2 / sqrt_c) * normal_norms


def fold_latents(z: torch.Tensor, *, c: float, eps: float | None = None) -> torch.Tensor:
    r"""`fold_ball_points(expmap0_projected(z))` for latents `z` `(..., dim)`, `(..., dim + 1)`, in two passes over
    `z` each way.

    Both maps only rescale each row, by factors that depend on its norm alone: the result is
    :math:`[\, z\, \alpha(\|z\|),\; \beta(\|z\|) \,]`, so the backward is
    :math:`g_z = \alpha\, g_{:d} + z\, (\alpha' \langle g_{:d}, z\rangle + \beta' g_d) / \|z\|`, with the
    per-row factors and their derivatives computed in `z`'s dtype (a few numbers per row). Autograd through the
    composition costs about fifteen passes over the N×dim latents, a tenth of HyperVQ's CPU step at N = 8192.
    The backward is not differentiable again: a double backward (a Hessian-vector product, a gradient penalty)
    raises, where it would otherwise be silently wrong; differentiate the composition for those.
    """
    eps = ball_margin(z.dtype) if eps is None else eps
    return _FoldLatents.apply(z, check_curvature(c), eps)


def _fold_factors(norms: torch.Tensor, c: float, eps: float, derivatives: bool = True):
    """Per row of norm r: `(alpha, beta, d alpha/dr, d beta/dr)` of `fold_latents`, as `expmap0_projected` then
    `fold_ball_points` compute them (the same clamps; the derivative is 0 where a clamp holds). Without
    `derivatives`, `(alpha, beta)`.

    In the norms' dtype (float32 in the quantizers: MPS has no float64), written so that float32 keeps its digits
    near the boundary, where everything hangs on `1 - m` (m = sqrt(c) ||x||, at most 1 - eps): `1 - m` comes from
    `1 - tanh(s) = 2 / (exp(2s) + 1)` and the margin itself, never from subtracting a rounded m from 1; `1 - tanh^2`
    is `1 / cosh^2`; and the derivative of `tanh(s) / s` is its series where its two terms would cancel."""
    r, sqrt_c = norms, c**0.5
    s = sqrt_c * r.clamp_min(MIN_NORM)
    tanh = torch.tanh(s.clamp_max(15))
    t = tanh.clamp_max(1.0 - eps)
    ratio = t / s  # expmap0_projected's factor
    # sqrt(c) ||x|| on the ball is t itself, except for a norm below MIN_NORM (where every derivative is 0)
    m = torch.where(r > MIN_NORM, t, sqrt_c * r * ratio)
    one_minus_m = torch.where(r > MIN_NORM, (2 / (torch.exp(2 * s.clamp_max(15)) + 1)).clamp_min(eps), 1 - m)
    den = one_minus_m * (2 - one_minus_m)  # 1 - m^2
    inv_den = 1 / den.clamp_min(MIN_NORM)
    alpha = (2 * sqrt_c) * ratio * inv_den
    beta = 1 - 2 * inv_den  # -(1 + m^2) / (1 - m^2)
    if not derivatives:
        return alpha, beta
    unclamped = (s < 15) & (tanh < 1.0 - eps)
    dt_ds = torch.where(unclamped, torch.cosh(s.clamp_max(15)).square().reciprocal(), 0.0)
    ds_dr = (r > MIN_NORM).to(r.dtype) * sqrt_c  # not torch.where of two numbers: that has the default dtype
    # d(t/s)/ds = (dt/ds - t/s) / s; below s = 0.01 (never clamped) its series -2s/3 + 8s^3/15, exact in float32
    dratio_ds = torch.where(s < 0.01, s * (s.square() * (8 / 15) - 2 / 3), (dt_ds - ratio) / s)
    dratio_dr = dratio_ds * ds_dr
    dm_dr = dt_ds * ds_dr
    dinv_den_dr = torch.where(den > MIN_NORM, inv_den.square() * 2 * m * dm_dr, 0.0)
    dalpha_dr = (2 * sqrt_c) * (dratio_dr * inv_den + ratio * dinv_den_dr)
    dbeta_dr = -2 * dinv_den_dr
    return alpha, beta, dalpha_dr, dbeta_dr


class _FoldLatents(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, c, eps):
        norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        if not ctx.needs_input_grad[0]:  # tokenization
            alpha, beta = _fold_factors(norms, c, eps, derivatives=False)
        else:
            alpha, beta, dalpha_dr, dbeta_dr = _fold_factors(norms, c, eps)
            ctx.save_for_backward(z, norms, alpha, dalpha_dr, dbeta_dr)
        return torch.cat([z * alpha, beta], dim=-1)

    @staticmethod
    @first_order_only  # the backward uses the saved per-row factors as constants
    def backward(ctx, grad):
        z, norms, alpha, dalpha_dr, dbeta_dr = ctx.saved_tensors
        grad_points, grad_last = grad[..., :-1], grad[..., -1:]
        radial = torch.linalg.vecdot(grad_points, z).unsqueeze(-1) * dalpha_dr + grad_last * dbeta_dr
        radial = torch.where(norms > MIN_NORM, radial / norms.clamp_min(MIN_NORM), 0.0)
        return torch.addcmul(grad_points * alpha, z, radial), None, None
