"""HyperVQ's N×K kernels as C loops for the CPU, built once per machine with the system's C compiler.

On a CPU, HyperVQ's step costs as much in the elementwise work on the N×K scores as in its matmuls: per score an
asinh, the counter-based Gumbel noise (a hash and two logs), an exp, and their backward. `torch.compile` fuses that
work (`kernels.py`), but with SLEEF's log and exp, and it sums the gradient of the per-code scale down the columns,
a strided loop. The loops below take one row at a time, in L1 cache, with Cephes' float32 polynomials for log and
exp (the bits taken apart with integer ops, so that the loops vectorise; about 2e-7 relative error), and add each
row into per-thread column sums. At N = 32768, K = 512 that takes the forward from 88 to 40 ms and the backward from
47 to 17 ms on 2 cores (docs/performance.md#native-cpu-kernels).

The source is a string in this module, so that it travels with a model saved with its remote code. It is compiled
into `$HF_HYPERVQ_CACHE` (default `~/.cache/hf_hypervq`) as a shared library named by a hash of the source, the
compiler, the flags and the CPU (`-march=native`: the library is built where it runs), and loaded with `ctypes`.
`load_cpu_kernels()` raises if no compiler works; `kernels.py` then runs every kernel eagerly, with one warning.
The functions here take and return tensors as their torch twins in `kernels.py` do, and the tests hold them to the
twins. Rows are split between `torch.get_num_threads()` OpenMP threads (fewer for a small input, see `_threads`).
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* a compiler without OpenMP: one thread */
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

static inline float as_float(uint32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t i; memcpy(&i, &f, 4); return i; }

/* log(x) for a finite normal x > 0 (Cephes logf): x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), found with
   integer ops on the bits so that the loop vectorises; log(1 + f) is a degree-9 polynomial, ln 2 is split in two. */
static inline float log_positive(float x) {
    int32_t bits = (int32_t)(as_bits(x) - 0x3F3504F3u);
    float e = (float)(bits >> 23);
    float f = as_float(((uint32_t)bits & 0x7FFFFFu) + 0x3F3504F3u) - 1.0f;
    float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    return f + (p * f * z - 2.12194440e-4f * e - 0.5f * z) + 0.693359375f * e;
}

/* exp(x) for x <= 0 (Cephes expf), with x floored at -87: below that the true value is under 2^-125 and only ever
   a softmax weight next to a row maximum of 1, or the sech of an argument far out on the asinh's flat tail. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * r * r + r + 1.0f) * as_float((uint32_t)((int32_t)n + 127) << 23);
}

/* asinh(y) = sign(y) log(|y| + sqrt(1 + y^2)), the accurate form (no cancellation for y < 0). */
static inline float asinh_f(float y) { return copysignf(log_positive(fabsf(y) + sqrtf(y * y + 1.0f)), y); }

/* kernels.py's counter-based uniform numbers, bit for bit: triple32's rounds, the seed mixed in after the first,
   the top 23 bits at the centre of their bin. */
static inline float counter_uniform(uint32_t x, uint32_t seed) {
    x ^= x >> 17; x *= 0xED5AD4BBu; x ^= seed;
    x ^= x >> 11; x *= 0xAC4C1B51u;
    x ^= x >> 15; x *= 0x31848BABu;
    x ^= x >> 14;
    return ((float)(int32_t)(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

/* The first index of `row_max` in `scores` (K - 1 if it is not there, as with a NaN): a min of indices, which
   vectorises where an argmax loop does not. */
static inline int64_t first_index_of(const float *restrict scores, float row_max, int64_t K) {
    int32_t best = (int32_t)K;
    for (int64_t k = 0; k < K; k++) {
        int32_t candidate = scores[k] == row_max ? (int32_t)k : (int32_t)K;
        best = candidate < best ? candidate : best;
    }
    return best < K ? best : K - 1;
}

typedef struct {
    int64_t K;
    const float *y, *scale, *grad_soft, *grad_logits, *logits, *weights, *inverse_total, *w_last, *x_last;
    uint32_t seed;
    float inverse_temperature;
    float *out_logits, *out_weights, *out_inverse_total, *grad_y, *grad_x_last;
    int64_t *indices;
} Args;

typedef void (*RowsFn)(const Args *args, int64_t first_row, int64_t end_row, float *scratch, float *column_sums);

/* Training forward, per row: the logits scale * asinh(y), the perturbed logits (kept in `scratch`, in L1) and
   their maximum; then the argmax and the exponentials of the soft sample. */
static void mlr_gumbel_forward_rows(const Args *a, int64_t first_row, int64_t end_row, float *scratch, float *unused) {
    const int64_t K = a->K;
    const float *restrict scale = a->scale;
    float *restrict perturbed = scratch;
    for (int64_t n = first_row; n < end_row; n++) {
        const float *restrict y = a->y + n * K;
        float *restrict logits = a->out_logits + n * K;
        float *restrict weights = a->out_weights + n * K;
        const uint32_t counter = (uint32_t)(n * K);  /* wraps as kernels.py's int32 counter does */
        float row_max = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float logit = scale[k] * asinh_f(y[k]);
            float u = counter_uniform(counter + (uint32_t)k, a->seed);
            float p = logit - log_positive(-log_positive(u));
            logits[k] = logit;
            perturbed[k] = p;
            row_max = p > row_max ? p : row_max;
        }
        float total = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float w = exp_nonpositive((perturbed[k] - row_max) * a->inverse_temperature);
            weights[k] = w;
            total += w;
        }
        a->indices[n] = first_index_of(perturbed, row_max, K);
        a->out_inverse_total[n] = 1.0f / total;
    }
}

/* Training backward of one row: the softmax's backward (a row dot product, then one pass), the asinh's, and the
   gradient of the folded latent's last column (returned); adds the row's terms of the gradients of the scale and
   of the folded normals' last column to `grad_scale` and `grad_w_last`. (Restrict-qualified parameters, so that
   the loop vectorises without a runtime alias check.) */
static inline float mlr_gumbel_backward_row(
    int64_t K, const float *restrict grad_soft, const float *restrict grad_logits, const float *restrict logits,
    const float *restrict weights, float inverse_total, const float *restrict scale,
    const float *restrict inverse_scale, float inverse_temperature, const float *restrict w_last, float x_last,
    float *restrict grad_y, float *restrict grad_scale, float *restrict grad_w_last) {
    float row_dot = 0.0f;
    for (int64_t k = 0; k < K; k++) row_dot += weights[k] * grad_soft[k];
    row_dot *= inverse_total;
    const float soft_factor = inverse_total * inverse_temperature;
    float grad_last = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float g = (grad_soft[k] - row_dot) * weights[k] * soft_factor + (grad_logits ? grad_logits[k] : 0.0f);
        float asinh = logits[k] * inverse_scale[k];
        float u = exp_nonpositive(-fabsf(asinh));  /* 1/cosh(asinh) = 2u / (1 + u^2) */
        float gy = g * scale[k] * (2.0f * u / (1.0f + u * u));
        grad_y[k] = gy;
        grad_last += gy * w_last[k];
        grad_scale[k] += g * asinh;
        grad_w_last[k] += gy * x_last;
    }
    return grad_last;
}

static void mlr_gumbel_backward_rows(const Args *a, int64_t first_row, int64_t end_row, float *scratch,
                                     float *column_sums) {
    const int64_t K = a->K;
    for (int64_t k = 0; k < K; k++) scratch[k] = 1.0f / a->scale[k];
    /* Two calls, so that the one without logits' gradient is compiled for a null `grad_logits`: a loop that tests
       the pointer becomes a masked load, which at address 0 costs a microcode assist per vector on some CPUs. */
    for (int64_t n = first_row; n < end_row; n++)
        a->grad_x_last[n] = a->grad_logits
            ? mlr_gumbel_backward_row(K, a->grad_soft + n * K, a->grad_logits + n * K, a->logits + n * K,
                                      a->weights + n * K, a->inverse_total[n], a->scale, scratch,
                                      a->inverse_temperature, a->w_last, a->x_last[n], a->grad_y + n * K,
                                      column_sums, column_sums + K)
            : mlr_gumbel_backward_row(K, a->grad_soft + n * K, 0, a->logits + n * K, a->weights + n * K,
                                      a->inverse_total[n], a->scale, scratch, a->inverse_temperature, a->w_last,
                                      a->x_last[n], a->grad_y + n * K, column_sums, column_sums + K);
}

/* Tokenization: the logits and their argmax. */
static void mlr_logits_argmax_rows(const Args *a, int64_t first_row, int64_t end_row, float *scratch, float *unused) {
    const int64_t K = a->K;
    const float *restrict scale = a->scale;
    for (int64_t n = first_row; n < end_row; n++) {
        const float *restrict y = a->y + n * K;
        float *restrict logits = a->out_logits + n * K;
        float row_max = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float logit = scale[k] * asinh_f(y[k]);
            logits[k] = logit;
            row_max = logit > row_max ? logit : row_max;
        }
        a->indices[n] = first_index_of(logits, row_max, K);
    }
}

/* Split N rows between `threads` threads, each with K floats of scratch and `sums` * K floats of column sums,
   added into `column_sums` at the end. The threads are OpenMP's, and at run time that is torch's own libgomp
   (the loader binds libgomp.so.1 to the copy torch has loaded), so the kernels share torch's thread pool: threads
   of another pool would compete for the cores with torch's, which spin for a while after each parallel region.
   Returns 0, or -1 if memory ran out. */
static int run_rows(RowsFn fn, const Args *args, int64_t N, int threads, int sums, float *column_sums) {
    const int64_t K = args->K, per_thread = (1 + sums) * K;
    if (threads < 1) threads = 1;
    float *buffers = (float *)calloc((size_t)threads * per_thread, sizeof(float));
    if (!buffers) return -1;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        float *scratch = buffers + per_thread * t;
        fn(args, N * t / count, N * (t + 1) / count, scratch, scratch + K);
    }
    for (int t = 0; t < threads; t++)
        for (int64_t k = 0; k < sums * K; k++) column_sums[k] += buffers[per_thread * t + K + k];
    free(buffers);
    return 0;
}

int hvq_mlr_gumbel_forward(const float *y, const float *scale, int32_t seed, float inverse_temperature, int64_t N,
                           int64_t K, float *logits, int64_t *indices, float *weights, float *inverse_total,
                           int threads) {
    Args a = {0};
    a.K = K; a.y = y; a.scale = scale; a.seed = (uint32_t)seed; a.inverse_temperature = inverse_temperature;
    a.out_logits = logits; a.indices = indices; a.out_weights = weights; a.out_inverse_total = inverse_total;
    return run_rows(mlr_gumbel_forward_rows, &a, N, threads, 0, 0);
}

/* `grad_scale_and_w_last`: 2K zeros, filled with the gradients of the scale and of w_folded's last column. */
int hvq_mlr_gumbel_backward(const float *grad_soft, const float *grad_logits, const float *logits,
                            const float *weights, const float *inverse_total, const float *scale,
                            float inverse_temperature, const float *w_last, const float *x_last, int64_t N,
                            int64_t K, float *grad_y, float *grad_x_last, float *grad_scale_and_w_last,
                            int threads) {
    Args a = {0};
    a.K = K; a.grad_soft = grad_soft; a.grad_logits = grad_logits; a.logits = logits; a.weights = weights;
    a.inverse_total = inverse_total; a.scale = scale; a.inverse_temperature = inverse_temperature;
    a.w_last = w_last; a.x_last = x_last; a.grad_y = grad_y; a.grad_x_last = grad_x_last;
    return run_rows(mlr_gumbel_backward_rows, &a, N, threads, 2, grad_scale_and_w_last);
}

int hvq_mlr_logits_argmax(const float *y, const float *scale, int64_t N, int64_t K, float *logits,
                          int64_t *indices, int threads) {
    Args a = {0};
    a.K = K; a.y = y; a.scale = scale; a.out_logits = logits; a.indices = indices;
    return run_rows(mlr_logits_argmax_rows, &a, N, threads, 0, 0);
}
"""

