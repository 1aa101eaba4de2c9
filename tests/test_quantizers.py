"""The five quantizers behind the shared interface (`VectorQuantizer`, `QuantizerOutput`)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_hypervq import GumbelVQ, HyperEmbMatVQ, HyperKmeansVQ, HyperVQ, KmeansVQ, QuantizerOutput
from hf_hypervq.models.hypervq import kernels
from hf_hypervq.models.hypervq.quantizers import decay_for_run


ALL = [HyperVQ, KmeansVQ, GumbelVQ, HyperKmeansVQ, HyperEmbMatVQ]
MLR_OR_GUMBEL = {HyperVQ, GumbelVQ, HyperEmbMatVQ}
DIM, K = 8, 16


@pytest.fixture(params=ALL, ids=lambda cls: cls.__name__)
def quantizer_cls(request):
    return request.param


@pytest.fixture
def device():
    """Where the tests that hold a quantizer to its reference formula run: HF_HYPERVQ_TEST_DEVICE, default cpu
    (tools/check_device.py runs them on a GPU this way)."""
    return os.environ.get("HF_HYPERVQ_TEST_DEVICE", "cpu")


@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (2, 3, 4)])
def test_any_leading_shape(quantizer_cls, leading):
    q = quantizer_cls(DIM, K)
    z = torch.randn(*leading, DIM)
    for mode in ("train", "eval"):
        q.train(mode == "train")
        out = q(z)
        assert isinstance(out, QuantizerOutput)
        assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
        assert out.indices.shape == leading and out.indices.dtype == torch.int64
        assert out.loss.shape == () and out.perplexity.shape == ()
        assert 1 - 1e-5 <= out.perplexity <= K
        if quantizer_cls in MLR_OR_GUMBEL:
            assert out.logits.shape == (*leading, K) and out.logits.dtype == torch.float32
        else:
            assert out.logits is None
        assert q.codebook.shape == (K, DIM)


def test_eval_is_deterministic_and_matches_indices_to_codes(quantizer_cls, device):
    q = quantizer_cls(DIM, K).to(device).eval()
    z = torch.randn(4, 10, DIM, device=device)
    first = q(z)
    torch.manual_seed(123)  # eval must not draw noise
    second = q(z)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.quantized, second.quantized)
    assert torch.equal(q.indices_to_codes(first.indices), first.quantized)
    if first.logits is not None:
        assert torch.equal(first.indices, first.logits.argmax(-1))


def test_training_output_is_exactly_the_chosen_code(quantizer_cls, device):
    q = quantizer_cls(DIM, K).to(device).train()
    out = q(torch.randn(50, DIM, device=device))
    assert torch.equal(out.quantized, q.indices_to_codes(out.indices))


def test_hypervq_codebook_is_offset_times_unit_normal(device):
    q = HyperVQ(DIM, K).to(device)
    unit = q.normals / q.normals.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(q.codebook, q.offsets[:, None] * unit)
    # weight norm (HNN++): a_k = g_k v_k / |v_k|, with g_k = |v_k| at initialisation
    torch.testing.assert_close(q.normals.norm(dim=-1), q.normal_scales.abs())
    torch.testing.assert_close(q.normal_scales, q.normal_directions.norm(dim=-1))
    z = torch.randn(3, 5, DIM, device=device)
    torch.testing.assert_close(q.logits(z), q.eval()(z).logits)


def test_hypervq_train_samples_codes_from_softmax_of_logits(device):
    """Gumbel-max: the training codes are draws from Categorical(softmax(logits)), whatever the temperature."""
    q = HyperVQ(4, 3, curvature=1.0).to(device)
    with torch.no_grad():
        q.normal_directions.copy_(torch.eye(3, 4))
        q.normal_scales.fill_(1.0)
        q.offsets.fill_(0.1)
    z = torch.full((40000, 4), 0.3, device=device)
    z[:, 3] = 0.0
    out = q.train()(z)
    probs = torch.softmax(out.logits[0].cpu(), -1)  # float64 below on the CPU: not every device has it
    freq = torch.bincount(out.indices.cpu(), minlength=3).double() / len(z)
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)


@pytest.fixture(params=["native", "eager", "compiled"])
def kernel_path(request, monkeypatch):
    """The path the fused kernels take: "native" (the default: C loops on CPU tensors, compiled twins on large
    inputs elsewhere), "eager" (the torch twins, unfused) or "compiled" (the twins through inductor, whatever the
    size and device: what CUDA and MPS run). Checks that "compiled" really compiled."""
    if request.param != "native":
        kernels.set_compiled_kernels(request.param == "compiled")
        kernels.set_native_cpu_kernels(False)
    try:
        yield request.param
    finally:
        kernels.set_compiled_kernels(None)
        kernels.set_native_cpu_kernels(True)
    if request.param == "compiled":  # no silent fallback to eager
        assert kernels._compile_error is None and kernels._compiled, "no kernel went through torch.compile"


@pytest.mark.parametrize("cls", [HyperVQ, GumbelVQ])
def test_gumbel_straight_through_equals_gumbel_softmax_reference(cls, kernel_path, device):
    """Same noise, same values and gradients as `y = onehot - sg(y_soft) + y_soft; y @ codebook`, with the fused
    kernels on each path; a loss on the logits as well reaches them through every path."""
    torch.manual_seed(0)
    q = cls(DIM, K).to(device).train()
    q.set_num_updates(50_000)
    z = torch.randn(64, DIM, device=device, requires_grad=True)
    weights, logit_weights = torch.randn(64, DIM, device=device), torch.randn(64, K, device=device)

    torch.manual_seed(7)
    out = q(z)
    ((out.quantized * weights).sum() + (out.logits * logit_weights).sum()).backward()
    kernels.set_compiled_kernels(None)
    kernels.set_native_cpu_kernels(True)
    parameters = (z, *q.parameters())
    grads = [t.grad.clone() for t in parameters]
    for t in parameters:
        t.grad = None

    torch.manual_seed(7)
    noise = kernels.gumbel_noise(kernels.draw_seed(device), 64, K, device)  # the draw the step made
    logits = q.logits(z) if cls is HyperVQ else z @ q.projection_weight.T + q.projection_bias
    y_soft = torch.softmax((logits + noise) / q.current_temperature, -1)
    y_hard = F.one_hot(y_soft.argmax(-1), K).float()
    quantized = (y_hard - y_soft.detach() + y_soft) @ q.codebook
    ((quantized * weights).sum() + (logits * logit_weights).sum()).backward()
    assert torch.equal(out.indices, y_soft.argmax(-1))
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(out.logits, logits)
    for got, t in zip(grads, parameters):  # float32 rounding, relative to each gradient's scale
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5 * t.grad.abs().max().item())


def test_counter_noise_is_uniform_independent_and_a_function_of_seed_and_position():
    seed = torch.tensor(12345, dtype=torch.int32)
    u = kernels.counter_uniform(seed, 2048, 512, "cpu").double()
    assert 0 < u.min() and u.max() < 1
    # uniform: 64 equal bins, chi-square with 63 degrees of freedom (p = 1e-6 at 130)
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    assert ((counts - expected) ** 2 / expected).sum() < 130
    assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1 / 12) < 1e-3
    # no correlation between neighbours in a row, in a column, or between two seeds (|r| ~ 1/sqrt(n) = 1e-3)
    other_seed = kernels.counter_uniform(seed + 1, 2048, 512, "cpu").double()
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, other_seed)):
        assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]) < 6e-3
    # a function of (seed, position): the same block of a larger draw, and the same again
    torch.testing.assert_close(kernels.counter_uniform(seed, 4096, 512, "cpu")[:2048].double(), u, rtol=0, atol=0)
    assert not torch.equal(u, other_seed)


def test_uniform_numbers_never_reach_0_or_1_so_the_noise_is_finite():
    extremes = torch.tensor([0, 511, -1, 0x7FFFFFFF, -0x80000000], dtype=torch.int32)  # all bits 0 / 1
    u = kernels.uniform_from_bits(extremes)
    assert 0 < u.min() and u.max() < 1
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_fused_kernels_draw_the_same_noise_on_every_path(kernel_path, device):
    """The fused kernels must be the eager ones: the same Gumbel draw bit for bit (the integer hash and the argmax),
    the same soft sample to float32 rounding."""
    y, scale = torch.randn(300, 70, device=device), torch.rand(70, device=device) + 0.5
    seed = torch.tensor(99, dtype=torch.int32, device=device)
    inverse_temperature = torch.tensor(0.8, device=device)
    logits, indices, weights, inverse_total = kernels.mlr_gumbel_forward(y, scale, seed, inverse_temperature)
    # the float64 reference on the CPU (not every device has float64), from the device's own noise
    reference_logits = scale.cpu().double() * torch.asinh(y.cpu().double())
    perturbed = reference_logits + kernels.gumbel_noise(seed, 300, 70, device).cpu().double()
    torch.testing.assert_close(logits.cpu().double(), reference_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices.cpu(), perturbed.argmax(-1))
    torch.testing.assert_close((weights * inverse_total).cpu().double(), torch.softmax(perturbed * 0.8, -1),
                               rtol=1e-5, atol=1e-7)  # fmt: skip


def test_argmax_kernel_takes_the_first_maximum_like_torch():
    scores = torch.randn(50, 33)
    scores[4, [3, 20]] = 10.0
    scores[5] = 1.0
    assert torch.equal(kernels.argmax(scores), scores.argmax(-1))


def _grads(q, z, term):
    q.zero_grad()
    z.grad = None
    out = q(z)
    value = out.quantized.pow(2).sum() if term == "quantized" else out.loss
    if value.requires_grad:
        value.backward()
    named = {"z": z.grad, **{n: p.grad for n, p in q.named_parameters()}}
    return {n for n, g in named.items() if g is not None and g.abs().sum() > 0}


# Which parameters receive gradient from the decoder's side (a loss on `quantized`) and from `out.loss`.
GRADIENT_PATHS = {
    HyperVQ: ({"z", "normal_directions", "normal_scales", "offsets"}, set()),  # no loss term by default
    HyperEmbMatVQ: ({"z", "normal_directions", "normal_scales", "offsets", "embedding"}, set()),
    GumbelVQ: ({"z", "projection_weight", "projection_bias", "embedding"}, set()),
    KmeansVQ: ({"z"}, {"z", "embedding"}),
    HyperKmeansVQ: ({"z"}, {"z", "embedding"}),
}


def test_gradient_paths(quantizer_cls):
    from_quantized, from_loss = GRADIENT_PATHS[quantizer_cls]
    q = quantizer_cls(DIM, K).train()
    z = torch.randn(256, DIM, requires_grad=True)
    assert _grads(q, z, "quantized") == from_quantized
    assert _grads(q, z, "loss") == from_loss


def test_training_gradients_repeat_bit_for_bit(quantizer_cls, torch_threads):
    """A seeded training run must repeat itself: no parameter gradient may depend on the order in which threads
    accumulate (on CPU, the backward of `codebook[indices]` does)."""
    q = quantizer_cls(64, 64).train()
    z = torch.randn(16384, 64)
    cotangent = torch.randn(16384, 64)

    def gradients():
        q.zero_grad()
        torch.manual_seed(0)  # the same Gumbel noise each time
        out = q(z)
        ((out.quantized * cotangent).sum() + out.loss).backward()
        return [p.grad.clone() for p in q.parameters()]

    with torch_threads(2):
        for _ in range(3):  # geoopt's TorchScript functions run differently fused until profiled (two calls)
            gradients()
        first = gradients()
        for _ in range(10):
            assert all(torch.equal(a, b) for a, b in zip(first, gradients()))


@pytest.mark.parametrize("cls", [KmeansVQ, HyperKmeansVQ])
def test_codebook_loss_moves_only_the_codebook_and_commitment_only_the_input(cls, device):
    z = torch.randn(256, DIM, device=device, requires_grad=True)
    assert _grads(cls(DIM, K, commitment_weight=0.0).to(device).train(), z, "loss") == {"embedding"}
    q = cls(DIM, K, commitment_weight=1.0).to(device)
    out = q(z)
    codes = q.indices_to_codes(out.indices).detach()
    torch.testing.assert_close(out.loss, 2 * F.mse_loss(z, codes))


@pytest.mark.parametrize("cls", [HyperVQ, HyperEmbMatVQ])
def test_mlr_quantizers_train_on_reconstruction_alone_by_default(cls):
    """The paper's Algorithm 1 has no commitment term; an optional one reaches only the input."""
    z = torch.randn(64, DIM, requires_grad=True)
    assert cls(DIM, K).commitment_weight == 0
    assert cls(DIM, K).train()(z).loss == 0
    assert _grads(cls(DIM, K, commitment_weight=0.25).train(), z, "loss") == {"z"}


