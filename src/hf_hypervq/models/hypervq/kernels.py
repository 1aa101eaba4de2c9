"""The N×K elementwise work of the quantizers, written once in torch and fused: natively on CPU, by `torch.compile`
elsewhere.

The quantizers' cost beyond their matmuls is the passes over the N×K score matrix (asinh, Gumbel noise, softmax and
their backwards; docs/performance.md#passes-over-the-score-matrix). Each function below with `@fused_kernel` is
that work as torch code, and runs

- on CPU tensors, where a native twin is given (HyperVQ's training forward and backward and its tokenization), as
  that twin: C loops built once per machine with the system's compiler (`cpu_kernels.py`);
- otherwise, by default (`set_compiled_kernels(None)`, `HF_HYPERVQ_COMPILE` unset), compiled with
  `torch.compile(dynamic=True)` the first time it gets at least `COMPILE_MIN_ELEMENTS` elements; smaller inputs run
  eagerly, where compiling would cost seconds to save microseconds. Compiling happens once per kernel and process
  (dynamic shapes; the temperature and the noise seed are tensors) and is announced once;
- `set_compiled_kernels(True)` / `HF_HYPERVQ_COMPILE=1` compiles whatever the size; `False` / `0` runs the torch
  code eagerly everywhere (the reference the tests hold the others to);
- `set_native_cpu_kernels(False)` / `HF_HYPERVQ_NATIVE=0` makes CPU tensors take the torch code too, compiled or
  eager by the rules above: the path CUDA and MPS take, which the tests run on a CPU.

A copy of this module imported as a model's remote code (`REMOTE_CODE`: not under the `hf_hypervq` package) starts
no compiler unless asked (`HF_HYPERVQ_NATIVE=1`, `HF_HYPERVQ_COMPILE=1`): by default it runs the torch code eagerly.

If the native CPU kernels cannot be built (no C compiler), one warning says so and they run eagerly from then on;
if `torch.compile` fails (no C++ compiler, an unsupported device), one warning says so and every compiled kernel
runs eagerly from then on. The two are kept apart: a CPU without a C compiler does not turn off compiling on a GPU.
Inside a model compiled as a whole (`--torch_compile`), the torch code is traced into the model's graph.

The Gumbel noise comes from a counter-based generator: a hash of (seed, position) gives each element its uniform
number, so the noise is computed inside the fused loop, on every thread, with no random-number state (torch's
`uniform_` on CPU costs more than the whole fused kernel). The uniform numbers are the same bits on every path; the
noise made from them agrees to float32 rounding (the native log is a polynomial). The forward keeps the soft
sample's exponentials, so the backward computes no transcendental function but the asinh's derivative.
"""

import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import cpu_kernels
from .cpu_kernels import (
    cpu_mlr_gumbel_backward,
    cpu_mlr_gumbel_forward,
    cpu_mlr_logits_and_argmax,
    load_cpu_kernels,
)


logger = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 20
# A copy of this module saved next to a model's weights and imported by transformers (`trust_remote_code`) starts
# no compiler unless its user asks (HF_HYPERVQ_NATIVE=1, HF_HYPERVQ_COMPILE=1): no C library built into their cache
# and no inductor run on the first forward of a model they only meant to load.
REMOTE_CODE = __name__.split(".")[0] != "hf_hypervq"


def _switch(variable: str, choices: dict):
    value = os.environ.get(variable, "").strip().lower()
    if value not in choices:
        warnings.warn(f"{variable} must be 1, 0 or auto, got {value!r}: using auto", stacklevel=2)
    return choices.get(value)


_compile_mode = _switch("HF_HYPERVQ_COMPILE", {"": None, "auto": None, "1": True, "0": False})
_native_enabled = _switch("HF_HYPERVQ_NATIVE", {"": None, "auto": None, "1": True, "0": False})
if _native_enabled is None:  # auto: the package's default, off in a remote-code copy (see `set_native_cpu_kernels`)
    _native_enabled = not REMOTE_CODE
