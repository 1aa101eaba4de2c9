"""HyperVQ's N×K kernels as C loops for the CPU, built once per machine with the system's C compiler.

On a CPU, HyperVQ's step costs as much in the elementwise work on the N×K scores as in its matmuls: per score an
asinh, the counter-based Gumbel noise (a hash and two logs), an exp, and their backward. `torch.compile` fuses that
work (`kernels.py`), but with SLEEF's log and exp, and it sums the gradient of the per-code scale down the columns,
a strided loop. The loops below take one row at a time, in L1 cache, with Cephes' float32 polynomials for log and
exp (the bits taken apart with integer ops, so that the loops vectorise; about 2e-7 relative error), and add blocks
of 128 rows into column sums of their own, added up in block order (the kernel's outputs are the same bits on any
number of threads; the training step's matmuls around it are not, docs/performance.md#native-cpu-kernels).

The source is a string in this module, so that it travels with a model saved with its remote code. It is compiled
into `$HF_HYPERVQ_CACHE` (default `~/.cache/hf_hypervq`; a folder of the user's in the temporary folder if that one
cannot be written) as a shared library named by a hash of the source, the OS, the machine, the compiler and its
version, the flags and the target the compiler resolves `-march=native` to (the library is built where it runs, and
a shared home may serve several CPUs), and loaded with `ctypes`. The build is bounded and honest about failure:

- one process builds while the others wait on a file lock;
- all flag sets together get `BUILD_DEADLINE_S`; a build that runs past it is remembered for `RETRY_AFTER_S`, so
  that later processes run the torch twins at once instead of waiting again;
- a flag set the compiler rejects (Apple's clang and `-fopenmp`) is remembered under the compiler's version; a
  failure the compiler did not diagnose (a signal such as the OOM killer's, a full disk) only for `RETRY_AFTER_S`;
- a process that falls back to a weaker flag set (no OpenMP, no `-march=native`) says so once, with the reason.

OpenMP comes from torch's own runtime: the library is compiled with `-fopenmp` but linked against the runtime file
torch has mapped (on Linux), never `-lgomp`, so it cannot load a second runtime beside torch's (a wheel with a renamed
`libgomp-<hash>.so.1`, a conda build with LLVM's or Intel's). Elsewhere it is single-threaded.

`load_cpu_kernels()` raises if no compiler works; `kernels.py` then runs the torch twins, with one warning. The
functions here take and return tensors as their torch twins in `kernels.py` do, check their arguments before any
pointer reaches C (the part `TORCH_CHECK` plays in a C++ operator: they are public as torch operators), and the
tests hold them to the twins. Rows are split between `torch.get_num_threads()` OpenMP threads (fewer for a small
input, see `_threads`).
"""

import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from filelock import Timeout as FileLockTimeout


logger = logging.getLogger(__name__)