def test_hyper_emb_mat_vq_shares_hyperplanes_with_hypervq_for_a_seed():
    torch.manual_seed(3)
    hyper = HyperVQ(DIM, K)
    torch.manual_seed(3)
    ablation = HyperEmbMatVQ(DIM, K)
    for name in ("normal_directions", "normal_scales", "offsets"):
        assert torch.equal(getattr(hyper, name), getattr(ablation, name)), name


def test_hyperplane_init_scales():
    torch.manual_seed(0)
    base = HyperVQ(DIM, K)
    torch.manual_seed(0)
    scaled = HyperVQ(DIM, K, offset_init_scale=8.0, normal_init_scale=4.0)
    torch.testing.assert_close(scaled.offsets, 8 * base.offsets)
    torch.testing.assert_close(scaled.normals, 4 * base.normals)
    assert torch.all(HyperVQ(DIM, K, offset_init_scale=0.0).offsets == 0)  # HNN++'s zeros
    assert 0 < base.offsets.min() and base.offsets.max() <= (DIM**-0.5)
    with pytest.raises(ValueError, match="normal_init_scale"):
        HyperVQ(DIM, K, normal_init_scale=0.0)
    with pytest.raises(ValueError, match="offset_init_scale"):
        HyperVQ(DIM, K, offset_init_scale=-1.0)


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "gumbel"])
def test_decay_for_run_reaches_tau_min_at_the_last_update(quantizer_type, run_training_loop):
    """Driven by the real training loop: it calls `set_num_updates(j)` after update j, so the last of 7 updates
    runs at index 6 (`decay_for_run` used to reach tau_min at index 7, which no update of the run used)."""
    from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel

    steps = 7  # 3 batches per epoch: the run ends inside its third epoch
    config = HyperVQVAEConfig(hidden_size=8, residual_hidden_size=4, embedding_dim=4, codebook_size=8,
                              num_residual_layers=1, quantizer_type=quantizer_type,
                              gumbel_temperature=[2.0, 0.5, decay_for_run(2.0, 0.5, steps)])  # fmt: skip
    model = HyperVQVAEModel(config)
    temperatures = []  # the temperature of every training forward, as the quantizer draws with it
    model.quantizer.register_forward_pre_hook(
        lambda quantizer, inputs: temperatures.append(quantizer.current_temperature) if quantizer.training else None
    )
    run_training_loop(model, steps, num_batches=3)
    assert len(temperatures) == steps
    assert temperatures[0] == 2.0 and temperatures[3] == pytest.approx(1.0)  # the middle update, geometrically
    assert temperatures[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:]))  # no update of the run is spent at tau_min


