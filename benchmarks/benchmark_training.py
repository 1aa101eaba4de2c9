#!/usr/bin/env python
"""Images per second of one training step (forward, backward, AdamW update) of the default HyperVQ-VAE with each
quantizer, side by side in one process, round-robin, with the ratio of each step time to KmeansVQ's.

    python benchmarks/benchmark_training.py                    # 32×32 images, batch 128, K = 512 (the README table)
    python benchmarks/benchmark_training.py --device cuda      # on a GPU
    python benchmarks/benchmark_training.py --image_size 128 --batch_size 64 --codebook_size 1024

The images are random (speed does not depend on them). Each quantizer runs as shipped (HyperVQ's N×K kernels
fused by torch.compile at these sizes); "+eager" runs them unfused (`set_compiled_kernels(False)`), and
"+torch_compile" compiles the whole model as `--torch_compile` does (inductor; its first call, the compilation, is
printed). On CUDA the steps are timed with CUDA events and the table adds each step's peak memory
(`torch.cuda.max_memory_allocated`). On Linux CPUs the script re-executes itself with glibc's allocator set to keep
freed memory, as in `benchmark_quantizers.py`; pass `--default-allocator` to measure without it.
"""

import argparse
import statistics

import torch
from benchmarking import Timer, cpu_clock, others_cpu, rerun_with_tuned_allocator

from hf_hypervq import QUANTIZER_TYPES, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.models.hypervq import kernels


VARIANTS = [*QUANTIZER_TYPES, "hyperbolic+eager", "kmeans+torch_compile", "hyperbolic+torch_compile"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--image_size", type=int, default=32, help="square image size (default: 32)")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--codebook_size", type=int, default=512, help="codes K (default: 512)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; the median is reported (default: 7)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--default-allocator", action="store_true", help="do not re-run with the tuned allocator")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def make_step(variant: str, args):
    quantizer_type, _, option = variant.partition("+")
    model = HyperVQVAEModel(HyperVQVAEConfig(quantizer_type=quantizer_type, codebook_size=args.codebook_size))
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    device_type = torch.device(args.device).type
    forward = torch.compile(model) if option == "torch_compile" else model

    def step(pixel_values):
        kernels.set_compiled_kernels(False if option == "eager" else None)
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = forward(pixel_values).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory_mib(step, pixel_values) -> float:
    """Peak CUDA memory of one step above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(pixel_values)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and not args.default_allocator:
        rerun_with_tuned_allocator()
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    steps = {v: make_step(v, args) for v in variants}
    timer = Timer(args.device)
    first_call = {v: timer(step, pixel_values) for v, step in steps.items()}  # includes any compilation
    for step in steps.values():  # warm-up
        step(pixel_values)
    times = {v: [] for v in variants}
    start = cpu_clock()
    for _ in range(args.rounds):
        for variant, step in steps.items():
            times[variant].append(timer(step, pixel_values))
    busy = others_cpu(start, cpu_clock())
    cuda = args.device.startswith("cuda")
    peaks = {v: peak_memory_mib(step, pixel_values) for v, step in steps.items()} if cuda else {}
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {device}; torch {torch.__version__}; {args.image_size}×{args.image_size}, batch {args.batch_size}, "
        f"K={args.codebook_size}, mixed precision {args.mixed_precision}; median of {args.rounds} rounds; "
        f"CPU share of other processes {busy:.2f}"
    )
    print(
        "| quantizer | ms / step | images / s | step time ÷ KmeansVQ | first call s |"
        + (" peak MiB |" if cuda else "")
    )
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    reference = statistics.median(times["kmeans"]) if "kmeans" in times else None
    for variant, ts in times.items():
        median = statistics.median(ts)
        ratio = f"{median / reference:.2f}×" if reference else "-"
        line = f"| {variant} | {median:.1f} | {args.batch_size / median * 1e3:.0f} | {ratio} | {first_call[variant] / 1e3:.1f} |"
        print(line + (f" {peaks[variant]:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
