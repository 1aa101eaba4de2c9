"""Train a HyperVQ-VAE image tokenizer (any of the five quantizers) with accelerate.

    python scripts/train_vqvae.py --output_dir outputs/tokenizer        # embedded digits, a few minutes on 2 cores
    accelerate launch scripts/train_vqvae.py --dataset uoft-cs/cifar100 --output_dir outputs/cifar100
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vqvae.py --dataset ILSVRC/imagenet-1k \\
        --image_size 128 --streaming --max_train_steps 250000 --output_dir outputs/imagenet

The loss is the reconstruction MSE plus the quantizer's loss, and the quantizer's Gumbel temperature follows the
number of optimizer updates. The output folder ends up with the model and its image processor
(`AutoModel.from_pretrained(output_dir)`), `all_results.json`, `eval_results.json`, `reconstructions.png` (inputs
above, reconstructions below), `codebook_usage.png`, `codebook.png` (every code decoded on its own, the paper's
Figure 5), and resumable checkpoints in `checkpoints/`.
"""

import argparse

import torch
from huggingface_hub.errors import StrictDataclassError

from hf_hypervq import QUANTIZER_TYPES, HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.models.hypervq.quantizers import decay_for_run
from hf_hypervq.training.cli import (
    add_common_arguments,
    check_common_arguments,
    finish,
    make_accelerator,
    reported_errors,
)
from hf_hypervq.training.data import FASHION_MNIST, RandomCropFlip, load_splits, make_loaders
from hf_hypervq.training.evaluation import evaluate_tokenizer, pixel_range
from hf_hypervq.training.hub import push_if_asked
from hf_hypervq.training.loop import make_scheduler, total_updates, train
from hf_hypervq.training.outputs import save_model, write_results
from hf_hypervq.training.plots import save_tokenizer_pictures
from hf_hypervq.training.recipes import recipe_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, learning_rate=1e-3, epochs=40, batch_size=128)
    model = parser.add_argument_group("model")
    model.add_argument("--quantizer", default="hyperbolic", choices=QUANTIZER_TYPES, help="the quantizer")
    model.add_argument(
        "--recipe", default="recommended", choices=["recommended", "paper"],
        help="'recommended' (the default): the quantizer's recipe of settings chosen on validation in the study "
        "(hf_hypervq.training.recipes; docs/training.md#recipes), for the flags you do not give; 'paper': the "
        "paper's settings",
    )  # fmt: skip
    model.add_argument(
        "--image_size", type=int, default=None,
        help="images are resized so that their shorter side is N, then centre-cropped to N×N, here and by the saved "
        "image processor (default: 32; digits: 16; fashion_mnist: 28, padded to 32)",
    )  # fmt: skip
    model.add_argument(
        "--train_augmentation", default="none", choices=["none", "crop_flip"],
        help="training images: 'none' (the paper: the centre crop, as in evaluation) or 'crop_flip' (a random N×N "
        "crop of the shorter-side-N image, flipped half the time)",
    )  # fmt: skip
    model.add_argument(
        "--pad_to_size", type=int, default=None,
        help="then centre them on an N×N black canvas (the saved image processor does the same), e.g. 28×28 "
        "Fashion-MNIST to 32×32 for an 8×8 token grid (default: no padding; fashion_mnist: 32)",
    )  # fmt: skip
    model.add_argument("--codebook_size", type=int, default=512, help="number of codes K (default: 512)")
    model.add_argument("--embedding_dim", type=int, default=64, help="latent vector size d (default: 64)")
    model.add_argument("--hidden_size", type=int, default=128, help="encoder/decoder channels (default: 128)")
    model.add_argument("--residual_hidden_size", type=int, default=32, help="residual bottleneck (default: 32)")
    model.add_argument("--num_residual_layers", type=int, default=2, help="residual blocks (default: 2)")
    model.add_argument("--num_downsamples", type=int, default=2, help="stride-2 convs; tokens = image / 2**n")
    model.add_argument("--curvature", type=float, default=1.0, help="ball curvature c (hyperbolic quantizers)")
    model.add_argument(
        "--commitment_weight", type=float, default=None,
        help="commitment loss weight (default: the quantizer's own: 0 for HyperVQ and HyperEmbMatVQ, as in the "
        "paper; 0.25 for KmeansVQ and HyperKmeansVQ)",
    )  # fmt: skip
    model.add_argument(
        "--gumbel_temperature", type=_decay, nargs=3, default=[2.0, 0.5, "run_length"],
        metavar=("MAX", "MIN", "DECAY"),
        help="Gumbel temperature max(MAX * DECAY**update, MIN) of the Gumbel quantizers. DECAY 'run_length' (the "
        "default) takes the decay that reaches MIN at the last update (results/ABLATIONS.md, row 'per_update': "
        "vq-wav2vec's 0.999995, made for ~300k updates, keeps τ near MAX in a short run)",
    )  # fmt: skip
    model.add_argument(
        "--offset_init_scale", type=float, default=1.0,
        help="HyperVQ/HyperEmbMatVQ: offsets start Uniform(0, s/sqrt(c*d)); 0 gives HNN++'s zeros (default: 1)",
    )  # fmt: skip
    model.add_argument(
        "--normal_init_scale", type=float, default=1.0,
        help="HyperVQ/HyperEmbMatVQ: multiplies HNN++'s std of the hyperplane normals (default: 1)",
    )  # fmt: skip
    model.add_argument(
        "--diversity_weight", type=float, default=None, metavar="W",
        help="the Gumbel quantizers (HyperVQ, HyperEmbMatVQ, GumbelVQ): weight of wav2vec 2.0's codebook diversity "
        "loss (K - exp(H(mean softmax of the logits))) / K, in training only (default: the --recipe's; the "
        "paper's is 0, off)",
    )  # fmt: skip
    model.add_argument(
        "--feature_clip", type=float, default=None, metavar="R",
        help="HyperVQ/HyperEmbMatVQ: rescale each latent to min(1, R/||z||) z before the map onto the ball, in "
        "training and eval (feature clipping, Guo et al., CVPR 2022; default: none, the paper's: off)",
    )  # fmt: skip
    return parser


