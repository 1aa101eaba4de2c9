"""Tokenize an image data set once with a frozen tokenizer, and keep its tokens as a `datasets` data set to train
token models on many times; optionally push it to the Hub with its dataset card.

    hypervq-tokenize --tokenizer your-name/hypervq-digits --output_dir outputs/digits-tokens
    accelerate launch --multi_gpu --num_processes 8 -m hf_hypervq.commands.tokenize_dataset \\
        --tokenizer org/hypervq-imagenet --dataset ILSVRC/imagenet-1k --split train validation --image_size 128 \\
        --output_dir outputs/imagenet-tokens --push_to_hub --hub_dataset_id org/imagenet-hypervq-tokens
    hypervq-train-prior --token_dataset outputs/digits-tokens --output_dir outputs/prior

The data set is any the training scripts take (a Hub id, a folder, a data file, `fashion_mnist`, the embedded digits
by default; `--streaming` reads it as a stream). Each split is tokenized in eval mode, in batches, shard by shard,
its images decoded by `--dataloader_num_workers` loader workers; under `accelerate launch` the processes take the
shards in turn, and the folder holds exactly what one process would write. The output folder is laid out as a Hub
dataset repository: `data/<split>-NNNNN-of-NNNNN.parquet` with `input_ids` (the token grid, row-major, in the
smallest unsigned integer type that holds K; with `--views flip` or `ten_crop`, one grid per view, which a prior
draws one of per epoch), `index` (the row's position in its split), `label` when the source has one and the
`--keep_columns`; `README.md` (the dataset card) and `tokenization.json` (the tokenizer's Hub id and commit, or its
folder, and weights SHA-256, image size, grid, K, the views, each split's codebook usage), written last. `datasets.load_dataset(OUTPUT_DIR)` reads it. Finished shards wait in the hidden `.tokenizing/` until
all are done, so no half-written data is ever visible; rerunning an interrupted command resumes it.

A token dataset is pushed only when its tokenizer is on the Hub: push the tokenizer first (`hypervq-push`) and
tokenize with its Hub id, which is recorded with the commit it was loaded at.
"""

import argparse
from pathlib import Path

from accelerate import Accelerator
from transformers import AutoImageProcessor

