#!/usr/bin/env python
"""The library's own targets, measured the way a user meets them: `scripts/train_vqvae.py`, then
`scripts/train_classifier.py` on its codes, each with its defaults, for HyperVQ and for KmeansVQ.

    python study/check_defaults.py --dataset digits --seeds 0 1 2            # ~1 hour on 2 CPU cores
    python study/check_defaults.py --dataset fashion_mnist --seeds 0 \\
        --tokenizer_args --max_train_steps 2000 --classifier_args --max_train_samples 10000

The targets: HyperVQ uses at least 90% of its codes, with a test MSE at most 1.1× KmeansVQ's and a frozen-feature
accuracy at most 1 point below KmeansVQ's. Only what the two scripts do by default is measured: `--tokenizer_args` and
`--classifier_args` pass the same extra flags to both quantizers' runs (to fit a CPU budget), nothing per quantizer.
Each run is a real subprocess of the script a user runs; its output folder is kept, a rerun reuses every run that
finished (`eval_results.json`) and resumes an interrupted one from its last epoch's checkpoint. Writes
`OUTPUT_DIR/DEFAULTS-<dataset>.md` and `defaults-<dataset>.json`.
"""

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from hf_hypervq.training.outputs import write_text


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"  # the commands a user runs
QUANTIZERS = ("hyperbolic", "kmeans")
VERSIONS = ("hf-hypervq", "torch", "transformers", "accelerate", "datasets")  # recorded in the report
TARGETS = {"codes_used": 0.9, "mse_ratio": 1.1, "accuracy_gap": 0.01}  # HyperVQ against KmeansVQ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits",
                        help="`digits` (the scripts' default data), `fashion_mnist`, or any --dataset they take")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--output_dir", default="results/defaults", help="where the runs and the report go")
    parser.epilog = ("--tokenizer_args FLAG ... and --classifier_args FLAG ..., after this script's own flags, pass "
                     "extra flags to train_vqvae.py and train_classifier.py, the same for both quantizers.")  # fmt: skip
    return parser


def split_extra(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(this script's flags, train_vqvae.py's, train_classifier.py's): `--tokenizer_args ...` and
    `--classifier_args ...` take everything up to the other one."""
    own, extra, target = [], {"--tokenizer_args": [], "--classifier_args": []}, None
    for arg in argv:
        if arg in extra:
            target = arg
        elif target is None:
            own.append(arg)
        else:
            extra[target].append(arg)
    return own, extra["--tokenizer_args"], extra["--classifier_args"]


def run(script: str, args: list[str], output_dir: Path) -> dict:
    """Run one training script unless its output folder already holds a finished run; its final evaluation. Runs
    save a checkpoint every epoch and resume from the newest, so an interrupted check loses at most an epoch (a
    resumed run ends with the weights of an uninterrupted one)."""
    results = output_dir / "eval_results.json"
    if not results.exists():
        resumable = ["--checkpointing_steps", "epoch", "--resume_from_checkpoint", "latest"]
        command = [sys.executable, str(SCRIPTS / script), "--output_dir", str(output_dir), *resumable, *args]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads(results.read_text())


def measure(dataset: str, seed: int, quantizer: str, output_dir: Path, tokenizer_args, classifier_args) -> dict:
    data = [] if dataset == "digits" else ["--dataset", dataset]
    folder = output_dir / dataset / f"{quantizer}-seed{seed}"
    common = [*data, "--seed", str(seed)]
    tokenizer = run("train_vqvae.py", ["--quantizer", quantizer, *common, *tokenizer_args], folder / "tokenizer")
    classifier = run("train_classifier.py", ["--tokenizer", str(folder / "tokenizer"), *common, *classifier_args],
                     folder / "classifier")  # fmt: skip
    return {"quantizer": quantizer, "seed": seed, "reconstruction_mse": tokenizer["reconstruction_mse"],
            "codes_used": tokenizer["codes_used"], "perplexity": tokenizer["perplexity"],
            "accuracy": classifier["accuracy"]}  # fmt: skip


def verdicts(runs: list[dict]) -> list[tuple[str, list[float], bool]]:
    """(target, its per-seed values, met by all of them), HyperVQ against KmeansVQ of the same seed."""
    by = {(r["quantizer"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    hyper = [by["hyperbolic", s] for s in seeds]
    kmeans = [by["kmeans", s] for s in seeds]
    used = [h["codes_used"] for h in hyper]
    ratio = [h["reconstruction_mse"] / k["reconstruction_mse"] for h, k in zip(hyper, kmeans)]
    gap = [k["accuracy"] - h["accuracy"] for h, k in zip(hyper, kmeans)]
    return [
        ("HyperVQ uses at least 90% of its codes", used, all(u >= TARGETS["codes_used"] for u in used)),
        ("HyperVQ's MSE is at most 1.1× KmeansVQ's", ratio, all(r <= TARGETS["mse_ratio"] for r in ratio)),
        ("HyperVQ's accuracy is at most 1 point below KmeansVQ's (points below)", [100 * g for g in gap],
         all(g <= TARGETS["accuracy_gap"] for g in gap)),
    ]  # fmt: skip


def report(dataset: str, runs: list[dict], command: str) -> str:
    lines = [f"# The defaults, as a user meets them: {dataset}", "",
             f"Made by `{command}`: `scripts/train_vqvae.py`, then `scripts/train_classifier.py` on its codes, "
             "each with its defaults (the extra flags in the command apply to both quantizers alike).", "",
             "Versions: " + ", ".join(f"{name} {importlib.metadata.version(name)}" for name in VERSIONS)
             + f", Python {platform.python_version()}.", "",
             "| quantizer | seed | test MSE | codes used | eval perplexity | accuracy (%) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r["quantizer"], r["seed"])):
        lines.append(f"| {r['quantizer']} | {r['seed']} | {r['reconstruction_mse']:.4f} | {r['codes_used']:.2f} | "
                     f"{r['perplexity']:.1f} | {100 * r['accuracy']:.1f} |")  # fmt: skip
    lines += ["", "| target | per seed | met by every seed |", "|---|---|---|"]
    for target, values, met in verdicts(runs):
        shown = ", ".join(f"{v:.2f}" for v in values)
        spread = f" (mean {statistics.fmean(values):.2f})" if len(values) > 1 else ""
        lines.append(f"| {target} | {shown}{spread} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, tokenizer_args, classifier_args = split_extra(argv)
    args = build_parser().parse_args(own)
    output_dir = Path(args.output_dir)
    runs = [measure(args.dataset, seed, q, output_dir, tokenizer_args, classifier_args)
            for seed in args.seeds for q in QUANTIZERS]  # fmt: skip
    command = "python study/check_defaults.py " + " ".join(argv)
    name = args.dataset.replace("/", "_")
    write_text(output_dir / f"DEFAULTS-{name}.md", report(args.dataset, runs, command.strip()))
    write_text(output_dir / f"defaults-{name}.json", json.dumps(runs, indent=1))
    for target, values, met in verdicts(runs):
        print(f"{target}: {', '.join(f'{v:.2f}' for v in values)} -> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
