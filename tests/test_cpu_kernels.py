"""HyperVQ's native CPU kernels (`cpu_kernels.py`) against their torch twins in `kernels.py`, and the folded latents'
closed-form backward (`hyperbolic.fold_latents`)."""

import importlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from hf_hypervq import HyperVQ
from hf_hypervq.models.hypervq import cpu_kernels, hyperbolic, kernels


def _twin(kernel):
    return kernel.__wrapped__  # the torch function that `fused_kernel` wraps


def _scores(num_rows, num_columns, seed=0):
    """Matmul outputs of every size the asinh meets: around 0, ordinary, and far out (1e18)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(num_rows, num_columns, generator=generator) * 4
    y.view(-1)[:3] = torch.tensor([0.0, 1e18, -1e18])[: y.numel()]
    scale = torch.rand(num_columns, generator=generator) + 0.5
    return y, scale


# K = 2 and K = 70 / 513 leave a tail after the 8-wide vectors; N = 1 gives a single thread a single row.
SHAPES = [(1, 2), (37, 70), (300, 513), (2048, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_forward_equals_its_twin(shape):
    y, scale = _scores(*shape)
    seed, inverse_temperature = torch.tensor(1234, dtype=torch.int32), torch.tensor(0.7)
    logits, indices, weights, inverse_total = cpu_kernels.cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature)
    reference_logits = scale * torch.asinh(y.double())
    perturbed = reference_logits + kernels.gumbel_noise(seed, *shape, "cpu").double()  # the same uniform bits
    torch.testing.assert_close(logits.double(), reference_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, perturbed.argmax(-1))
    torch.testing.assert_close((weights * inverse_total).double(), torch.softmax(perturbed * 0.7, -1), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    twin = _twin(kernels.mlr_gumbel_forward)(y, scale, seed, inverse_temperature)
    torch.testing.assert_close(weights * inverse_total, twin[2] * twin[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_logits_gradient", [False, True], ids=["straight_through", "and_logits"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_backward_equals_its_twin(shape, with_logits_gradient):
    y, scale = _scores(*shape, seed=1)
    seed, inverse_temperature = torch.tensor(5, dtype=torch.int32), torch.tensor(1.3)
    logits, _, weights, inverse_total = _twin(kernels.mlr_gumbel_forward)(y, scale, seed, inverse_temperature)
    generator = torch.Generator().manual_seed(2)
    grad_soft = torch.randn(*shape, generator=generator)
    grad_logits = torch.randn(*shape, generator=generator) if with_logits_gradient else None
    w_last, x_last = torch.randn(shape[1], generator=generator), torch.randn(shape[0], generator=generator)
    arguments = (grad_soft, grad_logits, logits, weights, inverse_total, scale, inverse_temperature, w_last, x_last)
    native = cpu_kernels.cpu_mlr_gumbel_backward(*arguments)
    twin = _twin(kernels.mlr_gumbel_backward)(*arguments)
    for got, expected in zip(native, twin):  # float32 rounding, relative to each output's scale
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tokenization_equals_its_twin_and_takes_the_first_maximum(shape):
    y, scale = _scores(*shape, seed=3)
    y[-1] = 2.0  # a row of equal scores: the first index wins, as with torch.argmax
    scale[:] = 1.0
    logits, indices = cpu_kernels.cpu_mlr_logits_and_argmax(y, scale)
    twin_logits, twin_indices = _twin(kernels.mlr_logits_and_argmax)(y, scale)
    torch.testing.assert_close(logits.double(), scale * torch.asinh(y.double()), rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, twin_indices) and indices[-1] == 0


def test_results_do_not_depend_on_the_number_of_threads(torch_threads):
    y, scale = _scores(4096, 96, seed=4)
    seed, inverse_temperature = torch.tensor(77, dtype=torch.int32), torch.tensor(0.5)
    generator = torch.Generator().manual_seed(5)
    grad_soft, grad_logits = torch.randn(4096, 96, generator=generator), torch.randn(4096, 96, generator=generator)
    w_last, x_last = torch.randn(96, generator=generator), torch.randn(4096, generator=generator)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            assert cpu_kernels._threads(y.numel()) == threads
            logits, indices, weights, inverse_total = cpu_kernels.cpu_mlr_gumbel_forward(
                y, scale, seed, inverse_temperature
            )
            backward = cpu_kernels.cpu_mlr_gumbel_backward(
                grad_soft, grad_logits, logits, weights, inverse_total, scale, inverse_temperature, w_last, x_last
            )
        results.append((logits, indices, weights, inverse_total, *backward))
    for a, b in zip(*results):  # rows are independent, and the column sums add fixed blocks of rows in order
        assert torch.equal(a, b)


def test_infinite_and_nan_scores_come_out_as_in_the_torch_twins():
    """Compiled without -ffinite-math-only, a non-finite score is defined behaviour: a NaN makes its row's maximum
    NaN (the last index, NaN weights), an infinity is the row's maximum, as with torch's amax."""
    y, scale = _scores(6, 40, seed=6)
    y[1, 5], y[2, 7], y[3, 9], y[4, 3], y[4, 30] = float("nan"), float("inf"), float("-inf"), float("inf"), 2e19
    y[5, 11] = -torch.tensor(float("nan"))  # a NaN with its sign bit set, as x86 makes them (inf - inf)
    seed, inverse_temperature = torch.tensor(3, dtype=torch.int32), torch.tensor(0.8)
    native = cpu_kernels.cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature)
    twin = _twin(kernels.mlr_gumbel_forward)(y, scale, seed, inverse_temperature)
    torch.testing.assert_close(native[0], twin[0], equal_nan=True)
    assert torch.equal(native[1], twin[1]) and native[1][1] == native[1][5] == 39 and native[1][2] == 7
    torch.testing.assert_close(native[2] * native[3], twin[2] * twin[3], equal_nan=True, rtol=1e-5, atol=1e-7)
    logits, indices = cpu_kernels.cpu_mlr_logits_and_argmax(y, scale)
    twin_logits, twin_indices = _twin(kernels.mlr_logits_and_argmax)(y, scale)
    torch.testing.assert_close(logits, twin_logits, equal_nan=True)
    assert torch.equal(indices, twin_indices)


# the -### output of a GCC and of a clang for two ARM CPUs (Neoverse N1, Cortex-A72), whose /proc/cpuinfo names no
# model and no flags; the temporary file's name changes from call to call
ARM_DRIVERS = {
    ("gcc", "n1"): " /usr/lib/gcc/aarch64-linux-gnu/12/cc1 -quiet -imultiarch aarch64-linux-gnu /dev/null "
    '-mlittle-endian -mabi=lp64 "-march=armv8.2-a+crypto+fp16+rcpc+dotprod+ssbs" -dumpbase null -o /tmp/cc$$.s',
    ("gcc", "a72"): " /usr/lib/gcc/aarch64-linux-gnu/12/cc1 -quiet -imultiarch aarch64-linux-gnu /dev/null "
    '-mlittle-endian -mabi=lp64 "-march=armv8-a+crc" -dumpbase null -o /tmp/cc$$.s',
    ("clang", "n1"): ' "/usr/lib/llvm-16/bin/clang" "-cc1" "-triple" "aarch64-unknown-linux-gnu" "-target-cpu" '
    '"neoverse-n1" "-target-feature" "+neon" "-target-feature" "+dotprod" "-o" "/tmp/null-$$.o"',
    ("clang", "a72"): ' "/usr/lib/llvm-16/bin/clang" "-cc1" "-triple" "aarch64-unknown-linux-gnu" "-target-cpu" '
    '"cortex-a72" "-target-feature" "+neon" "-target-feature" "+crc" "-o" "/tmp/null-$$.o"',
}


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _deadline():
    return time.monotonic() + 60


@pytest.mark.parametrize("driver", ["gcc", "clang"])
def test_the_cache_key_is_the_target_the_compiler_resolves_for_march_native(driver, tmp_path, monkeypatch):
    keys = {}
    for cpu in ("n1", "a72"):
        compiler = _script(
            tmp_path / f"cc-{cpu}", f"echo 'Target: aarch64-linux-gnu' >&2\necho '{ARM_DRIVERS[driver, cpu]}' >&2\n"
        )
        target = cpu_kernels._native_target([compiler], _deadline())
        assert target == cpu_kernels._native_target([compiler], _deadline())  # the same CPU: the same key
        runtime = "/site/torch/lib/libgomp.so.1"
        keys[cpu] = {
            cpu_kernels._library_path(tmp_path, "gcc 12", flags, target, runtime)
            for flags in cpu_kernels.flag_sets(runtime)
        }
    assert len(keys["n1"] | keys["a72"]) == 5  # the plain C library (no -march=native) is the same on both


def test_every_key_names_the_machine_the_os_and_the_compilers_version(tmp_path, monkeypatch):
    """A home shared by x86 and ARM nodes, or a compiler upgrade, must not share even the plain C library, nor a
    remembered failure."""
    identities = []
    for version in ("12.2.0", "13.1.0"):
        compiler = _script(tmp_path / f"cc-{version}", f'echo "gcc (Debian {version}) {version}"\n')
        identities.append(cpu_kernels._compiler_identity([compiler, "-O2"], _deadline()))
    assert "12.2.0" in identities[0] and sys.platform in identities[0] and platform.machine() in identities[0]
    paths = {cpu_kernels._library_path(tmp_path, identity, cpu_kernels.FLAGS, "", None) for identity in identities}
    assert len(paths) == 2


def test_cc_keeps_its_own_arguments(monkeypatch, tmp_path):
    """`CC="ccache gcc"`: the wrapper and its compiler, not `ccache -O3 ...`."""
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")
    wrapper = _script(tmp_path / "wrapper", f'echo "$*" >> {tmp_path}/calls\nexec "$@"\n')
    monkeypatch.setenv("CC", f"{wrapper} gcc")
    assert cpu_kernels._compiler() == [wrapper, "gcc"]
    cpu_kernels.load_cpu_kernels()
    builds = [call for call in (tmp_path / "calls").read_text().splitlines() if "kernels.c" in call]
    assert len(builds) == 1 and builds[0].startswith("gcc -O3")


def _fresh_cpu_kernels(monkeypatch, cache):
    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(cache))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_load_error", None)


def test_a_compiler_that_hangs_costs_one_deadline_once(monkeypatch, tmp_path):
    """The compiler answers its queries, then hangs in a child process (as cc1 would) that holds its output pipes.
    All flag sets share one deadline, and the next process does not wait again."""
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("CC", _script(tmp_path / "cc", 'case "$*" in *kernels.c*) sleep 60;; esac\nexit 0\n'))
    monkeypatch.setattr(cpu_kernels, "BUILD_DEADLINE_S", 2)
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past the build deadline"):
        cpu_kernels.load_cpu_kernels()
    assert time.perf_counter() - started < 5  # not 2 s for each of the three flag sets
    with pytest.raises(TimeoutError):  # remembered for this process: no second wait
        cpu_kernels.load_cpu_kernels()
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")  # a new process: the missed deadline is remembered a while
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="an earlier build ran past its deadline"):
        cpu_kernels.load_cpu_kernels()
    assert time.perf_counter() - started < 1
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")  # and only a while
    monkeypatch.setattr(cpu_kernels, "RETRY_AFTER_S", 0)
    with pytest.raises(TimeoutError):
        cpu_kernels.load_cpu_kernels()


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("a file, where the cache folder should be")  # root can write anywhere else
    _fresh_cpu_kernels(monkeypatch, tmp_path / "file" / "hf_hypervq")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    library = cpu_kernels.load_cpu_kernels()
    assert Path(library._name).parent.parent == tmp_path / "tmp"
    logits, indices = cpu_kernels.cpu_mlr_logits_and_argmax(*_scores(30, 20))
    assert torch.equal(indices, _twin(kernels.mlr_logits_and_argmax)(*_scores(30, 20))[1])


LOAD = (
    "import importlib.util, logging, sys\n"
    "logging.basicConfig(level=logging.WARNING)\n"
    f"spec = importlib.util.spec_from_file_location('cpu_kernels', {cpu_kernels.__file__!r})\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "y, scale = module.torch.randn(40, 20), module.torch.rand(20) + 0.5\n"
    "print(module.cpu_mlr_logits_and_argmax(y, scale)[1].tolist() == (y.asinh() * scale).argmax(-1).tolist())\n"
)


def _load_in_fresh_processes(tmp_path, count, compiler):
    """Load the kernels in `count` processes started together: the compile commands so far, and each process's
    log."""
    env = {**os.environ, "CC": compiler, "HF_HYPERVQ_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(count)]  # fmt: skip
    logs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0 and stdout.strip() == "True", stderr[-2000:]
        logs.append(stderr)
    calls = (tmp_path / "calls").read_text().splitlines()
    return [call for call in calls if "kernels.c" in call], logs


def test_a_rejected_flag_set_is_remembered_and_every_process_says_it_falls_back(tmp_path):
    # like Apple's clang, which has no -fopenmp
    compiler = _script(tmp_path / "cc", f'echo "$*" >> {tmp_path}/calls\ncase "$*" in *-fopenmp*) '
                       'echo "clang: error: unsupported option -fopenmp" >&2; exit 1;; esac\nexec gcc "$@"\n')  # fmt: skip
    builds, logs = _load_in_fresh_processes(tmp_path, 1, compiler)
    assert len(builds) == 2 and "-fopenmp" in builds[0] and "-fopenmp" not in builds[1]
    again, more_logs = _load_in_fresh_processes(tmp_path, 1, compiler)
    assert again == builds  # the second process builds nothing
    for log in logs + more_logs:
        assert "run without OpenMP (-fopenmp -march=native: " in log and "unsupported option -fopenmp" in log
    assert len(list((tmp_path / "cache").glob("*.failed"))) == 1


def test_a_compiler_stopped_by_a_signal_is_tried_again_later(tmp_path):
    """The OOM killer, Ctrl-C: nothing the compiler said about the code. Remembered for `RETRY_AFTER_S` only, so
    the kernels are not single-threaded for good after one bad moment."""
    compiler = _script(tmp_path / "cc", f'echo "$*" >> {tmp_path}/calls\ncase "$*" in *-fopenmp*kernels.c*) '
                       f'[ -e {tmp_path}/killed ] || {{ touch {tmp_path}/killed; kill -9 $$; }};; esac\n'
                       'exec gcc "$@"\n')  # fmt: skip
    builds, logs = _load_in_fresh_processes(tmp_path, 1, compiler)
    assert len(builds) == 2 and "run without OpenMP" in logs[0]
    (failure,) = (tmp_path / "cache").glob("*.failed")
    record = json.loads(failure.read_text())
    assert not record["diagnosed"]
    record["time"] -= cpu_kernels.RETRY_AFTER_S + 1  # an hour later
    failure.write_text(json.dumps(record))
    builds, logs = _load_in_fresh_processes(tmp_path, 1, compiler)
    assert len(builds) == 3 and "-fopenmp" in builds[2] and "run without" not in logs[0]


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    compiler = _script(tmp_path / "cc", f'echo "$*" >> {tmp_path}/calls\nsleep 1\nexec gcc "$@"\n')
    assert len(_load_in_fresh_processes(tmp_path, 3, compiler)[0]) == 1


def test_a_native_build_failure_leaves_torch_compile_on(monkeypatch, tmp_path):
    """CC=false: the native kernels run as eager torch code, with one warning, while the kernels that are not native
    (on a GPU, all of them; here argmax and GumbelVQ's) are still compiled."""
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(kernels, "_native_warned", False)
    monkeypatch.setattr(kernels, "_compile_error", None)
    monkeypatch.setattr(kernels, "_compiled", {})
    compiled = []

    def recording_compile(fn, **options):
        compiled.append(fn.__name__)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    kernels.set_compiled_kernels(True)
    try:
        y, scale = _scores(50, 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits, indices = kernels.mlr_logits_and_argmax(y, scale)
            assert torch.equal(kernels.argmax(logits), indices)
            kernels.gumbel_forward(logits, torch.tensor(1, dtype=torch.int32), torch.tensor(1.0))
            HyperVQ(8, 16).train()(torch.randn(30, 8)).quantized.sum().backward()
    finally:
        kernels.set_compiled_kernels(None)
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "could not build the quantizer's native CPU kernels" in m]) == 1
    assert "false failed" in messages[0] and not [m for m in messages if "compiling the quantizer's kernels" in m]
    assert compiled == ["argmax", "gumbel_forward"] and kernels._compile_error is None
    twin_logits, twin_indices = _twin(kernels.mlr_logits_and_argmax)(y, scale)
    assert torch.equal(logits, twin_logits) and torch.equal(indices, twin_indices)