def test_decay_for_run_of_one_update_and_bad_values():
    # a single update runs at tau_max whatever the decay; training continued past it goes on at tau_min
    q = HyperVQ(DIM, K, temperature=(2.0, 0.5, decay_for_run(2.0, 0.5, 1)))
    assert q.current_temperature == 2.0
    q.set_num_updates(1)
    assert q.current_temperature == pytest.approx(0.5)
    assert decay_for_run(1.0, 1.0, 10) == 1.0
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="num_updates"):
            decay_for_run(2.0, 0.5, bad)
    with pytest.raises(ValueError, match="tau_min"):
        decay_for_run(0.5, 2.0, 10)


@pytest.mark.parametrize("cls", [HyperVQ, HyperEmbMatVQ])
def test_commitment_weight_scales_the_only_loss_term(cls, device):
    z = torch.randn(64, DIM, device=device)
    q = cls(DIM, K, commitment_weight=0.5).to(device).eval()
    out = q(z)
    torch.testing.assert_close(out.loss, 0.5 * F.mse_loss(z, out.quantized))
    assert cls(DIM, K, commitment_weight=0.0).to(device).eval()(z).loss == 0


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 30.0, 1e3])
def test_finite_outputs_and_gradients_for_large_inputs(quantizer_cls, scale):
    q = quantizer_cls(DIM, K).train()
    z = (torch.randn(128, DIM) * scale / DIM**0.5).requires_grad_()
    out = q(z)
    for t in (out.quantized, out.loss, out.perplexity, *([] if out.logits is None else [out.logits])):
        assert torch.isfinite(t).all()
    (out.quantized.sum() + out.loss + (0 if out.logits is None else out.logits.mean())).backward()
    receivers = set.union(*GRADIENT_PATHS[quantizer_cls])  # a gradient that never arrives must fail, too
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, t in {"z": z, **dict(q.named_parameters())}.items():
        if name in receivers:
            assert t.grad is not None and torch.isfinite(t.grad).all(), name
        else:
            assert t.grad is None or torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_inputs(quantizer_cls, dtype):
    q = quantizer_cls(DIM, K).train()
    lin = torch.nn.Linear(DIM, DIM)
    x = torch.randn(64, DIM) * 5
    with torch.autocast("cpu", dtype=dtype):
        z = lin(x)
        assert z.dtype == dtype
        out = q(z)
    assert out.quantized.dtype == dtype
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)
    assert out.logits is None or (out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all())
    (out.quantized.float().sum() + out.loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in [*lin.parameters()] if p.grad is not None)


