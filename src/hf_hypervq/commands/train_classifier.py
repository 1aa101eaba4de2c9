"""Train the paper's frozen-feature classifier on a trained HyperVQ-VAE tokenizer, with accelerate.

    python scripts/train_classifier.py --tokenizer outputs/tokenizer --output_dir outputs/classifier   # digits
    accelerate launch scripts/train_classifier.py --tokenizer outputs/cifar100 --dataset uoft-cs/cifar100 \\
        --label_column fine_label --output_dir outputs/cifar100-classifier

The tokenizer's encoder and quantizer stay frozen (and in eval mode); only the head (conv 3×3 + ReLU, global average
pool, two linear layers) trains, with cross-entropy. By default a BatchNorm without affine parameters standardises
each channel of the frozen features before the head (`classifier_normalize_features`, as MAE's linear probe does):
the code vectors' scale differs about 50-fold between quantizers, and the paper's head trained at one learning rate
favours the large ones (`results/REPORT.md`, "Classifier protocols"); `--no-normalize_features` gives the paper's
head. Images are preprocessed with the tokenizer's own image processor. The output folder holds the classifier (`AutoModelForImageClassification.from_pretrained(output_dir)`;
it also loads as the tokenizer with `AutoModel`), `eval_results.json` (top-1 accuracy) and `all_results.json`.
"""

import argparse

import torch
from transformers import AutoImageProcessor

from hf_hypervq import HyperVQVAEForImageClassification
from hf_hypervq.models.hypervq.modeling_hypervq import check_pretrained_source
from hf_hypervq.training.cli import (
    add_common_arguments,
    check_common_arguments,
    finish,
    make_accelerator,
    reported_errors,
)
from hf_hypervq.training.data import DataError, label_names, load_splits, make_loaders
from hf_hypervq.training.evaluation import evaluate_classifier
from hf_hypervq.training.hub import push_if_asked
from hf_hypervq.training.loop import make_scheduler, total_updates, train
from hf_hypervq.training.outputs import save_model, write_results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer: a folder or a Hub id")
    parser.add_argument(
        "--classifier_hidden_size", type=int, default=None, help="head width (default: the tokenizer config's, 128)"
    )
    parser.add_argument(
        "--normalize_features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="standardise the frozen features per channel before the head (default: on; off: the paper's head)",
    )
    add_common_arguments(parser, learning_rate=1e-3, epochs=20, batch_size=128)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(args, parser)
    return args


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        check_pretrained_source(args.tokenizer, "--tokenizer")
        accelerator = make_accelerator(args)
        processor = AutoImageProcessor.from_pretrained(args.tokenizer)
        with accelerator.main_process_first():
            train_data, eval_data = load_splits(args, require_labels=True)
        names = label_names(train_data)
        if names is None:
            raise DataError("the label column is not a ClassLabel feature, so the class names are unknown")
        head = {"classifier_normalize_features": args.normalize_features}
        if args.classifier_hidden_size is not None:
            head["classifier_hidden_size"] = args.classifier_hidden_size
        model = HyperVQVAEForImageClassification.from_pretrained(
            args.tokenizer,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            **head,
        )
        train_loader, eval_loader = make_loaders(args, train_data, eval_data, processor)
        trainable = [p for p in model.parameters() if p.requires_grad]  # the head only
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = make_scheduler(args, optimizer, total_updates(args, train_loader, accelerator), accelerator)
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        results = train(
            args,
            accelerator,
            model,
            optimizer,
            train_loader,
            lambda m, final: evaluate_classifier(m, eval_loader, accelerator),
            scheduler=scheduler,
        )
        save_model(accelerator, model, processor, args.output_dir)
        if accelerator.is_main_process:
            write_results(args, {**results, "tokenizer": args.tokenizer})
            push_if_asked(args)
        finish(accelerator)


if __name__ == "__main__":
    main()
