"""The reproduction report of `study/reproduce.py`: aggregation over seeds, the paper's claims checked one by one,
plots, and the markdown."""

import dataclasses
import math
import statistics

import matplotlib
from scipy import stats


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..models.hypervq.hyperbolic import expmap0_projected  # noqa: E402
from ..models.hypervq.quantizers import QUANTIZERS  # noqa: E402
from .outputs import write_text  # noqa: E402
from .plots import draw_codebook_usage, image_grid  # noqa: E402


PAPER_QUANTIZERS = {name: spec.paper_name for name, spec in QUANTIZERS.items()}  # the paper's claims are about these
# Reference rows from outside the library, in the same VQ-VAE: `hf_hypervq.training.study` adapts them (the library does not
# depend on their packages). `vq_pytorch` is vector-quantize-pytorch's `VectorQuantize`, the one practitioners use.
ANCHORS = {"vq_pytorch": "VectorQuantize (anchor)"}
QUANTIZER_NAMES = {**PAPER_QUANTIZERS, **ANCHORS}  # the report's row names, in the tables' order


# The comparison's rows besides the quantizers' own: the three Gumbel quantizers with wav2vec 2.0's diversity term
# (`diversity_weight`), which the paper does not mention; each maps to the row without it.
DIVERSITY_ROWS = {f"{q}+diversity": q for q in ("hyperbolic", "gumbel", "hyperbolic_embedding")}
ROW_NAMES = {**QUANTIZER_NAMES, **{row: f"{PAPER_QUANTIZERS[q]} + diversity" for row, q in DIVERSITY_ROWS.items()}}
TOKENIZER_METRICS = ("reconstruction_mse", "perplexity", "codes_used", "silhouette", "davies_bouldin",
                     "noisy_silhouette", "noisy_davies_bouldin")  # fmt: skip
# The frozen-feature classifier's protocols (`hf_hypervq.training.study`): train_classifier.py's defaults first
ACCURACIES = {
    "accuracy": "normalised features, 20 epochs (train_classifier.py)",
    "accuracy_unnormalized": "the paper's head, 20 epochs",
    "accuracy_early_stopping": "the paper's head, early stopping, learning rate chosen on validation",
}
CONFIDENCE = 0.95  # of the paired intervals behind every verdict


