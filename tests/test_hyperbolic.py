"""The Poincaré-ball math against float64 references written from the formulas (docs/method.md#poincare-ball)."""

import math

import pytest
import torch
from geoopt.manifolds.stereographic import math as geoopt_math
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hypervq.models.hypervq import hyperbolic as hyp


CURVATURES = [0.1, 1.0, 2.0]
F64 = torch.float64


def random_ball_points(n, dim, c, max_frac, dtype=F64, generator=None):
    """Points with sqrt(c)*||x|| uniform in [0, max_frac], random directions."""
    direction = torch.randn(n, dim, dtype=dtype, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.rand(n, 1, dtype=dtype, generator=generator) * max_frac / math.sqrt(c)
    return direction * radius


# ---- references, written directly from the formulas, float64 ----


def ref_expmap0(u, c):
    n = u.norm(dim=-1, keepdim=True)
    return torch.tanh(math.sqrt(c) * n) * u / (math.sqrt(c) * n)


def ref_mobius_add(x, y, c):
    xy = (x * y).sum(-1, keepdim=True)
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1, keepdim=True)
    return ((1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y) / (1 + 2 * c * xy + c**2 * x2 * y2)


def ref_mlr_closed_form(x, normals, offsets, c):
    """docs/method.md#closed-form, term by term."""
    s = math.sqrt(c)
    norms = normals.norm(dim=-1)
    unit = normals / norms[:, None]
    cx2 = c * (x * x).sum(-1, keepdim=True)
    num = 2 * s * (x @ unit.T) * torch.cosh(2 * s * offsets) - (1 + cx2) * torch.sinh(2 * s * offsets)
    return 2 * norms / s * torch.asinh(num / (1 - cx2))


def ref_mlr_distance_form(x, normals, offsets, c):
    """2 ||a_k|| times the signed distance from x to the hyperplane through q_k = exp0(r_k [a_k]) with normal
    [a_k] (Ganea et al. 2018), built from Möbius addition (docs/method.md#hyperplane-geometry)."""
    s = math.sqrt(c)
    norms = normals.norm(dim=-1)
    unit = normals / norms[:, None]
    q = ref_expmap0(offsets[:, None] * unit, c)  # (K, dim)
    diff = ref_mobius_add(-q[None], x[:, None], c)  # (N, K, dim), small sizes only
    inner = (diff * unit[None]).sum(-1)
    signed_distance = torch.asinh(2 * s * inner / (1 - c * (diff * diff).sum(-1))) / s
    return 2 * norms * signed_distance


# ---- the tests ----


@pytest.mark.parametrize("c", CURVATURES)
def test_maps_and_addition_match_formulas(c):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(200, 7, dtype=F64, generator=g) * 2
    torch.testing.assert_close(hyp.expmap0(u, c=c), ref_expmap0(u, c), rtol=1e-12, atol=1e-12)
    y = random_ball_points(200, 7, c, 1 - 1e-5, generator=g)
    x = random_ball_points(200, 7, c, 1 - 1e-5, generator=g)
    log_y = hyp.logmap0(y, c=c)
    n = y.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(log_y, torch.atanh(math.sqrt(c) * n) * y / (math.sqrt(c) * n), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hyp.mobius_add(x, y, c=c), ref_mobius_add(x, y, c), rtol=1e-10, atol=1e-12)
    ref_dist = 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * ref_mobius_add(-x, y, c).norm(dim=-1))
    torch.testing.assert_close(hyp.dist(x, y, c=c), ref_dist, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hyp.pairwise_dist(x[:20], y[:30], c=c), hyp.dist(x[:20, None], y[None, :30], c=c))


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("max_frac", [0.2, 0.77, 1 - 4e-3])
def test_mlr_logits_float64_equal_closed_form_and_distance_form(c, max_frac):
    g = torch.Generator().manual_seed(2)
    x = random_ball_points(64, 6, c, max_frac, generator=g)
    normals = torch.randn(24, 6, dtype=F64, generator=g) * 0.7
    offsets = torch.randn(24, dtype=F64, generator=g)
    logits = hyp.mlr_logits(x, normals, offsets, c=c)
    assert logits.dtype == F64 and logits.shape == (64, 24)
    torch.testing.assert_close(logits, ref_mlr_closed_form(x, normals, offsets, c), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits, ref_mlr_distance_form(x, normals, offsets, c), rtol=1e-7, atol=1e-8)
    # geoopt's dist2plane is the same quantity; its arsinh is fine in float64 away from huge negative values
    unit = normals / normals.norm(dim=-1, keepdim=True)
    q = hyp.expmap0(offsets[:, None] * unit, c=c)
    geo = geoopt_math.dist2plane(x[:, None], q[None], unit[None], k=torch.tensor(-c, dtype=F64), signed=True)
    torch.testing.assert_close(logits, 2 * normals.norm(dim=-1) * geo, rtol=1e-5, atol=1e-6)


