"""HyperVQ's native CPU kernels (`cpu_kernels.py`) against their torch twins in `kernels.py`, and the folded latents'
closed-form backward (`hyperbolic.fold_latents`)."""

import logging

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
    with torch_threads(1):
        one = cpu_kernels.cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature)
    with torch_threads(2):
        two = cpu_kernels.cpu_mlr_gumbel_forward(y, scale, seed, inverse_temperature)
    for a, b in zip(one, two):  # rows are independent: the same bits
        assert torch.equal(a, b)


def test_the_kernels_are_built_once_and_without_a_compiler_everything_runs_eagerly(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        cpu_kernels.load_cpu_kernels()
        monkeypatch.setattr(cpu_kernels, "_library", None)
        cpu_kernels.load_cpu_kernels()  # from the cache
    assert len([r for r in caplog.records if "built the quantizer's CPU kernels" in r.message]) == 1
    assert len(list((tmp_path / "cache").glob("cpu_kernels-*"))) == 1

    monkeypatch.setenv("HF_HYPERVQ_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(kernels, "_compile_error", None)
    y, scale = _scores(50, 20)
    with pytest.warns(
        UserWarning, match="compiling the quantizer's kernels failed .*false failed.*run eagerly"
    ) as caught:
        logits, indices = kernels.mlr_logits_and_argmax(y, scale)
        q = HyperVQ(8, 16).train()
        q(torch.randn(30, 8)).quantized.sum().backward()
    assert len([w for w in caught if "compiling the quantizer's kernels failed" in str(w.message)]) == 1
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
    tolerance = 1e-5 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(
        folded.double(), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item()
    )
    torch.testing.assert_close(grad.double(), reference_grad, rtol=tolerance,
                               atol=tolerance * reference_grad.abs().max().item())  # fmt: skip


def test_fold_latents_passes_gradcheck():
    z = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    z.data[:3] *= 10  # clamped by the margin
    assert torch.autograd.gradcheck(lambda z: hyperbolic.fold_latents(z, c=0.7, eps=1e-3), (z,))
