#!/usr/bin/env python
"""Rerun the HyperVQ paper's comparisons with one fair protocol at the scale this machine allows, and write a report.

    python scripts/reproduce.py                  # the default grid on the embedded digits, ~1 hour on 2 CPU cores
    python scripts/reproduce.py --quick          # a few minutes (CI): one K, one seed, a tiny model

The quantizers are the library's five and, as a reference row, vector-quantize-pytorch's `VectorQuantize`
(`vq_pytorch`, "VectorQuantize (anchor)": EMA, k-means init, dead-code replacement, as its README recommends) in the
same VQ-VAE. Every quantizer × codebook size × seed trains a tokenizer and frozen-feature classifiers on its codes with
`scripts/study.py`'s protocol: the library defaults of each quantizer, the same model, data order, optimizer,
number of updates and Gumbel temperature rule for all, and a classifier that stops early on a validation split carved
from the training split (its learning rate chosen there too); nothing is tuned per quantizer. Then a tokenizer with
3-dimensional latents and K = 16 for HyperVQ and KmeansVQ (the paper's Table 5 / Figure 6 setting), and for the
paper's Figure 5 one tokenizer per quantizer at K = 64 (else the grid's smallest K; the first seed; retrained in the
same pool, since the runs keep no models) whose codes are decoded one by one. The output folder gets `REPORT.md`
(tables of mean ± std over seeds, the paper's claims checked one by one with the mechanism numbers behind them, the
code fingerprint and versions of the runs, wall time), `results.json` and the plots (`codebooks.png` is Figure 5).
Finished runs are kept in `OUTPUT_DIR/runs` and reused when the command is rerun on the same code (also those of
`scripts/ablate.py` with the same setting); a change to the code that computes them recomputes them
(`scripts/study.py`, `code_fingerprint`).
"""

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from study import (
    ANCHOR,
    ANCHOR_PACKAGE,
    MODEL,
    QUICK_MODEL,
    STUDY_QUANTIZERS,
    anchor_version,
    decoded_codebook,
    load_digits_tensors,
    provenance,
    run_one,
    setting_of,
    tokenizer_metrics,
    train_tokenizer,
)

