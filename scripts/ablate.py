#!/usr/bin/env python
"""The study behind HyperVQ's defaults: which choices decide its quality, and why.

    python scripts/ablate.py                      # the full study, about an hour on 2 CPU cores
    python scripts/ablate.py --rows defaults beta_0.25 --seeds 0   # a few rows
    python scripts/ablate.py --quick              # a smoke test of the pipeline (CI)

Each row changes one choice against the library's defaults (HyperVQ, K = 512, 1500 updates, the `run_length`
temperature rule) and trains a tokenizer on scikit-learn's digits per seed, then frozen-feature classifiers on its
codes under two protocols (`scripts/study.py` has the protocol, shared with `scripts/reproduce.py`). Next to the
quality numbers (test MSE, accuracy, eval perplexity) stand the numbers that explain them: the perplexity of the
training-time samples against the eval argmax, the mean latent norm on the ball, the top-1 − top-2 logit margin, the
mean max softmax probability, and the dead codes.

The reference rows run other quantizers under the same protocol: KmeansVQ, GumbelVQ, HyperEmbMatVQ and the anchor
practitioners use, vector-quantize-pytorch's `VectorQuantize` (`scripts/study.py`, `VectorQuantizeAnchor`).

Writes `results/ABLATIONS.md` (mean ± std over seeds) and `results/ablations.json`. Runs are kept in
`results/runs/` and reused by a rerun (and by `reproduce.py` where the settings agree) as long as the code that
computes them is unchanged (`scripts/study.py`, `code_fingerprint`).
"""

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from study import ANCHOR, DEFAULTS, MODEL, QUICK_MODEL, provenance, run_one, setting_of

from hf_hypervq.training.outputs import write_text


# Each row: what it tests, and how it differs from DEFAULTS.
ROWS = {
    "defaults": ("the library's defaults", {}),
    "v0.1": (
        "hf-hypervq 0.1's defaults: commitment 0.25, vq-wav2vec's per-update decay, 400 updates",
        {"commitment_weight": 0.25, "schedule": "per_update", "steps": 400},
    ),  # fmt: skip
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
    "steps_400": ("training length 400 updates", {"steps": 400}),
    "steps_3000": ("training length 3000 updates", {"steps": 3000}),
    "kmeans": ("reference: KmeansVQ (VQ-VAE), its defaults", {"quantizer": "kmeans"}),
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
COLUMNS = [  # (key, header, digits)
    ("reconstruction_mse", "test MSE ↓", 4),
    ("accuracy", "accuracy, early stopping (%) ↑", 1),
    ("accuracy_fixed", "accuracy, 200 updates (%)", 1),
    ("perplexity", "eval perplexity ↑", 1),
    ("train_perplexity", "train-sample perplexity", 1),
    ("dead_codes", "dead codes ↓", 0),
    ("ball_norm", "latent norm on the ball", 3),
    ("logit_margin", "top-1 − top-2 logit", 3),
    ("mean_max_probability", "mean max prob", 3),
    ("code_vector_norm", "code vector norm", 3),
]
PERCENT = {"accuracy", "accuracy_fixed"}
BEST = [("reconstruction_mse", "test MSE", True), ("accuracy", "accuracy (early stopping)", False),
        ("perplexity", "eval perplexity", False), ("dead_codes", "dead codes", True)]  # fmt: skip


def write_report(results: list, rows: list, seeds: list, path: Path, wall_minutes: float, quick: bool) -> None:
    lines = [
        "# HyperVQ ablations: what decides its quality",
        "",
        "Made by `python scripts/ablate.py"
        + (" --quick" if quick else "")
        + "`"
        + ("; **quick mode: a smoke test, not evidence**" if quick else "")
        + ". "
        f"Data: scikit-learn's handwritten digits (1,437 training / 360 test images, 16×16, 4×4 tokens). Model: "
        f"`{json.dumps(QUICK_MODEL if quick else MODEL)}`, AdamW 1e-3, batch 128, seeds {seeds}; mean ± std over "
        f"seeds. Defaults: `{json.dumps(DEFAULTS)}`; each row changes "
        "what its description says and nothing else. Gumbel temperature rules: `run_length` decays from 2 to 0.5 "
        "over the run (`decay_for_run`), `per_update` is vq-wav2vec's 0.999995 per update. The classifier "
        "protocols are in `scripts/study.py`'s docstring; `early stopping` chooses its learning rate and stopping epoch "
        "on a validation split carved from the training split, never on the test split. "
        f"The runs' code and versions: {provenance(results)} (`scripts/study.py`, `code_fingerprint`). "
        f"The {len(results)} runs took "
        f"{wall_minutes:.1f} minutes of compute in all.",
        "",
        "Mechanism columns: *eval perplexity* is of the argmax codes on the test split, *train-sample perplexity* of "
        "the codes the training step actually used in its last epoch (the Gumbel samples for the MLR quantizers); "
        "*latent norm on the ball* is the mean of √c‖x‖ (0 at the centre, 1 at the boundary); the logit margin and "
        "max probability are the mean over test latents of the eval logits; *dead codes* are never chosen on the "
        "test split (of K = 512).",
        "",
        "| row | what changes | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name in rows:
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        cells = []
        for key, _, digits in COLUMNS:
            values = [r[key] * (100 if key in PERCENT else 1) for r in runs if r.get(key) is not None]
            if not values:
                cells.append("—")
            elif len(values) == 1:
                cells.append(f"{values[0]:.{digits}f}")
            else:
                cells.append(f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}")
        lines.append(f"| `{name}` | {ROWS[name][0]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Best HyperVQ row per quality column (means; the reference rows of other quantizers excluded)",
        "",
    ]
    hyperbolic = [n for n in rows if ROWS[n][1].get("quantizer", DEFAULTS["quantizer"]) == "hyperbolic"]
    for key, header, lower_is_better in BEST:
        means = {n: statistics.mean(r[key] for r in results if r["row"] == n) for n in hyperbolic
                 if any(r["row"] == n for r in results)}  # fmt: skip
        if means:
            best = (min if lower_is_better else max)(means, key=means.get)
            lines.append(f"- {header}: `{best}` ({means[best] * (100 if key in PERCENT else 1):.4g})")
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, K <= 64, 1/50 of the updates (smoke test)")
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
            pool.submit(run_one, setting_of(ROWS[name][1], args.quick), seed, args.quick, runs_dir): (name, seed)
            for name, seed in jobs
        }
        for future, (name, seed) in futures.items():
            result = {"row": name, **future.result()}
            results.append(result)
            print(f"{name} seed {seed}: MSE {result['reconstruction_mse']:.4f}, accuracy {result['accuracy']:.3f}, "
                  f"eval perplexity {result['perplexity']:.1f}, train perplexity {result['train_perplexity']:.1f}",
                  flush=True)  # fmt: skip
    wall_minutes = sum(r["wall_seconds"] for r in results) / 60
    write_report(results, args.rows, args.seeds, output_dir / "ABLATIONS.md", wall_minutes, args.quick)
    compact = [{k: v for k, v in r.items() if k != "code_counts"} for r in results]
    write_text(output_dir / "ablations.json", json.dumps(compact, indent=1))
    print(f"wrote {output_dir / 'ABLATIONS.md'}")


if __name__ == "__main__":
    sys.exit(main())