def _decay(value: str):
    """A temperature flag's value: a number, or 'run_length' (decided once the run's length is known)."""
    return value if value == "run_length" else float(value)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(args, parser)
    for flag, value in recipe_settings(args.quantizer, args.recipe).items():
        if getattr(args, flag) is None:  # a flag given on the command line wins over the recipe
            setattr(args, flag, value)
    if args.image_size is None:
        args.image_size = {None: 16, FASHION_MNIST: 28}.get(args.dataset, 32)
        if args.dataset == FASHION_MNIST and args.pad_to_size is None:
            args.pad_to_size = 32  # framed as 28×28 MNIST-style images usually are: an 8×8 token grid, not 7×7
    if args.image_size < 1:
        parser.error(f"--image_size must be >= 1, got {args.image_size}")
    if args.pad_to_size is not None and args.pad_to_size < args.image_size:
        parser.error(f"--pad_to_size must be >= --image_size ({args.image_size}), got {args.pad_to_size}")
    factor = 2**args.num_downsamples if args.num_downsamples >= 1 else 1
    size_flag, input_size = (
        ("--pad_to_size", args.pad_to_size) if args.pad_to_size else ("--image_size", args.image_size)
    )
    if input_size % factor:
        parser.error(f"{size_flag} must be a positive multiple of 2**num_downsamples = {factor}, got {input_size}")
    try:
        build_config(args, num_updates=args.max_train_steps or 1)
    except (ValueError, StrictDataclassError) as error:
        parser.error(str(error).splitlines()[-1].strip())
    return args


def build_config(args, num_updates: int) -> HyperVQVAEConfig:
    """The model's config; a 'run_length' temperature decay becomes the number that reaches MIN in `num_updates`."""
    tau_max, tau_min, decay = args.gumbel_temperature
    if decay == "run_length":
        decay = decay_for_run(tau_max, tau_min, num_updates) if tau_min <= tau_max else 1.0  # the config rejects it
    return HyperVQVAEConfig(
        quantizer_type=args.quantizer,
        embedding_dim=args.embedding_dim,
        codebook_size=args.codebook_size,
        hidden_size=args.hidden_size,
        residual_hidden_size=args.residual_hidden_size,
        num_residual_layers=args.num_residual_layers,
        num_downsamples=args.num_downsamples,
        curvature=args.curvature,
        commitment_weight=args.commitment_weight,
        gumbel_temperature=[tau_max, tau_min, decay],
        offset_init_scale=args.offset_init_scale,
        normal_init_scale=args.normal_init_scale,
        diversity_weight=args.diversity_weight,
        feature_clip=args.feature_clip,
    )


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        accelerator = make_accelerator(args)
        padding = {"do_pad": True, "pad_size": {"height": args.pad_to_size, "width": args.pad_to_size}}
        if args.pad_to_size:  # a square data set whose images are smaller than the token grid needs
            processor = HyperVQImageProcessor(size={"height": args.image_size, "width": args.image_size}, **padding)
        else:
            processor = HyperVQImageProcessor.for_image_size(args.image_size)
        augment = RandomCropFlip(args.image_size) if args.train_augmentation == "crop_flip" else None
        with accelerator.main_process_first():
            train_data, eval_data = load_splits(args)
        sample_images = [eval_data[i]["image"] for i in range(min(8, len(eval_data)))]
        train_loader, eval_loader = make_loaders(args, train_data, eval_data, processor, augment)
        num_updates = total_updates(args, train_loader, accelerator)
        model = HyperVQVAEModel(build_config(args, num_updates=num_updates))

        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = make_scheduler(args, optimizer, num_updates, accelerator)
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        results = train(
            args,
            accelerator,
            model,
            optimizer,
            train_loader,
            lambda m, final: evaluate_tokenizer(
                m, eval_loader, accelerator, data_range=pixel_range(processor), full=final
            ),
            scheduler=scheduler,
        )
        save_model(accelerator, model, processor, args.output_dir)
        if accelerator.is_main_process:
            # from the saved weights: under FSDP or DeepSpeed this process's own model holds only a shard of them
            saved = HyperVQVAEModel.from_pretrained(args.output_dir).to(accelerator.device).eval()
            save_tokenizer_pictures(saved, processor, sample_images, results, args)
            write_results(args, results)
            push_if_asked(args)
        finish(accelerator)


if __name__ == "__main__":
    main()
