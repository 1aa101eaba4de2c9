#!/usr/bin/env python
"""Tokens per second of scripts/tokenize_dataset.py's work, end to end (`write_token_dataset` in one process: images
decoded, processed, tokenized in eval mode and written as Parquet), next to the tokenizer's forward pass alone on the
same images (its share of the time), round-robin; medians of the rounds.

    python benchmarks/benchmark_tokenization.py                      # the digits' train split at 32×32, 8×8 tokens
    python benchmarks/benchmark_tokenization.py --tokenizer outputs/tokenizer --rounds 7
    python benchmarks/benchmark_tokenization.py --device cuda

Without --tokenizer the tokenizer is the default HyperVQ-VAE (K = 512, 32×32 images to 8×8 tokens) as initialised:
the speed does not depend on its weights. Every round writes a fresh folder, and datasets' cache is off, so nothing
is reused. On Linux CPUs the script re-executes itself with glibc's allocator set to keep freed memory, as the other
benchmarks do; pass `--default-allocator` to measure without it.
"""

import argparse
import statistics
import tempfile
import time

import datasets
import torch
from accelerate import Accelerator
from benchmarking import Timer, cpu_clock, others_cpu, rerun_with_tuned_allocator

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.training.data import DEFAULT_DATASET, load_image_dataset
from hf_hypervq.training.generation import load_tokenizer
from hf_hypervq.training.token_datasets import pixel_values, tokenizer_record, write_token_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokenizer", default=None, help="a trained tokenizer (default: the default one, as initialised)"
    )
    parser.add_argument("--dataset", default=None, help="as in the training scripts (default: the digits)")
    parser.add_argument("--split", default="train", help="the split to tokenize (default: train)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per tokenizer call (default: 256)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported (default: 5)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (default: cpu)")
    parser.add_argument("--default-allocator", action="store_true", help="do not re-run with the tuned allocator")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1:
        parser.error("--batch_size and --rounds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and not args.default_allocator:
        rerun_with_tuned_allocator()
    datasets.disable_caching()  # a cached map would not tokenize again
    accelerator = Accelerator(cpu=args.device == "cpu")
    with tempfile.TemporaryDirectory() as work:
        name = args.tokenizer
        if name is None:
            torch.manual_seed(0)
            HyperVQVAEModel(HyperVQVAEConfig()).save_pretrained(work)
            HyperVQImageProcessor().save_pretrained(work)
            name = work
        tokenizer, processor = load_tokenizer(name)
        tokenizer.to(accelerator.device)
        record = tokenizer_record(name, tokenizer)
        data = load_image_dataset(args.dataset, split=args.split)
        batches = [pixel_values(processor, data[i : i + args.batch_size]["image"]) for i in range(0, len(data), args.batch_size)]  # fmt: skip
        timer = Timer(args.device)

        def forward():
            with torch.no_grad():
                for batch in batches:
                    tokenizer.get_image_tokens(batch)

        def pipeline():
            with tempfile.TemporaryDirectory() as output:
                source = {"dataset": args.dataset or DEFAULT_DATASET}
                return write_token_dataset({args.split: data}, tokenizer, processor, output, accelerator,
                                           record=record, source=source, batch_size=args.batch_size,
                                           shard_size=len(data))  # fmt: skip

        metadata = pipeline()  # warm-up (and the grid)
        forward()
        times = {"pipeline": [], "forward": []}
        start = cpu_clock()
        for _ in range(args.rounds):
            started = time.perf_counter()
            pipeline()
            times["pipeline"].append(time.perf_counter() - started)
            times["forward"].append(timer(forward) / 1e3)
        busy = others_cpu(start, cpu_clock())
    tokens = len(data) * metadata["grid"][0] * metadata["grid"][1]
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# {device}; torch {torch.__version__}; {len(data)} images of {args.dataset or DEFAULT_DATASET} "
        f"({args.split}) at {'×'.join(map(str, metadata['image_size']))} -> {'×'.join(map(str, metadata['grid']))} "
        f"tokens, K={metadata['codebook_size']}; batch {args.batch_size}; median of {args.rounds} rounds; CPU share "
        f"of other processes {busy:.2f}"
    )
    print("| measured | s / round | images / s | tokens / s |")
    print("|---|---|---|---|")
    for label, key in (("tokenize_dataset (decode, process, tokenize, write)", "pipeline"),
                       ("the tokenizer's forward alone", "forward")):  # fmt: skip
        seconds = statistics.median(times[key])
        print(f"| {label} | {seconds:.2f} | {len(data) / seconds:,.0f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
