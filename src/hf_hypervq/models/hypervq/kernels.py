"""The N×K elementwise work of the quantizers, in one place, eager or fused by `torch.compile`.

On CPU the quantizers' cost is not their matmul but the passes over the N×K score matrix around it (asinh, Gumbel
noise, softmax and their backwards; docs/performance.md#passes-over-the-score-matrix). Each kernel below is written
once, with in-place ops so that eager mode allocates little. `set_compiled_kernels(True)` (or
`HF_HYPERVQ_COMPILE=1`) runs the `@_kernel` ones through `torch.compile(dynamic=True)`, which fuses each into one loop
(the first call of each then compiles for a few seconds; a kernel that fails to compile falls back to eager, with one
warning). The others stay eager because inductor made them slower on CPU: its random numbers cost more than
`uniform_`, and its column sums than eager's.
"""

import functools
import os
import warnings

import torch


_compiled_kernels = os.environ.get("HF_HYPERVQ_COMPILE", "0") == "1"
_COMPILE_FAILED = object()


def set_compiled_kernels(enabled: bool) -> None:
    """Fuse the quantizers' elementwise kernels with `torch.compile` (off by default; results agree with eager to
    float32 rounding)."""
    global _compiled_kernels
    _compiled_kernels = bool(enabled)


def compiled_kernels_enabled() -> bool:
    return _compiled_kernels


def _kernel(fn):
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not _compiled_kernels or compiled is _COMPILE_FAILED:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as error:  # a missing C++ compiler, an unsupported device, ...
            warnings.warn(f"torch.compile failed for {fn.__name__}, using eager mode: {error}", stacklevel=2)
            compiled = _COMPILE_FAILED
            return fn(*args)

    return run


@_kernel
def scaled_asinh(y: torch.Tensor, scale: torch.Tensor):
    """`scale * asinh(y)` as `sign(y) * log(|y| + sqrt(1 + y^2))` (eager `torch.asinh` on CPU is a scalar loop,
    12× a matmul); returns `(logits, asinh(y), sqrt(1 + y^2))`, the last two for the backward. `|y|` must stay
    below 1e19 so that `y^2` is finite in float32 (`hyperbolic.mlr_logits` guarantees it)."""
    root = torch.addcmul(torch.ones((), dtype=y.dtype, device=y.device), y, y).sqrt_()
    asinh = y.abs().add_(root).log_().copysign_(y)
    return asinh * scale, asinh, root


@_kernel
def scaled_asinh_inference(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scaled_asinh`'s logits alone, with fewer allocations."""
    root = torch.addcmul(torch.ones((), dtype=y.dtype, device=y.device), y, y).sqrt_()
    return root.add_(y.abs()).log_().copysign_(y).mul_(scale)


def scaled_asinh_backward(grad_logits, asinh, root, scale):
    """Gradients of `scale * asinh(y)`: `(d/d scale, d/d y)`; d asinh(y)/dy = 1/sqrt(1 + y^2)."""
    return (grad_logits * asinh).sum(0), (grad_logits * scale).div_(root)


def gumbel_sample(logits: torch.Tensor, uniform: torch.Tensor, inv_temperature: float):
    """A hard Gumbel-softmax draw per row: `(indices, softmax((logits + g) / tau))` with `g = -log(-log u)`.
    `u = 0` gives `g = -inf`, a code that is never drawn (never a NaN). Consumes `uniform`."""
    perturbed = uniform.log_().neg_().log_().neg_().add_(logits)  # logits + g
    indices = perturbed.argmax(dim=-1)  # a sample of Categorical(softmax(logits))
    return indices, torch.softmax(perturbed.mul_(inv_temperature), dim=-1)


@_kernel
def softmax_backward(grad_soft: torch.Tensor, soft: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """The gradient reaching the logits of `softmax(logits * inv_temperature)`. Consumes `grad_soft`."""
    row_dot = (soft * grad_soft).sum(dim=-1, keepdim=True)
    return grad_soft.sub_(row_dot).mul_(soft).mul_(inv_temperature)
