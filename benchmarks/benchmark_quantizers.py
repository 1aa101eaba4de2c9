#!/usr/bin/env python
"""Speed and peak memory of the five quantizers next to vector-quantize-pytorch and a plain matmul floor.

Every variant of one shape runs in the same process, round-robin (one call of each per round), so drift on a
shared machine hits all of them alike; the table gives medians and ratios to `VectorQuantize` and to the floor.

- eval: `module.eval()` forward under `torch.no_grad()` (tokenization).
- train: `module.train()` forward and backward of `(quantized * G).sum() + loss` with a fixed random G.
- floor: `z @ W` with `W` (dim, K), the one matmul every quantizer needs; in train, its backward as well.
- `HyperVQ` runs as shipped (`kernels.py`: on a CPU its native C kernels, elsewhere its torch twins, compiled at
  these sizes). The kernel paths side by side: `HyperVQ+native` (the C kernels), `HyperVQ+compiled` (the torch
  twins compiled by inductor, what CUDA runs) and `HyperVQ+eager` (the twins unfused: a machine without a compiler,
  or a remote-code copy that was not asked to compile).
- `VectorQuantize` is set up as in a VQ-VAE, `decay=0.99, commitment_weight=0.25` (the ratios are to it);
  `VectorQuantize+defaults` keeps the library's defaults (`decay=0.8, commitment_weight=1.0`), and a comment line
  per shape gives HyperVQ's ratios to it. Every latent requires grad in train, as behind an encoder.
- time: CUDA events on a GPU, the clock on a CPU.
- memory: peak extra memory of one step. On CPU each (variant, shape, mode) runs in a fresh process whose kernel
  high-water mark is reset after a warm-up step (docs/performance.md#allocator); on CUDA,
  `torch.cuda.max_memory_allocated`.

On Linux CPUs the timing process re-executes itself with glibc's allocator set to keep freed memory (otherwise every
fresh N×K tensor above 32 MiB is page-faulted again, which costs more than the matmul; docs/performance.md#allocator);
pass `--default-allocator` to measure without it.

    python benchmarks/benchmark_quantizers.py                       # the README table (CPU, ~15 minutes)
    python benchmarks/benchmark_quantizers.py --device cuda         # on a GPU
    python benchmarks/benchmark_quantizers.py --sizes 8192 --codebook-sizes 512 --rounds 3 --no-memory   # quick
    python benchmarks/benchmark_quantizers.py --cold-start --variants HyperVQ+native,HyperVQ+compiled,HyperVQ+eager

`--cold-start` measures instead what a user waits for before the first step: each variant's first training step
(any build or compilation included) in a fresh process with empty caches, then in a second process that finds the
first one's caches, `--rounds` times each (medians).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmarking import Timer, cpu_clock, others_cpu, rerun_with_tuned_allocator


# For the memory children: every tensor above 64 KiB gets its own mapping, so freeing it lowers the RSS.
MEASURING_ALLOCATOR = "glibc.malloc.mmap_threshold=65536"
VARIANTS = [
    "floor",
    "VectorQuantize",
    "VectorQuantize+defaults",
    "HyperVQ",
    "HyperVQ+native",
    "HyperVQ+compiled",
    "HyperVQ+eager",
    "KmeansVQ",
    "GumbelVQ",
    "HyperKmeansVQ",
    "HyperEmbMatVQ",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--sizes", default="8192,32768", help="comma-separated numbers of vectors N")
    parser.add_argument("--codebook-sizes", default="128,512,1024", help="comma-separated codebook sizes K")
    parser.add_argument("--dim", type=int, default=64, help="vector size d (default: 64)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per shape; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--default-allocator", action="store_true", help="do not re-run with the tuned glibc allocator"
    )
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument("--cold-start", action="store_true", help="time the first step of fresh processes instead")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cold-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.codebook_sizes = [int(s) for s in args.codebook_sizes.split(",")]
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def build(name, dim, codebook_size, device):
    """A callable `step(z, grad_weights, train)` for one variant."""
    import hf_hypervq

    if name == "floor":
        weight = torch.randn(dim, codebook_size, device=device, requires_grad=True)
        grad_outputs = {}  # a fixed (N, K) output gradient per N, made once

        def step(z, grad_weights, train):
            out = z @ weight
            if train:
                if out.shape not in grad_outputs:
                    grad_outputs[out.shape] = torch.randn_like(out)
                out.backward(grad_outputs[out.shape])

        return step
    if name.startswith("VectorQuantize"):
        from vector_quantize_pytorch import VectorQuantize

        options = {} if name.endswith("+defaults") else {"decay": 0.99, "commitment_weight": 0.25}
        module = VectorQuantize(dim=dim, codebook_size=codebook_size, **options).to(device)

        def run(z):
            quantized, indices, loss = module(z[None])
            return quantized[0], loss.sum()

    else:
        from hf_hypervq.models.hypervq import kernels

        class_name, _, option = name.partition("+")
        module = getattr(hf_hypervq, class_name)(dim, codebook_size).to(device)

        # (native C kernels on CPU tensors, torch.compile mode): None is the shipped default
        native, compiled = {"native": (True, None), "compiled": (False, True), "eager": (False, False)}.get(
            option, (kernels.native_cpu_kernels_enabled(), kernels.compiled_kernels_enabled())
        )

        def run(z):
            kernels.set_native_cpu_kernels(native)
            kernels.set_compiled_kernels(compiled)
            out = module(z)
            return out.quantized, out.loss

    def step(z, grad_weights, train):
        module.train(train)
        if not train:
            with torch.no_grad():
                run(z)
            return
        quantized, loss = run(z)
        ((quantized * grad_weights).sum() + loss).backward()

    return step


def inputs(n, dim, device, train, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = (0.1 * torch.randn(n, dim, generator=generator)).to(device).requires_grad_(train)
    grad_weights = torch.randn(n, dim, generator=generator).to(device)
    return z, grad_weights


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_shape(names, n, k, dim, device, rounds):
    """Median, min and max milliseconds of each (variant, mode), round-robin."""
    steps = {name: build(name, dim, k, device) for name in names}
    timer = Timer(device)
    results = {}
    for train in (False, True):
        z, grad_weights = inputs(n, dim, device, train)
        times = {name: [] for name in names}
        for name in names:  # warm-up
            for _ in range(2):
                steps[name](z, grad_weights, train)
        start = cpu_clock()
        for _ in range(rounds):
            for name in names:
                z.grad = None
                times[name].append(timer(steps[name], z, grad_weights, train))
        end = cpu_clock()
        for name, ts in times.items():
            results[name, "train" if train else "eval"] = (statistics.median(ts), min(ts), max(ts))
        results["others_cpu", "train" if train else "eval"] = others_cpu(start, end)
    return results


def read_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # MiB
    raise KeyError(key)


def memory_child(spec):
    """Run in a fresh process: peak extra memory (MiB) of one step after a warm-up step."""
    name, n, k, dim, mode, device, threads = spec.split(":")
    n, k, dim = int(n), int(k), int(dim)
    if threads != "None":
        torch.set_num_threads(int(threads))
    train = mode == "train"
    step = build(name, dim, k, device)
    z, grad_weights = inputs(n, dim, device, train)
    step(z, grad_weights, train)
    z.grad = None
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(z, grad_weights, train)
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        before = read_status("VmRSS")
        step(z, grad_weights, train)
        peak = read_status("VmHWM") - before
    print(json.dumps({"peak_mib": peak}))


def cold_child(spec):
    """Run in a fresh process: seconds of the first training step (building and compiling included)."""
    name, n, k, dim, device = spec.split(":")
    step = build(name, int(dim), int(k), device)
    z, grad_weights = inputs(int(n), int(dim), device, train=True)
    started = time.perf_counter()
    step(z, grad_weights, True)
    sync(device)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def cold_start(names, n, k, dim, device, rounds):
    """Median seconds of each variant's first training step: `(fresh caches, second process)`."""
    results = {}
    for name in names:
        cold, warm = [], []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as caches:
                env = dict(os.environ, HF_HYPERVQ_CACHE=f"{caches}/hf_hypervq", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor",
                           TRITON_CACHE_DIR=f"{caches}/triton")  # fmt: skip
                for times in (cold, warm):
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cold-child",
                                          f"{name}:{n}:{k}:{dim}:{device}"], env=env, capture_output=True, text=True,
                                         check=True)  # fmt: skip
                    times.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        results[name] = (statistics.median(cold), statistics.median(warm))
    return results