_compiled = {}  # kernel name -> its compiled function
_compile_error = None  # the first torch.compile error, after which every kernel runs eagerly off the native path
_native_warned = False  # the native kernels failed to build and a warning said so (`cpu_kernels` keeps the error)
_announced = False


def set_compiled_kernels(enabled: bool | None) -> None:
    """Fuse the quantizers' kernels: `None` (the default) natively on CPU and with `torch.compile` for inputs of at
    least `COMPILE_MIN_ELEMENTS` elements elsewhere, `True` always, `False` never (the torch code, eagerly). Results
    agree with eager to float32 rounding, and the uniform numbers behind the Gumbel noise are the same bits."""
    global _compile_mode
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"`enabled` must be True, False or None, got {enabled!r}")
    _compile_mode = enabled


def compiled_kernels_enabled() -> bool | None:
    return _compile_mode


def set_native_cpu_kernels(enabled: bool) -> None:
    """Run the native C kernels on CPU tensors (`True`, the default, except in a remote-code copy), or the torch
    code that CUDA and MPS run (`False`; compiled or not as `set_compiled_kernels` says), so that path can be tested
    and timed on a CPU."""
    global _native_enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"`enabled` must be True or False, got {enabled!r}")
    _native_enabled = enabled


def native_cpu_kernels_enabled() -> bool:
    return _native_enabled


def cpu_kernel_path() -> str:
    """Which code the quantizers' kernels run on CPU tensors in this process, as a line a study run is keyed by
    (float32 rounding differs between them): the native library with its compiler, flags and target, or the torch
    code, eager or compiled, and why. Builds the native kernels if they are wanted and not built yet."""
    if _compile_mode is False:
        return "torch, eager (set_compiled_kernels(False))"
    torch_code = f"torch, {'compiled' if _compile_mode else 'compiled for large inputs, else eager'}"
    if not _native_enabled:
        return f"{torch_code} (native kernels off)"
    try:
        load_cpu_kernels()
    except (OSError, RuntimeError) as error:
        return f"{torch_code} (native kernels unavailable: {type(error).__name__}: {error})"
    return f"native: {cpu_kernels.loaded_build}"


def _wants_compiled(tensor: torch.Tensor) -> bool:
    if _compile_mode is None:
        return not REMOTE_CODE and tensor.numel() >= COMPILE_MIN_ELEMENTS
    return _compile_mode


def _announce_compile(name: str, seconds: float) -> None:
    global _announced
    if not _announced:
        _announced = True
        logger.warning(
            f"hf_hypervq: the quantizer's kernels are compiled with torch.compile once per process (the first, "
            f"{name}, took {seconds:.1f} s; later runs reuse the on-disk cache; HF_HYPERVQ_COMPILE=0 turns it off)"
        )


def _fall_back_to_eager(error: Exception) -> None:
    global _compile_error
    _compile_error = error  # the other kernels would fail alike: every compiled kernel runs eagerly from now on
    warnings.warn(
        f"hf_hypervq: compiling the quantizer's kernels failed ({type(error).__name__}: {error}); they run eagerly, "
        "unfused (HF_HYPERVQ_COMPILE=0 skips the attempt)",
        stacklevel=3,
    )


def _warn_native_unavailable(error: Exception) -> None:
    global _native_warned
    if not _native_warned:
        _native_warned = True
        warnings.warn(
            f"hf_hypervq: could not build the quantizer's native CPU kernels ({type(error).__name__}: {error}); on "
            "CPUs they run as eager torch code (set CC to a working C compiler)",
            stacklevel=4,
        )


