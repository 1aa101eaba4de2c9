"""Tokenize an image data set once with a frozen tokenizer, and keep its tokens as a `datasets` data set to train
token models on many times; optionally push it to the Hub with a generated dataset card.

    python scripts/tokenize_dataset.py --tokenizer outputs/tokenizer --output_dir outputs/digits-tokens
    accelerate launch --multi_gpu --num_processes 8 scripts/tokenize_dataset.py --tokenizer org/hypervq-imagenet \\
        --dataset ILSVRC/imagenet-1k --split train validation --image_size 128 --output_dir outputs/imagenet-tokens \\
        --push_to_hub --repo_id org/imagenet-hypervq-tokens
    python scripts/train_prior.py --token_dataset outputs/digits-tokens --output_dir outputs/prior

The data set is any the training scripts take (a Hub id, a folder, a data file, `fashion_mnist`, the embedded digits
by default; `--streaming` reads it as a stream). Each split is mapped through the tokenizer in eval mode, in batches
(`datasets.map`), shard by shard; under `accelerate launch` the processes take the shards in turn, and the folder
holds exactly what one process would write. The output folder is laid out as a Hub dataset repository:
`data/<split>-NNNNN-of-NNNNN.parquet` with `input_ids` (the token grid, row-major, in the smallest unsigned integer
type that holds K) and `label` when the source has one, and `tokenization.json` (the tokenizer's name, revision and
weights SHA-256, image size, grid, K, each split's codebook usage), written last. `datasets.load_dataset(OUTPUT_DIR)`
reads it. Rerunning an interrupted command resumes it: finished shards are kept.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from accelerate import Accelerator
from transformers import AutoImageProcessor

from hf_hypervq.training.cli import reported_errors
from hf_hypervq.training.data import load_image_dataset
from hf_hypervq.training.generation import load_tokenizer
from hf_hypervq.training.hub import check_repo_id, push_token_dataset
from hf_hypervq.training.token_datasets import (
    DEFAULT_SHARD_SIZE,
    SPLIT_NAME,
    tokenizer_record,
    write_token_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer: a folder or a Hub id")
    parser.add_argument("--output_dir", required=True, help="where the token dataset goes")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default=None,
        help="as in the training scripts: a Hub id, a local image folder, a folder written by save_to_disk, a "
        ".parquet/.csv/.json file, or fashion_mnist (default: scikit-learn's handwritten digits)",
    )  # fmt: skip
    data.add_argument("--dataset_config", default=None, help="configuration name of a Hub data set")
    data.add_argument("--split", nargs="+", default=["train", "test"], help="splits to tokenize (default: train test)")
    data.add_argument("--image_column", default=None, help="image column (default: image, img, ... whichever exists)")
    data.add_argument("--label_column", default=None, help="label column (default: label, fine_label, ...)")
    data.add_argument(
        "--streaming", action="store_true", help="read the data set as a stream instead of downloading it"
    )
    data.add_argument(
        "--max_samples", type=int, default=None, help="tokenize only the first N images of each split (not a stream)"
    )
    images = parser.add_argument_group("images")
    images.add_argument(
        "--processor", default=None,
        help="an image processor (a folder or Hub id) to use instead of the tokenizer's own",
    )  # fmt: skip
    images.add_argument(
        "--image_size", type=int, default=None,
        help="resize images to N×N instead of the processor's size (a multiple of the tokenizer's downsampling factor)",
    )  # fmt: skip
    run = parser.add_argument_group("run")
    run.add_argument(
        "--batch_size", type=int, default=256, help="images per tokenizer call per process (default: 256)"
    )
    run.add_argument(
        "--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
        help=f"images per output file, the unit the processes share and a resumed run keeps (default: "
        f"{DEFAULT_SHARD_SIZE}; a stream is cut where its source files are)",
    )  # fmt: skip
    run.add_argument("--cpu", action="store_true", help="tokenize on the CPU even if a GPU is present")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="push the token dataset to the Hub when done")
    hub.add_argument("--repo_id", default=None, help="the Hub dataset repo to push to, 'user/name' or 'org/name'")
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size", "image_size", "max_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    bad = [split for split in args.split if not SPLIT_NAME.fullmatch(split)]
    if bad:
        parser.error(f"--split {bad[0]!r} is not a split name (letters, digits, _ and .)")
    if len(set(args.split)) != len(args.split):
        parser.error(f"--split names a split twice: {args.split}")
    if args.streaming and args.max_samples:  # datasets would cut each of the stream's shards short instead
        parser.error("--max_samples cannot be combined with --streaming: the processes share a stream by its files")
    if args.push_to_hub and not args.repo_id:
        parser.error("--push_to_hub needs --repo_id")
    if args.repo_id:
        try:
            check_repo_id(args.repo_id)
        except ValueError as error:
            parser.error(str(error))
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output_dir {args.output_dir} cannot be made: {error.strerror or error}")
    return args


def image_processor(args, processor):
    """The tokenizer's image processor, or --processor's, resized to --image_size when given."""
    if args.processor:
        try:
            processor = AutoImageProcessor.from_pretrained(args.processor)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OSError(f"--processor {args.processor}: cannot load it ({reason})") from None
    if args.image_size:
        size = {"height": args.image_size, "width": args.image_size}
        processor = type(processor).from_dict({**processor.to_dict(), "size": size})
    return processor


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        accelerator = Accelerator(cpu=args.cpu)
        tokenizer, processor = load_tokenizer(args.tokenizer)  # one line for a folder that holds no tokenizer
        processor = image_processor(args, processor)
        tokenizer.to(accelerator.device)
        if accelerator.is_main_process:
            print(f"tokenizing with {accelerator.num_processes} process(es) on {accelerator.device}")
        splits = {}
        with accelerator.main_process_first():  # the other processes find the data set in datasets' cache
            for split in args.split:
                data = load_image_dataset(
                    args.dataset, split=split, config_name=args.dataset_config, image_column=args.image_column,
                    label_column=args.label_column, streaming=args.streaming,
                )  # fmt: skip
                splits[split] = data.select(range(min(args.max_samples, len(data)))) if args.max_samples else data
        source = {
            "dataset": args.dataset or "scikit-learn/digits",
            "config": args.dataset_config,
            "image_column": args.image_column,
            "label_column": args.label_column,
            "streaming": args.streaming,
            "max_samples": args.max_samples,
        }
        metadata = write_token_dataset(
            splits, tokenizer, processor, args.output_dir, accelerator,
            record=tokenizer_record(args.tokenizer, tokenizer), source=source, batch_size=args.batch_size,
            shard_size=args.shard_size, command=shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        )  # fmt: skip
        if accelerator.is_main_process:
            grid = "×".join(map(str, metadata["grid"]))
            for split, usage in ((split, metadata["splits"][split]) for split in args.split):
                print(
                    f"{split}: {usage['num_images']} images, {usage['num_tokens']} tokens ({grid} grids, K="
                    f"{metadata['codebook_size']}, {metadata['dtype']}), perplexity {usage['perplexity']:.1f}, "
                    f"{usage['dead_codes']} dead codes"
                )
            print(f"wrote {args.output_dir}")
            if args.push_to_hub:
                print(f"pushed to {push_token_dataset(args.output_dir, args.repo_id, private=args.private)}")
        accelerator.end_training()


if __name__ == "__main__":
    main()
