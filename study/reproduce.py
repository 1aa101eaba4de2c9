#!/usr/bin/env python
"""Rerun the HyperVQ paper's comparisons with one fair protocol at the scale this machine allows, and write a report.

    python study/grid.py                         # first: the runs, resumably (about 18 CPU hours)
    python study/reproduce.py                    # Fashion-MNIST, K = 512, with a digits section: the report
    python study/reproduce.py --quick            # a few minutes (CI): digits, one K, one seed, a tiny model

The rows are the library's five quantizers with the paper's settings, HyperVQ's recommended recipe
(`hf_hypervq.training.recipes`, chosen on validation by `study/ablate.py`'s runs; a row of its own when it differs
from the paper's settings) and, as a reference, vector-quantize-pytorch's `VectorQuantize` (`vq_pytorch`,
"VectorQuantize (anchor)": EMA, k-means init, dead-code replacement, as its README recommends) in the same VQ-VAE.
Every row × codebook size × seed trains a tokenizer and frozen-feature classifiers on its codes with
`hf_hypervq.training.study`'s protocol: the same model, data, data order, optimizer, number of updates and Gumbel
temperature rule for all. The rows that decide the claims (`DECIDING_ROWS`) get every seed of `--seeds` (10 by
default), the others the first three. Then:

- the digits section: the deciding rows on scikit-learn's digits, three seeds (unless `--no-digits_section`);
- the paper's Table 5 / Figure 6 setting: tokenizers with 3-dimensional latents and K = 16, HyperVQ and KmeansVQ,
  three seeds;
- the budget curve, when `--budget_steps` names other numbers of updates (none by default);
- the paper's Figure 5: each row's codes decoded one by one (stored with each run by `study.run_one`).

Every claim is decided from intervals on comparisons of two rows paired by seed (`report.check_claims`, whose rules
`report.CLAIM_RULES` states).

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

from hf_hypervq.training.data import FASHION_MNIST
from hf_hypervq.training.outputs import write_text
from hf_hypervq.training.recipes import RECIPES
from hf_hypervq.training.report import (
    CLAIM_RULES,
    DIVERSITY_ROWS,
    RECIPE_ROW,
    ROW_NAMES,
    WIN_RULE,
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
    provenance,
    run_one,
    setting_of,
)


DIVERSITY_WEIGHT = 0.1  # wav2vec 2.0's weight, and the middle of the ablation's sweep (study/ablate.py)
ROWS = {
    **{q: {"quantizer": q} for q in STUDY_QUANTIZERS},
    RECIPE_ROW: {"quantizer": "hyperbolic", **RECIPES["hyperbolic"]},
    **{row: {"quantizer": q, "diversity_weight": DIVERSITY_WEIGHT} for row, q in DIVERSITY_ROWS.items()},
}
# The rows the claims are decided on, with every seed; the recipe only where it is not the paper's settings
DECIDING_ROWS = ("hyperbolic", "kmeans", "gumbel", ANCHOR) + ((RECIPE_ROW,) if RECIPES["hyperbolic"] else ())
DEFAULT_ROWS = [*STUDY_QUANTIZERS, *DECIDING_ROWS[4:]]
OTHER_SEEDS = 3  # the other rows', the digits section's and Table 5's: the first three seeds
BUDGET_ROWS = ("hyperbolic", "kmeans")
TABLE_5 = {"codebook_size": 16, "embedding_dim": 3}  # the paper's Table 5 setting (MNIST there)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="digits, one K (16), one seed, 1/50 of the updates, a tiny model")  # fmt: skip
    parser.add_argument("--dataset", default=FASHION_MNIST, choices=list(DATASETS), help="the main data set")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS),
                        help="rows to compare (default: the five quantizers, the anchor and HyperVQ's recipe)")  # fmt: skip
    parser.add_argument("--codebook_sizes", type=int, nargs="+", default=[512], help="codebook sizes K (default: 512)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                        help="seeds of the deciding rows; the other rows take the first three (default: 0 to 9)")  # fmt: skip
    parser.add_argument("--tokenizer_steps", type=int, default=DEFAULTS["steps"],
                        help=f"updates per tokenizer (default: {DEFAULTS['steps']})")  # fmt: skip
    parser.add_argument("--budget_steps", type=int, nargs="*", default=[],
                        help="the budget curve's other numbers of updates, HyperVQ and KmeansVQ (default: none)")  # fmt: skip
    parser.add_argument("--digits_section", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the deciding rows on digits for a section of the report (default: on; off "
                             "with --quick or --dataset digits)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--output_dir", default=None,
                        help="where the report goes (default: results; results/quick with --quick)")  # fmt: skip
    return parser


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


def seeds_of(row: str, args, every: bool = True) -> list[int]:
    """A row's seeds: all of --seeds for a deciding row (with `every`), else the first `OTHER_SEEDS`."""
    return args.seeds if every and row in DECIDING_ROWS else args.seeds[:OTHER_SEEDS]