def fused_kernel(fn=None, *, cpu=None, schema=None):
    """Run `fn` compiled (forward and, under autograd, backward) by the rule above, else eagerly.

    `cpu`, where given, is `fn` as a native loop (`cpu_kernels.py`) that replaces `fn` on CPU tensors, registered as
    the torch operator `hf_hypervq::<name>_<hash of the code>` with `schema`, so that a compiled model calls it too
    (as one opaque op; its output shapes come from running `fn` on fake tensors)."""
    if fn is None:
        return functools.partial(fused_kernel, cpu=cpu, schema=schema)
    native_op = None if cpu is None else _native_operator(fn, cpu, schema)

    @functools.wraps(fn)
    def run(*args):
        if _compile_mode is False:
            return fn(*args)
        if native_op is not None and _native_enabled and args[0].device.type == "cpu":
            return native_op(*args)
        if _compile_error is not None or torch.compiler.is_compiling() or not _wants_compiled(args[0]):
            return fn(*args)
        first_call = fn.__name__ not in _compiled
        if first_call:
            _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
        started = time.perf_counter()
        try:
            result = _compiled[fn.__name__](*args)
        except Exception as error:  # a missing C++ compiler, an unsupported device, ...
            _fall_back_to_eager(error)
            return fn(*args)
        if first_call:
            _announce_compile(fn.__name__, time.perf_counter() - started)
        return result

    run.native_operator = native_op  # the torch operator `hf_hypervq::<name>_<hash>`, or None
    return run


def _native_operator(fn, cpu, schema: str):
    def native_or_eager(*args):
        try:
            load_cpu_kernels()  # raises again at once after a failed build
        except (OSError, RuntimeError) as error:  # no C compiler
            _warn_native_unavailable(error)
            return fn(*args)
        return cpu(*args)

    operator = torch.library.custom_op(
        f"hf_hypervq::{_operator_name(fn)}", native_or_eager, mutates_args=(), device_types="cpu", schema=schema
    )
    operator.register_fake(fn)
    return operator


def _operator_name(fn) -> str:
    """`<name>_<hash of this module's and cpu_kernels.py's full text>`: torch keeps one operator per name for the
    whole process, so two copies of this code in one process (the package and a model's remote code, say) must
    not share a name unless their code is the same, or one would run the other's kernels. The whole text, not the
    two functions: a copy that changes only a helper must not take over the package's operator."""
    try:
        code = b"".join(Path(module.__file__).read_bytes() for module in (sys.modules[__name__], cpu_kernels))
    except (OSError, TypeError):  # no source file (a frozen application): the module's name and the C source
        code = f"{__name__}\0{cpu_kernels.SOURCE}".encode()
    return f"{fn.__name__}_{hashlib.sha256(code).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------------------------
# Counter-based uniform numbers


