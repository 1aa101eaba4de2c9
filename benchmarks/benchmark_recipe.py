#!/usr/bin/env python
"""What the paper's ImageNet recipe (recipes/imagenet/) costs, measured at its shapes, and what that projects to.

    python benchmarks/benchmark_recipe.py                        # this machine: FLOPs, memory, data pipeline
    python benchmarks/benchmark_recipe.py --device cuda          # a GPU: measured images/s replace the projection
    python benchmarks/benchmark_recipe.py --steps 2 --no-memory  # a quick run (tools/check_device.py, the tests)

For each of the recipe's three jobs (the 128×128 tokenizer, the Gated PixelCNN prior on its 32×32 tokens, VQ-SA on
a ResNet-50 at 224×224) it measures:

- FLOPs per image of one training step, forward and backward, counted by `torch.utils.flop_counter` (matmuls and
  convolutions; the elementwise work is not counted, so the count is a floor);
- peak memory of one process training at batch `--batch_size` (8), in a fresh process: on CPU the resident-set
  high-water mark minus the memory before the step, on CUDA `torch.cuda.max_memory_allocated`;
- the time of a training step at that batch on `--device`, median of `--steps` steps after one warm-up;

and for the data pipeline, the images per second one core decodes and prepares as the tokenizer's training loader
does with `--train_augmentation crop_flip` (JPEG decode, shorter side to 128, random 128×128 crop, flip,
normalise), on the rehearsal data set (`benchmarks/make_rehearsal_data.py`; `--data_dir`, else 256 images made on
the fly).

From these it projects, labelled as a projection, the GPU-hours of each job on the paper's data (1,281,167
ImageNet training images, the epochs below) at an assumed GPU throughput (`--gpu_tflops`, dense bf16 tensor-core
peak; default an A100's 312) and an assumed model FLOPs utilisation (`--mfu`, default 0.35), and the number of data
cores each GPU needs to be fed. On a GPU, the measured step time gives the images per second instead.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmarking import cpu_clock, others_cpu
from torch.utils.flop_counter import FlopCounterMode


IMAGENET_TRAIN_IMAGES = 1_281_167
# The recipe's jobs (recipes/imagenet/README.md has their commands): model, input shape, epochs. The paper gives 50
# epochs for the prior and VQ-SA, and no count for the tokenizer: 20 epochs is this recipe's assumption.
JOBS = {
    "tokenizer": {"image_size": 128, "epochs": 20},
    "prior": {"grid": 32, "epochs": 50},
    "vqsa": {"image_size": 224, "epochs": 50},
}
TOKENIZER = dict(
    hidden_size=256,
    residual_hidden_size=64,
    num_residual_layers=2,
    embedding_dim=64,
    codebook_size=512,
    num_downsamples=2,
)  # fmt: skip  (VQ-VAE's ImageNet model: 128×128 -> 32×32 codes, K = 512)
PRIOR = dict(codebook_size=512, hidden_size=128, num_layers=15, grid_size=(32, 32), num_classes=1000)
VQSA = dict(codebook_size=1024, num_labels=1000)  # the paper's K = 1024, ResNet-50


def build(job: str, device: str):
    """`(model, make_batch(batch_size), loss(model, batch))` for one job."""
    from hf_hypervq import (
        HyperVQPriorConfig,
        HyperVQPriorModel,
        HyperVQSAConfig,
        HyperVQSAForImageClassification,
        HyperVQVAEConfig,
        HyperVQVAEModel,
    )

    if job == "tokenizer":
        model = HyperVQVAEModel(HyperVQVAEConfig(**TOKENIZER))
        size = JOBS[job]["image_size"]

        def batch(n):
            return {"pixel_values": torch.rand(n, 3, size, size, device=device) * 2 - 1}

    elif job == "prior":
        model = HyperVQPriorModel(HyperVQPriorConfig(**PRIOR))
        grid = JOBS[job]["grid"]

        def batch(n):
            return {"image_tokens": torch.randint(0, 512, (n, grid, grid), device=device),
                    "class_labels": torch.randint(0, 1000, (n,), device=device)}  # fmt: skip

    else:
        model = HyperVQSAForImageClassification(HyperVQSAConfig(**VQSA))
        size = JOBS[job]["image_size"]

        def batch(n):
            return {"pixel_values": torch.randn(n, 3, size, size, device=device),
                    "labels": torch.randint(0, 1000, (n,), device=device)}  # fmt: skip

    return model.to(device).train(), batch


def train_step(model, inputs, optimizer):
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_image(job: str, batch_size: int = 2) -> float:
    """Forward and backward FLOPs of one image (counted on a small CPU batch: the count is linear in it)."""
    model, batch = build(job, "cpu")
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch(batch_size)).loss.backward()
    return counter.get_total_flops() / batch_size


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_seconds(job: str, device: str, batch_size: int, steps: int) -> float:
    model, batch = build(job, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    inputs = batch(batch_size)
    train_step(model, inputs, optimizer)  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        train_step(model, inputs, optimizer)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(key + ":"))


def memory_child(job: str, device: str, batch_size: int) -> None:
    """In a fresh process: the peak extra memory (MiB) of a training step after a warm-up step."""
    model, batch = build(job, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    inputs = batch(batch_size)
    train_step(model, inputs, optimizer)  # the optimizer's state exists from here on
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, inputs, optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20  # weights, optimizer state and activations
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the high-water mark to the current resident set
        before = _status_mib("VmRSS")
        train_step(model, inputs, optimizer)
        peak = _status_mib("VmHWM") - before  # activations and gradients: the step's own memory
    print(json.dumps({"peak_mib": peak}))


def peak_memory(job: str, device: str, batch_size: int) -> float:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory_child", job, "--device", device,
         "--batch_size", str(batch_size)],
        env={**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},  # freed tensors leave the RSS
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def pipeline_images_per_second(data_dir: str | None, seconds: float = 5.0) -> float:
    """Images per second one core prepares as the tokenizer's training loader does with `--train_augmentation
    crop_flip`: JPEG decode, `RandomCropFlip`, then the saved processor's rule and normalisation."""
    from PIL import Image

    from hf_hypervq import HyperVQImageProcessor
    from hf_hypervq.training.data import RandomCropFlip, SampleKey

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core; the training steps measured afterwards get all of them back
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if data_dir is None:
                sys.path.insert(0, str(Path(__file__).parent))
                from make_rehearsal_data import make_rehearsal_data

                data_dir = make_rehearsal_data(Path(scratch, "rehearsal"), 256, num_shards=1)
            files = sorted(Path(data_dir, "images", "train").rglob("*.jpg"))
            size = JOBS["tokenizer"]["image_size"]
            augment, processor = RandomCropFlip(size), HyperVQImageProcessor.for_image_size(size)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                for path in files:
                    with Image.open(path) as image:
                        crop = augment(image.convert("RGB"), SampleKey(0, 0, count))
                    processor(images=crop, return_tensors="pt")
                    count += 1
                    if time.perf_counter() - started >= seconds:
                        break
            return count / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step for memory and time (default: 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default: 5)")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    parser.add_argument("--data_dir", default=None, help="a rehearsal data set (make_rehearsal_data.py)")
    parser.add_argument("--gpu_tflops", type=float, default=312.0, help="assumed GPU peak TFLOP/s (A100 bf16: 312)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed share of that peak reached (default: 0.35)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--output", default=None, help="also write the results as JSON")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jobs = args.jobs.split(",")
    if set(jobs) - set(JOBS):
        parser.error(f"unknown --jobs {sorted(set(jobs) - set(JOBS))}; choose from {list(JOBS)}")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not (args.gpu_tflops > 0 and 0 < args.mfu <= 1):
        parser.error("--gpu_tflops must be > 0 and --mfu in (0, 1]")
    if args.memory_child:
        return memory_child(args.memory_child, args.device, args.batch_size)

    start = cpu_clock()
    pipeline = pipeline_images_per_second(args.data_dir)
    busy = others_cpu(start, cpu_clock())
    print(
        f"# device: {args.device}; torch {torch.__version__}; batch {args.batch_size}; medians of {args.steps} steps"
    )
    print(f"# data pipeline (decode, shorter side 128, random crop, flip, normalise): {pipeline:.0f} images/s per core "
          f"(other processes used {busy:.0%} of the machine meanwhile)")  # fmt: skip
    print(f"# projection: {args.gpu_tflops:g} TFLOP/s per GPU at {args.mfu:.0%} utilisation (assumed, not measured)")
    lines = [
        "| job | GFLOPs per image (fwd+bwd) | peak MiB per process | step s | images/s here | GPU images/s | "
        "epochs | GPU-hours | data cores per GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = {"device": args.device, "pipeline_images_per_second_per_core": pipeline, "jobs": {}}
    for job in jobs:
        flops = flops_per_image(job)
        memory = None if args.no_memory else peak_memory(job, args.device, args.batch_size)
        seconds = step_seconds(job, args.device, args.batch_size, args.steps)
        here = args.batch_size / seconds
        # on a GPU the measured rate; elsewhere the projection from the FLOP count
        gpu_rate = here if args.device.startswith("cuda") else args.gpu_tflops * 1e12 * args.mfu / flops
        epochs = JOBS[job]["epochs"]
        gpu_hours = IMAGENET_TRAIN_IMAGES * epochs / gpu_rate / 3600
        cores = gpu_rate / pipeline if job != "prior" else 0.0  # the prior reads stored tokens, no image decoding
        results["jobs"][job] = {"gflops_per_image": flops / 1e9, "peak_mib": memory, "step_seconds": seconds,
                                "images_per_second_here": here, "gpu_images_per_second": gpu_rate, "epochs": epochs,
                                "gpu_hours": gpu_hours, "data_cores_per_gpu": cores}  # fmt: skip
        label = "measured" if args.device.startswith("cuda") else "projected"
        lines.append(
            f"| {job} | {flops / 1e9:.2f} | {'-' if memory is None else f'{memory:.0f}'} | {seconds:.3f} | "
            f"{here:.1f} | {gpu_rate:,.0f} ({label}) | {epochs} | {gpu_hours:,.1f} ({label}) | {cores:.1f} |"
        )
        print(lines[-1], flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
