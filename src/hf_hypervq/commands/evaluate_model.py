"""Evaluate a saved HyperVQ model on a data split and write `eval_results.json` next to it.

    python scripts/evaluate_model.py outputs/tokenizer                       # digits test split
    python scripts/evaluate_model.py outputs/classifier --dataset uoft-cs/cifar100 --label_column fine_label
    accelerate launch scripts/evaluate_model.py outputs/vqsa --dataset ILSVRC/imagenet-1k --eval_split validation \\
        --corruptions all                                              # + corruption errors, mCE (known/unknown)

A tokenizer gets reconstruction MSE, codebook perplexity and usage, and silhouette / Davies-Bouldin of its latents
clustered by code (clean and perturbed inputs); a classifier gets top-1 accuracy, and with `--corruptions` the
ImageNet-C corruption errors of every corruption and severity, normalised by AlexNet (mCE over the 15 common
corruptions, "unknown" mCE over the 4 extra ones).
"""

import argparse
from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import hf_hypervq  # noqa: F401  (registers the models)
from hf_hypervq.metrics.mean_corruption_error.mean_corruption_error import COMMON_CORRUPTIONS, EXTRA_CORRUPTIONS
from hf_hypervq.models.hypervq.modeling_hypervq import check_pretrained_source
from hf_hypervq.training.cli import add_deprecated_alias, finish, reported_errors
from hf_hypervq.training.corruptions import corrupted_after_crop
from hf_hypervq.training.data import collate, load_image_dataset, with_image_transform
from hf_hypervq.training.evaluation import (
    evaluate_classifier,
    evaluate_corruptions,
    evaluate_tokenizer,
    pixel_range,
    protocol_line,
)
from hf_hypervq.training.outputs import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved model: a folder or a Hub id")
    parser.add_argument("--dataset", default=None, help="as in the training scripts (default: scikit-learn digits)")
    parser.add_argument("--dataset_config", default=None, help="configuration name of a Hub data set")
    parser.add_argument("--eval_split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--image_column", default=None, help="image column (default: auto)")
    parser.add_argument("--label_column", default=None, help="label column (default: auto)")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument(
        "--per_device_eval_batch_size", type=int, default=256, help="batch size per process (default: 256)"
    )
    add_deprecated_alias(parser, "--batch_size", "--per_device_eval_batch_size", type=int)
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="worker processes per data loader")
    parser.add_argument(
        "--corruptions", default=None, choices=["common", "extra", "all"],
        help="classifiers: also evaluate under ImageNet-C corruptions (common = the 15 known, extra = the 4 unknown)",
    )  # fmt: skip
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="corruption severities")
    parser.add_argument("--output_file", default=None, help="where to write (default: MODEL/eval_results.json)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: 0)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not all(1 <= severity <= 5 for severity in args.severities):
        parser.error(f"--severities must be between 1 and 5, got {args.severities}")
    if args.per_device_eval_batch_size < 1:
        parser.error("--per_device_eval_batch_size must be >= 1")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        parser.error("--max_eval_samples must be >= 1 (leave it out to evaluate every example)")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with reported_errors():
        check_pretrained_source(args.model, "model")
        accelerator = Accelerator(cpu=args.cpu)
        config = AutoConfig.from_pretrained(args.model)
        is_classifier = any(name.endswith("ForImageClassification") for name in config.architectures or [])
        model_class = AutoModelForImageClassification if is_classifier else AutoModel
        model = model_class.from_pretrained(args.model).eval()
        processor = AutoImageProcessor.from_pretrained(args.model)
        with accelerator.main_process_first():
            data = load_image_dataset(
                args.dataset, split=args.eval_split, config_name=args.dataset_config, image_column=args.image_column,
                label_column=args.label_column, require_labels=is_classifier,
            )  # fmt: skip
        if args.max_eval_samples:
            data = data.select(range(min(args.max_eval_samples, len(data))))
        model = accelerator.prepare(model)

        def loader(image_transform=None, image_processor=processor):
            dataset = with_image_transform(data, image_processor, image_transform)
            batches = DataLoader(dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate,
                                 num_workers=args.dataloader_num_workers)  # fmt: skip
            return accelerator.prepare(batches)

        if is_classifier:
            results = evaluate_classifier(model, loader(), accelerator)
            if args.corruptions:
                names = {"common": COMMON_CORRUPTIONS, "extra": EXTRA_CORRUPTIONS}.get(
                    args.corruptions, COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS
                )
                corrupted = lambda name, severity: evaluate_classifier(  # noqa: E731
                    model, loader(*corrupted_after_crop(processor, name, severity)), accelerator
                )
                results.update(evaluate_corruptions(corrupted, names, args.severities))
        else:
            results = evaluate_tokenizer(
                model, loader(), accelerator, seed=args.seed, data_range=pixel_range(processor)
            )
        if accelerator.is_main_process:
            local = Path(args.model).is_dir()
            output = Path(args.output_file or (Path(args.model) if local else Path(".")) / "eval_results.json")
            source = {"dataset": args.dataset or "scikit-learn/digits", "split": args.eval_split}
            results["protocol"] = {**source, **results["protocol"]}
            write_json(output, {**source, **results})
            summary = {k: round(v, 4) for k, v in results.items() if isinstance(v, float)}
            print(f"{output}: {summary}\nprotocol: {protocol_line(results['protocol'])}")
        finish(accelerator)


if __name__ == "__main__":
    main()