def test_mlr_logits_at_origin():
    normals = torch.randn(10, 4, dtype=F64)
    offsets = torch.randn(10, dtype=F64)
    logits = hyp.mlr_logits(torch.zeros(1, 4, dtype=F64), normals, offsets, c=1.0)
    torch.testing.assert_close(logits[0], -4 * normals.norm(dim=-1) * offsets)  # v_k(0), docs/method.md#closed-form


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("max_frac", [0.2, 0.77, 1 - 4e-3])
def test_mlr_logits_float32_close_to_float64(c, max_frac):
    """The float32 target: max|error| / max|ref| <= 1e-5 and argmax agreement >= 0.999, up to the float32 margin."""
    g = torch.Generator().manual_seed(3)
    x = random_ball_points(2048, 64, c, max_frac, generator=g)
    normals = torch.randn(256, 64, dtype=F64, generator=g) / 8
    offsets = torch.rand(256, dtype=F64, generator=g) * 2 - 0.5
    ref = ref_mlr_closed_form(x, normals, offsets, c)
    got = hyp.mlr_logits(x.float(), normals.float(), offsets.float(), c=c)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() / ref.abs().max() <= 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).double().mean() >= 0.999


def test_mlr_logits_accurate_for_large_negative_arguments():
    """geoopt's arsinh gives -34.5 instead of -9.9 at -1e4 (docs/method.md#accurate-asinh); torch's asinh does not."""
    x = torch.tensor([[0.99, 0.0]])
    normals = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    offsets = torch.tensor([3.0, 0.5])
    got = hyp.mlr_logits(x, normals, offsets, c=1.0)
    ref = ref_mlr_closed_form(x.double(), normals.double(), offsets.double(), 1.0)
    assert ref[0, 0] < -10  # the regime where the cancellation bites
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_mlr_logits_backward_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(4)
    x = random_ball_points(12, 5, 2.0, 0.99, generator=g).requires_grad_()
    normals = torch.randn(7, 5, dtype=F64, generator=g).requires_grad_()
    offsets = torch.randn(7, dtype=F64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: hyp.mlr_logits(*a, c=0.5), (x, normals, offsets))
    weights = torch.randn(12, 7, dtype=F64, generator=g)
    grads = torch.autograd.grad((hyp.mlr_logits(x, normals, offsets, c=2.0) * weights).sum(), (x, normals, offsets))
    ref = torch.autograd.grad((ref_mlr_closed_form(x, normals, offsets, 2.0) * weights).sum(), (x, normals, offsets))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_mlr_logits_any_leading_shape():
    normals, offsets = torch.randn(5, 3), torch.rand(5)
    x = hyp.project(torch.randn(2, 4, 3), c=1.0)
    logits = hyp.mlr_logits(x, normals, offsets, c=1.0)
    assert logits.shape == (2, 4, 5)
    torch.testing.assert_close(logits[1, 2], hyp.mlr_logits(x[1, 2:3], normals, offsets, c=1.0)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("c", CURVATURES)
def test_project_keeps_a_dtype_aware_margin(dtype, c):
    x = torch.randn(500, 8, dtype=torch.float64) * torch.logspace(-3, 3, 500, dtype=torch.float64)[:, None]
    x = x.to(dtype)
    projected = hyp.project(x, c=c)
    assert projected.dtype == dtype
    sq_norm = c * projected.float().pow(2).sum(-1)
    assert (sq_norm < 1).all()  # strictly inside, also in half precision
    assert torch.all(projected.double().norm(dim=-1) <= (1 - hyp.ball_margin(dtype)) / math.sqrt(c) * (1 + 1e-2))
    inside = x.double().norm(dim=-1) < 0.5 / math.sqrt(c)
    assert torch.equal(projected[inside], x[inside])


def test_gradients_finite_from_origin_to_far_outside_the_ball():
    """geoopt's test idea: a log grid of norms running into the singularities, here 1e-15 ... 1e3."""
    norms = 10 ** torch.arange(-15, 4, dtype=torch.float32)
    z = (torch.randn(len(norms), 8) * norms[:, None] / 3).requires_grad_()
    normals, offsets = torch.randn(16, 8, requires_grad=True), torch.rand(16, requires_grad=True)
    x = hyp.project(hyp.expmap0(z, c=1.0), c=1.0)
    logits = hyp.mlr_logits(x, normals, offsets, c=1.0)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for t in (z, normals, offsets):
        assert torch.isfinite(t.grad).all()


margin_radius = math.atanh(1 - 1e-5)


@settings(max_examples=60, deadline=None)
@given(
    c=st.sampled_from(CURVATURES),
    vec=st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4),
    frac=st.floats(0, 1),
)
def test_logmap0_inverts_expmap0_inside_the_margin(c, vec, frac):
    u = torch.tensor(vec, dtype=F64)
    if u.norm() < 1e-6:
        u = torch.tensor([1.0, 0, 0, 0], dtype=F64)
    u = u / u.norm() * frac * margin_radius / math.sqrt(c)
    torch.testing.assert_close(hyp.logmap0(hyp.expmap0(u, c=c), c=c), u, rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(c=st.sampled_from(CURVATURES), seed=st.integers(0, 2**31 - 1), frac=st.floats(0, 0.999))
def test_mobius_left_cancellation_and_distance_axioms(c, seed, frac):
    g = torch.Generator().manual_seed(seed)
    x, y = random_ball_points(2, 5, c, frac, generator=g)
    torch.testing.assert_close(hyp.mobius_add(-x, hyp.mobius_add(x, y, c=c), c=c), y, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hyp.dist(x, y, c=c), hyp.dist(y, x, c=c))
    assert hyp.dist(x, x, c=c) < 1e-6
    torch.testing.assert_close(hyp.dist(torch.zeros_like(x), x, c=c), 2 * hyp.logmap0(x, c=c).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", CURVATURES)
def test_expmap0_projected_equals_the_composition(dtype, c):
    u = torch.randn(300, 6, dtype=dtype) * torch.logspace(-12, 3, 300, dtype=dtype)[:, None]
    torch.testing.assert_close(hyp.expmap0_projected(u, c=c), hyp.project(hyp.expmap0(u, c=c), c=c))
    torch.testing.assert_close(hyp.expmap0_projected(u, c=c, eps=0.1), hyp.project(hyp.expmap0(u, c=c), c=c, eps=0.1))


@pytest.mark.parametrize("c", [0, -1, 0.0, float("inf"), float("nan"), True, "1"])
def test_every_function_rejects_a_curvature_that_is_not_finite_and_positive(c):
    x = torch.full((2, 3), 0.1)
    calls = [
        lambda: hyp.expmap0(x, c=c),
        lambda: hyp.logmap0(x, c=c),
        lambda: hyp.mobius_add(x, x, c=c),
        lambda: hyp.dist(x, x, c=c),
        lambda: hyp.project(x, c=c),
        lambda: hyp.expmap0_projected(x, c=c),
        lambda: hyp.pairwise_dist(x, x, c=c),
        lambda: hyp.mlr_logits(x, torch.ones(4, 3), torch.zeros(4), c=c),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="curvature `c`"):
            call()


# ---- geoopt: a quiet import, and fallbacks should its TorchScript ever fail ----


@pytest.mark.parametrize("c", CURVATURES)
def test_the_closed_form_fallbacks_equal_geoopt(c):
    generator = torch.Generator().manual_seed(0)
    x = random_ball_points(200, 6, c, 0.999, generator=generator)
    y = random_ball_points(200, 6, c, 0.999, generator=generator)
    u = torch.randn(200, 6, dtype=F64, generator=generator) * torch.logspace(-8, 1.5, 200, dtype=F64)[:, None]
    k = torch.tensor(-c, dtype=F64)
    torch.testing.assert_close(hyp._expmap0(u, c=c), geoopt_math.expmap0(u, k=k))
    torch.testing.assert_close(hyp._mobius_add(x, y, c=c), geoopt_math.mobius_add(x, y, k=k))
    torch.testing.assert_close(hyp._dist(x, y, c=c), geoopt_math.dist(x, y, k=k))
    torch.testing.assert_close(hyp._dist(x, x, c=c), torch.zeros(200, dtype=F64), atol=1e-6, rtol=0)


def _run_python(code: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_package_prints_nothing():
    """geoopt's `@torch.jit.script` decorators warn at import on recent torch (a FutureWarning on 2.14, printed by
    every script before its own output); `-W always` shows even the DeprecationWarning that 2.13 gives."""
    result = _run_python("import hf_hypervq, hf_hypervq.training")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_the_package_works_when_torchscript_is_gone():
    """A torch without `torch.jit.script` breaks geoopt's import: ours goes on with the fallbacks."""
    code = """
import torch
def removed(*args, **kwargs):
    raise RuntimeError("torch.jit.script was removed")
torch.jit.script = removed
import hf_hypervq
from hf_hypervq.models.hypervq import hyperbolic
assert hyperbolic.geoopt_math is None
x = torch.tensor([[0.3, -0.2]]); y = torch.tensor([[-0.1, 0.4]])
print(float(hyperbolic.dist(x, y, c=1.0)), float(hyperbolic.expmap0(x, c=1.0).norm()))
out = hf_hypervq.HyperVQ(4, 8).eval()(torch.randn(5, 4))
print(tuple(out.indices.shape))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    distance, norm, shape = result.stdout.split()
    x, y = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([[-0.1, 0.4]], dtype=F64)
    assert float(distance) == pytest.approx(2 * math.atanh(ref_mobius_add(-x, y, 1.0).norm().item()), rel=1e-5)
    assert float(norm) == pytest.approx(math.tanh(x.norm().item()), rel=1e-5)
    assert shape == "(5,)"