# -O3 vectorises the row loops; the relaxations let it vectorise their max and sum reductions and contract the
# polynomials into FMAs. Not -ffast-math: with -shared, older GCCs link code that sets flush-to-zero for the whole
# process.
FLAGS = [
    "-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
    "-ffinite-math-only", "-fno-signed-zeros", "-fassociative-math",
]  # fmt: skip
_library = None
_MIN_ELEMENTS_PER_THREAD = 1 << 15  # below this a thread costs more to start than it saves


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate.split()[0]
    raise RuntimeError("no C compiler found (set CC)")


def _cpu_fingerprint() -> str:
    """What `-march=native` depends on: a library built for one CPU may not run on another (a shared home)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "".join(sorted({line for line in cpuinfo if line.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("HF_HYPERVQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_hypervq"
    )
    return Path(root)


def _build(path: Path, compiler: str, flags: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # compile aside, then rename: processes may race
        source, library = Path(scratch, "kernels.c"), Path(scratch, path.name)
        source.write_text(SOURCE)
        result = subprocess.run([compiler, *flags, str(source), "-o", str(library), "-lm"], capture_output=True,
                                text=True)  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(library, path)


def load_cpu_kernels() -> ctypes.CDLL:
    """The compiled kernels (built on first use, then loaded from the cache); raises if they cannot be built."""
    global _library
    if _library is not None:
        return _library
    compiler = _compiler()
    suffix = ".dll" if sys.platform == "win32" else ".so"
    errors = []
    # OpenMP and -march=native where the compiler has them (Apple's clang has no OpenMP: one thread)
    for flags in ([*FLAGS, "-fopenmp", "-march=native"], [*FLAGS, "-march=native"], FLAGS):
        key = hashlib.sha256("\0".join([SOURCE, compiler, *flags, _cpu_fingerprint()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"cpu_kernels-{key}{suffix}"
        try:
            if not path.exists():
                started = time.perf_counter()
                _build(path, compiler, flags)
                logger.warning(
                    f"hf_hypervq: built the quantizer's CPU kernels with {compiler} in "
                    f"{time.perf_counter() - started:.1f} s, once per machine (cached in {path.parent})"
                )
            library = ctypes.CDLL(str(path))
            break
        except (OSError, RuntimeError) as error:
            errors.append(str(error))
    else:
        raise RuntimeError("; ".join(errors))
    pointer, i64, i32, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_int
    library.hvq_mlr_gumbel_forward.argtypes = [pointer, pointer, i32, f32, i64, i64, *[pointer] * 4, c_int]
    library.hvq_mlr_gumbel_backward.argtypes = [*[pointer] * 6, f32, pointer, pointer, i64, i64, *[pointer] * 3, c_int]
    library.hvq_mlr_logits_argmax.argtypes = [pointer, pointer, i64, i64, pointer, pointer, c_int]
    _library = library
    return library


def _threads(num_elements: int) -> int:
    return max(1, min(torch.get_num_threads(), num_elements // _MIN_ELEMENTS_PER_THREAD))


def _pointer(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


def _check(status: int) -> None:
    if status:
        raise MemoryError("hf_hypervq's CPU kernels could not allocate their scratch memory")


def cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature):
    """`kernels.mlr_gumbel_forward` on CPU tensors."""
    y, scale = _float32(y), _float32(scale)
    (num_rows, num_columns), library = y.shape, load_cpu_kernels()
    logits, weights = torch.empty_like(y), torch.empty_like(y)
    indices = torch.empty(num_rows, dtype=torch.long)
    inverse_total = torch.empty(num_rows, 1)
    _check(
        library.hvq_mlr_gumbel_forward(
            _pointer(y), _pointer(scale), int(seed), float(inverse_temperature), num_rows, num_columns,
            _pointer(logits), _pointer(indices), _pointer(weights), _pointer(inverse_total), _threads(y.numel()),
        )
    )  # fmt: skip
    return logits, indices, weights, inverse_total


def cpu_mlr_gumbel_backward(grad_soft, grad_logits, logits, weights, inverse_total, scale, inv_temperature, w_last,
                            x_last):  # fmt: skip
    """`kernels.mlr_gumbel_backward` on CPU tensors."""
    grad_soft, logits, weights, inverse_total, scale, w_last, x_last = map(
        _float32, (grad_soft, logits, weights, inverse_total, scale, w_last, x_last)
    )
    grad_logits = None if grad_logits is None else _float32(grad_logits)
    (num_rows, num_columns), library = grad_soft.shape, load_cpu_kernels()
    grad_y, grad_x_last, column_sums = (
        torch.empty_like(grad_soft),
        torch.empty(num_rows, 1),
        torch.zeros(2, num_columns),
    )
    _check(
        library.hvq_mlr_gumbel_backward(
            _pointer(grad_soft), _pointer(grad_logits), _pointer(logits), _pointer(weights), _pointer(inverse_total),
            _pointer(scale), float(inv_temperature), _pointer(w_last), _pointer(x_last), num_rows, num_columns,
            _pointer(grad_y), _pointer(grad_x_last), _pointer(column_sums), _threads(grad_soft.numel()),
        )
    )  # fmt: skip
    # two tensors, not two views of one: the outputs of a torch operator may not alias each other
    return grad_y, grad_x_last, column_sums[1].clone(), column_sums[0].clone()


def cpu_mlr_logits_and_argmax(y, scale):
    """`kernels.mlr_logits_and_argmax` on CPU tensors."""
    y, scale = _float32(y), _float32(scale)
    (num_rows, num_columns), library = y.shape, load_cpu_kernels()
    logits, indices = torch.empty_like(y), torch.empty(num_rows, dtype=torch.long)
    _check(
        library.hvq_mlr_logits_argmax(
            _pointer(y), _pointer(scale), num_rows, num_columns, _pointer(logits), _pointer(indices),
            _threads(y.numel()),
        )
    )  # fmt: skip
    return logits, indices
