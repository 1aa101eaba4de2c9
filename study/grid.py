#!/usr/bin/env python
"""Run the study's runs in the order that decides the most first, resumably, so that a grid of many CPU hours can
span several sittings: `study/reproduce.py` and `study/ablate.py` then read the finished runs back (a run that
finished on the same code and environment is never computed again; `hf_hypervq.training.study`, `run_one`).

    python study/grid.py --list              # the plan: every run, its stage, done or not, the CPU hours left
    python study/grid.py                     # run what is left, two at a time (stop it any time)
    python study/grid.py --stages 1          # only the first stage

The stages, all at the main setting (Fashion-MNIST, K = 512, 2,000 updates) unless they say otherwise:

1. Seeds 0-2 of `study/ablate.py`'s default rows, what every decision needs: the paper's three quantizers (HyperVQ,
   KmeansVQ, GumbelVQ) and the anchor; HyperVQ with the diversity term at three weights (its recipe is chosen among
   them on validation); the search for what closes HyperVQ's gap to the anchor (`ablate.SEARCH_ROWS`, 12 runs,
   about 3 CPU hours); the paper's two ablations.
2. The paper's Table 5 setting (latent dimension 3, K = 16, HyperVQ and KmeansVQ) and the digits section.
3. Seeds 3-9 of the rows that decide the claims: HyperVQ, KmeansVQ, GumbelVQ, the anchor and HyperVQ's
   recommended recipe (`hf_hypervq.training.recipes`), 10 seeds each.
"""

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from hf_hypervq.training.recipes import RECIPES
from hf_hypervq.training.study import ANCHOR, run_one, run_path, setting_of


sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (study/ablate.py: the first stage's rows)


FIRST_SEEDS, ALL_SEEDS = (0, 1, 2), tuple(range(10))
# The rows that decide the claims, as `study/reproduce.py` names them
DECIDING = {"hyperbolic": {}, "kmeans": {"quantizer": "kmeans"}, "gumbel": {"quantizer": "gumbel"},
            ANCHOR: {"quantizer": ANCHOR}}  # fmt: skip
# CPU hours of one run, measured on this project's 2-core x86 machine (one thread a run)
HOURS = {"fashion_mnist": 0.25, "digits": 0.05, "table_5": 0.2}


def recipe_row() -> dict:
    """HyperVQ's recommended recipe as a study setting's overrides."""
    return dict(RECIPES["hyperbolic"])


def plan() -> list[tuple[int, str, dict, int]]:
    """`[(stage, name, overrides, seed)]` in the order they run."""
    runs = []
    for seed in FIRST_SEEDS:  # a seed of every row before the next seed: an early stop leaves whole comparisons
        runs += [(1, name, ablate.ROWS[name][1], seed) for name in ablate.DEFAULT_ROWS]
    for seed in FIRST_SEEDS:
        runs += [(2, f"table_5_{q}", {"quantizer": q, "codebook_size": 16, "embedding_dim": 3}, seed)
                 for q in ("hyperbolic", "kmeans")]  # fmt: skip
        runs += [(2, f"digits_{name}", {**overrides, "dataset": "digits"}, seed)
                 for name, overrides in {**DECIDING, "recipe": recipe_row()}.items()]  # fmt: skip
    for seed in ALL_SEEDS[len(FIRST_SEEDS) :]:
        runs += [(3, name, overrides, seed) for name, overrides in {**DECIDING, "recipe": recipe_row()}.items()]
    runs += [(3, "recipe", recipe_row(), seed) for seed in FIRST_SEEDS]  # if the recipe is not a row of stage 1
    unique, seen = [], set()
    for stage, name, overrides, seed in runs:
        key = (repr(sorted(setting_of(overrides).items())), seed)
        if key not in seen:  # the recipe may be a row already (the paper's settings, or a diversity weight)
            seen.add(key)
            unique.append((stage, name, overrides, seed))
    return unique


def hours_of(overrides: dict) -> float:
    if overrides.get("embedding_dim") == 3:
        return HOURS["table_5"]
    return HOURS[overrides.get("dataset", "fashion_mnist")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3], help="stages to run")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--list", action="store_true", help="print the plan and what is done, run nothing")
    parser.add_argument("--runs_dir", default="results/runs", help="where finished runs are (default: results/runs)")
    args = parser.parse_args(argv)
    todo = [run for run in plan() if run[0] in args.stages]
    done = {i for i, (_, _, overrides, seed) in enumerate(todo)
            if run_path(args.runs_dir, setting_of(overrides), seed, False).exists()}  # fmt: skip
    left = sum(hours_of(overrides) for i, (_, _, overrides, _) in enumerate(todo) if i not in done)
    print(f"{len(done)} of {len(todo)} runs done; about {left:.1f} CPU hours left")
    if args.list:
        for i, (stage, name, _, seed) in enumerate(todo):
            print(f"stage {stage}  {name:<24} seed {seed}  {'done' if i in done else ''}")
        return 0
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, setting_of(overrides), seed, False, args.runs_dir): (name, seed)
                   for i, (_, name, overrides, seed) in enumerate(todo) if i not in done}  # fmt: skip
        for future in as_completed(futures):
            name, seed = futures[future]
            run = future.result()
            print(
                f"{name} seed {seed}: MSE {run['reconstruction_mse']:.4f}, accuracy {run['accuracy']:.3f}, "
                f"perplexity {run['perplexity']:.1f}, {run['compute_seconds'] / 60:.0f} CPU minutes",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
