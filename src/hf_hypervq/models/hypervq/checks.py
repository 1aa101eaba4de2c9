"""Value checks of tensor arguments, none of which makes a training step wait for the device or stop it.

A check of values (are they finite, are ids in range) needs the values on the host: on an accelerator that is a
synchronisation, a stall in every training step, and inside `torch.compile` a graph break. So `check_ids` runs on
the host only for CPU tensors in eager mode, where reading a reduction costs nothing more; on an accelerator, or
inside a compiled graph, it is `torch._assert_async`, which raises with the same message at the next
synchronisation instead. Latents are checked on the host in evaluation and tokenization (`check_finite`), and not at
all in a training step, whose loss carries a non-finite marker instead (`nonfinite_marker`).
"""

import torch


def _on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def check_ids(ids, name: str, count: int, batch_size: int | None = None) -> None:
    """`ids` must be an integer tensor of values in [0, count) (of shape `(batch_size,)` when given)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"`{name}` must be an integer tensor of ids in [0, {count}); got {got}")
    if batch_size is not None and tuple(ids.shape) != (batch_size,):
        raise ValueError(f"`{name}` must have shape ({batch_size},), one id per image; got {tuple(ids.shape)}")
    if not ids.numel():
        return
    message = f"`{name}` must lie in [0, {count})"
    if _on_host(ids):
        low, high = ids.aminmax()
        if low < 0 or high >= count:
            raise ValueError(f"{message}; got values from {int(low)} to {int(high)}")
    else:
        torch._assert_async(((ids >= 0) & (ids < count)).all(), message)


def check_finite(z: torch.Tensor, owner: str) -> None:
    """`z` must hold finite values whose squares are finite in float32 (|z| below ~1e17: larger ones would make
    a squared error inf without an error). One reduction, no temporary of `z`'s size beyond a float32 copy.

    For evaluation and tokenization, where the caller reads the result anyway: on an accelerator the check waits for
    the device; inside a compiled graph it is `torch._assert_async`. A training step uses `nonfinite_marker`
    instead, which never stops the step."""
    sum_of_squares = _sum_of_squares(z)
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(sum_of_squares), f"{owner} got NaN, inf or values too large for float32")
    elif not torch.isfinite(sum_of_squares):
        if not torch.isfinite(z).all():
            raise ValueError(f"{owner} got NaN or inf values in `z`")
        raise ValueError(
            f"{owner} got values too large for float32 (largest |z| is {z.abs().max().item():.3g}); latents of "
            "a trained encoder are of order 1"
        )


def nonfinite_marker(z: torch.Tensor) -> torch.Tensor:
    """0 when `z` passes `check_finite`, NaN when it does not, as a 0-d float32 tensor computed on the device.

    A training step adds it to its loss instead of checking: a latent that overflowed (an fp16 encoder) then makes
    the loss non-finite, as it would in any model, so the training loop counts the step, with no host
    synchronisation and no device-side assert, which would end the process before it could save.

    It poisons the loss, not the gradients: `z` is detached, so the marker adds nothing to any gradient. A
    GradScaler skips such a step because the non-finite latent makes the real gradients non-finite too, which holds
    for NaN and inf latents in all five quantizers (each multiplies or normalises the latent on its gradient's
    path), not for an arbitrary model."""
    return _sum_of_squares(z.detach()) * 0.0  # finite * 0 = 0; inf * 0 = nan * 0 = nan


def _sum_of_squares(z: torch.Tensor) -> torch.Tensor:
    flat = z.reshape(-1).float()
    return torch.dot(flat, flat)
