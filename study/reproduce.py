#!/usr/bin/env python
"""Rerun the HyperVQ paper's comparisons with one fair protocol at the scale this machine allows, and write a report.

    python study/reproduce.py                    # Fashion-MNIST, K = 512, 3 seeds, with a digits section (~8 hours)
    python study/reproduce.py --quick            # a few minutes (CI): digits, one K, one seed, a tiny model

The rows are the library's five quantizers, the three Gumbel quantizers again with wav2vec 2.0's diversity term
(`diversity_weight`, which the paper does not mention) and, as a reference, vector-quantize-pytorch's
`VectorQuantize` (`vq_pytorch`, "VectorQuantize (anchor)": EMA, k-means init, dead-code replacement, as its README
recommends) in the same VQ-VAE. Every row × codebook size × seed trains a tokenizer and frozen-feature classifiers
on its codes with `hf_hypervq.training.study`'s protocol: each quantizer's library defaults, the same model, data, data order,
optimizer, number of updates and Gumbel temperature rule for all; nothing is tuned per quantizer. Then:

- the budget curve: HyperVQ and KmeansVQ at other numbers of updates (`--budget_steps`), same seeds;
- the digits section: the same rows on scikit-learn's digits (unless `--no-digits_section`);
- the paper's Table 5 / Figure 6 setting: a tokenizer with 3-dimensional latents and K = 16 for HyperVQ and KmeansVQ;
- the paper's Figure 5: each row's codes decoded one by one (stored with each run by `study.run_one`).

Every claim is decided from an interval on the difference between two rows paired by seed (`report.check_claims`):
holds, does not hold, or inconclusive when the interval straddles the claimed bound.

The output folder gets `REPORT.md`, `results.json` and the plots. Finished runs are kept in `OUTPUT_DIR/runs` and
reused when the command is rerun on the same code (also those of `study/ablate.py` with the same setting); a change
to the code that computes them recomputes them (`hf_hypervq.training.study`, `code_fingerprint`).
"""

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from hf_hypervq.training.data import FASHION_MNIST
from hf_hypervq.training.outputs import write_text
from hf_hypervq.training.report import (
    DIVERSITY_ROWS,
    ROW_NAMES,
    aggregate,
    budget_table,
    check_claims,
    claims_table,
    diversity_table,
    embedding_panels,
    plot_budget,
    plot_decoded_codebooks,
    plot_embedding_scatter,
    plot_usage_histograms,
    protocol_table,
    results_table,
    write_report,
)
from hf_hypervq.training.study import (
    ANCHOR,
    ANCHOR_PACKAGE,
    DATASETS,
    DEFAULTS,
    MODEL,
    QUICK_MODEL,
    STUDY_QUANTIZERS,
    anchor_version,
    decoded_codebook,
    load_tensors,
    provenance,
    run_one,
    setting_of,
    tokenizer_metrics,
    train_tokenizer,
)


DIVERSITY_WEIGHT = 0.1  # wav2vec 2.0's weight, and the middle of the ablation's sweep (study/ablate.py)
ROWS = {
    **{q: {"quantizer": q} for q in STUDY_QUANTIZERS},
    **{row: {"quantizer": q, "diversity_weight": DIVERSITY_WEIGHT} for row, q in DIVERSITY_ROWS.items()},
}
BUDGET_ROWS = ("hyperbolic", "kmeans")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="digits, one K (16), one seed, 1/50 of the updates, a tiny model")  # fmt: skip
    parser.add_argument("--dataset", default=FASHION_MNIST, choices=list(DATASETS), help="the main data set")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="rows to compare (default: all: the five quantizers, the anchor, the diversity rows)")  # fmt: skip
    parser.add_argument("--codebook_sizes", type=int, nargs="+", default=[512], help="codebook sizes K (default: 512)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--tokenizer_steps", type=int, default=DEFAULTS["steps"],
                        help=f"updates per tokenizer (default: {DEFAULTS['steps']})")  # fmt: skip
    parser.add_argument("--budget_steps", type=int, nargs="*", default=[1000, 4000],
                        help="the budget curve's other numbers of updates, HyperVQ and KmeansVQ (default: 1000 4000)")  # fmt: skip
    parser.add_argument("--digits_section", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the rows on digits for a section of the report (default: on; off with "
                             "--quick or --dataset digits)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--output_dir", default=None,
                        help="where the report goes (default: results; results/quick with --quick)")  # fmt: skip
    return parser


def scatter_panels(dataset: str, quick: bool, steps: int):
    """The Table-5-style figure's panels and metrics: a dim-3, K = 16 tokenizer per quantizer, HyperVQ and KmeansVQ,
    trained with the study's protocol (`report.embedding_panels` draws 1,000 of their test latents)."""
    data = load_tensors(dataset)
    model_options = {**(QUICK_MODEL if quick else MODEL), "embedding_dim": 3}
    panels, metrics = [], {}
    torch.set_num_threads(2)  # the grid's workers are done: this process has both cores
    for quantizer in ("hyperbolic", "kmeans"):
        setting = setting_of({"dataset": dataset, "quantizer": quantizer, "codebook_size": 16, "steps": steps})
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
]


