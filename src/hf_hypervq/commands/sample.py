"""Sample images from a trained token prior through its tokenizer; optionally measure FID and Inception Score.

    python scripts/sample.py --prior outputs/prior --output samples.png                  # a grid of 16 samples
    python scripts/sample.py --prior outputs/prior --num_samples 500 --feature_extractor outputs/classifier
    python scripts/sample.py --prior outputs/imagenet-prior --num_samples 50000 --dataset ILSVRC/imagenet-1k \\
        --split validation                                            # Inception-v3 features (needs timm + the Hub)

FID compares the Gaussians fitted to the pool features of the samples and of `--num_samples` real images of the data
set; IS uses the extractor's class probabilities. The standard extractor is Inception-v3
(timm/inception_v3.tv_in1k, loaded through transformers); where it cannot be loaded, any image classifier works (a
folder or Hub id, e.g. one trained with scripts/train_classifier.py). The output always says which extractor produced
the numbers: FID and IS are only comparable between runs that used the same one.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModel

import hf_hypervq  # noqa: F401  (registers the models)
from hf_hypervq.models.hypervq.modeling_hypervq import check_pretrained_source
from hf_hypervq.training.cli import reported_errors
from hf_hypervq.training.data import load_image_dataset
from hf_hypervq.training.evaluation import metric
from hf_hypervq.training.generation import (
    INCEPTION_V3,
    find_recorded_tokenizer,
    load_feature_extractor,
    load_tokenizer,
    sample_images,
)
from hf_hypervq.training.outputs import write_json
from hf_hypervq.training.plots import save_sample_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True, help="a trained prior (folder or Hub id)")
    parser.add_argument("--tokenizer", default=None,
                        help="its tokenizer, a folder or Hub id (default: the one the prior records)")  # fmt: skip
    parser.add_argument("--num_images", type=int, default=16, help="images in the PNG grid (default: 16)")
    parser.add_argument("--output", default="samples.png", help="where the grid goes (default: samples.png)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None, help="classes, for a conditional prior")
    parser.add_argument("--num_samples", type=int, default=None, help="also compute FID/IS on this many samples")
    parser.add_argument("--feature_extractor", default=INCEPTION_V3, help=f"FID/IS network (default: {INCEPTION_V3})")
    parser.add_argument("--dataset", default=None, help="real images for FID (default: scikit-learn digits)")
    parser.add_argument("--split", default="test", help="split of --dataset (default: test)")
    parser.add_argument("--image_column", default=None, help="image column of --dataset")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="worker processes per data loader")
    parser.add_argument("--metrics_file", default=None, help="where FID/IS go (default: next to --output)")
    return parser


def parse_args(argv=None):
    """The flags, checked before any model is loaded (argparse's one-line error, exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    if args.num_samples is not None and args.num_samples < 2:
        parser.error(f"--num_samples must be >= 2 (FID needs a covariance), got {args.num_samples}")
    if not 0 < args.temperature < math.inf:  # also NaN
        parser.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    for name in ("seed", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.class_labels and min(args.class_labels) < 0:
        parser.error(f"--class_labels must be class ids >= 0, got {args.class_labels}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        check_pretrained_source(args.prior, "prior")
        prior = AutoModel.from_pretrained(args.prior).eval()
        if args.tokenizer:
            tokenizer_path = args.tokenizer
            tokenizer, processor = load_tokenizer(tokenizer_path)
        else:
            tokenizer_path = find_recorded_tokenizer(args.prior, prior.config.tokenizer_name_or_path)
            tokenizer, processor = load_tokenizer(
                tokenizer_path, "the prior's tokenizer", hint="; pass --tokenizer",
                revision=getattr(prior.config, "tokenizer_revision", None),  # the commit it was trained with
            )  # fmt: skip
        if tokenizer.config.codebook_size != prior.config.codebook_size:  # its tokens would decode to garbage
            raise ValueError(
                f"the prior models {prior.config.codebook_size} codes but the tokenizer {tokenizer_path} has "
                f"{tokenizer.config.codebook_size}: pass the --tokenizer it was trained on"
            )
        if args.class_labels and not prior.config.num_classes:
            raise ValueError("--class_labels needs a class-conditional prior; this one is unconditional")

        def labels(count):
            if not prior.config.num_classes:
                return {}
            chosen = args.class_labels or list(range(prior.config.num_classes))
            return {"class_labels": torch.tensor([chosen[i % len(chosen)] for i in range(count)])}

        grid = sample_images(
            prior,
            tokenizer,
            processor,
            args.num_images,
            temperature=args.temperature,
            seed=args.seed,
            **labels(args.num_images),
        )
        save_sample_grid(grid, args.output)
        print(f"wrote {args.output} ({args.num_images} samples)")
        if args.num_samples:
            extractor = load_feature_extractor(args.feature_extractor)
            samples = sample_images(
                prior,
                tokenizer,
                processor,
                args.num_samples,
                temperature=args.temperature,
                seed=args.seed + 1,
                **labels(args.num_samples),
            )
            real = load_image_dataset(args.dataset, split=args.split, image_column=args.image_column)
            real = real.select(range(min(args.num_samples, len(real))))
            sample_features, sample_probabilities = extractor(samples)
            # the real images are decoded in the loader's workers, each once
            real_features, _ = extractor.of_dataset(real, num_workers=args.dataloader_num_workers)
            scores = metric("fid_inception_score").compute(
                predictions=torch.cat([real_features, sample_features]).numpy(),
                references=[0] * len(real_features) + [1] * len(sample_features),
                probabilities=sample_probabilities.numpy(), splits=min(10, len(samples)),
                feature_extractor=f"{extractor.name} (sha256 {extractor.weights_sha256})",
            )  # fmt: skip
            score, score_std = scores["inception_score"], scores["inception_score_std"]
            metrics = {
                "fid": scores["fid"],
                "inception_score": score,
                "inception_score_std": score_std,
                "feature_extractor": extractor.name,
                "protocol": {
                    "feature_extractor": extractor.name,
                    "feature_extractor_sha256": extractor.weights_sha256,
                    "num_samples": len(samples),
                    "num_real_images": len(real),
                    "real_images": f"{args.dataset or 'scikit-learn/digits'}:{args.split}",
                    "resolution": [samples[0].height, samples[0].width],
                    "temperature": args.temperature,
                },
            }
            path = Path(args.metrics_file or Path(args.output).with_name("sample_metrics.json"))
            write_json(path, metrics)
            print(
                f"FID {metrics['fid']:.2f}, IS {score:.2f} ± {score_std:.2f} over {len(samples)} samples against "
                f"{len(real)} real images, features from {extractor.name} "
                f"(sha256 {extractor.weights_sha256[:12]}), wrote {path}"
            )


if __name__ == "__main__":
    sys.exit(main())
