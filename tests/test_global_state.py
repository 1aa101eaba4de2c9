"""The quantizers under global settings they do not own: another default dtype (transformers sets one while it builds
a model in `torch_dtype`; people set float64 for numerics) and a default-device context. A training step and a
tokenization of every quantizer, on the native CPU kernels and on the torch twins, must give the same bits as under
the float32 default. It runs in a subprocess: a kernel that wrote past a buffer would kill the test run."""

import json
import subprocess
import sys

import pytest
import torch


SETTINGS = ["bfloat16", "float16", "float64", "meta", "cpu"]
SCRIPT = r"""
import contextlib, json, sys
import torch
from hf_hypervq.models.hypervq import kernels
from hf_hypervq.models.hypervq.quantizers import QUANTIZERS


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


SETTINGS = {
    "bfloat16": lambda: default_dtype(torch.bfloat16),
    "float16": lambda: default_dtype(torch.float16),
    "float64": lambda: default_dtype(torch.float64),
    "meta": lambda: torch.device("meta"),  # around a call on CPU tensors
    "cpu": lambda: torch.device("cpu"),
}


def step(quantizer, z, setting):
    # A float32 model and float32 latents, built outside the setting; the step runs inside it.
    torch.manual_seed(1)
    quantizer.zero_grad(set_to_none=True)
    z = z.detach().requires_grad_(True)
    with setting():
        out = quantizer.train()(z)
        (out.quantized.square().sum() + out.loss).backward()
        with torch.no_grad():
            tokens = quantizer.eval()(z).indices
    return [tokens, out.indices, out.quantized, z.grad, *(p.grad for p in quantizer.parameters() if p.grad is not None)]


for setting in sys.argv[1:]:
    mismatches = []
    for native in (True, False):
        kernels.set_native_cpu_kernels(native)
        for name, spec in QUANTIZERS.items():
            torch.manual_seed(0)
            quantizer, z = spec.cls(16, 40), torch.randn(300, 16)
            expected = step(quantizer, z, contextlib.nullcontext)
            got = step(quantizer, z, SETTINGS[setting])
            if len(got) != len(expected) or not all(
                g.device.type == "cpu" and g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, expected)
            ):
                mismatches.append(f"{name} ({'native' if native else 'torch twin'})")
    print(json.dumps({"setting": setting, "mismatches": mismatches}), flush=True)
"""


def test_every_quantizer_gives_the_same_bits_under_other_default_dtypes_and_devices():
    result = subprocess.run([sys.executable, "-c", SCRIPT, *SETTINGS], capture_output=True, text=True, timeout=600)
    done = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    crashed = SETTINGS[len(done)] if len(done) < len(SETTINGS) else None
    assert result.returncode == 0, f"died under {crashed} (exit {result.returncode}): {result.stderr[-2000:]}"
    assert {entry["setting"]: entry["mismatches"] for entry in done} == {setting: [] for setting in SETTINGS}


@pytest.mark.parametrize(
    "kernel, arguments, message",
    [
        ("logits", lambda y, s: (y.double(), s), "`y` must be a torch.float32 CPU tensor of shape \\(30, 20\\)"),
        ("logits", lambda y, s: (y, s[:-1]), "`scale` must be a torch.float32 CPU tensor of shape \\(20,\\)"),
        ("logits", lambda y, s: (y.to("meta"), s), "`y` must be a torch.float32 CPU tensor"),
        ("logits", lambda y, s: (y[0], s), "`y` must be an \\(N, K\\) tensor"),
        ("forward", lambda y, s: (y, s, torch.tensor(1), torch.tensor(1.0)), "`seed` must be a torch.int32"),
        ("forward", lambda y, s: (y, s, torch.tensor(1, dtype=torch.int32), torch.ones(2)), "`inv_temperature`"),
    ],
    ids=["float64", "short_scale", "meta", "one_dimensional", "int64_seed", "vector_temperature"],
)
def test_the_native_kernels_check_their_arguments_before_any_pointer_reaches_c(kernel, arguments, message):
    from hf_hypervq.models.hypervq import cpu_kernels

    function = {"logits": cpu_kernels.cpu_mlr_logits_and_argmax, "forward": cpu_kernels.cpu_mlr_gumbel_forward}[kernel]
    with pytest.raises(ValueError, match=message):
        function(*arguments(torch.randn(30, 20), torch.rand(20) + 0.5))


def test_the_public_operator_refuses_a_wrong_tensor():
    """The operators are public (`torch.ops.hf_hypervq.*`): a wrong tensor is a clear error, never a read or a
    write out of bounds."""
    from hf_hypervq.models.hypervq import kernels

    operator = getattr(torch.ops.hf_hypervq, kernels.mlr_logits_and_argmax.native_operator._name)
    with pytest.raises(ValueError, match="mlr_logits_and_argmax: `scale` must be a torch.float32 CPU tensor"):
        operator(torch.randn(30, 20), torch.rand(19))


def test_the_native_backward_checks_every_argument():
    from hf_hypervq.models.hypervq import cpu_kernels

    n, k = 12, 7
    arguments = dict(grad_soft=torch.randn(n, k), grad_logits=None, logits=torch.randn(n, k), weights=torch.rand(n, k),
                     inverse_total=torch.rand(n, 1), scale=torch.rand(k), inv_temperature=torch.tensor(1.0),
                     w_last=torch.randn(k), x_last=torch.randn(n))  # fmt: skip
    cpu_kernels.cpu_mlr_gumbel_backward(**arguments)  # the right shapes pass
    for name, wrong in [("x_last", torch.randn(n + 1)), ("w_last", torch.randn(k, 1)), ("inverse_total", torch.rand(n)),
                        ("grad_logits", torch.randn(n, k, dtype=torch.bfloat16)), ("weights", torch.rand(n, k + 1))]:  # fmt: skip
        with pytest.raises(ValueError, match=f"mlr_gumbel_backward: `{name}` must be"):
            cpu_kernels.cpu_mlr_gumbel_backward(**{**arguments, name: wrong})
