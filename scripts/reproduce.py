#!/usr/bin/env python
"""Rerun the HyperVQ paper's comparisons at the scale this machine allows, and write a report.

    python scripts/reproduce.py                  # the default grid on the embedded digits, ~1 hour on 2 CPU cores
    python scripts/reproduce.py --quick          # a few minutes (CI): one K, one seed, a tiny model
    python scripts/reproduce.py --dataset uoft-cs/cifar100 --label_column fine_label --image_size 32 \\
        --codebook_sizes 64 128 256 512 --tokenizer_steps 20000 --output_dir results/cifar100

For every quantizer × codebook size × seed it trains a tokenizer with `scripts/train_vqvae.py` and a frozen-feature
classifier on it with `scripts/train_classifier.py` (as subprocesses, exactly the commands listed in the report),
then trains a tokenizer with 3-dimensional latents and K = 16 for HyperVQ and KmeansVQ (the paper's Table 5 /
Figure 6 setting). Every quantizer gets the same architecture, steps, learning rate and seeds. The output folder gets
`REPORT.md` (tables of mean ± std over seeds, the paper's claims checked one by one, the commands, versions and wall
time), `results.json` (every run's numbers) and the plots. Finished runs are reused when the command is rerun.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import hf_hypervq
from hf_hypervq import HyperVQImageProcessor
from hf_hypervq.models.hypervq.configuration_hypervq import QUANTIZER_TYPES
from hf_hypervq.models.hypervq.hyperbolic import expmap0_projected
from hf_hypervq.training.data import load_image_dataset
from hf_hypervq.training.report import (
    aggregate,
    check_claims,
    plot_embedding_scatter,
    plot_metric_vs_k,
    plot_usage_histograms,
    write_report,
)


SCRIPTS = Path(__file__).resolve().parent
# The same model for every quantizer. Default: a smaller trunk than the CIFAR recipe, so the grid fits in an hour.
MODEL = {"hidden_size": 64, "residual_hidden_size": 32, "embedding_dim": 64}
QUICK_MODEL = {"hidden_size": 16, "residual_hidden_size": 8, "embedding_dim": 16}


def flags(options: dict) -> list:
    return [item for name, value in options.items() for item in (f"--{name}", value)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one K (16), one seed, 30 steps, a tiny model")
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZER_TYPES), choices=QUANTIZER_TYPES,
                        help="quantizers to compare (default: all five)")  # fmt: skip
    parser.add_argument("--codebook_sizes", type=int, nargs="+", default=[64, 512], help="codebook sizes K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--tokenizer_steps", type=int, default=400, help="updates per tokenizer (default: 400)")
    parser.add_argument("--classifier_steps", type=int, default=200, help="updates per classifier (default: 200)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="learning rate of every run (1e-3)")
    parser.add_argument("--dataset", default=None, help="as in the training scripts (default: scikit-learn digits)")
    parser.add_argument("--image_column", default=None, help="image column of --dataset")
    parser.add_argument("--label_column", default=None, help="label column of --dataset")
    parser.add_argument("--image_size", type=int, default=None, help="input size (default: 16 for digits, else 32)")
    parser.add_argument("--output_dir", default="results", help="where the report goes (default: results)")
    parser.add_argument("--runs_dir", default=None, help="where the trained models go (default: OUTPUT_DIR/runs)")
    return parser


def run(command: list, output_dir: Path) -> float:
    """Run a script that writes `output_dir`, unless it already finished there; return its wall time (recorded in
    `output_dir/wall_seconds.json`, so a rerun that reuses the folder still reports it)."""
    record = output_dir / "wall_seconds.json"
    if (output_dir / "eval_results.json").exists() and record.exists():
        return json.loads(record.read_text())["wall_seconds"]
    start = time.time()
    result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True)
    if result.returncode != 0:
        line = " ".join(map(str, command))
        raise SystemExit(f"error: this run failed:\npython {line}\n{result.stderr[-3000:]}")
    seconds = time.time() - start
    record.write_text(json.dumps({"wall_seconds": seconds}))
    return seconds


def command_of(folder) -> str:
    """The command line a training run recorded in its `all_results.json`."""
    return "python " + json.loads((Path(folder) / "all_results.json").read_text())["command"]


def train_pair(args, quantizer, k, seed, runs_dir, model_flags, data_flags) -> dict:
    """A tokenizer and its frozen-feature classifier; their evaluation numbers, reused if already there."""
    tokenizer_dir, classifier_dir = (
        runs_dir / f"{quantizer}-K{k}-seed{seed}",
        runs_dir / f"{quantizer}-K{k}-seed{seed}-classifier",
    )
    common = ["--seed", seed, "--learning_rate", args.learning_rate, "--eval_at_end_only", *data_flags]
    seconds = run([SCRIPTS / "train_vqvae.py", "--output_dir", tokenizer_dir, "--quantizer", quantizer,
                   "--codebook_size", k, "--max_train_steps", args.tokenizer_steps, *model_flags, *common], tokenizer_dir)  # fmt: skip
    seconds += run([SCRIPTS / "train_classifier.py", "--tokenizer", tokenizer_dir, "--output_dir", classifier_dir,
                    "--max_train_steps", args.classifier_steps, *common], classifier_dir)  # fmt: skip
    tokenizer = json.loads((tokenizer_dir / "eval_results.json").read_text())
    classifier = json.loads((classifier_dir / "eval_results.json").read_text())
    return {"quantizer": quantizer, "codebook_size": k, "seed": seed, **tokenizer, "accuracy": classifier["accuracy"],
            "wall_seconds": seconds, "commands": [command_of(tokenizer_dir), command_of(classifier_dir)]}  # fmt: skip


@torch.no_grad()
def scatter_panels(model_dirs: dict, args, image_size: int):
    """Points for the Table-5-style figure: 1,000 latents of each model, with HyperVQ's on the ball next to its
    hyperplanes' closest points to the origin, and KmeansVQ's next to its codebook."""
    data = load_image_dataset(
        args.dataset, split="test", image_column=args.image_column, label_column=args.label_column
    )
    processor = HyperVQImageProcessor(size={"height": image_size, "width": image_size})
    pixel_values = processor(images=[im.convert("RGB") for im in data[:256]["image"]], return_tensors="pt")[
        "pixel_values"
    ]
    panels, metrics = [], {}
    for quantizer, folder in model_dirs.items():
        model = hf_hypervq.HyperVQVAEModel.from_pretrained(folder).eval()
        encoded = model.encode(pixel_values)
        latents = encoded.latents.permute(0, 2, 3, 1).reshape(-1, 3)
        codes = encoded.image_tokens.reshape(-1)
        keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))[:1000]
        latents, codes = latents[keep], codes[keep]
        q = model.quantizer
        if quantizer == "hyperbolic":
            panels.append(("HyperVQ: latents z_e", latents, codes, None))
            ball = expmap0_projected(latents, c=q.curvature)
            hyperplane_points = expmap0_projected(q.codebook, c=q.curvature)  # exp0(r_k a_k / |a_k|)
            panels.append(("HyperVQ: z_h on the ball, hyperplane points", ball, codes, hyperplane_points))
        else:
            panels.append(("KmeansVQ: latents z_e and codebook", latents, codes, q.codebook.detach()))
        metrics[quantizer] = json.loads((Path(folder) / "eval_results.json").read_text())
    return panels, metrics


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.codebook_sizes, args.seeds, args.tokenizer_steps, args.classifier_steps = [16], [0], 30, 20
    output_dir = Path(args.output_dir)
    runs_dir = Path(args.runs_dir or output_dir / "runs")
    output_dir.mkdir(parents=True, exist_ok=True)
    image_size = args.image_size or (16 if args.dataset is None else 32)
    data_flags = flags({k: getattr(args, k) for k in ("dataset", "image_column", "label_column") if getattr(args, k)})
    model = {**(QUICK_MODEL if args.quick else MODEL), "image_size": image_size}
    model_flags = flags(model)
    started, runs = time.time(), []

    for k in args.codebook_sizes:
        for quantizer in args.quantizers:
            for seed in args.seeds:
                runs.append(train_pair(args, quantizer, k, seed, runs_dir, model_flags, data_flags))
                print(f"{quantizer} K={k} seed={seed}: MSE {runs[-1]['reconstruction_mse']:.4f}, "
                      f"accuracy {runs[-1]['accuracy']:.3f}, perplexity {runs[-1]['perplexity']:.1f}", flush=True)  # fmt: skip

    scatter_dirs, scatter_seconds = {}, 0.0
    for quantizer in ("hyperbolic", "kmeans"):
        folder = runs_dir / f"{quantizer}-dim3-K16"
        scatter_seconds += run([SCRIPTS / "train_vqvae.py", "--output_dir", folder, "--quantizer", quantizer,
                                "--codebook_size", 16, "--max_train_steps", args.tokenizer_steps, "--learning_rate",
                                args.learning_rate, "--eval_at_end_only", *flags({**model, "embedding_dim": 3}),
                                *data_flags], folder)  # fmt: skip
        scatter_dirs[quantizer] = folder
    panels, scatter_metrics = scatter_panels(scatter_dirs, args, image_size)

    table = aggregate(runs)
    counts = {q: next(r["code_counts"] for r in runs if r["quantizer"] == q and r["codebook_size"] == max(args.codebook_sizes))
              for q in args.quantizers}  # fmt: skip
    plot_metric_vs_k(table, "reconstruction_mse", "reconstruction MSE", output_dir / "mse_vs_k.png")
    plot_metric_vs_k(table, "accuracy", "frozen-feature accuracy (%)", output_dir / "accuracy_vs_k.png", scale=100)
    plot_usage_histograms(counts, output_dir / "codebook_usage.png")
    plot_embedding_scatter(panels, output_dir / "embedding_scatter.png")

    minutes = (time.time() - started) / 60
    run_minutes = (sum(r["wall_seconds"] for r in runs) + scatter_seconds) / 60
    dataset = args.dataset or "scikit-learn's handwritten digits (1,437 training / 360 test images, 16×16)"
    setup = (
        (
            "**Quick mode: a smoke test of the pipeline, far too short to be evidence for or against any claim.** "
            if args.quick
            else ""
        )
        + f"Data: {dataset}. Every quantizer uses the same VQ-VAE (`{' '.join(map(str, model_flags))}`, 4× downsampling), "
        f"{args.tokenizer_steps} tokenizer updates and {args.classifier_steps} classifier updates at learning rate "
        f"{args.learning_rate}, batch 128, seeds {args.seeds}; nothing was tuned per quantizer. "
        f"Versions: hf-hypervq {hf_hypervq.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; {platform.machine()} with "
        f"{torch.get_num_threads()} threads. The {2 * len(runs) + 2} training runs took {run_minutes:.1f} minutes "
        f"in all, one after another (each run's wall time, including its start-up, is kept in its folder)."
    )
    scatter_text = " ".join(
        f"{q}: silhouette {m.get('silhouette', float('nan')):.3f}, Davies-Bouldin {m.get('davies_bouldin', float('nan')):.3g}, "
        f"noisy silhouette {m.get('noisy_silhouette', float('nan')):.3f}."
        for q, m in scatter_metrics.items()
    )
    claims = check_claims(table, args.codebook_sizes, scatter_metrics)
    commands = [c for r in runs for c in r["commands"]] + [command_of(f) for f in scatter_dirs.values()]
    write_report(output_dir / "REPORT.md", table=table, codebook_sizes=args.codebook_sizes, claims=claims,
                 setup=setup, commands=commands, scatter_text=scatter_text)  # fmt: skip
    (output_dir / "results.json").write_text(json.dumps({"runs": runs, "scatter": scatter_metrics}, indent=1))
    print(f"wrote {output_dir / 'REPORT.md'} ({minutes:.1f} minutes; the runs took {run_minutes:.1f} minutes)")


if __name__ == "__main__":
    main()
