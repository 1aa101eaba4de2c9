"""Value checks of tensor arguments that never make the host wait for the device.

A check of values (are they finite, are ids in range) needs the values on the host: on an accelerator that is a
synchronisation, a stall in every training step, and inside `torch.compile` a graph break. So the checks below run
on the host only for CPU tensors in eager mode, where reading a reduction costs nothing more; on an accelerator, or
inside a compiled graph, they are `torch._assert_async`, which raises with the same message at the next
synchronisation instead.
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
    a squared error inf without an error). One reduction, no temporary of `z`'s size beyond a float32 copy."""
    flat = z.reshape(-1).float()
    sum_of_squares = torch.dot(flat, flat)
    if not _on_host(z):
        torch._assert_async(torch.isfinite(sum_of_squares), f"{owner} got NaN, inf or values too large for float32")
    elif not torch.isfinite(sum_of_squares):
        if not torch.isfinite(z).all():
            raise ValueError(f"{owner} got NaN or inf values in `z`")
        raise ValueError(
            f"{owner} got values too large for float32 (largest |z| is {z.abs().max().item():.3g}); latents of "
            "a trained encoder are of order 1"
        )