def measure_memory(name, n, k, dim, mode, device, threads):
    env = dict(os.environ, GLIBC_TUNABLES=MEASURING_ALLOCATOR)
    spec = f"{name}:{n}:{k}:{dim}:{mode}:{device}:{threads}"
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-child", spec],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.cold_child:
        return cold_child(args.cold_child)
    if args.device == "cpu" and not args.default_allocator:
        rerun_with_tuned_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in VARIANTS if v in args.variants]
    if args.cold_start:
        print(f"# device: {device_name(args.device)}; torch {torch.__version__}; first training step, median of "
              f"{args.rounds} fresh processes")  # fmt: skip
        lines = ["| N | K | variant | first step, empty caches (s) | first step, second process (s) |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for n in args.sizes:
            for k in args.codebook_sizes:
                for name, (cold, warm) in cold_start(names, n, k, args.dim, args.device, args.rounds).items():
                    lines.append(f"| {n} | {k} | {name} | {cold:.2f} | {warm:.2f} |")
        print("\n".join(lines), flush=True)
        if args.output:
            Path(args.output).write_text("\n".join(lines) + "\n")
        return
    print(f"# device: {device_name(args.device)}; torch {torch.__version__}; dim={args.dim}; rounds={args.rounds}")
    lines = [
        "| N | K | quantizer | eval ms | eval ÷ VQ | train ms | train ÷ VQ | train ÷ floor | train peak MiB | peak ÷ VQ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        for k in args.codebook_sizes:
            timing = time_shape(names, n, k, args.dim, args.device, args.rounds)
            memory = {}
            if not args.no_memory:
                for name in names:
                    memory[name] = measure_memory(name, n, k, args.dim, "train", args.device, args.threads)
            for name in names:
                eval_ms, train_ms = timing[name, "eval"][0], timing[name, "train"][0]
                ratio = lambda a, b: f"{a / b:.2f}×" if b else "-"  # noqa: E731
                vq_eval = timing.get(("VectorQuantize", "eval"), (0,))[0]
                vq_train = timing.get(("VectorQuantize", "train"), (0,))[0]
                floor_train = timing.get(("floor", "train"), (0,))[0]
                peak = memory.get(name)
                vq_peak = memory.get("VectorQuantize")
                line = (
                    f"| {n} | {k} | {name} | {eval_ms:.1f} | {ratio(eval_ms, vq_eval)} | {train_ms:.1f} | "
                    f"{ratio(train_ms, vq_train)} | {ratio(train_ms, floor_train)} | "
                    f"{'-' if peak is None else f'{peak:.0f}'} | "
                    f"{ratio(peak, vq_peak) if peak is not None and vq_peak else '-'} |"
                )
                lines.append(line)
                print(line, flush=True)
            if ("HyperVQ", "train") in timing and ("VectorQuantize+defaults", "train") in timing:
                print(
                    f"<!-- N={n} K={k}: HyperVQ ÷ VectorQuantize+defaults: eval "
                    f"{timing['HyperVQ', 'eval'][0] / timing['VectorQuantize+defaults', 'eval'][0]:.2f}×, train "
                    f"{timing['HyperVQ', 'train'][0] / timing['VectorQuantize+defaults', 'train'][0]:.2f}× -->"
                )
            print(
                f"<!-- N={n} K={k}: share of CPU used by other processes: "
                f"eval {timing['others_cpu', 'eval']:.2f}, train {timing['others_cpu', 'train']:.2f} -->",
                flush=True,
            )
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