SOURCE = r"""
#include <limits.h>
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
   a softmax weight next to a row maximum of 1, or the sech of an argument far out on the asinh's flat tail. A NaN
   is floored too (the comparison is false), so that the integer conversion below stays defined, and returned. */
static inline float exp_nonpositive(float x) {
    float floored = x > -87.0f ? x : -87.0f;
    float n = floorf(floored * 1.44269504088896341f + 0.5f);
    float r = floored - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float result = (p * r * r + r + 1.0f) * as_float((uint32_t)((int32_t)n + 127) << 23);
    return x == x ? result : x;
}

/* asinh(y) = sign(y) log(|y| + sqrt(1 + y^2)), the accurate form (no cancellation for y < 0). An infinite or NaN
   argument of the log (bits at or above +inf's) is passed through, as torch's log does. */
static inline float asinh_f(float y) {
    float t = fabsf(y) + sqrtf(y * y + 1.0f);
    return copysignf(as_bits(t) < 0x7F800000u ? log_positive(t) : t, y);
}

/* Row maxima as torch.amax takes them (a NaN anywhere makes the maximum NaN), as integer max and min reductions
   on the bits: they vectorise without the compiler being told that floats are finite (-ffinite-math-only, under
   which an infinite or NaN score would be undefined behaviour). `ordered` maps floats onto int32 in their order
   (negative floats have their magnitude bits flipped; it is its own inverse), which puts a NaN above +inf or,
   with its sign bit set, below -inf. */
static inline int32_t ordered(uint32_t bits) { return (int32_t)(bits ^ ((0u - (bits >> 31)) >> 1)); }
static inline float row_maximum(int32_t ordered_max, int32_t ordered_min) {
    const int32_t above_infinity = 0x7F800000, below_minus_infinity = -0x7F800001;  /* ordered(+-inf) */
    return ordered_max > above_infinity || ordered_min < below_minus_infinity
        ? NAN : as_float((uint32_t)ordered((uint32_t)ordered_max));
}

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
        int32_t ordered_max = INT32_MIN, ordered_min = INT32_MAX;
        for (int64_t k = 0; k < K; k++) {
            float logit = scale[k] * asinh_f(y[k]);
            float u = counter_uniform(counter + (uint32_t)k, a->seed);
            float p = logit - log_positive(-log_positive(u));
            logits[k] = logit;
            perturbed[k] = p;
            int32_t o = ordered(as_bits(p));
            ordered_max = o > ordered_max ? o : ordered_max;
            ordered_min = o < ordered_min ? o : ordered_min;
        }
        const float row_max = row_maximum(ordered_max, ordered_min);
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
        int32_t ordered_max = INT32_MIN, ordered_min = INT32_MAX;
        for (int64_t k = 0; k < K; k++) {
            float logit = scale[k] * asinh_f(y[k]);
            logits[k] = logit;
            int32_t o = ordered(as_bits(logit));
            ordered_max = o > ordered_max ? o : ordered_max;
            ordered_min = o < ordered_min ? o : ordered_min;
        }
        a->indices[n] = first_index_of(logits, row_maximum(ordered_max, ordered_min), K);
    }
}

/* Rows per block of the column sums: each block of rows adds into sums of its own, and the blocks' sums are then
   added up in block order, so that the column sums are the same bits whatever the number of threads. */
#define ROWS_PER_BLOCK 128

/* Split N rows between `threads` threads, each with K floats of scratch; with `sums` > 0, in blocks of
   ROWS_PER_BLOCK rows, each adding into `sums` * K column sums of its own, which the threads then add into
   `column_sums` (each thread a range of columns, block after block). The threads are OpenMP's, and at run time
   that is torch's own runtime (the library is linked against the very file torch has mapped, never a runtime of
   its own), so the kernels share torch's thread pool: threads of another pool would compete for the cores with
   torch's, which spin for a while after each parallel region.
   Returns 0, or -1 if memory ran out. */
static int run_rows(RowsFn fn, const Args *args, int64_t N, int threads, int sums, float *column_sums) {
    const int64_t K = args->K, width = sums * K;
    const int64_t blocks = sums ? (N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK : 0;
    if (threads < 1) threads = 1;
    float *scratch = (float *)malloc(((size_t)threads * K + 1) * sizeof(float));
    float *partial = (float *)calloc((size_t)(blocks * width) + 1, sizeof(float));
    if (!scratch || !partial) {
        free(scratch);
        free(partial);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        float *own = scratch + K * t;
        if (!sums) {
            fn(args, N * t / count, N * (t + 1) / count, own, 0);
        } else {
            for (int64_t b = blocks * t / count; b < blocks * (t + 1) / count; b++) {
                const int64_t end = (b + 1) * ROWS_PER_BLOCK;
                fn(args, b * ROWS_PER_BLOCK, end < N ? end : N, own, partial + b * width);
            }
            #pragma omp barrier
            const int64_t first = width * t / count, last = width * (t + 1) / count;
            for (int64_t b = 0; b < blocks; b++)
                for (int64_t k = first; k < last; k++) column_sums[k] += partial[b * width + k];
        }
    }
    free(scratch);
    free(partial);
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

# -O3 vectorises the row loops; the relaxations let it vectorise the sum reductions and contract the polynomials
# into FMAs. Not -ffinite-math-only (the row maxima are integer reductions instead, see `row_maximum`), so that an
# infinite or NaN score is defined behaviour and comes out as in torch; not -ffast-math: with -shared, older GCCs
# link code that sets flush-to-zero for the whole process.
FLAGS = [
    "-O3", "-fPIC", "-std=c99", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
    "-fassociative-math",
]  # fmt: skip
OPENMP, NATIVE = "-fopenmp", "-march=native"
BUILD_DEADLINE_S = 120  # for the probe and every flag set together: a hung compiler must not hang training
RETRY_AFTER_S = 3600  # how long a failure the compiler did not diagnose (or a missed deadline) is remembered
_MAX_COLUMNS = 2**31 - 1  # the C code keeps column indices as int32
_MIN_ELEMENTS_PER_THREAD = 1 << 15  # below this a thread costs more to start than it saves
_OPENMP_RUNTIME = re.compile(r"^lib(gomp|iomp5|omp|iomp5md|vcomp)\d*([-.][0-9a-f]{8})?\.(so|dylib|dll)\b")
# what a compiler prints when it was stopped rather than refused the code: worth another try later
_NOT_DIAGNOSED = re.compile(
    r"Killed|terminated program|signal|No space left|Cannot allocate memory|out of memory|internal compiler error",
    re.IGNORECASE,
)
_library = None
loaded_build = None  # what the loaded library was built with: compiler, flags, target CPU (`kernels.cpu_kernel_path`)
_load_error = None  # why the kernels could not be loaded: raised again at once, without calling the compiler again


class _CacheNotWritable(OSError):
    pass


class _BuildFailure(RuntimeError):
    def __init__(self, message: str, diagnosed: bool):
        super().__init__(message)
        self.diagnosed = diagnosed  # the compiler refused the code or a flag, rather than being stopped


def _compiler() -> list[str]:
    """The C compiler as a command, with its own arguments (`CC="ccache gcc"`, `CC="zig cc"`)."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        command = shlex.split(candidate or "")
        if command and shutil.which(command[0]):
            return command
    raise RuntimeError("no C compiler found (set CC)")


