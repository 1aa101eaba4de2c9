#!/usr/bin/env python
"""The study behind HyperVQ's defaults: which choices decide its quality, and why.

    python study/ablate.py                        # the default rows on Fashion-MNIST, ~4 hours on 2 CPU cores
    python study/ablate.py --rows defaults beta_0.25 --seeds 0     # a few rows
    python study/ablate.py --dataset digits       # the same rows on scikit-learn's digits
    python study/ablate.py --quick                # a smoke test of the pipeline (CI)

Each row changes one choice against the library's defaults (HyperVQ, K = 512, 2000 updates, the `run_length`
temperature rule) and trains a tokenizer per seed, then frozen-feature classifiers on its codes under three protocols
(`hf_hypervq.training.study` has the protocol, shared with `study/reproduce.py`). Next to the quality numbers (test MSE,
accuracy, eval perplexity, codes used) stand each row's differences from the defaults, paired by seed with a 95%
interval, and the numbers that explain them: the perplexity of the training-time samples against the eval argmax,
the mean latent norm on the ball, the top-1 − top-2 logit margin, the mean max softmax probability, and the dead
codes. `DEFAULT_ROWS` are the choices that moved the results most; the other rows stay available with `--rows`.

The reference rows run other quantizers under the same protocol: KmeansVQ, GumbelVQ, HyperEmbMatVQ and the anchor
practitioners use, vector-quantize-pytorch's `VectorQuantize` (`hf_hypervq.training.study`, `VectorQuantizeAnchor`).

Writes `results/ABLATIONS.md` (mean ± std over seeds) and `results/ablations.json`. Runs are kept in
`results/runs/` and reused by a rerun (and by `reproduce.py` where the settings agree) as long as the code that
computes them is unchanged (`hf_hypervq.training.study`, `code_fingerprint`).
"""

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hf_hypervq.training.data import FASHION_MNIST
from hf_hypervq.training.outputs import write_text
from hf_hypervq.training.report import (
    NOT_ON_VALIDATION,
    WIN_RULE,
    best_row,
    choose_recipe,
    diversity_table,
    paired,
    recipe_verdict,
)
from hf_hypervq.training.study import ANCHOR, DATASETS, DEFAULTS, MODEL, QUICK_MODEL, provenance, run_one, setting_of