def test_quantizer_parameters_cast_to_bf16_still_compute_in_fp32(quantizer_cls):
    q = quantizer_cls(DIM, K).to(torch.bfloat16)
    out = q(torch.randn(32, DIM, dtype=torch.bfloat16))
    assert out.quantized.dtype == torch.bfloat16
    assert out.logits is None or out.logits.dtype == torch.float32


def test_temperature_schedule():
    for q in (HyperVQ(DIM, K), GumbelVQ(DIM, K), HyperEmbMatVQ(DIM, K, temperature=(4.0, 1.0, 0.9))):
        tau_max, tau_min, decay = q.temperature
        assert q.current_temperature == tau_max
        q.set_num_updates(10)
        assert q.current_temperature == pytest.approx(max(tau_max * decay**10, tau_min))
        q.set_num_updates(10**9)
        assert q.current_temperature == tau_min
    KmeansVQ(DIM, K).set_num_updates(5)  # a no-op where there is no schedule


def test_perplexity_counts_code_usage(device):
    q = KmeansVQ(2, 4).to(device)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    assert q(torch.tensor([[1.0, 0.1]] * 6, device=device)).perplexity.item() == pytest.approx(1.0)
    z = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], device=device).repeat(3, 1)
    assert q(z).perplexity.item() == pytest.approx(4.0, rel=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_k_by_dim_tensor(quantizer_cls):
    """The closed forms keep every intermediate at O(N*K) (the naive Möbius form would be N*K*dim)."""
    n, k, dim = 256, 64, 32
    q = quantizer_cls(dim, k).train()
    z = torch.randn(n, dim, requires_grad=True)
    with _LargestTensor() as mode:
        out = q(z)
        (out.quantized.sum() + out.loss).backward()
    assert mode.largest <= n * k


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: HyperVQ(8, 1), ValueError, "codebook_size"),
        (lambda: KmeansVQ(8, 0), ValueError, "codebook_size"),
        (lambda: GumbelVQ(0, 16), ValueError, "dim"),
        (lambda: HyperVQ(8, 16, curvature=0), ValueError, "curvature"),
        (lambda: HyperKmeansVQ(8, 16, curvature=-1.0), ValueError, "curvature"),
        (lambda: HyperEmbMatVQ(8, 16, curvature=float("nan")), ValueError, "curvature"),
        (lambda: KmeansVQ(8, 16, commitment_weight=-1), ValueError, "commitment_weight"),
        (lambda: GumbelVQ(8, 16, temperature=(0.5, 2.0, 0.9)), ValueError, "temperature"),
        (lambda: HyperVQ(8, 16, temperature=2.0), ValueError, "temperature"),
        (lambda: HyperVQ(8, 16, ball_eps=1.5), ValueError, "ball_eps"),
        (lambda: HyperVQ(8, 16, curvature=float("inf")), ValueError, "curvature"),  # was an all-zero codebook
        (lambda: HyperVQ(8, 16).set_num_updates(-10), ValueError, "num_updates"),  # was tau above tau_max
        (lambda: GumbelVQ(8, 16).set_num_updates("100"), ValueError, "num_updates"),  # was a raw TypeError
        (lambda: KmeansVQ(8, 16).set_num_updates(1.5), ValueError, "num_updates"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "z, error, match",
    [
        (torch.randn(4, 7), ValueError, r"\(\.\.\., dim=8\)"),
        (torch.randn(()), ValueError, "dim=8"),
        (torch.randint(0, 5, (4, 8)), TypeError, "floating-point"),
        ([[0.0] * 8], TypeError, "torch.Tensor"),
        (torch.tensor([[float("nan")] * 8]), ValueError, "NaN or inf"),
        (torch.tensor([[float("inf")] + [0.0] * 7]), ValueError, "NaN or inf"),
        (torch.empty(0, 8), ValueError, "at least one"),
        (torch.full((4, 8), 1e20), ValueError, "too large"),  # was an inf loss without an error
        (torch.full((4, 8), 1e30), ValueError, "too large"),
    ],
)
def test_bad_input(quantizer_cls, z, error, match):
    with pytest.raises(error, match=match):
        quantizer_cls(8, 16).eval()(z)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), 1e20])