def _compiler_identity(compiler: list[str], deadline: float) -> str:
    """What names a compiler in the cache keys: the OS, the machine, the command, the first line of its
    `--version` and its binary's modification time (an upgraded compiler gets new keys, so it is asked again)."""
    try:
        version = _run([*compiler, "--version"], deadline)[1].strip().splitlines()[:1]
        mtime = os.stat(shutil.which(compiler[0])).st_mtime_ns
    except TimeoutError:
        raise
    except (OSError, RuntimeError, TypeError) as error:
        version, mtime = [f"{type(error).__name__}: {error}"], 0
    return " ".join([sys.platform, platform.machine(), shlex.join(compiler), *version, str(mtime)])


def _native_target(compiler: list[str], deadline: float) -> str:
    """What the library built with `-march=native` depends on: the target the compiler resolves it to, read from
    its driver's `-###` output (GCC's cc1 line lists the concrete `-march=`/`-mcpu=` and every `-m` feature flag
    and cache size, clang's the `-target-cpu` and `-target-feature`s), with the target triple and the compiler's
    version. On ARM /proc/cpuinfo names no model and no flags, so this is what tells two CPUs apart there; a library
    built for one CPU and loaded on another (a shared home) may die of an illegal instruction."""
    try:
        words = []
        output = _run([*compiler, NATIVE, "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull], deadline)[1]
    except TimeoutError:
        raise
    except (OSError, RuntimeError) as error:
        words, output = [f"{type(error).__name__}: {error}"], ""
    for line in output.splitlines():
        if line.startswith("Target:") or " version " in line:
            words.append(line.strip())
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for previous, token in zip(["", *tokens], tokens):
            if token.startswith(("-m", "-target-cpu", "-target-feature")) or previous in (
                "--param", "-target-cpu", "-target-feature", "-target-abi",
            ):  # fmt: skip
                words.append(token)
    if not any(word.startswith(("-march=", "-mcpu=", "-target-cpu")) for word in words):  # an unknown driver
        words.append(f"{platform.machine()} {_cpu_info()}")
    return " ".join(words)


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "".join(sorted(set(cpuinfo)))  # every field, for CPUs whose file names no model or flags
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("HF_HYPERVQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_hypervq"
    )
    return Path(root)


def _temporary_cache_dir() -> Path:
    """A folder of this user's in the temporary folder, for a cache folder that cannot be written (a read-only
    home): not another user's, whose library this process would otherwise load."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    folder = Path(tempfile.gettempdir(), f"hf_hypervq-{user}")
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        if not hasattr(os, "getuid") or folder.stat().st_uid == os.getuid():
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="hf_hypervq-"))


def openmp_runtimes(maps: str) -> set[str]:
    """The OpenMP runtimes (GNU libgomp, renamed copies such as torch wheels' libgomp-1a2b3c4d.so.1, LLVM's libomp,
    Intel's libiomp5) among the files mapped in a process, from the text of /proc/<pid>/maps."""
    paths = (line.split(None, 5)[-1].strip() for line in maps.splitlines() if line.count(" ") >= 5)
    return {path for path in paths if _OPENMP_RUNTIME.match(os.path.basename(path))}


def _process_maps() -> str:
    with open("/proc/self/maps") as maps:
        return maps.read()


def torch_openmp_runtime() -> str | None:
    """The OpenMP runtime file torch has mapped in this process, to link the kernels against, or None (not Linux,
    torch without OpenMP, or no way to tell torch's from another library's). A runtime inside torch's install
    (`torch/lib`, a wheel's `torch.libs`) is torch's; else the only one mapped (a conda build's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        runtimes = sorted({os.path.realpath(path) for path in openmp_runtimes(_process_maps())})
    except OSError:
        return None
    torch_folder = os.path.dirname(os.path.realpath(torch.__file__))
    own = [path for path in runtimes if path.startswith((torch_folder + os.sep, torch_folder + ".libs" + os.sep))]
    if len(own) == 1:
        return own[0]
    return runtimes[0] if len(runtimes) == 1 and not own else None


def flag_sets(runtime: str | None) -> list[list[str]]:
    """The flag sets to try, best first: OpenMP (where torch's runtime is known) and `-march=native`, then without
    OpenMP, then plain C."""
    return ([[*FLAGS, OPENMP, NATIVE]] if runtime else []) + [[*FLAGS, NATIVE], FLAGS]


def _library_path(folder: Path, identity: str, flags: list[str], target: str, runtime: str | None) -> Path:
    parts = [SOURCE, identity, *flags, target if NATIVE in flags else "", (runtime or "") if OPENMP in flags else ""]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return folder / f"cpu_kernels-{key[:16]}{'.dll' if sys.platform == 'win32' else '.so'}"


def _run(command: list[str], deadline: float) -> tuple[int, str]:
    """Run a compiler: its exit status and its output (stderr, then stdout). At `deadline` (a `time.monotonic()`)
    the compiler and the processes it started (cc1, as, ld: they hold the output pipes open) are killed."""
    timeout = max(0.0, deadline - time.monotonic())
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=sys.platform != "win32") as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if sys.platform == "win32":
                process.kill()
            else:
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise TimeoutError(
                f"{command[0]} ran past the build deadline ({BUILD_DEADLINE_S} s); stopped it"
            ) from None
    return process.returncode, stderr + stdout


def _build(path: Path, compiler: list[str], flags: list[str], runtime: str | None, deadline: float) -> None:
    """Compile, then link aside and rename. With OpenMP, the link names torch's runtime file instead of `-lgomp`
    (which `-fopenmp` would add), and on Linux `--no-undefined` makes a runtime that lacks a symbol a diagnosed
    failure here rather than a failed load."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        source, objects, library = Path(scratch, "kernels.c"), Path(scratch, "kernels.o"), Path(scratch, path.name)
        source.write_text(SOURCE)
        link = [*compiler, "-shared", str(objects), *([runtime] if OPENMP in flags else []), "-o", str(library), "-lm"]
        if sys.platform.startswith("linux"):
            link.append("-Wl,--no-undefined")
        for command in ([*compiler, *flags, "-c", str(source), "-o", str(objects)], link):
            returncode, output = _run(command, deadline)
            if returncode:
                message = f"{shlex.join(compiler)} failed: {output.strip()[-2000:]}"
                raise _BuildFailure(message, diagnosed=returncode > 0 and not _NOT_DIAGNOSED.search(output))
        os.replace(library, path)


def _remembered_failure(path: Path) -> str | None:
    """The failure remembered next to `path`, or None: a diagnosed one for good (the key names the compiler's
    version), any other for `RETRY_AFTER_S`."""
    try:
        failure = json.loads(path.with_suffix(".failed").read_text())
        if failure["diagnosed"] or time.time() - failure["time"] < RETRY_AFTER_S:
            return failure["error"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember_failure(path: Path, error: str, diagnosed: bool) -> None:
    record = {"error": error, "diagnosed": diagnosed, "time": time.time()}
    path.with_suffix(".failed").write_text(json.dumps(record))


def _load_or_build(path: Path, compiler: list[str], flags: list[str], runtime: str | None, deadline: float):
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(f"{path}.lock", timeout=max(0.0, deadline - time.monotonic()))
            lock.acquire()
        except FileLockTimeout:
            raise TimeoutError(f"another process held {path}.lock past the build deadline") from None
        except OSError as error:
            raise _CacheNotWritable(f"{path.parent} is not writable ({error})") from error
        try:  # one process builds; the others wait on the lock and load its library
            if not path.exists() and _remembered_failure(path) is None:
                started = time.perf_counter()
                try:
                    _build(path, compiler, flags, runtime, deadline)
                except _BuildFailure as failure:
                    _remember_failure(path, str(failure), failure.diagnosed)
                    raise
                except TimeoutError:
                    raise
                except OSError as error:  # ENOSPC, EROFS: the folder cannot take the library
                    raise _CacheNotWritable(f"{path.parent} is not writable ({error})") from error
                logger.warning(
                    f"hf_hypervq: built the quantizer's CPU kernels with {shlex.join(compiler)} in "
                    f"{time.perf_counter() - started:.1f} s, once per machine (cached in {path.parent})"
                )
        finally:
            lock.release()
    if not path.exists():
        error = _remembered_failure(path) or "the build left no library"
        raise RuntimeError(f"{error} (remembered in {path.with_suffix('.failed')}: delete it to try again)")
    return ctypes.CDLL(str(path))


def load_cpu_kernels() -> ctypes.CDLL:
    """The compiled kernels (built on first use, then loaded from the cache); raises if they cannot be built, and
    again at once on every later call."""
    global _library, _load_error
    if _library is not None:
        return _library
    if _load_error is not None:
        raise _load_error
    try:
        _library = _configure(_load())
    except (OSError, RuntimeError) as error:
        _load_error = error
        raise
    return _library


def _load() -> ctypes.CDLL:
    """The best flag set's library. A missed deadline is remembered in the cache folder for `RETRY_AFTER_S`."""
    deadline = time.monotonic() + BUILD_DEADLINE_S
    compiler, folder = _compiler(), _cache_dir()
    timed_out = folder / f"build-timed-out-{hashlib.sha256(shlex.join(compiler).encode()).hexdigest()[:16]}"
    if timed_out.exists() and time.time() - timed_out.stat().st_mtime < RETRY_AFTER_S:
        raise RuntimeError(
            f"an earlier build ran past its deadline ({BUILD_DEADLINE_S} s); not trying again for {RETRY_AFTER_S} s "
            f"(delete {timed_out} to try now)"
        )
    try:
        return _load_best(compiler, folder, deadline)
    except TimeoutError:
        try:
            timed_out.parent.mkdir(parents=True, exist_ok=True)
            timed_out.touch()
        except OSError:
            pass
        raise


def _load_best(compiler: list[str], folder: Path, deadline: float) -> ctypes.CDLL:
    identity, target = _compiler_identity(compiler, deadline), _native_target(compiler, deadline)
    runtime = torch_openmp_runtime()
    errors = []
    for flags in flag_sets(runtime):
        try:
            try:
                path = _library_path(folder, identity, flags, target, runtime)
                library = _load_or_build(path, compiler, flags, runtime, deadline)
            except _CacheNotWritable as error:
                folder = _temporary_cache_dir()  # for this flag set and the ones after it
                logger.warning(f"hf_hypervq: {error}; building the CPU kernels in {folder} instead")
                path = _library_path(folder, identity, flags, target, runtime)
                library = _load_or_build(path, compiler, flags, runtime, deadline)
        except TimeoutError:
            raise
        except (OSError, RuntimeError) as error:
            errors.append(f"{shlex.join(flags[len(FLAGS) :]) or 'plain C'}: {error}")
            continue
        if errors or not runtime:  # a weaker flag set than the best: once per process, with the first reason
            missing = " and ".join(name for name, flag in (("OpenMP", OPENMP), (NATIVE, NATIVE)) if flag not in flags)
            reason = errors[0].splitlines()[0] if errors else "torch's OpenMP runtime is not known on this system"
            logger.warning(f"hf_hypervq: the quantizer's CPU kernels run without {missing} ({reason})")
        global loaded_build
        # the compiler without its binary's mtime, and the target's CPU (not its cache sizes or tuning)
        words = target.split()
        cpu = [word for previous, word in zip(["", *words], words)
               if word.startswith(("-march=", "-mcpu=", "-target-cpu")) or previous == "-target-cpu"]  # fmt: skip
        loaded_build = f"{identity.rsplit(' ', 1)[0]}; {shlex.join(flags)}; {' '.join(cpu) or target}"
        return library
    raise RuntimeError("; ".join(errors))


def _configure(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, i64, i32, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_int
    library.hvq_mlr_gumbel_forward.argtypes = [pointer, pointer, i32, f32, i64, i64, *[pointer] * 4, c_int]
    library.hvq_mlr_gumbel_backward.argtypes = [*[pointer] * 6, f32, pointer, pointer, i64, i64, *[pointer] * 3, c_int]
    library.hvq_mlr_logits_argmax.argtypes = [pointer, pointer, i64, i64, pointer, pointer, c_int]
    return library


def _threads(num_elements: int) -> int:
    return max(1, min(torch.get_num_threads(), num_elements // _MIN_ELEMENTS_PER_THREAD))


def _pointer(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _checked(operator: str, name: str, tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """`tensor` as the C code reads it, contiguous, after the checks a C++ operator makes with `TORCH_CHECK`: a CPU
    tensor of `dtype` and `shape`. Raises a ValueError that names the operator and the argument otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"hf_hypervq::{operator}: `{name}` must be a tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu" or tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ValueError(
            f"hf_hypervq::{operator}: `{name}` must be a {dtype} CPU tensor of shape {shape}; got a {tensor.dtype} "
            f"{tensor.device.type} tensor of shape {tuple(tensor.shape)}"
        )
    return tensor.detach().contiguous()


def _rows_and_columns(operator: str, name: str, tensor) -> tuple[int, int]:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        got = f"shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"hf_hypervq::{operator}: `{name}` must be an (N, K) tensor; got {got}")
    num_rows, num_columns = tensor.shape
    if not 0 < num_columns <= _MAX_COLUMNS:
        raise ValueError(f"hf_hypervq::{operator}: `{name}` must have 1 to {_MAX_COLUMNS} columns, got {num_columns}")
    return num_rows, num_columns


def _check_status(status: int) -> None:
    if status:
        raise MemoryError("hf_hypervq's CPU kernels could not allocate their scratch memory")


def cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature):
    """`kernels.mlr_gumbel_forward` on CPU tensors."""
    name = "mlr_gumbel_forward"
    num_rows, num_columns = _rows_and_columns(name, "y", y)
    y, scale = _checked(name, "y", y, (num_rows, num_columns)), _checked(name, "scale", scale, (num_columns,))
    seed = _checked(name, "seed", seed, (), torch.int32)
    inverse_temperature = _checked(name, "inv_temperature", inverse_temperature, ())
    library = load_cpu_kernels()
    logits, weights = torch.empty_like(y), torch.empty_like(y)
    indices, inverse_total = y.new_empty(num_rows, dtype=torch.long), y.new_empty(num_rows, 1)
    _check_status(
        library.hvq_mlr_gumbel_forward(
            _pointer(y), _pointer(scale), int(seed), float(inverse_temperature), num_rows, num_columns,
            _pointer(logits), _pointer(indices), _pointer(weights), _pointer(inverse_total), _threads(y.numel()),
        )
    )  # fmt: skip
    return logits, indices, weights, inverse_total


def cpu_mlr_gumbel_backward(grad_soft, grad_logits, logits, weights, inverse_total, scale, inv_temperature, w_last,
                            x_last):  # fmt: skip
    """`kernels.mlr_gumbel_backward` on CPU tensors."""
    name = "mlr_gumbel_backward"
    num_rows, num_columns = _rows_and_columns(name, "grad_soft", grad_soft)
    matrix, row, column = (num_rows, num_columns), (num_rows,), (num_columns,)
    grad_soft, logits, weights = (_checked(name, n, t, matrix) for n, t in
                                  (("grad_soft", grad_soft), ("logits", logits), ("weights", weights)))  # fmt: skip
    grad_logits = None if grad_logits is None else _checked(name, "grad_logits", grad_logits, matrix)
    inverse_total = _checked(name, "inverse_total", inverse_total, (num_rows, 1))
    scale, w_last = _checked(name, "scale", scale, column), _checked(name, "w_last", w_last, column)
    x_last = _checked(name, "x_last", x_last, row)
    inv_temperature = _checked(name, "inv_temperature", inv_temperature, ())
    library = load_cpu_kernels()
    grad_y, grad_x_last = torch.empty_like(grad_soft), grad_soft.new_empty(num_rows, 1)
    column_sums = grad_soft.new_zeros(2, num_columns)
    _check_status(
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
    name = "mlr_logits_and_argmax"
    num_rows, num_columns = _rows_and_columns(name, "y", y)
    y, scale = _checked(name, "y", y, (num_rows, num_columns)), _checked(name, "scale", scale, (num_columns,))
    library = load_cpu_kernels()
    logits, indices = torch.empty_like(y), y.new_empty(num_rows, dtype=torch.long)
    _check_status(
        library.hvq_mlr_logits_argmax(
            _pointer(y), _pointer(scale), num_rows, num_columns, _pointer(logits), _pointer(indices),
            _threads(y.numel()),
        )
    )  # fmt: skip
    return logits, indices
