"""What the other devices run, tested on this CPU.

On CUDA and MPS the quantizers' N×K kernels are their torch twins (`kernels.py`), compiled by inductor or eager;
on CPU they are native C loops by default. So the twins are held here, eagerly and through `torch.compile`, to an
independent float64 reference (values and gradients); every op of a forward and backward is checked for float64,
which MPS does not have; and a training step with an fp16 overflow goes on, as a GradScaler run should.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.models.hypervq import kernels
from hf_hypervq.models.hypervq.quantizers import QUANTIZER_TYPES, QUANTIZERS
from hf_hypervq.training import loop
from hf_hypervq.training.metrics import logit_confidence_per_row


TINY = dict(hidden_size=8, residual_hidden_size=4, embedding_dim=4, codebook_size=8, num_residual_layers=1)
N, K = 37, 19  # odd sizes: no vector width divides them


def _twin(kernel, compiled: bool):
    """The torch code behind a fused kernel (what CUDA and MPS run), eager or compiled by inductor."""
    return torch.compile(kernel.__wrapped__, dynamic=True) if compiled else kernel.__wrapped__


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(N, K, generator=generator) * 3
    scale = torch.rand(K, generator=generator) + 0.5
    return y, scale, torch.tensor(1234, dtype=torch.int32), torch.tensor(1 / 0.7)


def _reference_sample(logits64, seed, inv_temperature):
    """A hard Gumbel-softmax draw in float64 from the same uniform numbers: `(indices, soft sample)`."""
    uniform = kernels.counter_uniform(seed, *logits64.shape, "cpu").double()
    perturbed = logits64 - torch.log(-torch.log(uniform))
    return perturbed.argmax(-1), F.softmax(perturbed * inv_temperature.double(), dim=-1)


def _close(actual, expected, tolerance=2e-5):
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request):
    return request.param


def test_the_mlr_gumbel_twins_match_the_float64_reference(compiled):
    y, scale, seed, inv_temperature = _inputs()
    y64 = y.double().requires_grad_(True)
    scale64 = scale.double().requires_grad_(True)
    logits64 = scale64 * torch.asinh(y64)
    indices64, soft64 = _reference_sample(logits64, seed, inv_temperature)

    logits, indices, weights, inverse_total = _twin(kernels.mlr_gumbel_forward, compiled)(
        y, scale, seed, inv_temperature
    )
    _close(logits, logits64.detach())
    assert torch.equal(indices, indices64)
    _close(weights * inverse_total, soft64.detach())

    # the backward: d/dy and d/dscale of <soft, grad_soft> + <logits, grad_logits>, against autograd in float64
    generator = torch.Generator().manual_seed(1)
    grad_soft, grad_logits = torch.randn(N, K, generator=generator), torch.randn(N, K, generator=generator)
    w_last, x_last = torch.randn(K, generator=generator), torch.randn(N, generator=generator)
    through_soft = (soft64 * grad_soft.double()).sum()
    through_logits = (logits64 * grad_logits.double()).sum()
    for with_logits in (True, False):
        objective = through_soft + through_logits if with_logits else through_soft
        grad_y64, grad_scale64 = torch.autograd.grad(objective, (y64, scale64), retain_graph=True)
        grad_y, grad_x_last, grad_w_last, grad_scale = _twin(kernels.mlr_gumbel_backward, compiled)(
            grad_soft, grad_logits if with_logits else None, logits, weights, inverse_total, scale,
            inv_temperature, w_last, x_last,
        )  # fmt: skip
        _close(grad_y, grad_y64)
        _close(grad_scale, grad_scale64)
        _close(grad_x_last.squeeze(1), grad_y64 @ w_last.double())
        _close(grad_w_last, x_last.double() @ grad_y64)


def test_the_gumbel_and_argmax_twins_match_the_float64_reference(compiled):
    logits, _, seed, inv_temperature = _inputs(2)
    logits64 = logits.double().requires_grad_(True)
    indices64, soft64 = _reference_sample(logits64, seed, inv_temperature)
    indices, weights, inverse_total = _twin(kernels.gumbel_forward, compiled)(logits, seed, inv_temperature)
    assert torch.equal(indices, indices64)
    _close(weights * inverse_total, soft64.detach())
    grad_soft = torch.randn(N, K)
    (expected,) = torch.autograd.grad((soft64 * grad_soft.double()).sum(), logits64)
    _close(_twin(kernels.gumbel_backward, compiled)(grad_soft, weights, inverse_total, inv_temperature), expected)
    assert torch.equal(_twin(kernels.argmax, compiled)(logits), logits.argmax(-1))


def test_the_mlr_logits_twins_match_the_float64_reference(compiled):
    y, scale, _, _ = _inputs(3)
    y64, scale64 = y.double().requires_grad_(True), scale.double().requires_grad_(True)
    logits64 = scale64 * torch.asinh(y64)
    logits = _twin(kernels.mlr_logits_from_matmul, compiled)(y, scale)
    _close(logits, logits64.detach())
    tokenized_logits, indices = _twin(kernels.mlr_logits_and_argmax, compiled)(y, scale)
    _close(tokenized_logits, logits64.detach())
    assert torch.equal(indices, logits64.argmax(-1))
    grad_logits = torch.randn(N, K)
    expected = torch.autograd.grad((logits64 * grad_logits.double()).sum(), (y64, scale64))
    for actual, reference in zip(_twin(kernels.mlr_logits_backward, compiled)(grad_logits, logits, scale), expected):
        _close(actual, reference)


def _training_step(quantizer_type: str, path: str):
    """Loss, token ids and gradients of one training step of a tiny tokenizer, its kernels on `path`."""
    torch.manual_seed(0)
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type)).train()
    pixel_values = torch.rand(4, 3, 16, 16) * 2 - 1
    if path != "native":
        kernels.set_compiled_kernels(path == "compiled")
        kernels.set_native_cpu_kernels(False)
    try:
        out = model(pixel_values=pixel_values)
        out.loss.backward()
    finally:
        kernels.set_compiled_kernels(None)
        kernels.set_native_cpu_kernels(True)
    return out.loss.detach(), out.image_tokens, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
def test_a_training_step_on_the_twin_path_equals_the_default_one(quantizer_type, compiled):
    """A whole training step of each quantizer, as CUDA and MPS run it (the torch twins, eager or compiled by
    inductor), against the default CPU step (native C kernels where HyperVQ has them)."""
    loss, tokens, grads = _training_step(quantizer_type, "native")
    twin_loss, twin_tokens, twin_grads = _training_step(quantizer_type, "compiled" if compiled else "eager")
    assert torch.equal(twin_tokens, tokens)
    torch.testing.assert_close(twin_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


class _DtypeRecorder(TorchDispatchMode):
    """Records every op that takes or makes a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.float64_ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors):
            self.float64_ops.add(str(func))
        return out


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
@pytest.mark.parametrize("native", [False, True], ids=["twins", "native"])
def test_no_op_of_a_forward_or_backward_uses_float64(quantizer_type, native):
    """MPS has no float64: one such op anywhere in a training step, an evaluation or a tokenization ends the run
    there. The tokenizer, its quantizer and the evaluation's logit confidence, on both kernel paths."""
    config = HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type)
    model = HyperVQVAEModel(config)
    pixel_values = torch.rand(2, 3, 8, 8) * 2 - 1
    recorder = _DtypeRecorder()
    previous = kernels.compiled_kernels_enabled()
    kernels.set_compiled_kernels(None if native else False)
    try:
        with recorder:
            model.train()
            out = model(pixel_values=pixel_values)
            out.loss.backward()
            model.eval()
            out = model(pixel_values=pixel_values)
            with torch.no_grad():
                model.get_image_tokens(pixel_values)
            if out.logits is not None:
                logit_confidence_per_row(out.logits)
    finally:
        kernels.set_compiled_kernels(previous)
    assert not recorder.float64_ops, f"{QUANTIZERS[quantizer_type].paper_name} ran float64 ops: {recorder.float64_ops}"