def mechanism_table(runs: list, codebook_sizes: list) -> str:
    lines = [
        "| row | K | " + " | ".join(h for _, h, _ in MECHANISM) + " |",
        "|---|---|" + "---|" * len(MECHANISM),
    ]
    for k in codebook_sizes:
        for row, name in ROW_NAMES.items():
            group = [r for r in runs if r["row"] == row and r["codebook_size"] == k]
            if not group:
                continue
            cells = []
            for key, _, digits in MECHANISM:
                values = [r[key] for r in group if r.get(key) is not None]
                cells.append(f"{sum(values) / len(values):.{digits}f}" if values else "—")
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def submit_grid(pool, args, dataset: str, rows, steps_list, codebook_sizes, runs_dir):
    """Queue every (row, steps, K, seed) run of `dataset`; returns [(future, row, K, seed)]."""
    cells = [(row, steps, k, seed) for steps in steps_list for k in codebook_sizes for row in rows
             for seed in args.seeds]  # fmt: skip
    return [
        (pool.submit(run_one, setting_of({**ROWS[row], "dataset": dataset, "codebook_size": k, "steps": steps},
                                         args.quick), seed, args.quick, runs_dir), row, k, seed)
        for row, steps, k, seed in cells
    ]  # fmt: skip


def collect(futures) -> list[dict]:
    runs = []
    for future, row, k, seed in futures:
        run = {"row": row, "codebook_size": k, **future.result()}
        runs.append(run)
        print(f"{run['setting']['dataset']} {row} K={k} {run['setting']['steps']} updates seed={seed}: "
              f"MSE {run['reconstruction_mse']:.4f}, accuracy {run['accuracy']:.3f}, "
              f"perplexity {run['perplexity']:.1f}", flush=True)  # fmt: skip
    return runs


