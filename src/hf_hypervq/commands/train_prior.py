"""Train a Gated PixelCNN token prior on the tokens a frozen HyperVQ-VAE tokenizer gives a data set, with accelerate.

    hypervq-train-prior --tokenizer your-name/hypervq-digits --output_dir outputs/prior     # digits, minutes
    accelerate launch -m hf_hypervq.commands.train_prior --tokenizer org/hypervq-imagenet \\
        --dataset ILSVRC/imagenet-1k --image_size 128 --num_layers 15 --class_conditional --output_dir outputs/imagenet-prior
    hypervq-train-prior --token_dataset your-name/hypervq-digits-tokens --output_dir outputs/prior   # tokenized once

The data set is tokenized once, up front, with the frozen tokenizer (spread over the processes and gathered), or read
from a token dataset that `scripts/tokenize_dataset.py` made (`--token_dataset`, a folder or Hub id: --tokenizer must
be the tokenizer that made its tokens, and is that one when left out); the prior then learns each token given the
tokens before it (cross-entropy, raster order), optionally conditioned on the image's class. The output folder gets the prior (`AutoModel.from_pretrained(output_dir)`; it records its tokenizer,
a local folder as its absolute path),
`samples.png` (images decoded from sampled token grids), `eval_results.json` (held-out nats and bits per token) and
`all_results.json` (with the commits of the tokenizer and the token dataset it used), and its card, `README.md`.
Then `hypervq-sample --prior OUTPUT_DIR` samples more and measures FID/IS.
"""

import argparse
from pathlib import Path

import torch

from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel
from hf_hypervq.models.hypervq.modeling_hypervq import check_pretrained_source
from hf_hypervq.training.cli import (
    add_common_arguments,
    check_common_arguments,
    finish,
    make_accelerator,
    reported_errors,
)
from hf_hypervq.training.data import DataError, TokenDataset, label_names, load_splits, make_loader, tokenize_split
from hf_hypervq.training.evaluation import evaluate_prior
from hf_hypervq.training.generation import load_tokenizer, recorded_tokenizer, sample_images
from hf_hypervq.training.hub import push_if_asked
from hf_hypervq.training.loop import make_scheduler, total_updates, train
from hf_hypervq.training.outputs import save_figure, save_model, write_results
from hf_hypervq.training.plots import save_sample_grid
from hf_hypervq.training.token_datasets import (
    TokenGrids,
    check_tokenizer,
    is_hub_id,
    load_token_dataset,
    resolve_commit,
    token_splits,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokenizer", default=None,
        help="a trained tokenizer: a Hub id or a folder (with --token_dataset: checked against the one that made "
        "the tokens; default: that one)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer_revision", default=None, help="the tokenizer's branch, tag or commit on the Hub (default: main)"
    )
    parser.add_argument(
        "--token_dataset", default=None,
        help="train on a token dataset made by hypervq-tokenize (a folder or a Hub dataset id) instead "
        "of tokenizing --dataset",
    )  # fmt: skip
    parser.add_argument(
        "--token_dataset_revision", default=None,
        help="the token dataset's branch, tag or commit on the Hub (default: main)",
    )  # fmt: skip
    parser.add_argument("--hidden_size", type=int, default=64, help="channels of the gated layers (default: 64)")
    parser.add_argument("--num_layers", type=int, default=15, help="gated layers (default: 15, as in the paper)")
    parser.add_argument("--head_hidden_size", type=int, default=256, help="width of the output head (default: 256)")
    parser.add_argument("--class_conditional", action="store_true", help="condition on the data set's labels")
    parser.add_argument("--num_sample_images", type=int, default=16, help="images in samples.png (default: 16)")
    # 15 epochs: on the default digits the held-out bits per token stop improving after about 17 and then rise
    add_common_arguments(parser, learning_rate=1e-3, epochs=15, batch_size=64)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(args, parser)
    if args.streaming:
        parser.error("--streaming is not supported: the prior trains on the tokens of the whole data set")
    if args.token_dataset is None and args.tokenizer is None:
        parser.error("--tokenizer is required (or --token_dataset, whose tokens a tokenizer made already)")
    if args.tokenizer_revision and (args.tokenizer is None or not is_hub_id(args.tokenizer)):
        parser.error("--tokenizer_revision applies to a Hub id given as --tokenizer")
    if args.token_dataset_revision and (args.token_dataset is None or not is_hub_id(args.token_dataset)):
        parser.error("--token_dataset_revision applies to a Hub dataset id given as --token_dataset")
    if (
        args.push_to_hub and args.tokenizer is not None and not is_hub_id(args.tokenizer)
    ):  # found now, not after training
        parser.error(
            f"--push_to_hub needs the tokenizer on the Hub, and --tokenizer {args.tokenizer} is a local folder: push "
            "it first (hypervq-push FOLDER --hub_model_id ORG/NAME), then pass --tokenizer ORG/NAME"
        )
    if args.token_dataset is not None:
        given = [f"--{name}" for name in ("dataset", "dataset_config", "dataset_revision", "image_column", "label_column")
                 if getattr(args, name) is not None]  # fmt: skip
        if given:
            parser.error(f"{given[0]} cannot be combined with --token_dataset: the tokens come from it")
    return args