DIVERSITY_WEIGHTS = (0.03, 0.1, 0.3)  # HyperVQ's sweep; the other Gumbel quantizers get the first two
# Each row: what it tests, and how it differs from DEFAULTS.
ROWS = {
    "defaults": ("the library's defaults", {}),
    "beta_0.25": ("commitment loss, weight 0.25 (the paper has none)", {"commitment_weight": 0.25}),
    "per_update": (
        "temperature: vq-wav2vec's decay 0.999995 per update (τ ≈ 2 throughout)",
        {"schedule": "per_update"},
    ),  # fmt: skip
    "offsets_0": ("offsets start at 0 (HNN++); every code vector is 0 at step 0", {"offset_init_scale": 0.0}),
    "offsets_x8": (
        "offsets start Uniform(0, 8/sqrt(c·d)) = Uniform(0, 1): larger code vectors",
        {"offset_init_scale": 8.0},
    ),  # fmt: skip
    "normals_x0.25": ("normals start at 1/4 of HNN++'s scale: flatter logits", {"normal_init_scale": 0.25}),
    "normals_x4": ("normals start at 4× HNN++'s scale: sharper logits", {"normal_init_scale": 4.0}),
    "curvature_0.1": ("curvature 0.1: the latents are 10^-1/2 as large relative to the ball", {"curvature": 0.1}),
    "steps_1000": ("training length 1000 updates", {"steps": 1000}),
    "steps_4000": ("training length 4000 updates", {"steps": 4000}),
    "diversity_0.03": ("wav2vec 2.0's diversity term, weight 0.03", {"diversity_weight": 0.03}),
    "diversity_0.1": ("wav2vec 2.0's diversity term, weight 0.1", {"diversity_weight": 0.1}),
    "diversity_0.3": ("wav2vec 2.0's diversity term, weight 0.3", {"diversity_weight": 0.3}),
    **{
        f"{quantizer}_diversity_{weight}": (
            f"reference: {name} with the diversity term, weight {weight}",
            {"quantizer": quantizer, "diversity_weight": weight},
        )
        for quantizer, name in (("gumbel", "GumbelVQ"), ("hyperbolic_embedding", "HyperEmbMatVQ"))
        for weight in DIVERSITY_WEIGHTS[:2]
    },
    "clip_1": ("feature clipping at radius 1 before the map onto the ball (Guo et al.)", {"feature_clip": 1.0}),
    # the search for what closes HyperVQ's gap to the anchor (`hf_hypervq.training.study.train_tokenizer`)
    "kmeans_init": (
        "hyperplanes start with their code vectors at k-means centroids of the first batch's latents",
        {"hyperplane_init": "kmeans"},
    ),  # fmt: skip
    "restart_dead_100": (
        "every 100 updates, hyperplanes that won no training latent's argmax restart at latents of the batch",
        {"restart_dead_after": 100},
    ),  # fmt: skip
    "tau_min_0.1": ("Gumbel temperature down to 0.1 at the last update (not 0.5)", {"tau_min": 0.1}),
    "quantizer_lr_x10": ("the quantizer's learning rate 10× the model's", {"quantizer_lr_scale": 10.0}),
    "kmeans": ("reference: KmeansVQ (VQ-VAE), its defaults", {"quantizer": "kmeans"}),
    "hyperbolic_kmeans": ("reference: HyperKmeansVQ, the paper's ablation", {"quantizer": "hyperbolic_kmeans"}),
    "gumbel": ("reference: GumbelVQ (vq-wav2vec), the same schedule rule", {"quantizer": "gumbel"}),
    "gumbel_per_update": (
        "reference: GumbelVQ with the per-update decay",
        {"quantizer": "gumbel", "schedule": "per_update"},
    ),
    "hyperbolic_embedding": (
        "reference: HyperEmbMatVQ, same hyperplanes, learned code matrix",
        {"quantizer": "hyperbolic_embedding"},
    ),  # fmt: skip
    "vq_pytorch": (
        "anchor: vector-quantize-pytorch's VectorQuantize (EMA, k-means init, dead-code replacement, β = 0.25)",
        {"quantizer": ANCHOR},
    ),  # fmt: skip
}
# The rows run by default (`study/grid.py`'s first stage): the other quantizers, HyperVQ's diversity weights (its
# recipe is chosen among them on validation) and the search for what closes its gap to the anchor. The rows of
# earlier studies (temperature rule, initial scales, training length, ...) stay available with --rows.
DECIDING_ROWS = ["defaults", "kmeans", "gumbel", "vq_pytorch"]
SEARCH_ROWS = ["kmeans_init", "restart_dead_100", "tau_min_0.1", "quantizer_lr_x10"]
# The settings a recipe can take (hypervq-train-vqvae has their flags); the search's other rows need training code
RECIPE_CANDIDATES = ["diversity_0.03", "diversity_0.1", "diversity_0.3", "tau_min_0.1"]
DEFAULT_ROWS = [*DECIDING_ROWS, "diversity_0.03", "diversity_0.1", "diversity_0.3", *SEARCH_ROWS,
                "hyperbolic_embedding", "hyperbolic_kmeans"]  # fmt: skip
# A diversity weight may become the training scripts' default only if it wins for all three Gumbel quantizers alike:
# (label, the row with the term, the row without)
DIVERSITY_COMPARISONS = [
    (f"{name}, weight {weight}", f"{prefix}{weight}", base)
    for name, prefix, base, weights in (
        ("HyperVQ", "diversity_", "defaults", DIVERSITY_WEIGHTS),
        ("GumbelVQ", "gumbel_diversity_", "gumbel", DIVERSITY_WEIGHTS[:2]),
        ("HyperEmbMatVQ", "hyperbolic_embedding_diversity_", "hyperbolic_embedding", DIVERSITY_WEIGHTS[:2]),
    )
    for weight in weights
]
COLUMNS = [  # (key, header, digits)
    ("reconstruction_mse", "test MSE ↓", 4),
    ("accuracy", "accuracy (%) ↑", 1),
    ("accuracy_unnormalized", "accuracy, the paper's head (%)", 1),
    ("accuracy_early_stopping", "accuracy, early stopping (%)", 1),
    ("perplexity", "eval perplexity ↑", 1),
    ("codes_used", "codes used", 2),
    ("train_perplexity", "train-sample perplexity", 1),
    ("dead_codes", "dead codes ↓", 0),
    ("ball_norm", "latent norm on the ball", 3),
    ("logit_margin", "top-1 − top-2 logit", 3),
    ("mean_max_probability", "mean max prob", 3),
    ("code_vector_norm", "code vector norm", 3),
]
PERCENT = {"accuracy", "accuracy_unnormalized", "accuracy_early_stopping"}
# The "best row" columns, chosen on the validation split (runs carry no dead codes there: codes used ranks the same)
BEST = [("reconstruction_mse", "MSE", True), ("accuracy", "accuracy", False),
        ("perplexity", "eval perplexity", False), ("codes_used", "codes used", False)]  # fmt: skip