def comparison_sections(runs: list[dict], args, k: int, scatter: dict | None) -> list[tuple[str, str]]:
    """The main table, the claims and the diversity and classifier-protocol comparisons of one data set's runs."""
    diversity = diversity_table(runs, k)
    return [
        ("Main table (mean ± standard deviation over seeds)", results_table(aggregate(runs), args.codebook_sizes)),
        (
            "The paper's claims, one by one",
            claims_table(check_claims(runs, k, scatter))
            + f"""

- Each comparison is a difference between two rows trained with the same seeds, averaged over the seeds, with a
  95% Student-t interval on that mean (an MSE comparison is a ratio). A claim **holds** when every interval lies on
  the claimed side, **does not hold** when one lies on the other side, and is **inconclusive** when an interval
  straddles the bound (one seed gives no interval): with {len(args.seeds)} seed{"s" * (len(args.seeds) > 1)} that is
  common, and it means the runs cannot tell, not that the methods are equal.
- "Codes used" and accuracy are shares; differences in accuracy are in percentage points.
- These runs are small (the setup above); the paper trains on CIFAR-100 and ImageNet for hundreds of epochs. A claim
  that does not hold here may still hold at the paper's scale, and the reverse.""",
        ),
        (
            "The diversity term (an option beyond the paper)",
            diversity
            + f"""

Each Gumbel quantizer with `diversity_weight={DIVERSITY_WEIGHT}` against itself without, paired by seed. "Wins":
more codes used (the interval above 0), and neither MSE (the ratio's interval above 1) nor accuracy (the difference's
interval below 0) worse beyond the noise; "no" when the usage does not rise or a loss is beyond the noise.""",
        ),
        (
            "Classifier protocols (accuracy, %, mean ± std)",
            protocol_table(runs, k)
            + """

The same frozen features under three protocols (`hf_hypervq.training.study`). The first is `scripts/train_classifier.py`'s
default: a BatchNorm without affine parameters standardises each feature channel before the head, so the head does
not depend on the scale of the code vectors, which differs about 50-fold between quantizers.""",
        ),
    ]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.dataset, args.codebook_sizes, args.seeds = "digits", [16], [0]
    digits_section = args.digits_section and not args.quick and args.dataset != "digits"
    k = max(args.codebook_sizes)
    # a smoke test never overwrites the committed study
    output_dir = Path(args.output_dir or ("results/quick" if args.quick else "results"))
    runs_dir = output_dir / "runs"
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    budget_steps = [s for s in args.budget_steps if s != args.tokenizer_steps]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        main_futures = submit_grid(pool, args, args.dataset, args.rows, [args.tokenizer_steps], args.codebook_sizes,
                                   runs_dir)  # fmt: skip
        budget_futures = submit_grid(pool, args, args.dataset, [r for r in BUDGET_ROWS if r in args.rows],
                                     budget_steps, [k], runs_dir)  # fmt: skip
        digits_futures = (submit_grid(pool, args, "digits", args.rows, [args.tokenizer_steps], args.codebook_sizes,
                                      runs_dir) if digits_section else [])  # fmt: skip
        runs, budget_runs, digits_runs = collect(main_futures), collect(budget_futures), collect(digits_futures)

    steps = setting_of({"steps": args.tokenizer_steps}, args.quick)["steps"]
    panels, scatter_metrics = scatter_panels(args.dataset, args.quick, steps)
    plot_embedding_scatter(panels, output_dir / "embedding_scatter.png")
    counts = {row: next(r["code_counts"] for r in runs if r["row"] == row and r["codebook_size"] == k)
              for row in args.rows}  # fmt: skip
    plot_usage_histograms(counts, output_dir / "codebook_usage.png")
    codebooks = {}
    for row in args.rows:  # Figure 5: the first seed's run of each row
        setting = setting_of({**ROWS[row], "dataset": args.dataset, "codebook_size": k, "steps": args.tokenizer_steps},
                             args.quick)  # fmt: skip
        decoded = decoded_codebook(runs_dir, setting, args.seeds[0], args.quick)
        if decoded is not None:
            codebooks[row] = (decoded["images"], decoded["code_counts"])
    plot_decoded_codebooks(codebooks, output_dir / "codebooks.png", columns=min(64, k))  # K = 512: 8 lines a panel
    curve = budget_runs + [r for r in runs if r["row"] in BUDGET_ROWS and r["codebook_size"] == k]
    plot_budget(curve, k, output_dir / "budget.png")

    everything = runs + budget_runs + digits_runs
    compute_hours = sum(r["compute_seconds"] for r in everything) / 3600
    model = QUICK_MODEL if args.quick else MODEL
    setup = (
        (
            "**Quick mode: a smoke test of the pipeline, far too short to be evidence for or against any claim.** "
            if args.quick
            else ""
        )
        + f"Data: {DATASETS[args.dataset].description}. Every row uses the same VQ-VAE (`{json.dumps(model)}`), its "
        f"quantizer's library defaults, {steps} tokenizer updates (AdamW 1e-3, batch 128), the same Gumbel "
        f"temperature rule (2 → 0.5 over the run) for the Gumbel quantizers, and seeds {args.seeds}; nothing was "
        "tuned per quantizer. The frozen-feature classifier is `scripts/train_classifier.py`'s default protocol "
        "(features standardised by a BatchNorm without affine parameters, 20 epochs at learning rate 1e-3), trained "
        "on "
        + (
            f"a fixed, class-stratified subset of {int(0.8 * DATASETS[args.dataset].classifier_images):,} training "
            "images"
            if DATASETS[args.dataset].classifier_images
            else "80% of the training split"
        )
        + " and measured on the whole test split; two other protocols are compared below (`hf_hypervq.training.study`). "
        + (
            f"The anchor row, {ROW_NAMES[ANCHOR]}, is {ANCHOR_PACKAGE} {anchor_version()}'s `VectorQuantize` "
            "in the same VQ-VAE, as its README recommends for one: EMA codebook (decay 0.99), k-means "
            "initialisation on the first batch, dead codes (EMA cluster size below 2) replaced by batch vectors, "
            "commitment weight 0.25, the rotation-trick gradient (`hf_hypervq.training.study`, `VectorQuantizeAnchor`); "
            "it is a reference, not one of the paper's quantizers, and decides no claim. "
            if ANCHOR in args.rows
            else ""
        )
        + f"The runs' code and versions: {provenance(everything)} (`hf_hypervq.training.study`, `code_fingerprint`); "
        f"{platform.machine()}, {args.workers} runs in parallel with one thread each. The {len(everything)} runs "
        f"took {compute_hours:.1f} CPU hours."
    )
    sections = comparison_sections(runs, args, k, scatter_metrics)
    sections.append(
        (
            "The budget: does more training change the ranking?",
            f"""![MSE, perplexity and accuracy \
against updates](budget.png)

{budget_table(curve, k)}

HyperVQ and KmeansVQ at K = {k}, seeds {args.seeds}: the main grid's {steps} updates and
{", ".join(str(n) for n in sorted({r["setting"]["steps"] for r in budget_runs})) or "no other budget"}, each a run
of its own (the Gumbel temperature rule spans each run's length).""",
        )
    )
    sections.append(
        (
            "Mechanism (means over seeds)",
            f"""*Train-sample perplexity* is of the codes the training steps \
used in their last epoch (Gumbel samples for the MLR and Gumbel quantizers), *eval perplexity* of the argmax codes on \
the test split; *latent norm on the ball* is the mean √c‖x‖ (0 at the centre, 1 at the boundary); *mean max prob* is \
the mean largest softmax probability of the eval logits; *dead codes* are never chosen on the test split.

{mechanism_table(runs, args.codebook_sizes)}

![codebook usage](codebook_usage.png)""",
        )
    )
    patch = next(iter(codebooks.values()))[0][0].height if codebooks else 0
    sections.append(
        (
            "Decoded codes (the paper's Figure 5)",
            f"""Each row's {k} code vectors decoded on their own as \
1×1 latents (`HyperVQVAEModel.decode_codebook`), from its seed-{args.seeds[0]} tokenizer of the main grid, most used \
first by the eval argmax on the test split; faded codes were never chosen. Each picture is what one token alone \
draws into its {patch}×{patch}-pixel patch of the image.

![every code decoded on its own](codebooks.png)""",
        )
    )
    scatter_text = " ".join(
        f"{ROW_NAMES[q]}: silhouette {m.get('silhouette', float('nan')):.3f}, Davies-Bouldin "
        f"{m.get('davies_bouldin', float('nan')):.3g}, noisy silhouette {m.get('noisy_silhouette', float('nan')):.3f}."
        for q, m in scatter_metrics.items()
    )
    sections.append(("Cluster pictures (latent dimension 3, K = 16, one seed)",
                     f"{scatter_text}\n\n![embedding scatter](embedding_scatter.png)"))  # fmt: skip
    if digits_runs:
        digits = [(f"Digits: {heading[0].lower()}{heading[1:]}", text)
                  for heading, text in comparison_sections(digits_runs, args, k, None)]  # fmt: skip
        digits[0] = (digits[0][0], f"{DATASETS['digits'].description}; the same rows, protocol and seeds.\n\n"
                     + digits[0][1])  # fmt: skip
        sections += digits
    command = "python study/reproduce.py" + (" --quick" if args.quick else "")
    title = "Does HyperVQ reproduce? (generated by `study/reproduce.py`)"
    write_report(output_dir / "REPORT.md", title=title, setup=setup, sections=sections, commands=[command])
    compact = [{key: v for key, v in r.items() if key != "code_counts"} for r in everything]
    write_text(output_dir / "results.json", json.dumps({"runs": compact, "scatter": scatter_metrics}, indent=1))
    print(f"wrote {output_dir / 'REPORT.md'} ({(time.time() - started) / 60:.1f} minutes; the runs took "
          f"{compute_hours:.1f} CPU hours)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