def read_token_dataset(args, accelerator):
    """The tokenizer, its image processor, the training and evaluation tokens and labels, and the label names, from
    --token_dataset (at --token_dataset_revision, resolved to a commit once); --tokenizer must be the tokenizer that
    made the tokens (when left out, that one is loaded, at the commit the tokens record)."""
    with accelerator.main_process_first():  # downloaded and cached once
        data, metadata = load_token_dataset(args.token_dataset, args.token_dataset_revision)
    args.token_dataset_revision = metadata.get("token_dataset_revision")  # the commit: in the results and the card
    made_by = metadata["tokenizer"]
    if args.tokenizer:
        tokenizer, processor = load_tokenizer(args.tokenizer, revision=args.tokenizer_revision)
        check_tokenizer(metadata, tokenizer, args.tokenizer, args.token_dataset)
    else:
        args.tokenizer, args.tokenizer_revision = made_by["name_or_path"], made_by.get("revision")  # recorded too
        if args.push_to_hub and not is_hub_id(args.tokenizer):
            raise DataError(
                f"--push_to_hub needs the tokenizer on the Hub, and the token dataset's is the local folder "
                f"{args.tokenizer}: push it (hypervq-push FOLDER --hub_model_id ORG/NAME) and pass --tokenizer ORG/NAME"
            )
        try:
            tokenizer, processor = load_tokenizer(
                args.tokenizer, "the token dataset's tokenizer", revision=args.tokenizer_revision
            )
        except (OSError, ValueError) as error:  # e.g. a folder on the machine that made the tokens
            raise DataError(f"{error}; pass --tokenizer, the tokenizer that made them") from None
    train_data, eval_data = token_splits(data, args, args.token_dataset)
    names = label_names(train_data) if args.class_conditional else None
    if args.class_conditional and names is None:
        raise DataError(f"--class_conditional needs a ClassLabel label column, which {args.token_dataset} has not")
    # what the results and the card say the prior was evaluated on, at which commit
    args.dataset, args.dataset_revision = args.token_dataset, args.token_dataset_revision
    grid, labelled = metadata["grid"], names is not None  # read from the memory-mapped Arrow tables, batch by batch
    views = len(metadata.get("views", ["center"]))  # training draws one per epoch; evaluation takes the first
    train_tokens = TokenGrids(train_data, grid, labelled, views=views, seed=args.seed)
    return tokenizer, processor, train_tokens, TokenGrids(eval_data, grid, labelled, views=views), names


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        check_pretrained_source(args.tokenizer, "--tokenizer")
        accelerator = make_accelerator(args)
        if args.tokenizer and not Path(args.tokenizer).expanduser().is_dir():  # a Hub id: one commit for every read
            args.tokenizer_revision = resolve_commit(
                args.tokenizer, args.tokenizer_revision, filename="config.json", flag="--tokenizer"
            )
        if args.token_dataset:
            tokenizer, processor, train_set, eval_set, names = read_token_dataset(args, accelerator)
            grid_size = list(train_set.grid)
            tokenizer.to(accelerator.device)
        else:
            # one line for a prior's folder, or a missing Hub id
            tokenizer, processor = load_tokenizer(args.tokenizer, revision=args.tokenizer_revision)
            tokenizer.to(accelerator.device)
            with accelerator.main_process_first():
                train_data, eval_data = load_splits(args, require_labels=args.class_conditional)
            names = label_names(train_data) if args.class_conditional else None
            if args.class_conditional and names is None:
                raise DataError("--class_conditional needs a ClassLabel label column")
            train_tokens, train_labels = tokenize_split(train_data, tokenizer, processor, accelerator, args)
            eval_tokens, eval_labels = tokenize_split(eval_data, tokenizer, processor, accelerator, args)
            grid_size = list(train_tokens.shape[1:])
            labels = (train_labels, eval_labels) if names else (None, None)
            train_set, eval_set = TokenDataset(train_tokens, labels[0]), TokenDataset(eval_tokens, labels[1])
        config = HyperVQPriorConfig(
            codebook_size=tokenizer.config.codebook_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            head_hidden_size=args.head_hidden_size,
            num_classes=len(names) if names else 0,
            grid_size=grid_size,
            tokenizer_name_or_path=recorded_tokenizer(args.tokenizer),  # a folder absolute: found from any folder
            tokenizer_revision=args.tokenizer_revision,
            id2label=dict(enumerate(names)) if names else None,
        )
        prior = HyperVQPriorModel(config)
        stack = lambda items: {k: torch.stack([item[k] for item in items]) for k in items[0]}  # noqa: E731
        train_loader = make_loader(train_set, args.per_device_train_batch_size, stack, args, True, large=True)
        eval_loader = make_loader(eval_set, args.per_device_eval_batch_size, stack, args, False)
        optimizer = torch.optim.AdamW(prior.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = make_scheduler(args, optimizer, total_updates(args, train_loader, accelerator), accelerator)
        prior, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            prior, optimizer, train_loader, eval_loader, scheduler
        )
        results = train(
            args, accelerator, prior, optimizer, train_loader, lambda m, final: evaluate_prior(m, eval_loader, accelerator),
            scheduler=scheduler,
        )  # fmt: skip
        save_model(accelerator, prior, processor, args.output_dir)
        if accelerator.is_main_process:
            # from the saved weights: under FSDP or DeepSpeed this process's own model holds only a shard of them
            saved = HyperVQPriorModel.from_pretrained(args.output_dir).to(accelerator.device).eval()
            conditional = {"class_labels": torch.arange(args.num_sample_images) % len(names)} if names else {}
            samples = sample_images(saved, tokenizer, processor, args.num_sample_images, seed=args.seed, **conditional)
            save_figure(lambda path: save_sample_grid(samples, path), f"{args.output_dir}/samples.png")
            references = {
                "tokenizer": recorded_tokenizer(args.tokenizer),
                "tokenizer_revision": args.tokenizer_revision,
            }
            if args.token_dataset:
                references["token_dataset_revision"] = args.token_dataset_revision
            write_results(args, {**results, **references})
            push_if_asked(args)
        finish(accelerator)


if __name__ == "__main__":
    main()