def test_a_copy_that_changes_only_a_helper_runs_its_own_kernels(monkeypatch, tmp_path):
    """The package and a model's remote code (a copy of the model folder, imported under another name) register
    their operators side by side: a copy that differs anywhere, even in a Python helper, runs its own."""
    folder = tmp_path / "remote" / "hypervq_remote_copy"
    shutil.copytree(Path(kernels.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    source = (folder / "cpu_kernels.py").read_text()
    helper = "    return tensor.detach().contiguous()\n"
    assert source.count(helper) == 1  # the copy's `_checked` doubles every input: its logits double
    (folder / "cpu_kernels.py").write_text(source.replace(helper, "    return tensor.detach().contiguous() * 2\n"))
    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HYPERVQ_NATIVE", "1")  # a remote copy runs the torch twins unless asked
    monkeypatch.syspath_prepend(str(tmp_path / "remote"))
    try:
        remote = importlib.import_module("hypervq_remote_copy.kernels")
        y, scale = _scores(50, 20)
        expected = _twin(kernels.mlr_logits_and_argmax)(y, scale)[0]
        torch.testing.assert_close(kernels.mlr_logits_and_argmax(y, scale)[0], expected)
        torch.testing.assert_close(remote.mlr_logits_and_argmax(y, scale)[0], 2 * scale * torch.asinh(2 * y))
        torch.testing.assert_close(kernels.mlr_logits_and_argmax(y, scale)[0], expected)
    finally:
        for name in [name for name in sys.modules if name.startswith("hypervq_remote_copy")]:
            del sys.modules[name]


def test_a_remote_code_copy_starts_no_compiler_unless_asked(tmp_path):
    """A model loaded with `trust_remote_code` imports a copy of this code: by default it builds no C library and
    compiles nothing, at any size."""
    folder = tmp_path / "remote" / "hypervq_remote_copy"
    shutil.copytree(Path(kernels.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path / 'remote')!r})\n"
        "torch.compile = lambda *a, **k: sys.exit('torch.compile called')\n"
        "from hypervq_remote_copy import cpu_kernels, kernels\n"
        "from hypervq_remote_copy.quantizers import HyperVQ\n"
        "quantizer = HyperVQ(64, 512).train()\n"
        "quantizer(torch.randn(4096, 64)).quantized.sum().backward()\n"  # 2^21 scores: past COMPILE_MIN_ELEMENTS
        "print(kernels.REMOTE_CODE, cpu_kernels._library is None)\n"
    )
    env = {**os.environ, "HF_HYPERVQ_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HYPERVQ_NATIVE", None), env.pop("HF_HYPERVQ_COMPILE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


MAPS = """\
7f0000000000-7f0000001000 r-xp 00000000 08:01 1234 {torch}/lib/libtorch_cpu.so
7f0000001000-7f0000002000 r-xp 00000000 08:01 1235 {torch}.libs/libgomp-a34b3233.so.1.0.0
7f0000002000-7f0000003000 r-xp 00000000 08:01 1236 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0
7f0000003000-7f0000004000 r-xp 00000000 08:01 1237 {site}/scipy/linalg/_decomp_lu_cython.cpython-311-x86_64-linux-gnu.so
7f0000004000-7f0000005000 rw-p 00000000 00:00 0
7f0000005000-7f0000006000 r-xp 00000000 08:01 1238 /opt/conda/lib/libomp.so
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_runtime_to_link_is_torchs_own(monkeypatch):
    torch_folder = os.path.dirname(os.path.realpath(torch.__file__))
    maps = MAPS.format(torch=torch_folder, site=os.path.dirname(torch_folder))
    assert cpu_kernels.openmp_runtimes(maps) == {
        f"{torch_folder}.libs/libgomp-a34b3233.so.1.0.0", "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",
        "/opt/conda/lib/libomp.so",
    }  # fmt: skip
    # an aarch64 wheel's renamed libgomp, with the system's and a conda libomp loaded by other libraries
    monkeypatch.setattr(cpu_kernels, "_process_maps", lambda: maps)
    assert cpu_kernels.torch_openmp_runtime() == f"{torch_folder}.libs/libgomp-a34b3233.so.1.0.0"
    # a conda torch linked to the environment's runtime: the only one mapped
    monkeypatch.setattr(cpu_kernels, "_process_maps", lambda: maps.splitlines()[-1])
    assert cpu_kernels.torch_openmp_runtime() == "/opt/conda/lib/libomp.so"
    # two runtimes, neither of them torch's: which one torch uses is unknown, so the kernels build without OpenMP
    monkeypatch.setattr(cpu_kernels, "_process_maps", lambda: "\n".join(maps.splitlines()[2:]))
    assert cpu_kernels.torch_openmp_runtime() is None and cpu_kernels.flag_sets(None)[0] == [
        *cpu_kernels.FLAGS, cpu_kernels.NATIVE
    ]  # fmt: skip


FAKE_RUNTIME = r"""
/* A stand-in OpenMP runtime under a renamed soname (as aarch64 torch wheels ship libgomp): one thread, counting
   the parallel regions it runs. */
int regions = 0;
void GOMP_parallel(void (*fn)(void *), void *data, unsigned threads, unsigned flags) { regions++; fn(data); }
void GOMP_barrier(void) {}
int omp_get_thread_num(void) { return 0; }
int omp_get_num_threads(void) { return 1; }
"""

RUN_WITHOUT_TORCH = r"""
import ctypes, math, random, sys
fake = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # the runtime the process already has, as torch's would be
library = ctypes.CDLL(sys.argv[2])
n, k = 200, 30
y = (ctypes.c_float * (n * k))(*[random.uniform(-4, 4) for _ in range(n * k)])
scale = (ctypes.c_float * k)(*[random.uniform(0.5, 1.5) for _ in range(k)])
logits, indices = (ctypes.c_float * (n * k))(), (ctypes.c_int64 * n)()
assert library.hvq_mlr_logits_argmax(y, scale, ctypes.c_int64(n), ctypes.c_int64(k), logits, indices, 2) == 0
best = [max(range(k), key=lambda j: scale[j] * math.asinh(y[i * k + j])) for i in range(n)]
maps = open("/proc/self/maps").read()
print(list(indices) == best, ctypes.c_int.in_dll(fake, "regions").value, "libgomp.so" in maps)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="links against a runtime file (Linux)")
def test_the_kernels_bind_to_the_runtime_torch_has_whatever_its_name(tmp_path):
    """Linked against the runtime file torch mapped, the library names that file's soname and no other: it runs
    its threads on that runtime and never loads a second one (`libgomp.so.1` beside a renamed copy)."""
    source = tmp_path / "fake.c"
    source.write_text(FAKE_RUNTIME)
    fake = tmp_path / "libgomp-deadbeef.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libgomp-deadbeef.so.1", str(source), "-o", str(fake)],
                   check=True)  # fmt: skip
    flags = [*cpu_kernels.FLAGS, cpu_kernels.OPENMP]
    library = tmp_path / "kernels.so"
    cpu_kernels._build(library, cpu_kernels._compiler(), flags, str(fake), _deadline())
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "[libgomp-deadbeef.so.1]" in needed and "[libgomp.so.1]" not in needed
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(fake), str(library)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "1", "False"]  # the right codes, on the fake's thread, no libgomp.so.1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernels_share_torchs_openmp_runtime():
    """Loading the library maps no OpenMP runtime beside torch's, with scikit-learn's loaded first (as in the
    training scripts), and the library runs with OpenMP (the best flag set)."""
    code = (
        "import torch, sklearn.metrics\n"
        "from hf_hypervq.models.hypervq import cpu_kernels\n"
        "runtimes = lambda: set(cpu_kernels.openmp_runtimes(cpu_kernels._process_maps()))\n"
        "before = runtimes()\n"
        "cpu_kernels.load_cpu_kernels()\n"
        "print(sorted(runtimes() - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and "run without" not in result.stderr
    assert cpu_kernels.torch_openmp_runtime() is not None


def test_the_kernels_are_built_once_and_without_a_compiler_everything_runs_eagerly(monkeypatch, tmp_path, caplog):
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        cpu_kernels.load_cpu_kernels()
        monkeypatch.setattr(cpu_kernels, "_library", None)
        cpu_kernels.load_cpu_kernels()  # from the cache
    assert len([r for r in caplog.records if "built the quantizer's CPU kernels" in r.message]) == 1
    assert len(list((tmp_path / "cache").glob("cpu_kernels-*.so"))) == 1

    _fresh_cpu_kernels(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(kernels, "_native_warned", False)
    y, scale = _scores(50, 20)
    with pytest.warns(
        UserWarning, match="could not build the quantizer's native CPU kernels .*false failed"
    ) as caught:
        logits, indices = kernels.mlr_logits_and_argmax(y, scale)
        q = HyperVQ(8, 16).train()
        q(torch.randn(30, 8)).quantized.sum().backward()
    assert len([w for w in caught if "native CPU kernels" in str(w.message)]) == 1
    twin_logits, twin_indices = _twin(kernels.mlr_logits_and_argmax)(y, scale)
    assert torch.equal(logits, twin_logits) and torch.equal(indices, twin_indices)


@pytest.mark.parametrize("c", [1.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_latents_equals_the_composition_in_value_and_gradient(dtype, c):
    """Rows from the origin (a zero latent) past the margin, where the projection clamps the norm."""
    generator = torch.Generator().manual_seed(0)
    norms = torch.logspace(-4, 1.5, 300, dtype=torch.float64)[:, None]
    z = (torch.randn(300, 8, generator=generator, dtype=torch.float64) * norms).to(dtype)
    z[0] = 0.0
    z.requires_grad_(True)
    weights = torch.randn(300, 9, generator=generator, dtype=torch.float64).to(dtype)
    folded = hyperbolic.fold_latents(z, c=c)
    (grad,) = torch.autograd.grad((folded * weights).sum(), z)
    # the reference: the composition, in float64 from the same inputs, with the input dtype's margin
    z64 = z.detach().double().requires_grad_(True)
    eps = hyperbolic.ball_margin(dtype)
    reference = hyperbolic.fold_ball_points(hyperbolic.expmap0_projected(z64, c=c, eps=eps), c=c)
    (reference_grad,) = torch.autograd.grad((reference * weights.double()).sum(), z64)
    # float64: the composition itself loses digits near the boundary, where 1 / (1 - c||x||^2) reaches 5e4
    tolerance = 2e-6 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(
        folded.double(), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item()
    )
    torch.testing.assert_close(grad.double(), reference_grad, rtol=tolerance,
                               atol=tolerance * reference_grad.abs().max().item())  # fmt: skip


def test_fold_latents_passes_gradcheck():
    z = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    z.data[:3] *= 10  # clamped by the margin
    assert torch.autograd.gradcheck(lambda z: hyperbolic.fold_latents(z, c=0.7, eps=1e-3), (z,))


def test_fold_latents_takes_leading_dimensions():
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert hyperbolic.fold_latents(z, c=0.7).shape == (3, 4, 6)
    assert torch.autograd.gradcheck(lambda z: hyperbolic.fold_latents(z, c=0.7, eps=1e-3), (z,))


@pytest.mark.parametrize("function", ["fold_latents", "mlr_logits"])
def test_a_double_backward_through_the_hand_written_backwards_raises(function):
    """Their backwards use saved per-row factors (or logits) as constants: a Hessian-vector product through them
    would be silently wrong (29% off for fold_latents), so a backward that builds a graph raises; a first-order one
    does not."""
    z = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    normals, offsets = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64) * 0.1
    output = {
        "fold_latents": lambda: hyperbolic.fold_latents(z, c=0.7),
        "mlr_logits": lambda: hyperbolic.mlr_logits(hyperbolic.expmap0_projected(z, c=0.7), normals, offsets, c=0.7),
    }[function]()
    with pytest.raises(RuntimeError, match="has no double backward"):
        torch.autograd.grad(output.square().sum(), z, create_graph=True)
    assert torch.autograd.grad(output.square().sum(), z)[0].shape == z.shape