def submit_grid(pool, args, dataset: str, rows, steps_list, codebook_sizes, runs_dir, *, every=True, extra=None):
    """Queue every (row, steps, K, seed) run of `dataset` (`extra`: more settings, e.g. `TABLE_5`'s); returns
    [(future, row, K, seed)]."""
    cells = [(row, steps, k, seed) for steps in steps_list for k in codebook_sizes for row in rows
             for seed in seeds_of(row, args, every)]  # fmt: skip
    return [
        (pool.submit(run_one, setting_of({**ROWS[row], "dataset": dataset, "codebook_size": k, "steps": steps,
                                          **(extra or {})}, args.quick), seed, args.quick, runs_dir), row,
         (extra or {}).get("codebook_size", k), seed)
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
    return (
        [
            ("Main table (mean ± standard deviation over seeds)", results_table(aggregate(runs), args.codebook_sizes)),
            (
                "The paper's claims, one by one",
                claims_table(check_claims(runs, k, scatter))
                + f"""

{CLAIM_RULES}
- These runs are small (the setup above); the paper trains on CIFAR-100 and ImageNet for hundreds of epochs. A claim
  that does not hold here may still hold at the paper's scale, and the reverse.""",
            ),
        ]
        + (
            [
                (
                    "The diversity term (an option beyond the paper)",
                    diversity
                    + f"""

Each Gumbel quantizer with `diversity_weight={DIVERSITY_WEIGHT}` against itself without, paired by seed.

{WIN_RULE}""",
                ),
            ]
            if len(diversity.splitlines()) > 2
            else []
        )
        + [
            (
                "Classifier protocols (accuracy, %, mean ± std)",
                protocol_table(runs, k)
                + """

The same frozen features under three protocols (`hf_hypervq.training.study`). The first is `scripts/train_classifier.py`'s
default: a BatchNorm without affine parameters standardises each feature channel before the head, so the head does
not depend on the scale of the code vectors, which differs about 50-fold between quantizers.""",
            ),
        ]
    )


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
        digits_rows = [row for row in args.rows if row in DECIDING_ROWS]
        digits_futures = (submit_grid(pool, args, "digits", digits_rows, [args.tokenizer_steps], args.codebook_sizes,
                                      runs_dir, every=False) if digits_section else [])  # fmt: skip
        cluster_futures = submit_grid(pool, args, args.dataset, [q for q in ("hyperbolic", "kmeans") if q in args.rows],
                                      [args.tokenizer_steps], [k], runs_dir, every=False, extra=TABLE_5)  # fmt: skip
        runs, budget_runs, digits_runs = collect(main_futures), collect(budget_futures), collect(digits_futures)
        cluster_runs = collect(cluster_futures)

    steps = setting_of({"steps": args.tokenizer_steps}, args.quick)["steps"]
    panels = [panel for run in cluster_runs if run["seed"] == args.seeds[0]
              for panel in embedding_panels(run["scatter_points"])]  # fmt: skip
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
    everything += cluster_runs
    compute_hours = sum(r["compute_seconds"] for r in everything) / 3600
    model = QUICK_MODEL if args.quick else MODEL
    setup = (
        (
            "**Quick mode: a smoke test of the pipeline, far too short to be evidence for or against any claim.** "
            if args.quick
            else ""
        )
        + f"Data: {DATASETS[args.dataset].description}; a stratified tenth of the training split is held out as the "
        "validation split, on which every choice was made (HyperVQ's recipe among them); the test split only "
        f"measures. Every row uses the same VQ-VAE (`{json.dumps(model)}`), its quantizer's paper settings (the "
        f"recipe row: HyperVQ's recommended recipe, `{json.dumps(RECIPES['hyperbolic'])}`), {steps} tokenizer "
        "updates (AdamW 1e-3, batch 128), the same Gumbel temperature rule (2 → 0.5 over the run) for the Gumbel "
        f"quantizers; seeds {seeds_of('hyperbolic', args)} for {', '.join(ROW_NAMES[r] for r in DECIDING_ROWS)}, "
        f"seeds {args.seeds[:OTHER_SEEDS]} for the others. The frozen-feature classifier is "
        "`scripts/train_classifier.py`'s default protocol "
        "(features standardised by a BatchNorm without affine parameters, 20 epochs at learning rate 1e-3), trained "
        "on "
        + (
            f"a fixed, class-stratified subset of {int(0.8 * DATASETS[args.dataset].classifier_images):,} training "
            "images"
            if DATASETS[args.dataset].classifier_images
            else "80% of the training split"
        )
        + " and measured on the whole validation and test splits; two other protocols are compared below, and every "
        "quantizer's head starts from the same weights for a seed (`hf_hypervq.training.study`). "
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
    sections = comparison_sections(runs, args, k, cluster_runs)
    sections += (
        []
        if not budget_runs
        else [
            (
                "The budget: does more training change the ranking?",
                f"""![MSE, perplexity and accuracy \
against updates](budget.png)

{budget_table(curve, k)}

HyperVQ and KmeansVQ at K = {k}, seeds {args.seeds}: the main grid's {steps} updates and
{", ".join(str(n) for n in sorted({r["setting"]["steps"] for r in budget_runs})) or "no other budget"}, each a run
of its own (the Gumbel temperature rule spans each run's length).""",
            )
        ]
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
    cluster_table = results_table(aggregate(cluster_runs), [TABLE_5["codebook_size"]])
    sections.append(("The paper's Table 5 setting: latent dimension 3, K = 16",
                     f"HyperVQ and KmeansVQ, seeds {args.seeds[:OTHER_SEEDS]}; the claims above decide on these "
                     f"runs. The pictures are of seed {args.seeds[0]}.\n\n{cluster_table}\n\n"
                     "![embedding scatter](embedding_scatter.png)"))  # fmt: skip
    if digits_runs:
        digits = [(f"Digits: {heading[0].lower()}{heading[1:]}", text)
                  for heading, text in comparison_sections(digits_runs, args, k, None)]  # fmt: skip
        digits[0] = (digits[0][0], f"{DATASETS['digits'].description}; the deciding rows, the same protocol, "
                     f"seeds {args.seeds[:OTHER_SEEDS]}.\n\n" + digits[0][1])  # fmt: skip
        sections += digits
    command = "python study/reproduce.py" + (" --quick" if args.quick else "")
    title = "Does HyperVQ reproduce? (generated by `study/reproduce.py`)"
    write_report(output_dir / "REPORT.md", title=title, setup=setup, sections=sections, commands=[command])
    compact = [{key: v for key, v in r.items() if key not in ("code_counts", "scatter_points")} for r in everything]
    write_text(output_dir / "results.json", json.dumps({"runs": compact}, indent=1))
    print(f"wrote {output_dir / 'REPORT.md'} ({(time.time() - started) / 60:.1f} minutes; the runs took "
          f"{compute_hours:.1f} CPU hours)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
