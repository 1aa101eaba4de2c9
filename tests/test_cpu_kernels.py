"""HyperVQ's native CPU kernels (`cpu_kernels.py`) against their torch twins in `kernels.py`, and the folded latents'
closed-form backward (`hyperbolic.fold_latents`)."""

import importlib
import logging
import os
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


@pytest.mark.parametrize("driver", ["gcc", "clang"])
def test_the_cache_key_is_the_target_the_compiler_resolves_for_march_native(driver, tmp_path, monkeypatch):
    keys = {}
    for cpu in ("n1", "a72"):
        compiler = _script(
            tmp_path / f"cc-{cpu}", f"echo 'Target: aarch64-linux-gnu' >&2\necho '{ARM_DRIVERS[driver, cpu]}' >&2\n"
        )
        target = cpu_kernels._native_target(compiler)
        assert target == cpu_kernels._native_target(compiler)  # the same CPU: the same key, whatever the temp names
        paths = {cpu_kernels._library_path(tmp_path, "cc", flags, target) for flags in cpu_kernels.FLAG_SETS}
        keys[cpu] = paths
    assert len(keys["n1"] | keys["a72"]) == 5  # the plain C library (no -march=native) is the same on both


def _fresh_cpu_kernels(monkeypatch, cache):
    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(cache))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_load_error", None)


def test_a_compiler_that_hangs_is_stopped(monkeypatch, tmp_path):
    # the compiler answers the -### query, then hangs in a child process (as cc1 would) that holds its output pipes
    _fresh_cpu_kernels(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("CC", _script(tmp_path / "cc", 'case "$*" in *-###*) exit 0;; esac\nsleep 60\n'))
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 1)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="took more than 1 s; stopped it"):
        cpu_kernels.load_cpu_kernels()
    assert time.perf_counter() - started < 20
    with pytest.raises(RuntimeError, match="took more than 1 s"):  # remembered for this process: no second wait
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
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('cpu_kernels', {cpu_kernels.__file__!r})\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "y, scale = module.torch.randn(40, 20), module.torch.rand(20) + 0.5\n"
    "print(module.cpu_mlr_logits_and_argmax(y, scale)[1].tolist() == (y.asinh() * scale).argmax(-1).tolist())\n"
)


