"""Train VQ-SA (a ResNet with a quantized two-token self-attention head) with HyperVQ, with accelerate.

    python scripts/train_vqsa.py --output_dir outputs/vqsa                   # digits, a small ResNet from scratch
    accelerate launch --multi_gpu --num_processes 4 scripts/train_vqsa.py --resnet microsoft/resnet-50 \\
        --dataset ILSVRC/imagenet-1k --eval_split validation --image_size 224 --output_dir outputs/vqsa-imagenet

As in VQ-SA (Yang et al., CVPR 2023; docs/method.md#vq-sa): the backbone is fine-tuned with SGD (momentum 0.9,
weight decay 5e-4, cosine schedule); each training image is randomly resized-cropped and flipped, then left clean or
corrupted with one of the 15 common ImageNet-C corruptions at severity 1-5 (`imagecorruptions-imaug`, pip install
"hf-hypervq[vqsa]"); the loss is the cross-entropy plus the quantizer's loss. `--resnet` takes a ResNet image
classifier (a folder or a Hub id such as microsoft/resnet-50) whose backbone and last layer are copied; without it a
small ResNet (3 stages of 16-64 channels) starts from scratch. Evaluate robustness (mCE) with
`scripts/evaluate_model.py --corruptions all`.
"""

import argparse

import torch

from hf_hypervq import QUANTIZER_TYPES, HyperVQImageProcessor
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
from hf_hypervq.training.vqsa import TrainAugmentation, build_vqsa_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet", default=None, help="ResNet image classifier to start from (folder or Hub id)")
    parser.add_argument("--quantizer", default="hyperbolic", choices=QUANTIZER_TYPES, help="the quantizer")
    parser.add_argument("--codebook_size", type=int, default=1000, help="number of codes K (default: 1000)")
    parser.add_argument(
        "--feature_scale", default="sqrt_dim", choices=["sqrt_dim", "l2", "none"], help="scaling of the feature"
    )
    parser.add_argument("--curvature", type=float, default=1.0, help="ball curvature c (hyperbolic quantizers)")
    parser.add_argument(
        "--commitment_weight",
        type=float,
        default=None,
        help="commitment loss weight (default: the quantizer's own: 0 for HyperVQ, 0.25 for KmeansVQ)",
    )
    parser.add_argument("--freeze_backbone", action="store_true", help="train only the VQ-SA head")
    parser.add_argument("--image_size", type=int, default=None, help="crop size (default: 224; digits: 32)")
    parser.add_argument("--no_corruptions", action="store_true", help="train without the corruption augmentation")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    add_common_arguments(parser, learning_rate=1e-3, epochs=30, batch_size=64)
    parser.set_defaults(weight_decay=5e-4, lr_scheduler_type="cosine")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(args, parser)
    if args.image_size is None:
        args.image_size = 224 if args.dataset else 32
    return args


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        accelerator = make_accelerator(args)
        with accelerator.main_process_first():
            train_data, eval_data = load_splits(args, require_labels=True)
        names = label_names(train_data)
        if names is None:
            raise DataError("the label column is not a ClassLabel feature, so the class names are unknown")
        model = build_vqsa_model(args, len(names), names)
        size = args.image_size
        if args.dataset:
            processor = HyperVQImageProcessor.for_imagenet(
                size={"shortest_edge": round(size * 256 / 224)}, crop_size={"height": size, "width": size}
            )
        else:  # digits are tiny: no crop at evaluation
            processor = HyperVQImageProcessor.for_imagenet(size={"height": size, "width": size}, do_center_crop=False)
        augment = TrainAugmentation(size, corruptions=not args.no_corruptions)
        train_loader, eval_loader = make_loaders(args, train_data, eval_data, processor, augment)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            parameters, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
        )
        scheduler = make_scheduler(args, optimizer, total_updates(args, train_loader, accelerator), accelerator)
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        results = train(
            args, accelerator, model, optimizer, train_loader,
            lambda m, final: evaluate_classifier(m, eval_loader, accelerator), scheduler=scheduler,
        )  # fmt: skip
        save_model(accelerator, model, processor, args.output_dir)
        if accelerator.is_main_process:
            write_results(args, {**results, "resnet": args.resnet})
            push_if_asked(args)
        finish(accelerator)


if __name__ == "__main__":
    main()