def write_report(results: list, rows: list, args, path: Path) -> None:
    quick, dataset = args.quick, ("digits" if args.quick else args.dataset)
    compute_hours = sum(r["compute_seconds"] for r in results) / 3600
    lines = [
        "# HyperVQ ablations: what decides its quality",
        "",
        "Made by `python study/ablate.py"
        + (" --quick" if quick else "")
        + ("" if quick or dataset == FASHION_MNIST else f" --dataset {dataset}")
        + "`"
        + ("; **quick mode: a smoke test, not evidence**" if quick else "")
        + ". "
        f"Data: {DATASETS[dataset].description}. Model: `{json.dumps(QUICK_MODEL if quick else MODEL)}`, AdamW 1e-3, "
        f"batch 128, seeds {args.seeds}; mean ± std over seeds. Defaults: `{json.dumps(DEFAULTS)}`; each row changes "
        "what its description says and nothing else. Gumbel temperature rules: `run_length` decays from 2 to 0.5 "
        "over the run (`decay_for_run`), `per_update` is vq-wav2vec's 0.999995 per update. The classifier "
        "protocols are in `hf_hypervq.training.study`'s docstring: *accuracy* is `scripts/train_classifier.py`'s default "
        "(features standardised per channel, 20 epochs), *the paper's head* the same without the standardisation, "
        "*early stopping* the paper's head with its learning rate and stopping epoch chosen on a validation split "
        "carved from the training split, never on the test split. "
        f"The runs' code and versions: {provenance(results)} (`hf_hypervq.training.study`, `code_fingerprint`). "
        f"The {len(results)} runs took {compute_hours:.1f} CPU hours.",
        "",
        "*vs defaults*: the row minus the defaults (MSE: the row over the defaults, averaged on the log scale and "
        "shown as a ratio), paired by seed: the mean and its 95% Student-t interval, on the test split. An interval "
        "that excludes 0 (1 for the MSE ratio) is a difference the seeds can tell; one that straddles it is not, "
        "which is not the same as no difference.",
        "",
        "Mechanism columns: *eval perplexity* is of the argmax codes on the test split, *train-sample perplexity* of "
        "the codes the training step actually used in its last epoch (the Gumbel samples for the MLR quantizers); "
        "*latent norm on the ball* is the mean of √c‖x‖ (0 at the centre, 1 at the boundary); the logit margin and "
        "max probability are the mean over test latents of the eval logits; *dead codes* are never chosen on the "
        "test split.",
        "",
        "| row | what changes | MSE vs defaults | accuracy vs defaults (points) | "
        + " | ".join(header for _, header, _ in COLUMNS)
        + " |",
        "|---|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for name in rows:
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        k = runs[0]["codebook_size"]
        if name == "defaults":
            versus = ["—", "—"]
        else:
            versus = [paired(results, name, "defaults", "reconstruction_mse", k, ratio=True).text(),
                      paired(results, name, "defaults", "accuracy", k).text(100, 1)]  # fmt: skip
        cells = []
        for key, _, digits in COLUMNS:
            values = [r[key] * (100 if key in PERCENT else 1) for r in runs if r.get(key) is not None]
            if not values:
                cells.append("—")
            elif len(values) == 1:
                cells.append(f"{values[0]:.{digits}f}")
            else:
                cells.append(f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}")
        lines.append(f"| `{name}` | {ROWS[name][0]} | " + " | ".join(versus + cells) + " |")
    diversity = diversity_table(results, results[0]["codebook_size"], DIVERSITY_COMPARISONS)
    if len(diversity.splitlines()) > 2:
        lines += [
            "",
            "## The diversity weight, for every Gumbel quantizer",
            "",
            "Each row with wav2vec 2.0's diversity term against the same quantizer without it, paired by seed. "
            "The training scripts turn a weight on by default only where it wins for all three alike.",
            "",
            WIN_RULE,
            "",
            diversity,
        ]
    judged = [row for row in dict.fromkeys(RECIPE_CANDIDATES + SEARCH_ROWS) if any(r["row"] == row for r in results)]
    candidates = [row for row in judged if row in RECIPE_CANDIDATES]
    if judged and any(r["row"] == "defaults" for r in results):
        k = results[0]["codebook_size"]
        chosen = choose_recipe(results, candidates, "defaults", k)
        lines += ["", "## HyperVQ's recipe, decided on validation", "",
                  "Each candidate setting against the defaults, paired by seed, on the validation split. It enters "
                  "the recipe (`hf_hypervq.training.recipes`) only with a gain beyond the noise, in codes used or "
                  "in MSE, and no loss beyond the declared margins; of several, the one with the lowest validation "
                  "MSE. The search rows that need training code the library does not have (k-means "
                  "initialisation, restarts, a quantizer learning rate) are evidence for that code, not recipes.",
                  "", "| candidate | what changes | a flag of the script | verdict (validation) |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{row}` | {ROWS[row][0]} | {'yes' if row in candidates else 'no'} | "
                  f"{recipe_verdict(results, row, 'defaults', k)} |" for row in judged]  # fmt: skip
        lines += ["", f"The recipe this evidence gives: `{chosen}` ({ROWS[chosen][0]})." if chosen else
                  "The recipe this evidence gives: the paper's settings (no candidate wins)."]  # fmt: skip
    lines += [
        "",
        "## Best HyperVQ row per quality column (the reference rows of other quantizers excluded)",
        "",
        "Chosen by the mean over seeds on the validation split, never on the test split; the test mean is shown for "
        "the report. Runs without validation numbers choose nothing.",
        "",
    ]
    hyperbolic = [n for n in rows if ROWS[n][1].get("quantizer", DEFAULTS["quantizer"]) == "hyperbolic"]
    for key, header, lower_is_better in BEST:
        scale = 100 if key in PERCENT else 1
        chosen = best_row(results, hyperbolic, key, lower_is_better=lower_is_better)
        if chosen is None:
            lines.append(f"- {header}: {NOT_ON_VALIDATION}")
            continue
        best, validation_mean = chosen
        test_mean = statistics.mean(r[key] for r in results if r["row"] == best)
        lines.append(f"- {header}: `{best}`, chosen on validation ({validation_mean * scale:.4g}; test "
                     f"{test_mean * scale:.4g})")  # fmt: skip
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS),
                        help="rows to run (default: DEFAULT_ROWS)")  # fmt: skip
    parser.add_argument("--dataset", default=FASHION_MNIST, choices=list(DATASETS), help="the data set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--quick", action="store_true",
                        help="digits, a tiny model, K <= 64, 1/50 of the updates (smoke test)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--output_dir", default=None,
                        help="where ABLATIONS.md goes (default: results; results/quick with --quick)")  # fmt: skip
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    # a smoke test never overwrites the committed study
    output_dir = Path(args.output_dir or ("results/quick" if args.quick else "results"))
    runs_dir = output_dir / "runs"
    jobs = [(name, seed) for name in args.rows for seed in args.seeds]
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            pool.submit(run_one, setting_of({**ROWS[name][1], "dataset": args.dataset}, args.quick), seed,
                        args.quick, runs_dir): (name, seed)
            for name, seed in jobs
        }  # fmt: skip
        for future, (name, seed) in futures.items():
            result = future.result()
            result = {"row": name, "codebook_size": result["setting"]["codebook_size"], **result}
            results.append(result)
            print(f"{name} seed {seed}: MSE {result['reconstruction_mse']:.4f}, accuracy {result['accuracy']:.3f}, "
                  f"eval perplexity {result['perplexity']:.1f}, train perplexity {result['train_perplexity']:.1f}",
                  flush=True)  # fmt: skip
    name = "ABLATIONS.md" if args.quick or args.dataset == FASHION_MNIST else f"ABLATIONS-{args.dataset}.md"
    write_report(results, args.rows, args, output_dir / name)
    compact = [{k: v for k, v in r.items() if k != "code_counts"} for r in results]
    write_text(output_dir / Path(name).with_suffix(".json").name.lower(), json.dumps(compact, indent=1))
    print(f"wrote {output_dir / name}")


if __name__ == "__main__":
    sys.exit(main())