from hf_hypervq import HyperVQImageProcessor
from hf_hypervq.training.cli import (
    add_deprecated_alias,
    add_hub_arguments,
    check_hub_arguments,
    finish,
    quiet_logs,
    reported_errors,
)
from hf_hypervq.training.data import load_image_dataset
from hf_hypervq.training.generation import load_tokenizer
from hf_hypervq.training.hub import (
    check_portable_dataset,
    default_repo_id,
    push_token_dataset,
    source_record,
    write_dataset_card,
)
from hf_hypervq.training.outputs import portable_command
from hf_hypervq.training.token_datasets import (
    DEFAULT_MAX_SHARD_SIZE,
    SPLIT_NAME,
    VIEWS,
    is_hub_id,
    parse_size,
    resolve_commit,
    tokenizer_record,
    write_token_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer: a Hub id or a folder")
    parser.add_argument(
        "--tokenizer_revision", default=None, help="the tokenizer's branch, tag or commit on the Hub (default: main)"
    )
    parser.add_argument("--output_dir", required=True, help="where the token dataset goes")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="start over in an --output_dir that holds tokens made otherwise (default: refuse; the same tokens resume)",
    )  # fmt: skip
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default=None,
        help="as in the training scripts: a Hub id, a local image folder, a folder written by save_to_disk, a "
        ".parquet/.csv/.json file, or fashion_mnist (default: scikit-learn's handwritten digits)",
    )  # fmt: skip
    data.add_argument("--dataset_config", default=None, help="configuration name of a Hub data set")
    data.add_argument(
        "--dataset_revision", default=None, help="the Hub data set's branch, tag or commit (default: main)"
    )
    data.add_argument("--split", nargs="+", default=["train", "test"], help="splits to tokenize (default: train test)")
    data.add_argument("--image_column", default=None, help="image column (default: image, img, ... whichever exists)")
    data.add_argument("--label_column", default=None, help="label column (default: label, fine_label, ...)")
    data.add_argument(
        "--streaming", action="store_true", help="read the data set as a stream instead of downloading it"
    )
    data.add_argument(
        "--max_train_samples", type=int, default=None, help="tokenize only the first N images of the train split"
    )
    data.add_argument(
        "--max_eval_samples", type=int, default=None, help="tokenize only the first N images of every other split"
    )
    add_deprecated_alias(
        data, "--max_samples", "--max_train_samples and --max_eval_samples", dest="max_samples", type=int
    )
    data.add_argument(
        "--keep_columns", nargs="+", default=[],
        help="other columns of the data set to keep beside the tokens, e.g. captions (each row's index is always kept)",
    )  # fmt: skip
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="worker processes that decode the images")
    images = parser.add_argument_group("images")
    images.add_argument(
        "--processor", default=None,
        help="an image processor (a folder or Hub id) to use instead of the tokenizer's own",
    )  # fmt: skip
    images.add_argument(
        "--image_size", type=int, default=None,
        help="shorter side to N, then the centre N×N crop, instead of the processor's rule (a multiple of the "
        "tokenizer's downsampling factor)",
    )  # fmt: skip
    images.add_argument(
        "--views", choices=VIEWS, default="center",
        help="what to store of each image: center (the processor's rule), flip (that and its mirror image) or ten_crop "
        "(the shorter side to 1.1·N, the centre and four corner N×N crops and their mirror images); a prior trained on "
        "the tokens draws one view per image per epoch (default: center)",
    )  # fmt: skip
    run = parser.add_argument_group("run")
    run.add_argument(
        "--per_device_eval_batch_size", type=int, default=256,
        help="images per tokenizer call per process (default: 256)",
    )  # fmt: skip
    add_deprecated_alias(run, "--batch_size", "--per_device_eval_batch_size", type=int)
    run.add_argument(
        "--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
        help=f"the size of each output file, uncompressed, e.g. 500MB or 1GB (default: {DEFAULT_MAX_SHARD_SIZE}); "
        "a shard is the unit the processes share and a resumed run keeps (a stream is cut where its source files are)",
    )  # fmt: skip
    run.add_argument(
        "--shard_size", type=int, default=None, help="images per output file, instead of --max_shard_size"
    )
    run.add_argument("--cpu", action="store_true", help="tokenize on the CPU even if a GPU is present")
    add_hub_arguments(parser, "--hub_dataset_id", "the Hub dataset repo to push to")
    parser.add_argument_group("hub").add_argument(
        "--regenerate_card", action="store_true",
        help="render the card again at the push, replacing edits made to OUTPUT_DIR/README.md",
    )  # fmt: skip
    add_deprecated_alias(parser, "--repo_id", "--hub_dataset_id")
    add_deprecated_alias(parser, "--private", "--hub_private_repo", flag=True)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_samples", None) is not None:  # the deprecated --max_samples: every split
        args.max_train_samples = args.max_train_samples or args.max_samples
        args.max_eval_samples = args.max_eval_samples or args.max_samples
    for name in ("per_device_eval_batch_size", "shard_size", "image_size", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    taken = sorted({"input_ids", "index", "image", "label"} & set(args.keep_columns))
    if taken:
        parser.error(f"--keep_columns {taken[0]}: the token dataset has its own {taken[0]!r} column")
    if len(set(args.keep_columns)) != len(args.keep_columns):
        parser.error(f"--keep_columns names a column twice: {args.keep_columns}")
    try:
        args.max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as error:
        parser.error(f"--max_shard_size {args.max_shard_size!r}: {error}")
    bad = [split for split in args.split if not SPLIT_NAME.fullmatch(split)]
    if bad:
        parser.error(f"--split {bad[0]!r} is not a split name (letters, digits, _ and .)")
    if len(set(args.split)) != len(args.split):
        parser.error(f"--split names a split twice: {args.split}")
    if args.streaming and (args.max_train_samples or args.max_eval_samples):
        # datasets would cut each of the stream's shards short instead
        parser.error("--max_train_samples and --max_eval_samples cannot be combined with --streaming")
    local = Path(args.tokenizer).expanduser().is_dir() or not is_hub_id(args.tokenizer)
    if args.tokenizer_revision and local:
        parser.error("--tokenizer_revision applies to a Hub id, not to the folder --tokenizer names")
    if args.dataset_revision and (args.dataset is None or not is_hub_id(args.dataset)):
        parser.error("--dataset_revision applies to a Hub data set, not to --dataset's folder, file or default")
    check_hub_arguments(args, parser, "hub_dataset_id")
    if args.push_to_hub and local:  # found now, not after tokenizing
        parser.error(
            f"--push_to_hub needs the tokenizer on the Hub, and --tokenizer {args.tokenizer} is a local folder: push "
            "it first (hypervq-push FOLDER --hub_model_id ORG/NAME), then pass --tokenizer ORG/NAME"
        )
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
    if args.image_size:  # the image rule: shorter side to N, centre N×N crop
        rule = HyperVQImageProcessor.for_image_size(args.image_size).to_dict()
        processor = type(processor).from_dict({**processor.to_dict(), **{key: rule[key] for key in
                                                                          ("size", "do_center_crop", "crop_size")}})  # fmt: skip
    return processor


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        accelerator = Accelerator(cpu=args.cpu)
        quiet_logs(accelerator.is_local_main_process)
        revision = None
        if not Path(args.tokenizer).expanduser().is_dir():  # a Hub id: one commit for every file read
            revision = resolve_commit(
                args.tokenizer, args.tokenizer_revision, filename="config.json", flag="--tokenizer"
            )
        tokenizer, processor = load_tokenizer(
            args.tokenizer, revision=revision
        )  # one line for a folder that holds no tokenizer
        processor = image_processor(args, processor)
        tokenizer.to(accelerator.device)
        if accelerator.is_main_process:
            print(f"tokenizing with {accelerator.num_processes} process(es) on {accelerator.device}")
        source = source_record(args)
        splits = {}
        with accelerator.main_process_first():  # the other processes find the data set in datasets' cache
            for split in args.split:
                data = load_image_dataset(
                    args.dataset, split=split, config_name=args.dataset_config, image_column=args.image_column,
                    label_column=args.label_column, streaming=args.streaming, revision=source["revision"],
                    keep_columns=args.keep_columns,
                )  # fmt: skip
                cap = args.max_train_samples if split == "train" else args.max_eval_samples
                splits[split] = data.select(range(min(cap, len(data)))) if cap else data
        repo_id = args.hub_dataset_id or default_repo_id(args.output_dir)
        metadata = write_token_dataset(
            splits, tokenizer, processor, args.output_dir, accelerator,
            record=tokenizer_record(args.tokenizer, tokenizer, revision), source=source,
            batch_size=args.per_device_eval_batch_size, shard_size=args.shard_size,
            max_shard_bytes=args.max_shard_bytes, command=portable_command("hypervq-tokenize"),
            overwrite=args.overwrite_output_dir, views=args.views, keep_columns=args.keep_columns,
            num_workers=args.dataloader_num_workers,
            write_card=lambda folder, metadata: write_dataset_card(folder, repo_id, metadata=metadata, license=args.license),
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
                check_portable_dataset(args.output_dir, metadata)
                url = push_token_dataset(
                    args.output_dir, args.hub_dataset_id, private=args.hub_private_repo, revision=args.hub_revision,
                    token=args.hub_token, license=args.license, regenerate_card=args.regenerate_card,
                )  # fmt: skip
                print(f"pushed to {url}")
        finish(accelerator)


if __name__ == "__main__":
    main()