def test_a_non_finite_latent_in_training_makes_the_loss_nan_instead_of_raising(quantizer_cls, bad_value):
    """A training step goes on (a GradScaler then skips it): no error, no device-side assert; the loss says it."""
    quantizer = quantizer_cls(8, 16).train()
    z = torch.randn(6, 8)
    z[2, 3] = bad_value
    out = quantizer(z.requires_grad_(True))
    assert torch.isnan(out.loss)
    assert ((out.indices >= 0) & (out.indices < 16)).all()  # still valid ids: nothing reads out of range
    clean = quantizer(torch.randn(6, 8))
    assert torch.isfinite(clean.loss)


def test_indices_to_codes_rejects_bad_ids(quantizer_cls):
    q = quantizer_cls(DIM, K)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.indices_to_codes(torch.tensor([0, K]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        q.indices_to_codes(torch.tensor([0.0]))
    assert q.indices_to_codes(torch.tensor([[0, K - 1]], dtype=torch.int32)).shape == (1, 2, DIM)


def test_without_a_working_compiler_every_kernel_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    def no_c_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_compile_error", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(kernels, "load_cpu_kernels", no_c_compiler)
    kernels.set_compiled_kernels(True)
    try:
        y, scale = torch.randn(50, 20), torch.rand(20) + 0.5
        with pytest.warns(
            UserWarning, match="compiling the quantizer's kernels failed .*no C.. compiler.*eagerly"
        ) as caught:
            logits, indices = kernels.mlr_logits_and_argmax(y, scale)
            assert torch.equal(kernels.argmax(logits), indices)
            q = HyperVQ(DIM, K).train()
            q(torch.randn(30, DIM)).quantized.sum().backward()
    finally:
        kernels.set_compiled_kernels(None)
    assert len([w for w in caught if "kernels failed" in str(w.message)]) == 1
    torch.testing.assert_close(logits, scale * torch.asinh(y))


# ---- options beyond the paper: the diversity loss (three Gumbel quantizers) and feature clipping (MLR ones) ----

GUMBEL_QUANTIZERS = [HyperVQ, GumbelVQ, HyperEmbMatVQ]


def _reference_logits(q, z, feature_clip=None):
    """The quantizer's logits in plain torch: GumbelVQ's linear layer, or HNN++'s closed-form hyperbolic MLR
    (`hyperbolic.mlr_logits`) of `expmap0(z)`, after `min(1, r / ||z||) * z` with a clip radius r."""
    if feature_clip is not None:
        z = z * torch.clamp(feature_clip / z.norm(dim=-1, keepdim=True), max=1.0)
    if isinstance(q, GumbelVQ):
        return z @ q.projection_weight.T + q.projection_bias
    s = q.curvature**0.5
    norms = z.norm(dim=-1, keepdim=True)
    x = torch.tanh(s * norms) * z / (s * norms)  # the tests' latents stay inside the projection margin
    normals = q.normal_scales[:, None] * q.normal_directions / q.normal_directions.norm(dim=-1, keepdim=True)
    normal_norms = normals.norm(dim=-1)
    cx2 = q.curvature * x.pow(2).sum(-1, keepdim=True)
    two_s_r = 2 * s * q.offsets
    distances = x @ (normals / normal_norms[:, None]).T
    argument = 2 * s * distances * torch.cosh(two_s_r) - (1 + cx2) * torch.sinh(two_s_r)
    return 2 * normal_norms / s * torch.asinh(argument / (1 - cx2))


def _reference_diversity(logits, weight):
    """wav2vec 2.0's diversity loss as fairseq computes it (one group): `avg_probs` is the batch mean of the softmax,
    `prob_perplexity` its exp-entropy, the loss `(num_vars - prob_perplexity) / num_vars`."""
    avg_probs = torch.softmax(logits, dim=-1).mean(dim=0)
    prob_perplexity = torch.exp(torch.special.entr(avg_probs).sum())
    return weight * (logits.shape[-1] - prob_perplexity) / logits.shape[-1]


def _gradients(q, z):
    return [z.grad.clone()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in q.parameters()]


@pytest.mark.parametrize("native", [True, False], ids=["native", "twin"])
@pytest.mark.parametrize("cls", GUMBEL_QUANTIZERS)
def test_diversity_loss_equals_the_fairseq_reference(cls, native, device):
    """Value and gradients (input and parameters) of the term equal autograd through plain torch, on the native
    CPU kernels and on their torch twins (what CUDA and MPS run); with a decoder-side loss as well, the term's
    gradient adds to the straight-through one (HyperVQ's fused backward takes it as `grad_logits`)."""
    kernels.set_native_cpu_kernels(native)
    try:
        torch.manual_seed(0)
        q = cls(DIM, K, diversity_weight=0.3).to(device).train()
        plain = cls(DIM, K).to(device).train()
        plain.load_state_dict(q.state_dict())
        z = (0.5 * torch.randn(64, DIM, device=device)).requires_grad_(True)
        cotangent = torch.randn(64, DIM, device=device)

        out = q(z)
        out.loss.backward()
        got = _gradients(q, z)
        q.zero_grad()
        z.grad = None
        expected_loss = _reference_diversity(_reference_logits(q, z), 0.3)
        expected_loss.backward()
        expected = _gradients(q, z)
        torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-7)
        assert expected_loss > 0
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())

        # with the decoder's gradient too: the same draw (seed) with and without the term differs by the term alone
        totals = []
        for quantizer in (q, plain):
            quantizer.zero_grad()
            z.grad = None
            torch.manual_seed(7)
            out = quantizer(z)
            ((out.quantized * cotangent).sum() + out.loss).backward()
            totals.append(_gradients(quantizer, z))
        for with_term, without, e in zip(*totals, expected):
            torch.testing.assert_close(with_term - without, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
    finally:
        kernels.set_native_cpu_kernels(True)


@pytest.mark.parametrize("cls", GUMBEL_QUANTIZERS)
def test_diversity_loss_is_zero_in_eval_and_with_weight_0(cls):
    z = torch.randn(64, DIM)
    weighted = cls(DIM, K, diversity_weight=0.3)
    assert weighted.train()(z).loss > 0
    assert weighted.eval()(z).loss == 0
    with torch.no_grad():  # tokenization
        assert weighted(z).loss == 0
    off = cls(DIM, K)
    assert off.diversity_weight == 0.0 and off.train()(z.requires_grad_(True)).loss == 0
    assert "diversity_weight=0.3" in repr(weighted) and "diversity_weight" not in repr(off)


def _codes_used_after_training(cls, diversity_weight, steps=50):
    """Distinct eval codes of 512 fixed random latents, bunched in one region (1 + 0.3 N(0, 1): few codes win
    there), after `steps` Adam updates of a K = 32 quantizer on `mse(quantized, z)` plus its own loss."""
    torch.manual_seed(0)
    q = cls(DIM, 32, diversity_weight=diversity_weight)
    z = 1.0 + 0.3 * torch.randn(512, DIM, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-2)
    for step in range(steps):
        q.train().set_num_updates(step)
        out = q(z)
        loss = F.mse_loss(out.quantized, z) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return q.eval()(z).indices.unique().numel()


@pytest.mark.parametrize("cls", GUMBEL_QUANTIZERS)
def test_diversity_loss_raises_the_number_of_codes_used(cls):
    # measured: 4 -> 18 codes (HyperVQ), 5 -> 26 (GumbelVQ), 3 -> 17 (HyperEmbMatVQ)
    without, with_term = _codes_used_after_training(cls, 0.0), _codes_used_after_training(cls, 0.3)
    assert with_term >= 2 * without, (without, with_term)


@pytest.mark.parametrize("cls", [HyperVQ, HyperEmbMatVQ])
def test_feature_clip_caps_the_norm_before_the_ball_map(cls):
    """The logits of clipped latents are those of latents rescaled beforehand to norm <= r, in training (same draw)
    and eval, with the gradient of `min(1, r / ||z||) * z`; latents shorter than r are left as they are."""
    radius = 1.0
    torch.manual_seed(0)
    clipped = cls(DIM, K, feature_clip=radius)
    plain = cls(DIM, K)
    plain.load_state_dict(clipped.state_dict())
    z = torch.randn(64, DIM) * torch.linspace(0.02, 1.0, 64)[:, None]  # norms from ~0.05 to ~3
    z[0] = 0.0  # a zero latent: no division by its norm, finite gradients
    short = z.norm(dim=-1) < radius
    assert 5 < short.sum() < 60
    pre_clipped = z * torch.clamp(radius / z.norm(dim=-1, keepdim=True), max=1.0)
    assert (pre_clipped.norm(dim=-1) <= radius * (1 + 1e-6)).all()
    for mode in (True, False):
        torch.manual_seed(3)
        out = clipped.train(mode)(z)
        torch.manual_seed(3)
        reference = plain.train(mode)(pre_clipped)
        torch.testing.assert_close(out.logits, reference.logits, rtol=1e-6, atol=1e-6)
        assert torch.equal(out.indices, reference.indices)
    assert torch.equal(clipped(z).logits[short], plain(z).logits[short])  # eval: short latents are not touched
    with torch.no_grad():  # tokenization clips too
        assert torch.equal(clipped.eval()(z).indices, plain.eval()(pre_clipped).indices)
    # the gradient through the clip is autograd's of the expression (the MLR's own backward is unchanged)
    cotangent = torch.randn(64, K)
    z_clip, z_ref = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    (clipped.logits(z_clip) * cotangent).sum().backward()
    (_reference_logits(plain, z_ref[1:], feature_clip=radius) * cotangent[1:]).sum().backward()
    assert torch.isfinite(z_clip.grad).all()
    torch.testing.assert_close(z_clip.grad[1:], z_ref.grad[1:], rtol=1e-4, atol=1e-5 * z_ref.grad.abs().max().item())
    assert "feature_clip=1.0" in repr(clipped) and "feature_clip" not in repr(plain)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GumbelVQ(8, 16, diversity_weight=-0.1), "diversity_weight"),
        (lambda: HyperVQ(8, 16, diversity_weight=float("nan")), "diversity_weight"),
        (lambda: HyperEmbMatVQ(8, 16, diversity_weight=float("inf")), "diversity_weight"),
        (lambda: HyperVQ(8, 16, diversity_weight="0.3"), "diversity_weight"),
        (lambda: GumbelVQ(8, 16, diversity_weight=True), "diversity_weight"),
        (lambda: HyperVQ(8, 16, feature_clip=0.0), "feature_clip"),
        (lambda: HyperEmbMatVQ(8, 16, feature_clip=-1.0), "feature_clip"),
        (lambda: HyperVQ(8, 16, feature_clip=float("inf")), "feature_clip"),
        (lambda: HyperVQ(8, 16, feature_clip=float("nan")), "feature_clip"),
        (lambda: HyperVQ(8, 16, feature_clip="1"), "feature_clip"),
    ],
)
def test_bad_diversity_weight_or_feature_clip(make, match):
    with pytest.raises(ValueError, match=match) as caught:
        make()
    assert "\n" not in str(caught.value)
