"""The training step under `torch.compile`: no graph break in any quantizer's forward and backward or in the
VQ-VAE's, one compile for a whole run (the Gumbel temperature is a tensor), and the same numbers as eager.

`aot_eager` traces forward and backward exactly as inductor does (dynamo, then AOTAutograd) but runs the graphs
without generating C++, so these tests take seconds; the inductor-compiled kernels are checked in
`test_quantizers.py`, the native CPU kernels in `test_cpu_kernels.py`. A traced graph runs the kernels' torch
twins, so the eager runs it is compared with use them too (`set_compiled_kernels(False)`)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from hf_hypervq import QUANTIZERS, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.models.hypervq import kernels


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_torch_kernels():
    torch._dynamo.reset()
    kernels.set_compiled_kernels(False)
    yield
    kernels.set_compiled_kernels(None)
    torch._dynamo.reset()


@pytest.mark.parametrize("quantizer_type", list(QUANTIZERS))
def test_quantizer_forward_and_backward_have_no_graph_break(quantizer_type):
    torch.manual_seed(0)
    quantizer = QUANTIZERS[quantizer_type].cls(16, 32).train()
    cotangent = torch.randn(64, 16)

    def step(z):
        out = quantizer(z)
        return (out.quantized * cotangent).sum() + out.loss, out.perplexity

    z = torch.randn(64, 16, requires_grad=True)
    assert torch._dynamo.explain(step)(z).graph_break_count == 0

    gradients = {}
    for name, run in (("eager", step), ("compiled", torch.compile(step, fullgraph=True, backend="aot_eager"))):
        torch.manual_seed(1)  # the same Gumbel noise
        z.grad = None
        quantizer.zero_grad()
        loss, perplexity = run(z)
        loss.backward()
        gradients[name] = [z.grad.clone(), *(p.grad.clone() for p in quantizer.parameters() if p.grad is not None)]
    assert len(gradients["eager"]) == len(gradients["compiled"]) > 1
    for eager, compiled in zip(gradients["eager"], gradients["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_vqvae_training_step_is_one_graph_compiled_once_for_a_whole_run():
    """Three optimizer updates move the Gumbel temperature each time; a Python-float temperature would recompile
    at every one of them."""
    torch.manual_seed(0)
    config = HyperVQVAEConfig(num_channels=1, hidden_size=8, num_residual_layers=1, residual_hidden_size=4,
                              embedding_dim=16, codebook_size=32, gumbel_temperature=[2.0, 0.5, 0.9])  # fmt: skip
    model = HyperVQVAEModel(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pixels = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch._dynamo.explain(lambda px: model(pixel_values=px).loss)(pixels).graph_break_count == 0

    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda px: model(pixel_values=px).loss, fullgraph=True, backend=counter)
    temperatures = []
    for update in range(3):
        loss = step(pixels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_num_updates(update + 1)
        temperatures.append(model.quantizer.current_temperature)
        assert torch.isfinite(loss)
    assert counter.frame_count == 1
    assert temperatures == pytest.approx([2.0 * 0.9, 2.0 * 0.81, 2.0 * 0.729])


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "hyperbolic_embedding"])
def test_a_compiled_step_calls_the_native_cpu_kernels_as_operators(quantizer_type):
    """With the default kernels, a traced HyperVQ step keeps the native CPU kernels (`hf_hypervq::` operators, one
    opaque op each) instead of tracing their torch twins, without a graph break and with the eager step's numbers."""
    kernels.set_compiled_kernels(None)
    torch.manual_seed(0)
    quantizer = QUANTIZERS[quantizer_type].cls(16, 32).train()
    cotangent = torch.randn(64, 16)

    def step(z):
        out = quantizer(z)
        return (out.quantized * cotangent).sum() + out.loss

    z = torch.randn(64, 16, requires_grad=True)
    explanation = torch._dynamo.explain(step)(z)
    assert explanation.graph_break_count == 0
    traced = "\n".join(module.code for graph in explanation.graphs for module in graph.modules())  # with subgraphs
    assert "hf_hypervq.mlr_gumbel_forward" in traced and "hf_hypervq.mlr_gumbel_backward" in traced

    gradients = {}
    for name, run in (("eager", step), ("compiled", torch.compile(step, fullgraph=True, backend="aot_eager"))):
        torch.manual_seed(1)
        z.grad = None
        quantizer.zero_grad()
        run(z).backward()
        gradients[name] = [z.grad.clone(), *(p.grad.clone() for p in quantizer.parameters() if p.grad is not None)]
    for eager, compiled in zip(gradients["eager"], gradients["compiled"]):
        assert torch.equal(compiled, eager)  # the same native kernels on the same numbers