def test_logit_confidence_equals_the_float64_softmax():
    logits = torch.randn(50, 300) * 20
    max_probability, margin = logit_confidence_per_row(logits)
    assert max_probability.dtype == torch.float32
    _close(max_probability, logits.double().softmax(-1).amax(-1), tolerance=1e-6)
    top2 = logits.double().topk(2).values
    _close(margin, top2[:, 0] - top2[:, 1], tolerance=1e-6)


def _overflow_on(model, steps: set, counter: list):
    """Make the encoder's output inf on the given training forwards (counted from 1), as an fp16 overflow does."""

    def hook(module, inputs, output):
        counter[0] += 1
        if counter[0] in steps:
            output = output.clone()
            output[0, 0, 0, 0] = float("inf")
        return output

    return model.encoder.register_forward_hook(hook)


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
def test_an_fp16_overflow_in_a_training_step_is_skipped_by_the_grad_scaler(quantizer_type):
    """One training step under fp16 autocast with a GradScaler whose latent overflowed: no error (it used to raise
    inside the quantizer, and on CUDA poison the context with a device-side assert), the scaler skips the update,
    and the next step trains."""
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    handle = _overflow_on(model, {1}, [0])
    pixel_values = torch.rand(2, 3, 8, 8) * 2 - 1
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(pixel_values=pixel_values).loss
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if len(losses) == 1:  # the overflowed step changed nothing and halved the scale
            assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
            assert scaler.get_scale() == 2.0**7
    handle.remove()
    assert not torch.isfinite(torch.tensor(losses[0])) and torch.isfinite(torch.tensor(losses[1]))
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def _train_tiny(run_training_loop, overflowed_steps: set, steps: int, grad_scaler: bool):
    """The real loop on a tiny tokenizer. `grad_scaler`: the fp16 loop as accelerate runs it on a GPU, with a
    GradScaler (fp32 compute here: accelerate has no fp16 autocast on CPU, and the scaler is what skips)."""
    from accelerate import Accelerator

    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY))
    accelerator = Accelerator(cpu=True)
    if grad_scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu")  # what `mixed_precision="fp16"` sets up on a GPU
    handle = _overflow_on(model, overflowed_steps, [0])
    try:
        return run_training_loop(model, steps, num_batches=2, accelerator=accelerator, logging_steps=1)
    finally:
        handle.remove()