def _load_in_fresh_processes(tmp_path, count, compiler):
    env = {**os.environ, "CC": compiler, "HF_HYPERVQ_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(count)]  # fmt: skip
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0 and stdout.strip() == "True", stderr[-2000:]
    calls = (tmp_path / "calls").read_text().splitlines()
    return [call for call in calls if "-shared" in call]


def test_a_failing_flag_set_is_remembered_and_not_retried_in_the_next_process(tmp_path):
    # like Apple's clang, which has no -fopenmp
    compiler = _script(tmp_path / "cc", f'echo "$*" >> {tmp_path}/calls\ncase "$*" in *-fopenmp*) '
                       'echo "clang: error: unsupported option -fopenmp" >&2; exit 1;; esac\nexec gcc "$@"\n')  # fmt: skip
    builds = _load_in_fresh_processes(tmp_path, 1, compiler)
    assert len(builds) == 2 and "-fopenmp" in builds[0] and "-fopenmp" not in builds[1]
    assert _load_in_fresh_processes(tmp_path, 1, compiler) == builds  # the second process builds nothing
    assert len(list((tmp_path / "cache").glob("*.failed"))) == 1


def test_processes_starting_together_build_once(tmp_path):
    compiler = _script(tmp_path / "cc", f'echo "$*" >> {tmp_path}/calls\nsleep 1\nexec gcc "$@"\n')
    assert len(_load_in_fresh_processes(tmp_path, 3, compiler)) == 1


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


def test_two_copies_of_the_code_in_one_process_each_run_their_own_kernels(monkeypatch, tmp_path):
    """The package and a model's remote code (a copy of the model folder, imported under another name) register
    their operators side by side: a copy whose C code differs runs its own."""
    folder = tmp_path / "remote" / "hypervq_remote_copy"
    shutil.copytree(Path(kernels.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    source = (folder / "cpu_kernels.py").read_text()
    tokenization = "return run_rows(mlr_logits_argmax_rows, &a, N, threads, 0, 0);"
    assert source.count(tokenization) == 1  # the copy's tokenization gives code 7 to every row
    (folder / "cpu_kernels.py").write_text(
        source.replace(tokenization, "run_rows(mlr_logits_argmax_rows, &a, N, threads, 0, 0);\n"
                       "    for (int64_t n = 0; n < N; n++) indices[n] = 7;\n    return 0;")
    )  # fmt: skip
    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "remote"))
    try:
        remote = importlib.import_module("hypervq_remote_copy.kernels")
        y, scale = _scores(50, 20)
        expected = _twin(kernels.mlr_logits_and_argmax)(y, scale)[1]
        assert torch.equal(kernels.mlr_logits_and_argmax(y, scale)[1], expected)
        assert torch.equal(remote.mlr_logits_and_argmax(y, scale)[1], torch.full((50,), 7))
        assert torch.equal(kernels.mlr_logits_and_argmax(y, scale)[1], expected)
    finally:
        for name in [name for name in sys.modules if name.startswith("hypervq_remote_copy")]:
            del sys.modules[name]


MAPS = """\
7f0000000000-7f0000001000 r-xp 00000000 08:01 1234 {torch}/lib/libtorch_cpu.so
7f0000001000-7f0000002000 r-xp 00000000 08:01 1235 {torch}/lib/libgomp-a34b3233.so.1
7f0000002000-7f0000003000 r-xp 00000000 08:01 1236 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0
7f0000003000-7f0000004000 r-xp 00000000 08:01 1237 {site}/scipy/linalg/_decomp_lu_cython.cpython-311-x86_64-linux-gnu.so
7f0000004000-7f0000005000 rw-p 00000000 00:00 0
7f0000005000-7f0000006000 r-xp 00000000 08:01 1238 /opt/conda/lib/libomp.so
"""


def test_a_second_openmp_runtime_is_detected_and_the_kernels_then_use_one_thread(monkeypatch, caplog):
    maps = MAPS.format(torch="/site/torch", site="/site")
    assert cpu_kernels.openmp_runtimes(maps) == {
        "/site/torch/lib/libgomp-a34b3233.so.1", "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0", "/opt/conda/lib/libomp.so"
    }  # fmt: skip
    # before: a torch wheel's renamed libgomp; after loading the library: the system's libgomp.so.1 too
    snapshots = iter(["\n".join(maps.splitlines()[:2]), "\n".join(maps.splitlines()[:3])])
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_single_thread", False)
    monkeypatch.setattr(cpu_kernels, "_process_maps", lambda: next(snapshots))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        cpu_kernels.load_cpu_kernels()
    assert cpu_kernels._threads(1 << 24) == 1 and "they run on one thread" in caplog.text
    assert "libgomp.so.1.0.0" in caplog.text and "a34b3233" not in caplog.text


def test_another_librarys_openmp_runtime_is_not_taken_for_a_second_pool(monkeypatch):
    """scikit-learn's wheels bring a libgomp of their own, mapped before the kernels load: not ours."""
    two_before = "\n".join(MAPS.format(torch="/site/torch", site="/site").splitlines()[:3])
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_single_thread", False)
    monkeypatch.setattr(cpu_kernels, "_process_maps", lambda: two_before)
    cpu_kernels.load_cpu_kernels()
    assert not cpu_kernels._single_thread


def test_the_kernels_share_torchs_openmp_runtime():
    """Loading the library maps no OpenMP runtime beside torch's, with scikit-learn's loaded first (as in the
    training scripts). Where this fails, two thread pools would compete (the kernels then run on one thread)."""
    code = (
        "import torch, sklearn.metrics\n"
        "from hf_hypervq.models.hypervq import cpu_kernels\n"
        "before = cpu_kernels._openmp_runtimes_now()\n"
        "cpu_kernels.load_cpu_kernels()\n"
        "print(len(before), sorted(cpu_kernels._openmp_runtimes_now() - before), cpu_kernels._single_thread)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(None, 1)[1].strip() == "[] False"


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