def _hash32(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of `x` (int32, wrapping arithmetic; the masks make the right shifts logical), in
    three xorshift-multiply rounds with the shifts and multipliers of Wellons' `triple32`. The seed enters after the
    first round, so two seeds give unrelated streams (with `x + seed` they would be shifted copies of each other).
    Updates `x` in place."""
    x ^= (x >> 17) & 0x7FFF
    x *= -0x12A52B45  # 0xED5AD4BB as int32
    x ^= seed
    x ^= (x >> 11) & 0x1FFFFF
    x *= -0x53B3E4AF  # 0xAC4C1B51
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x31848BAB
    x ^= (x >> 14) & 0x3FFFF
    return x


def counter_uniform(seed: torch.Tensor, num_rows: int, num_columns: int, device) -> torch.Tensor:
    """`(num_rows, num_columns)` float32 uniform numbers in (0, 1), a function of `seed` (an int32 tensor) and the
    position alone: element (i, j) hashes the counter `i * num_columns + j`. The counter is 32 bits: calls with
    more than 2^32 elements repeat it."""
    rows = torch.arange(num_rows, dtype=torch.int32, device=device)[:, None]
    columns = torch.arange(num_columns, dtype=torch.int32, device=device)[None, :]
    return uniform_from_bits(_hash32(rows * num_columns + columns, seed))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """The top 23 of 32 random bits (int32) as a float32 at the centre of one of 2^23 equal bins of (0, 1):
    from 2^-24 to 1 - 2^-24, never 0 or 1, so the Gumbel noise is finite. (With 24 bits the top bin's centre,
    1 - 2^-25, rounds to 1.0 in float32, and its noise would be +inf.)"""
    return ((bits >> 9) & 0x7FFFFF).float().add_(0.5).mul_(2.0**-23)


def draw_seed(device) -> torch.Tensor:
    """One int32 seed for `counter_uniform`, from torch's generator of `device` (so `torch.manual_seed` makes a run
    repeat itself, and a checkpoint's RNG state resumes it), without a host synchronisation."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int32, device=device)


def gumbel_noise(seed: torch.Tensor, num_rows: int, num_columns: int, device) -> torch.Tensor:
    """Standard Gumbel noise `g = -log(-log u)` from `counter_uniform`; the noise every Gumbel quantizer adds."""
    return counter_uniform(seed, num_rows, num_columns, device).log_().neg_().log_().neg_()


# ---------------------------------------------------------------------------------------------------------------
# The pieces of the kernels (plain functions: each kernel below composes them, and is compiled as one loop).
# In-place ops only ever touch tensors made here, so that eager mode allocates few N×K temporaries.


def _scaled_asinh(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale * asinh(y)` as `sign(y) * log(|y| + sqrt(1 + y^2))` (eager `torch.asinh` on CPU is a scalar loop,
    12× a matmul; this is also the accurate form, docs/method.md#accurate-asinh). `|y|` must stay below 1e19 so
    that `y^2` is finite in float32 (`hyperbolic.mlr_logits` guarantees it)."""
    return _asinh(y).mul_(scale)


def _asinh(y: torch.Tensor) -> torch.Tensor:
    return (
        torch.addcmul(torch.ones((), dtype=y.dtype, device=y.device), y, y).sqrt_().add_(y.abs()).log_().copysign_(y)
    )


def _scaled_asinh_backward(grad_logits, logits, scale):
    """`(d/d y, d/d scale)` of `logits = scale * asinh(y)`, from the logits alone (so the forward keeps no other
    N×K tensor): with `a = asinh(y) = logits / scale`, d asinh(y)/dy = 1/sqrt(1 + y^2) = 1/cosh(a) = 2u / (1 + u^2)
    with `u = exp(-|a|)` (never overflows); the scale is 2 |a_k| / sqrt(c), never 0 (the norm is clamped)."""
    asinh = logits / scale
    grad_scale = (grad_logits * asinh).sum(0)
    u = asinh.abs_().neg_().exp_()
    return (grad_logits * scale).mul_(u).div_(u.square().add_(1)).mul_(2), grad_scale


def _gumbel_sample(logits, seed, inv_temperature):
    """A hard Gumbel-softmax draw per row: `(indices, weights, inverse_total)`. `indices` is the argmax of
    `logits + g` (a sample of Categorical(softmax(logits))); the soft sample `softmax((logits + g) / tau)` is
    `weights * inverse_total`, kept in that form because the forward computes the exponentials anyway and the
    backward then needs none. The argmax and the softmax share one row maximum."""
    perturbed = gumbel_noise(seed, logits.shape[0], logits.shape[1], logits.device).add_(logits)
    row_max = perturbed.amax(dim=-1, keepdim=True)
    indices = _argmax(perturbed, row_max)
    weights = perturbed.sub_(row_max).mul_(inv_temperature).exp_()
    return indices, weights, weights.sum(dim=-1, keepdim=True).reciprocal_()


def _argmax(scores: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` (the first maximum of each row) from the row maxima, as a max of indices: plain
    maxima vectorise on CPU, where argmax's (index, value) reduction costs 5× as much, eager or compiled. A row
    without its maximum (a NaN) gets the last index rather than one out of range."""
    last = scores.shape[-1] - 1
    reversed_index = torch.arange(last, -1, -1, dtype=torch.int32, device=scores.device)
    return (last - torch.where(scores == row_max, reversed_index, 0).amax(dim=-1)).long()


def _soft_sample_backward(grad_soft, weights, inverse_total, inv_temperature):
    """The gradient reaching the logits from the soft sample `weights * inverse_total` (`_gumbel_sample`)."""
    soft = weights * inverse_total
    row_dot = (soft * grad_soft).sum(dim=-1, keepdim=True)
    return (grad_soft - row_dot).mul_(soft).mul_(inv_temperature)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@fused_kernel
def mlr_logits_from_matmul(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The MLR logits `scale * asinh(y)` of the folded matmul's output `y` (`hyperbolic.mlr_logits`)."""
    return _scaled_asinh(y, scale)


@fused_kernel
def argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` of `(N, K)` scores, faster on CPU (`_argmax`)."""
    return _argmax(scores, scores.amax(dim=-1, keepdim=True))


@fused_kernel
def mlr_logits_backward(grad_logits, logits, scale):
    """`(d/d y, d/d scale)` of the MLR logits `scale * asinh(y)` (`_scaled_asinh_backward`)."""
    return _scaled_asinh_backward(grad_logits, logits, scale)


@fused_kernel(cpu=cpu_mlr_logits_and_argmax, schema="(Tensor y, Tensor scale) -> (Tensor, Tensor)")
def mlr_logits_and_argmax(y: torch.Tensor, scale: torch.Tensor):
    """HyperVQ's tokenization after its matmul: the MLR logits and their argmax, in one pass."""
    logits = _scaled_asinh(y, scale)
    return logits, _argmax(logits, logits.amax(dim=-1, keepdim=True))


@fused_kernel
def gumbel_forward(logits, seed, inv_temperature):
    """A hard Gumbel-softmax draw per row of `logits`: `(indices, weights, inverse_total)` (`_gumbel_sample`)."""
    return _gumbel_sample(logits, seed, inv_temperature)


@fused_kernel
def gumbel_backward(grad_soft, weights, inverse_total, inv_temperature):
    """The straight-through gradient reaching the logits, from `grad_soft = grad_quantized @ codebook.T`."""
    return _soft_sample_backward(grad_soft, weights, inverse_total, inv_temperature)


@fused_kernel(
    cpu=cpu_mlr_gumbel_forward,
    schema="(Tensor y, Tensor scale, Tensor seed, Tensor inv_temperature) -> (Tensor, Tensor, Tensor, Tensor)",
)
def mlr_gumbel_forward(y, scale, seed, inv_temperature):
    """HyperVQ's training forward after its matmul, in one pass over the N×K scores: the MLR logits
    `scale * asinh(y)` and a hard Gumbel-softmax draw from them, `(logits, indices, weights, inverse_total)`."""
    logits = _scaled_asinh(y, scale)
    return logits, *_gumbel_sample(logits, seed, inv_temperature)


@fused_kernel(
    cpu=cpu_mlr_gumbel_backward,
    schema="(Tensor grad_soft, Tensor? grad_logits, Tensor logits, Tensor weights, Tensor inverse_total, Tensor scale, "
    "Tensor inv_temperature, Tensor w_last, Tensor x_last) -> (Tensor, Tensor, Tensor, Tensor)",
)
def mlr_gumbel_backward(grad_soft, grad_logits, logits, weights, inverse_total, scale, inv_temperature, w_last,
                        x_last):  # fmt: skip
    """HyperVQ's training backward before its matmuls, from the straight-through gradient `grad_soft` and, where
    the caller used the logits too, their own gradient `grad_logits` (or None): `(d/d y, d/d x_last, d/d w_last,
    d/d scale)` for `y = x_folded @ w_folded.T`, `x_last = x_folded[:, -1]`, `w_last = w_folded[:, -1]`. With the
    gradients of the last columns computed here, the caller's two matmuls take the first dim columns alone: on CPU
    a matmul over 64 columns costs up to a third less than over 65."""
    grad = _soft_sample_backward(grad_soft, weights, inverse_total, inv_temperature)
    if grad_logits is not None:
        grad += grad_logits
    grad_y, grad_scale = _scaled_asinh_backward(grad, logits, scale)
    return grad_y, grad_y @ w_last[:, None], x_last @ grad_y, grad_scale