def test_the_loop_counts_overflowed_updates_keeps_them_out_of_the_mean_loss_and_goes_on(run_training_loop):
    results = _train_tiny(
        run_training_loop, overflowed_steps={2, 3}, steps=4, grad_scaler=True
    )  # two epochs of 2 batches
    assert results["step"] == 4
    assert results["nonfinite_steps"] == 1  # the last epoch's: update 3; update 4 trained on unharmed weights
    assert torch.isfinite(torch.tensor(results["train_loss"]))


def test_the_loop_stops_in_one_line_once_training_has_clearly_diverged(run_training_loop, monkeypatch):
    """Without a GradScaler (fp32, bf16) a NaN gradient reaches the weights, as in any PyTorch loop, and every
    later loss is NaN: the loop stops once `DIVERGED_AFTER` updates in a row were, instead of training on."""
    monkeypatch.setattr(loop, "DIVERGED_AFTER", 3)
    with pytest.raises(loop.TrainingDivergedError, match=r"NaN or inf in the last 3 steps \(update 4\)"):
        _train_tiny(run_training_loop, overflowed_steps={2}, steps=10, grad_scaler=False)


def test_the_evaluation_runs_the_prepared_model_not_its_unwrapped_copy():
    """Under FSDP the unwrapped model holds a shard of the weights: the metrics (the perturbed pass of the cluster
    scores included) must come from the model accelerate prepared. Here the unwrapped copy refuses to run."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_hypervq.training.evaluation import evaluate_tokenizer

    class Shard(HyperVQVAEModel):
        def encode(self, pixel_values):
            raise AssertionError("the unwrapped model ran")

    accelerator = Accelerator(cpu=True)
    shard = Shard(HyperVQVAEConfig(**TINY))
    loader = DataLoader([{"pixel_values": torch.rand(3, 8, 8) * 2 - 1} for _ in range(6)], batch_size=3)
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY))
    model, loader = accelerator.prepare(model, loader)
    accelerator.unwrap_model = lambda prepared, **kwargs: shard
    results = evaluate_tokenizer(model, loader, accelerator, full=True)
    assert results["num_eval_samples"] == 6 and results["protocol"]["cluster_points"] > 0  # the perturbed pass ran
