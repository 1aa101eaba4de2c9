#!/usr/bin/env python
"""Peak memory of the two jobs that read every image, at N and 10·N ImageNet-shaped photos: tokenization
(`hypervq-tokenize`, the whole train split) and tokenizer training (`hypervq-train-vqvae`, a fixed number of steps).
Neither should grow with the data set: images are read from disk a batch at a time by loader workers, never held.

    python benchmarks/benchmark_data_memory.py                        # 2,000 and 20,000 photos (about 10 minutes)
    python benchmarks/benchmark_data_memory.py --num_images 200      # quicker

The photos come from `make_rehearsal_data.py` (ImageNet's sizes and aspect ratios, JPEG), read as an image folder;
the tokenizer is a fresh default one at `--image_size` (64). Each run is a fresh process tree with a fresh datasets
cache (so the image folder's Arrow index is built inside it, as on a first run). Memory is the peak, sampled every
0.2 s, of the process tree's summed PSS (proportional set size: pages shared between the main process and its
forked loader workers count once), as psutil reports it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def peak_pss_mib(command: list[str], env: dict) -> float:
    """Run `command` and return the peak of its process tree's summed PSS, in MiB."""
    log = tempfile.TemporaryFile("w+")  # not a pipe: one nobody reads until the end can fill up and block the job
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    root, peak = psutil.Process(process.pid), 0.0
    while process.poll() is None:
        total = 0
        for member in [root, *root.children(recursive=True)]:
            try:
                total += member.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total / 2**20)
        time.sleep(0.2)
    log.seek(0)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{log.read()[-3000:]}")
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000, help="N: the smaller data set (default: 2000)")
    parser.add_argument("--image_size", type=int, default=64, help="the tokenizer's image size (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of each job (default: 2)")
    parser.add_argument("--train_steps", type=int, default=60, help="training steps at either size (default: 60)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each job; the median is reported (default: 3)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from make_rehearsal_data import make_rehearsal_data

    from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel

    workers = ["--dataloader_num_workers", str(args.workers)]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        HyperVQVAEModel(HyperVQVAEConfig()).save_pretrained(scratch / "tokenizer")
        HyperVQImageProcessor.for_image_size(args.image_size).save_pretrained(scratch / "tokenizer")
        rows = []
        for count in (args.num_images, 10 * args.num_images):
            images = make_rehearsal_data(scratch / f"data-{count}", count) / "images"
            jobs = {
                "tokenization (the whole split)": [
                    "tokenize_dataset.py", "--tokenizer", scratch / "tokenizer", "--dataset", images, "--split",
                    "train", *workers, "--output_dir", scratch / "tokens",
                ],
                f"training ({args.train_steps} steps of 32)": [
                    "train_vqvae.py", "--dataset", images, "--eval_split", "validation", "--max_eval_samples", "64",
                    "--image_size", str(args.image_size), "--max_train_steps", str(args.train_steps),
                    "--per_device_train_batch_size", "32", "--eval_at_end_only", *workers,
                    "--output_dir", scratch / "run",
                ],
            }  # fmt: skip
            for job, (script, *flags) in jobs.items():
                peaks = []
                for round_ in range(args.rounds):
                    env = {**os.environ, "HF_DATASETS_CACHE": str(scratch / f"cache-{count}-{round_}"),
                           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
                    command = [
                        sys.executable,
                        str(SCRIPTS / script),
                        "--cpu",
                        "--overwrite_output_dir",
                        *map(str, flags),
                    ]
                    peaks.append(peak_pss_mib(command, env))
                rows.append((job, count, statistics.median(peaks)))
                print(f"{job}, {count:,} photos: peak PSS {statistics.median(peaks):.0f} MiB", file=sys.stderr)
    print(f"| job | photos | peak PSS, MiB (median of {args.rounds}) | 10·N / N |")
    print("|---|---|---|---|")
    for job in dict.fromkeys(job for job, _, _ in rows):
        small, large = [(count, peak) for name, count, peak in rows if name == job]
        print(f"| {job} | {small[0]:,} | {small[1]:.0f} | |")
        print(f"| {job} | {large[0]:,} | {large[1]:.0f} | {large[1] / small[1]:.2f} |")


if __name__ == "__main__":
    main()