from hf_hypervq.training.outputs import write_text
from hf_hypervq.training.report import (
    QUANTIZER_NAMES,
    aggregate,
    check_claims,
    embedding_panels,
    plot_decoded_codebooks,
    plot_embedding_scatter,
    plot_metric_vs_k,
    plot_usage_histograms,
    write_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one K (16), one seed, 1/50 of the updates, a tiny model")
    parser.add_argument("--quantizers", nargs="+", default=list(STUDY_QUANTIZERS), choices=STUDY_QUANTIZERS,
                        help=f"quantizers to compare (default: the library's five and the anchor {ANCHOR})")  # fmt: skip
    parser.add_argument("--codebook_sizes", type=int, nargs="+", default=[64, 512], help="codebook sizes K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--tokenizer_steps", type=int, default=1500, help="updates per tokenizer (default: 1500)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--output_dir", default=None,
                        help="where the report goes (default: results; results/quick with --quick)")  # fmt: skip
    return parser


def scatter_panels(quick: bool, steps: int):
    """The Table-5-style figure's panels and metrics: a dim-3, K = 16 tokenizer per quantizer, HyperVQ and KmeansVQ,
    trained with the study's protocol (`report.embedding_panels` draws 1,000 of their test latents)."""
    data = load_digits_tensors()
    model_options = {**(QUICK_MODEL if quick else MODEL), "embedding_dim": 3}
    panels, metrics = [], {}
    torch.set_num_threads(2)  # the grid's workers are done: this process has both cores
    for quantizer in ("hyperbolic", "kmeans"):
        setting = setting_of({"quantizer": quantizer, "codebook_size": 16, "steps": steps})
        model, train_tokens = train_tokenizer(setting, model_options, 0, data)
        metrics[quantizer] = {
            k: v for k, v in tokenizer_metrics(model, train_tokens, data).items() if k != "code_counts"
        }
        panels += embedding_panels(model, data["test"][0])
    return panels, metrics


MECHANISM = [  # (key, header, digits): why a quantizer's numbers are what they are
    ("train_perplexity", "train-sample perplexity", 1),
    ("perplexity", "eval perplexity", 1),
    ("dead_codes", "dead codes", 0),
    ("ball_norm", "latent norm on the ball", 3),
    ("mean_max_probability", "mean max prob", 3),
    ("code_vector_norm", "code vector norm", 3),
    ("accuracy_fixed", "accuracy, 200 fixed updates (%)", 1),
]


def mechanism_table(runs: list, codebook_sizes: list) -> str:
    lines = [
        "| quantizer | K | " + " | ".join(h for _, h, _ in MECHANISM) + " |",
        "|---|---|" + "---|" * len(MECHANISM),
    ]
    for k in codebook_sizes:
        for quantizer, name in QUANTIZER_NAMES.items():
            group = [r for r in runs if r["quantizer"] == quantizer and r["codebook_size"] == k]
            if not group:
                continue
            cells = []
            for key, _, digits in MECHANISM:
                values = [r[key] * (100 if key == "accuracy_fixed" else 1) for r in group if r.get(key) is not None]
                cells.append(f"{sum(values) / len(values):.{digits}f}" if values else "—")
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure_codebook_size(codebook_sizes: list[int]) -> int:
    """The K of the decoded-codes figure: 64 (readable at a glance) when the grid has it, else its smallest."""
    return 64 if 64 in codebook_sizes else min(codebook_sizes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.codebook_sizes, args.seeds = [16], [0]
    figure_k = figure_codebook_size(args.codebook_sizes)
    # a smoke test never overwrites the committed study
    output_dir = Path(args.output_dir or ("results/quick" if args.quick else "results"))
    runs_dir = output_dir / "runs"
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cells = [(q, k, seed) for k in args.codebook_sizes for q in args.quantizers for seed in args.seeds]
    runs = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = []
        for quantizer, k, seed in cells:
            setting = setting_of(
                {"quantizer": quantizer, "codebook_size": k, "steps": args.tokenizer_steps}, args.quick
            )
            futures.append(pool.submit(run_one, setting, seed, args.quick, runs_dir))
        # Figure 5's tokenizers, queued behind the grid: one per quantizer, the first seed, K = figure_k
        codebook_futures = {
            q: pool.submit(decoded_codebook, setting_of({"quantizer": q, "codebook_size": figure_k,
                                                         "steps": args.tokenizer_steps}, args.quick),
                           args.seeds[0], args.quick)
            for q in args.quantizers
        }  # fmt: skip
        for future, (quantizer, k, seed) in zip(futures, cells):
            run = {"quantizer": quantizer, "codebook_size": k, **future.result()}
            runs.append(run)
            print(f"{quantizer} K={k} seed={seed}: MSE {run['reconstruction_mse']:.4f}, "
                  f"accuracy {run['accuracy']:.3f}, perplexity {run['perplexity']:.1f}", flush=True)  # fmt: skip
        codebooks = {
            q: (future.result()["images"], future.result()["code_counts"]) for q, future in codebook_futures.items()
        }

    steps = setting_of({"steps": args.tokenizer_steps}, args.quick)["steps"]
    panels, scatter_metrics = scatter_panels(args.quick, steps)

    table = aggregate(runs)
    big = max(args.codebook_sizes)
    counts = {q: next(r["code_counts"] for r in runs if r["quantizer"] == q and r["codebook_size"] == big)
              for q in args.quantizers}  # fmt: skip
    plot_metric_vs_k(table, "reconstruction_mse", "reconstruction MSE", output_dir / "mse_vs_k.png")
    plot_metric_vs_k(table, "accuracy", "frozen-feature accuracy (%)", output_dir / "accuracy_vs_k.png", scale=100)
    plot_usage_histograms(counts, output_dir / "codebook_usage.png")
    plot_embedding_scatter(panels, output_dir / "embedding_scatter.png")
    plot_decoded_codebooks(codebooks, output_dir / "codebooks.png")

    minutes = (time.time() - started) / 60
    run_minutes = sum(r["wall_seconds"] for r in runs) / 60
    setup = (
        (
            "**Quick mode: a smoke test of the pipeline, far too short to be evidence for or against any claim.** "
            if args.quick
            else ""
        )
        + "Data: scikit-learn's handwritten digits (1,437 training / 360 test images, 16×16, 4×4 tokens). Every "
        f"quantizer uses the same VQ-VAE (`{json.dumps(QUICK_MODEL if args.quick else MODEL)}`), its library "
        f"defaults, {steps} tokenizer updates (AdamW 1e-3, batch 128), the same Gumbel temperature rule (2 → 0.5 over "
        f"the run) for the three Gumbel quantizers, and seeds {args.seeds}; nothing was tuned per quantizer. The "
        "frozen-feature classifier trains on 80% of the training split until its accuracy on the other 20% has not "
        "improved for 10 epochs, for each learning rate in {1e-3, 3e-3, 1e-2}; the best on validation gives the test "
        "accuracy (`scripts/study.py`). "
        + (
            f"The anchor row, {QUANTIZER_NAMES[ANCHOR]}, is {ANCHOR_PACKAGE} {anchor_version()}'s `VectorQuantize` "
            "in the same VQ-VAE, as its README recommends for one: EMA codebook (decay 0.99), k-means "
            "initialisation on the first batch, dead codes (EMA cluster size below 2) replaced by batch vectors, "
            "commitment weight 0.25, the rotation-trick gradient (`scripts/study.py`, `VectorQuantizeAnchor`); "
            "it is a reference, not one of the paper's quantizers, and decides no claim. "
            if ANCHOR in args.quantizers
            else ""
        )
        + f"The runs' code and versions: {provenance(runs)} (`scripts/study.py`, `code_fingerprint`); "
        f"{platform.machine()}, {args.workers} runs in parallel with one thread each. The {len(runs)} grid runs took {run_minutes:.1f} minutes of compute."
    )
    scatter_text = " ".join(
        f"{q}: silhouette {m.get('silhouette', float('nan')):.3f}, Davies-Bouldin {m.get('davies_bouldin', float('nan')):.3g}, "
        f"noisy silhouette {m.get('noisy_silhouette', float('nan')):.3f}."
        for q, m in scatter_metrics.items()
    )
    patch = next(iter(codebooks.values()))[0][0].height  # the downsampling factor: pixels per token a side
    codebooks_text = (
        f"Each quantizer's {figure_k} code vectors decoded on their own as 1×1 latents "
        f"(`HyperVQVAEModel.decode_codebook`), from one tokenizer per quantizer (K = {figure_k}, seed "
        f"{args.seeds[0]}, the grid's protocol, retrained for the picture), most used first by the eval argmax on the "
        "test split; faded codes were never chosen. Each picture is what one token alone draws into its "
        f"{patch}×{patch}-pixel patch of the image."
    )
    claims = check_claims(table, args.codebook_sizes, scatter_metrics)
    command = "python scripts/reproduce.py" + (" --quick" if args.quick else "")
    write_report(output_dir / "REPORT.md", table=table, codebook_sizes=args.codebook_sizes, claims=claims,
                 setup=setup, commands=[command], scatter_text=scatter_text,
                 mechanism=mechanism_table(runs, args.codebook_sizes), codebooks_text=codebooks_text)  # fmt: skip
    compact = [{k: v for k, v in r.items() if k != "code_counts"} for r in runs]
    write_text(output_dir / "results.json", json.dumps({"runs": compact, "scatter": scatter_metrics}, indent=1))
    print(f"wrote {output_dir / 'REPORT.md'} ({minutes:.1f} minutes; the runs took {run_minutes:.1f} minutes)")


if __name__ == "__main__":
    sys.exit(main())