def aggregate(runs: list[dict]) -> dict:
    """`{(row, K): {metric: (mean, std, n)}}` over the seeds of each grid cell."""
    cells: dict = {}
    for run in runs:
        cells.setdefault((run["row"], run["codebook_size"]), []).append(run)
    table = {}
    for key, group in cells.items():
        metrics = {}
        for name in (*TOKENIZER_METRICS, *ACCURACIES, "compute_seconds"):
            values = [r[name] for r in group if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                metrics[name] = (statistics.fmean(values), std, len(values))
        table[key] = metrics
    return table


def _fmt(cell, digits=3):
    if cell is None:
        return "–"
    mean, std, n = cell
    return f"{mean:.{digits}g} ± {std:.2g}" if n > 1 else f"{mean:.{digits}g}"


@dataclasses.dataclass(frozen=True)
class Paired:
    """The mean over seeds of a per-seed difference `a - b` (or ratio `a / b`) of two rows trained with the same seeds,
    and its `CONFIDENCE` Student-t interval; `n` pairs. One pair gives an infinite interval, none a NaN mean."""

    mean: float
    low: float
    high: float
    n: int
    ratio: bool = False

    def text(self, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "not measured"
        if self.ratio:
            mean = f"{self.mean:.{digits}f}×"
            lo, hi = (_bound(v, digits, 1.0, "") for v in (self.low, self.high))
        else:
            m, lo, hi = (scale * v for v in (self.mean, self.low, self.high))
            mean = f"{m:+.{digits}f}{unit}"
            lo, hi = (_bound(v, digits, 0.0, "+") for v in (lo, hi))
        return f"{mean} (1 seed: no interval)" if self.n == 1 else f"{mean} [{lo}, {hi}] ({self.n} seeds)"


def _bound(value: float, digits: int, no_difference: float, sign: str) -> str:
    """An interval bound with up to two more digits where `digits` would round it onto `no_difference`: the verdict
    turns on which side of it the bound lies, and "[1.00, 1.11]" cannot show that 1.004 is above 1."""
    for extra in range(3):
        text = f"{value:{sign}.{digits + extra}f}"
        if value == no_difference or float(text) != no_difference:
            break
    return text


def paired(runs: list[dict], row_a: str, row_b: str, metric: str, k: int, *, ratio: bool = False) -> Paired:
    """`row_a` against `row_b` on `metric` at codebook size `k`, paired by seed (`Paired`)."""

    def by_seed(row):
        return {r["seed"]: r.get(metric) for r in runs if r["row"] == row and r["codebook_size"] == k}

    a, b = by_seed(row_a), by_seed(row_b)
    values = []
    for seed in sorted(a.keys() & b.keys()):
        x, y = a[seed], b[seed]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) or (ratio and y == 0):
            return Paired(math.nan, math.nan, math.nan, 0, ratio)  # a failed run: nothing to decide from
        values.append(x / y if ratio else x - y)
    if not values:
        return Paired(math.nan, math.nan, math.nan, 0, ratio)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Paired(mean, -math.inf, math.inf, 1, ratio)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Paired(mean, mean - half, mean + half, len(values), ratio)


def decide(difference: Paired, claimed: str, threshold: float = 0.0) -> str:
    """The verdict on "the paired quantity is `claimed` ("above" / "below") `threshold`": holds when its interval lies
    wholly on the claimed side, does not hold when wholly on the other, inconclusive when it straddles the threshold;
    "not measurable" when a run is missing or failed."""
    if difference.n == 0 or not math.isfinite(difference.mean):
        return "not measurable"
    above, below = difference.low > threshold, difference.high < threshold
    if claimed == "above":
        return "holds" if above else "does not hold" if below else "inconclusive"
    if claimed == "below":
        return "holds" if below else "does not hold" if above else "inconclusive"
    raise ValueError(f"`claimed` must be 'above' or 'below', got {claimed!r}")


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim made of several comparisons: it does not hold if one of them does not, it holds if all
    do; else it cannot be measured (a comparison lacks runs) or is inconclusive."""
    for verdict in ("does not hold", "not measurable", "inconclusive"):
        if verdict in verdicts:
            return verdict
    return "holds"


METRIC_NAMES = {"reconstruction_mse": "MSE", "accuracy": "accuracy", "perplexity": "perplexity",
                "silhouette": "silhouette", "davies_bouldin": "Davies-Bouldin", "noisy_silhouette": "noisy silhouette"}  # fmt: skip


def _compare(runs, k, a, b, metric, claimed, *, scale=1.0, unit="", ratio=False, threshold=0.0, digits=2):
    difference = paired(runs, a, b, metric, k, ratio=ratio)
    sign = "/" if ratio else "−"
    text = f"{METRIC_NAMES[metric]}, {ROW_NAMES[a]} {sign} {ROW_NAMES[b]}: {difference.text(scale, digits, unit)}"
    return decide(difference, claimed, threshold), text


def check_claims(runs: list[dict], k: int, scatter: dict | None = None) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each claim of the paper at codebook size `k`, each decided from intervals on
    differences paired by seed (`paired`, `decide`). `scatter` adds the dimension-3, K = 16 cluster claims of one
    tokenizer per quantizer (`{quantizer: metrics}`): one seed, so never more than inconclusive."""
    claims = []

    def claim(text, comparisons, note=""):
        claims.append((text, combine([v for v, _ in comparisons]), "; ".join(t for _, t in comparisons) + note))

    h = "hyperbolic"
    claim(f"HyperVQ reconstructs about as well as KmeansVQ (Table 1), K={k}",
          [_compare(runs, k, h, "kmeans", "reconstruction_mse", "below", ratio=True, threshold=1.1)],
          " (\"about as well\": the MSE ratio at most 1.1×)")  # fmt: skip
    points = {"scale": 100, "unit": " points", "digits": 1}
    claim(f"HyperVQ's codes give a better frozen-feature classifier than KmeansVQ's and GumbelVQ's (Table 3), K={k}",
          [_compare(runs, k, h, q, "accuracy", "above", **points) for q in ("kmeans", "gumbel")])  # fmt: skip
    claim(f"HyperVQ has the highest codebook perplexity, then GumbelVQ, then KmeansVQ (Table 4: 220 / 170 / 58), K={k}",
          [_compare(runs, k, a, b, "perplexity", "above", digits=1) for a, b in ((h, "gumbel"), ("gumbel", "kmeans"))])  # fmt: skip
    claim(f"HyperVQ's clusters are more compact than KmeansVQ's: higher silhouette, lower Davies-Bouldin (Table 5), K={k}",
          [_compare(runs, k, h, "kmeans", "silhouette", "above", digits=3),
           _compare(runs, k, h, "kmeans", "davies_bouldin", "below", digits=3)],
          " (paper: 0.565 vs 0.487; 0.553 vs 0.732)")  # fmt: skip
    claim(f"HyperVQ's clusters stay more compact under noise (Table 5), K={k}",
          [_compare(runs, k, h, "kmeans", "noisy_silhouette", "above", digits=3)], " (paper: 0.564 vs 0.310)")  # fmt: skip
    if scatter:
        cells = [{"row": q, "codebook_size": 16, "seed": 0, **metrics} for q, metrics in scatter.items()]
        claim("HyperVQ's clusters are more compact than KmeansVQ's, latent dimension 3, K=16 (Table 5's setting)",
              [_compare(cells, 16, h, "kmeans", "silhouette", "above", digits=3),
               _compare(cells, 16, h, "kmeans", "davies_bouldin", "below", digits=3),
               _compare(cells, 16, h, "kmeans", "noisy_silhouette", "above", digits=3)])  # fmt: skip
    table = aggregate(runs)
    anchors = "".join(f"; context, {name}: {100 * table[(q, k)]['accuracy'][0]:.1f}%" for q, name in ANCHORS.items()
                      if "accuracy" in table.get((q, k), {}))  # fmt: skip
    claim(f"Ablation: HyperVQ's codes classify better than HyperEmbMatVQ's, KmeansVQ's, GumbelVQ's and "
          f"HyperKmeansVQ's (Table 7), K={k}",
          [_compare(runs, k, h, q, "accuracy", "above", **points)
           for q in ("hyperbolic_embedding", "kmeans", "gumbel", "hyperbolic_kmeans")],
          " (paper: HyperVQ 31.6 > KmeansVQ 30.0 > HyperEmbMatVQ 28.3 > GumbelVQ 26.0 > HyperKmeansVQ 22.4)"
          + anchors)  # fmt: skip
    return claims


def diversity_table(runs: list[dict], k: int, comparisons=None) -> str:
    """Each Gumbel quantizer with the diversity term against itself without, paired by seed: what the term buys in
    usage and costs in MSE and accuracy, and whether it "wins on usage without losing MSE or accuracy beyond the
    noise": yes when the codes used rise (interval above 0) and neither the MSE ratio's interval lies above 1 nor
    the accuracy difference's below 0; no when the usage does not rise or either loss is beyond the noise; else
    inconclusive. `comparisons`: `(label, row with the term, row without)` triples, by default the rows of
    `DIVERSITY_ROWS`; a comparison without runs gets no line."""
    if comparisons is None:
        comparisons = [(PAPER_QUANTIZERS[base], row, base) for row, base in DIVERSITY_ROWS.items()]
    lines = ["| quantizer | codes used (share), with − without | MSE, with / without | accuracy, with − without | "
             "wins on usage, no loss beyond the noise |", "|---|---|---|---|---|"]  # fmt: skip
    for label, row, base in comparisons:
        usage = paired(runs, row, base, "codes_used", k)
        mse = paired(runs, row, base, "reconstruction_mse", k, ratio=True)
        accuracy = paired(runs, row, base, "accuracy", k)
        if usage.n == 0:
            continue
        loses = decide(usage, "above") == "does not hold" or mse.low > 1 or accuracy.high < 0
        wins = decide(usage, "above") == "holds" and mse.low <= 1 and accuracy.high >= 0
        verdict = ("not measurable" if min(mse.n, accuracy.n) == 0 else "no" if loses else "yes" if wins
                   else "inconclusive")  # fmt: skip
        lines.append(f"| {label} | {usage.text(digits=2)} | {mse.text()} | "
                     f"{accuracy.text(100, 1, ' points')} | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def protocol_table(runs: list[dict], k: int) -> str:
    """Frozen-feature accuracy of every row under each classifier protocol (mean ± std), and HyperVQ − KmeansVQ
    under each, paired by seed."""
    table = aggregate(runs)
    lines = ["| row | " + " | ".join(ACCURACIES.values()) + " |", "|---|" + "---|" * len(ACCURACIES)]
    for row, name in ROW_NAMES.items():
        cell = table.get((row, k))
        if cell:
            values = [cell.get(key) for key in ACCURACIES]
            lines.append(f"| {name} | " + " | ".join(_fmt(v and (100 * v[0], 100 * v[1], v[2]), 3) for v in values)
                         + " |")  # fmt: skip
    differences = [paired(runs, "hyperbolic", "kmeans", key, k).text(100, 1, " points") for key in ACCURACIES]
    lines.append("| HyperVQ − KmeansVQ, paired | " + " | ".join(differences) + " |")
    return "\n".join(lines)


def budget_table(runs: list[dict], k: int, rows=("hyperbolic", "kmeans")) -> str:
    """The budget curve in numbers: each row's MSE, eval perplexity and accuracy (mean ± std) at each number of
    updates (`run["setting"]["steps"]`), and HyperVQ − KmeansVQ at each, paired by seed."""
    steps = sorted({r["setting"]["steps"] for r in runs})
    lines = ["| updates | " + " | ".join(f"{ROW_NAMES[q]} MSE | {ROW_NAMES[q]} perplexity | {ROW_NAMES[q]} accuracy (%)"
                                         for q in rows) + " | accuracy, HyperVQ − KmeansVQ | MSE, HyperVQ / KmeansVQ |",
             "|---|" + "---|" * (3 * len(rows) + 2)]  # fmt: skip
    for n in steps:
        at = [r for r in runs if r["setting"]["steps"] == n]
        table = aggregate(at)
        cells = []
        for q in rows:
            cell = table.get((q, k), {})
            accuracy = cell.get("accuracy")
            cells += [_fmt(cell.get("reconstruction_mse")), _fmt(cell.get("perplexity")),
                      _fmt(accuracy and (100 * accuracy[0], 100 * accuracy[1], accuracy[2]))]  # fmt: skip
        cells += [paired(at, rows[0], rows[1], "accuracy", k).text(100, 1, " points"),
                  paired(at, rows[0], rows[1], "reconstruction_mse", k, ratio=True).text()]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_budget(runs: list[dict], k: int, path, rows=("hyperbolic", "kmeans")) -> None:
    """MSE, eval perplexity and accuracy against the number of updates, mean ± std over seeds, one line per row."""
    metrics = (("reconstruction_mse", "test MSE", 1), ("perplexity", "eval perplexity", 1),
               ("accuracy", "accuracy (%)", 100))  # fmt: skip
    figure, axes = plt.subplots(1, len(metrics), figsize=(11, 3.2), dpi=120)
    for axis, (metric, label, scale) in zip(axes, metrics):
        for q in rows:
            points = []
            for n in sorted({r["setting"]["steps"] for r in runs}):
                cell = aggregate([r for r in runs if r["setting"]["steps"] == n]).get((q, k), {}).get(metric)
                if cell:
                    points.append((n, scale * cell[0], scale * cell[1]))
            if points:
                axis.errorbar(*zip(*points), marker="o", capsize=3, label=ROW_NAMES[q])
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokenizer updates")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_usage_histograms(code_counts: dict[str, list[int]], path, columns: int = 3) -> None:
    """One panel per row, `columns` to a line: the share of tokens per code, codes sorted by frequency."""
    lines = math.ceil(len(code_counts) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3 * columns, 2.6 * lines), dpi=120, sharey=True,
                                squeeze=False)  # fmt: skip
    for axis, (row, counts) in zip(axes.flat, code_counts.items()):
        draw_codebook_usage(axis, counts, f"{ROW_NAMES.get(row, row)}:")
    for axis in list(axes.flat)[len(code_counts) :]:
        axis.set_axis_off()
    for axis in axes[:, 0]:
        axis.set_ylabel("share of tokens")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def codes_by_usage(code_counts) -> list[int]:
    """Code ids ordered by how often they were chosen, most used first (ties in code order)."""
    counts = torch.as_tensor(code_counts)
    return torch.sort(counts, descending=True, stable=True).indices.tolist()


def plot_decoded_codebooks(codebooks: dict[str, tuple[list[Image.Image], list[int]]], path, columns: int = 32) -> None:
    """The paper's Figure 5, one panel per quantizer: each code decoded on its own as a 1×1 latent
    (`HyperVQVAEModel.decode_codebook`), most used first by its `code_counts`; codes never chosen are faded.
    `codebooks` maps a quantizer to (its K code images, its K counts)."""
    if not codebooks:
        raise ValueError("`codebooks` is empty: give at least one quantizer's decoded codes")
    grids, titles = [], []
    for quantizer, (images, counts) in codebooks.items():
        if len(images) != len(counts) or not images:
            raise ValueError(f"`codebooks[{quantizer!r}]`: {len(images)} code images but {len(counts)} code counts")
        white = Image.new("RGB", images[0].size, "white")
        tiles = [images[i].convert("RGB") if counts[i] else Image.blend(images[i].convert("RGB"), white, 0.75)
                 for i in codes_by_usage(counts)]  # fmt: skip
        grids.append(image_grid([tiles[i : i + columns] for i in range(0, len(tiles), columns)], pad=1))
        used = sum(1 for count in counts if count)
        titles.append(f"{ROW_NAMES.get(quantizer, quantizer)}: {used}/{len(counts)} codes used, most used first")
    width = 8.0
    heights = [width * grid.height / grid.width for grid in grids]
    figure, axes = plt.subplots(len(grids), 1, figsize=(width, sum(heights) + 0.35 * len(grids)), dpi=120,
                                gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for axis, grid, title in zip(axes[:, 0], grids, titles):
        axis.imshow(grid, interpolation="nearest")
        axis.set_axis_off()
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def embedding_panels(model, pixel_values: torch.Tensor, num_points: int = 1000, seed: int = 0) -> list:
    r"""The Table-5-style scatter panels of a tokenizer with 3-dimensional latents, for `plot_embedding_scatter`:
    `num_points` latents of `pixel_values` (a seeded draw) coloured by code, next to its codebook (KmeansVQ and
    the other Euclidean-codebook quantizers), or for HyperVQ a second panel with the latents on the ball next to its
    hyperplanes' closest points to the origin, :math:`\exp_0(r_k a_k / \|a_k\|)`."""
    quantizer = model.quantizer
    if quantizer.dim != 3:
        raise ValueError(f"the scatter panels need 3-dimensional latents, got embedding_dim={quantizer.dim}")
    with torch.no_grad():
        encoded = model.encode(pixel_values)
    latents = encoded.latents.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = encoded.image_tokens.reshape(-1)
    keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:num_points]
    latents, codes = latents[keep], codes[keep]
    codebook = quantizer.codebook.detach()
    name = QUANTIZERS[model.config.quantizer_type].paper_name
    if model.config.quantizer_type != "hyperbolic":
        return [(f"{name}: latents z_e and codebook", latents, codes, codebook)]
    return [
        (f"{name}: latents z_e", latents, codes, None),
        (
            f"{name}: z_h on the ball, hyperplane points",
            expmap0_projected(latents, c=quantizer.curvature),
            codes,
            expmap0_projected(codebook, c=quantizer.curvature),
        ),
    ]


def plot_embedding_scatter(panels: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]], path) -> None:
    """Table-5-style 3-D scatter: per panel (title, points (N, 3), codes (N,), special points (K, 3) or None)."""
    figure = plt.figure(figsize=(4.2 * len(panels), 4.2), dpi=120)
    for i, (title, points, codes, specials) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), i, projection="3d")
        axis.scatter(*points.T.numpy(), c=codes.numpy(), cmap="tab20", s=4, alpha=0.6)
        if specials is not None:
            axis.scatter(*specials.T.numpy(), c="black", marker="*", s=60)
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def results_table(table: dict, codebook_sizes: list[int]) -> str:
    header = ("| row | K | reconstruction MSE ↓ | accuracy (%) ↑ | perplexity ↑ | codes used | silhouette ↑ | "
              "Davies-Bouldin ↓ | noisy silhouette ↑ |")  # fmt: skip
    lines = [header, "|" + "---|" * 9]
    for k in codebook_sizes:
        for row, name in ROW_NAMES.items():
            cell = table.get((row, k))
            if not cell:
                continue
            accuracy = cell.get("accuracy")
            accuracy = (100 * accuracy[0], 100 * accuracy[1], accuracy[2]) if accuracy else None
            lines.append(
                f"| {name} | {k} | {_fmt(cell.get('reconstruction_mse'))} | {_fmt(accuracy)} | "
                f"{_fmt(cell.get('perplexity'))} | {_fmt(cell.get('codes_used'), 2)} | {_fmt(cell.get('silhouette'), 2)} | "
                f"{_fmt(cell.get('davies_bouldin'), 3)} | {_fmt(cell.get('noisy_silhouette'), 2)} |"
            )
    return "\n".join(lines)


def claims_table(claims: list[tuple[str, str, str]]) -> str:
    rows = "\n".join(f"| {claim} | **{verdict}** | {evidence} |" for claim, verdict, evidence in claims)
    return f"| claim | verdict | evidence (ours): mean difference [{CONFIDENCE:.0%} interval] |\n|---|---|---|\n{rows}"


def write_report(path, *, title: str, setup: str, sections: list[tuple[str, str]], commands: list[str]) -> None:
    """Write a markdown report: `title`, the `setup` paragraph, each `(heading, body)` section, and the commands that
    made it."""
    body = "".join(f"## {heading}\n\n{text.strip()}\n\n" for heading, text in sections)
    command_lines = "\n".join(commands)
    write_text(path, f"# {title}\n\n{setup}\n\n{body}## Commands\n\nThe report, as it was made (every run's "
                     f"setting is in `results.json`):\n\n```bash\n{command_lines}\n```\n")  # fmt: skip
