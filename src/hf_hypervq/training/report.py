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
# HyperVQ's recommended recipe (`hf_hypervq.training.recipes`), chosen on validation, beside its paper settings
RECIPE_ROW = "hyperbolic+recipe"
ROW_NAMES = {**QUANTIZER_NAMES, RECIPE_ROW: f"{PAPER_QUANTIZERS['hyperbolic']}, recommended recipe",
             **{row: f"{PAPER_QUANTIZERS[q]} + diversity" for row, q in DIVERSITY_ROWS.items()}}  # fmt: skip
TOKENIZER_METRICS = ("reconstruction_mse", "perplexity", "codes_used", "silhouette", "davies_bouldin",
                     "noisy_silhouette", "noisy_davies_bouldin")  # fmt: skip
# The frozen-feature classifier's protocols (`hf_hypervq.training.study`): train_classifier.py's defaults first
ACCURACIES = {
    "accuracy": "normalised features, 20 epochs (train_classifier.py)",
    "accuracy_unnormalized": "the paper's head, 20 epochs",
    "accuracy_early_stopping": "the paper's head, early stopping, learning rate chosen on validation",
}
# The verdict rules (issue 35), declared before the runs they judge: changing them after seeing results would let
# the results choose their own test.
CONFIDENCE = 0.95  # of the paired intervals behind every verdict
# How large a loss still counts as "no loss" (or "about as well"): a loss is "no loss" only when its whole interval
# lies inside the margin, never because an interval is too wide to show it.
MSE_RATIO_MARGIN = 1.1  # MSE: the ratio's upper bound below 1.1, i.e. at most 10% worse (the library's own target)
ACCURACY_MARGIN = 0.01  # accuracy (a share): the difference's lower bound above -1 point (the library's own target)
# Silhouette lies in [-1, 1]; 0.02 is 1% of that range and about one seed's standard deviation in the study's runs
# (mostly 0.01-0.03), far below the 0.08-0.25 gaps between quantizers that the paper's Table 5 reports.
SILHOUETTE_MARGIN = 0.02
# Short names of the classifier protocols, for the verdicts' evidence
PROTOCOL_NAMES = {"accuracy": "standardised features", "accuracy_unnormalized": "the paper's head",
                  "accuracy_early_stopping": "early stopping"}  # fmt: skip
SPLITS = ("test", "validation")  # a run's test numbers are at its top level, its validation numbers under "validation"
NOT_ON_VALIDATION = "not measured on validation"
# What the reports say about the verdicts, under their claims and win tables
CLAIM_RULES = f"""\
- Each comparison pairs two rows trained with the same seeds. Differences (accuracy in points, silhouette,
  Davies-Bouldin) are averaged over the seeds; ratios (MSE, perplexity) are averaged on the log scale and shown back
  as a ratio (the geometric mean, so A / B and B / A are reciprocals). Each gets a {CONFIDENCE:.0%} Student-t
  interval; *smallest detectable* is that interval's half-width (×/÷ for a ratio): the smallest effect these seeds
  could tell from none.
- A claim **holds** when every comparison it names (each pair of an ordering) lies wholly on the claimed side,
  **does not hold** when one lies wholly on the other side, and is **inconclusive** otherwise (one seed gives no
  interval): the runs cannot tell, which is not a tie. "About as well" in MSE means the ratio's upper bound below
  {MSE_RATIO_MARGIN}; an interval that reaches past that margin is inconclusive, never "as well".
- An accuracy claim holds only if it holds under all three classifier protocols and does not hold only if it fails
  under all three; when it holds under one protocol and fails under another, it **depends on the protocol**;
  otherwise it is inconclusive. The evidence gives each protocol's verdict and intervals.
- **Not measurable**: a run is missing or failed.
- "Codes used" and accuracy are shares; differences in accuracy are in percentage points."""
WIN_RULE = f"""\
"Wins" (**yes**) needs both: more codes used beyond the noise (the interval above 0) and no loss beyond a margin
declared in advance: the MSE ratio's upper bound below {MSE_RATIO_MARGIN}, the accuracy difference's lower bound
above −{100 * ACCURACY_MARGIN:g} point under every classifier protocol, the silhouette difference's lower bound above
−{SILHOUETTE_MARGIN}. **no** when the usage falls beyond the noise or a loss lies wholly beyond its margin;
**inconclusive** when an interval straddles its margin (too few seeds to show there is no loss); **depends on the
protocol** when one classifier protocol shows no accuracy loss and another a loss beyond the margin. The decision is made on the validation split; the table's numbers are the test
split's, for the report; runs without validation numbers are **not measured on validation** (the test split
chooses nothing)."""


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
    """Two rows trained with the same seeds, `n` pairs: the mean over seeds of the per-seed difference `a - b` and
    its `CONFIDENCE` Student-t interval; or, with `ratio`, the mean of `log(a / b)` and its interval, stored back on
    the ratio scale (`exp` of each), so that swapping `a` and `b` turns the ratio into its reciprocal. One pair gives
    an infinite interval, none a NaN mean."""

    mean: float
    low: float
    high: float
    n: int
    ratio: bool = False

    @property
    def detectable(self) -> float:
        """The smallest effect the design could detect: the interval's half-width, t(n-1) · sd / √n, a difference
        (or, for a ratio, exp of the half-width on the log scale: a ratio that far from 1, either way)."""
        if self.n == 0:
            return math.nan
        if self.ratio:
            return math.sqrt(self.high / self.low) if self.low > 0 else math.inf
        return (self.high - self.low) / 2

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

    def detectable_text(self, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        if self.n < 2 or not math.isfinite(self.detectable):
            return "smallest detectable: none (fewer than 2 seeds)"
        if self.ratio:
            return f"smallest detectable: ×/÷{self.detectable:.{digits}f}"
        return f"smallest detectable: ±{scale * self.detectable:.{digits}f}{unit}"


def _bound(value: float, digits: int, no_difference: float, sign: str) -> str:
    """An interval bound with up to two more digits where `digits` would round it onto `no_difference`: the verdict
    turns on which side of it the bound lies, and "[1.00, 1.11]" cannot show that 1.004 is above 1."""
    for extra in range(3):
        text = f"{value:{sign}.{digits + extra}f}"
        if value == no_difference or float(text) != no_difference:
            break
    return text


def _value(run: dict, metric: str, split: str):
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return run.get(metric) if split == "test" else (run.get("validation") or {}).get(metric)


def paired(runs: list[dict], row_a: str, row_b: str, metric: str, k: int, *, ratio: bool = False,
           split: str = "test") -> Paired:  # fmt: skip
    """`row_a` against `row_b` on `metric` at codebook size `k`, paired by seed (`Paired`); `ratio` for metrics
    compared as ratios (MSE, perplexity), on the log scale. `split="validation"` reads each run's
    `run["validation"][metric]`, the numbers selections are made on; `"test"` its top-level `run[metric]`."""

    def by_seed(row):
        return {r["seed"]: _value(r, metric, split) for r in runs if r["row"] == row and r["codebook_size"] == k}

    a, b = by_seed(row_a), by_seed(row_b)
    values = []
    for seed in sorted(a.keys() & b.keys()):
        x, y = a[seed], b[seed]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) or (ratio and min(x, y) <= 0):
            return Paired(math.nan, math.nan, math.nan, 0, ratio)  # a failed run: nothing to decide from
        values.append(math.log(x / y) if ratio else x - y)
    if not values:
        return Paired(math.nan, math.nan, math.nan, 0, ratio)
    mean = statistics.fmean(values)
    if len(values) < 2:
        low, high = -math.inf, math.inf
    else:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        low, high = mean - half, mean + half
    if ratio:
        mean, low, high = math.exp(mean), math.exp(low), math.exp(high)
    return Paired(mean, low, high, len(values), ratio)


def has_validation(runs: list[dict], rows, k: int | None = None) -> bool:
    """Whether every run of `rows` (at codebook size `k`, or any) carries validation numbers: a selection among them
    can then be made on validation; without them it is not made at all (the test split chooses nothing)."""
    chosen = [r for r in runs if r["row"] in rows and (k is None or r["codebook_size"] == k)]
    return bool(chosen) and all(isinstance(r.get("validation"), dict) for r in chosen)


def decide(difference: Paired, claimed: str, threshold: float | None = None) -> str:
    """The verdict on "the paired quantity is `claimed` ("above" / "below") `threshold`" (by default no difference:
    0, or 1 for a ratio; a margin for "no loss" claims): holds when its interval lies wholly on the claimed side, does
    not hold when wholly on the other, inconclusive when it straddles the threshold; "not measurable" when a run is
    missing or failed."""
    if threshold is None:
        threshold = 1.0 if difference.ratio else 0.0
    if difference.n == 0 or not math.isfinite(difference.mean):
        return "not measurable"
    above, below = difference.low > threshold, difference.high < threshold
    if claimed == "above":
        return "holds" if above else "does not hold" if below else "inconclusive"
    if claimed == "below":
        return "holds" if below else "does not hold" if above else "inconclusive"
    raise ValueError(f"`claimed` must be 'above' or 'below', got {claimed!r}")


def combine(verdicts, *, over: str = "comparisons") -> str:
    """One verdict from several. `over="comparisons"`, the comparisons one claim names: it does not hold if one of
    them does not, holds if all do; else it cannot be measured (a comparison lacks runs) or is inconclusive.
    `over="protocols"`, one claim's verdicts under each classifier protocol: it holds only if it holds under every
    protocol and does not hold only if it fails under every one; "depends on the protocol" when one protocol says
    holds and another does not hold; else not measurable or inconclusive."""
    verdicts = list(verdicts)
    if over == "comparisons":
        for verdict in ("does not hold", "not measurable", "depends on the protocol", "inconclusive"):
            if verdict in verdicts:
                return verdict
        return "holds"
    if over == "protocols":
        if ("holds" in verdicts and "does not hold" in verdicts) or "depends on the protocol" in verdicts:
            return "depends on the protocol"
        for verdict in ("not measurable", "inconclusive"):
            if verdict in verdicts or not verdicts:
                return verdict
        return verdicts[0]  # every protocol agrees
    raise ValueError(f"`over` must be 'comparisons' or 'protocols', got {over!r}")


def win(gain: str, no_losses) -> str:
    """Whether an option "wins": `gain` is the verdict on its gain beyond the noise, `no_losses` those on each loss
    staying within its margin (`MSE_RATIO_MARGIN`, `ACCURACY_MARGIN`, `SILHOUETTE_MARGIN`). "yes" only when all
    hold; "no" when the gain or a no-loss does not hold; else what keeps it open."""
    verdicts = [gain, *no_losses]
    if "does not hold" in verdicts:
        return "no"
    for verdict in ("not measurable", "depends on the protocol", "inconclusive"):
        if verdict in verdicts:
            return verdict
    return "yes"


METRIC_NAMES = {"reconstruction_mse": "MSE", "perplexity": "perplexity", "codes_used": "codes used",
                "silhouette": "silhouette", "davies_bouldin": "Davies-Bouldin", "noisy_silhouette": "noisy silhouette",
                "noisy_davies_bouldin": "noisy Davies-Bouldin",
                **{key: f"accuracy ({name})" for key, name in PROTOCOL_NAMES.items()}}  # fmt: skip
RATIO_METRICS = {"reconstruction_mse", "perplexity"}  # compared as ratios, on the log scale
POINTS = {"scale": 100, "unit": " points", "digits": 1}  # how accuracy differences read


def _compare(runs, k, a, b, metric, claimed, *, scale=1.0, unit="", threshold=None, digits=2, split="test"):
    """(verdict, evidence) of one paired comparison."""
    ratio = metric in RATIO_METRICS
    difference = paired(runs, a, b, metric, k, ratio=ratio, split=split)
    sign = "/" if ratio else "−"
    text = (f"{METRIC_NAMES[metric]}, {ROW_NAMES.get(a, a)} {sign} {ROW_NAMES.get(b, b)}: "
            f"{difference.text(scale, digits, unit)}, {difference.detectable_text(scale, digits, unit)}")  # fmt: skip
    return decide(difference, claimed, threshold), text


def accuracy_verdict(runs, k, pairs, *, claimed="above", threshold=0.0, split="test") -> tuple[str, str]:
    """(verdict, evidence) of an accuracy claim made of `(a, b)` comparisons ("a − b is `claimed` `threshold`"),
    decided under each classifier protocol of `ACCURACIES` and combined over them (`combine(over="protocols")`); the
    evidence lists each protocol's verdict and intervals."""
    verdicts, texts = [], []
    for protocol, name in PROTOCOL_NAMES.items():
        comparisons = [_compare(runs, k, a, b, protocol, claimed, threshold=threshold, split=split, **POINTS)
                       for a, b in pairs]  # fmt: skip
        verdicts.append(combine(v for v, _ in comparisons))
        texts.append(f"[{name}: {verdicts[-1]}] " + "; ".join(t for _, t in comparisons))
    return combine(verdicts, over="protocols"), " ".join(texts)


def _ordered_pairs(rows) -> list[tuple[str, str]]:
    """Every pair an ordering names: (a, b) for each a ranked above b."""
    return [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]


BEYOND_THE_PAPER = ", beyond the paper's claim (the paper's Table 5 is latent dimension 3, K = 16)"


def check_claims(
    runs: list[dict], k: int, cluster_runs: list[dict] | dict | None = None
) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each claim of the paper at codebook size `k`, each decided from paired
    intervals (`paired`, `decide`, `combine`; the module's constants hold the margins) on the test split.
    `cluster_runs` adds the Table 5 claims in the paper's own setting, latent dimension 3 and K = 16: runs of the
    main runs' shape ("row", "seed", the metrics; "codebook_size" 16 when missing), or, as `study/reproduce.py`
    made them before it trained seeds, `{quantizer: metrics}` of one tokenizer each (seed 0)."""
    claims = []

    def claim(text, comparisons, note=""):
        claims.append((text, combine(v for v, _ in comparisons), "; ".join(t for _, t in comparisons) + note))

    h = "hyperbolic"
    claim(f"HyperVQ reconstructs about as well as KmeansVQ (Table 1), K={k}",
          [_compare(runs, k, h, "kmeans", "reconstruction_mse", "below", threshold=MSE_RATIO_MARGIN)],
          f" (\"about as well\": the MSE ratio's upper bound below {MSE_RATIO_MARGIN})")  # fmt: skip
    verdict, evidence = accuracy_verdict(runs, k, [(h, "kmeans"), (h, "gumbel")])
    claims.append((f"HyperVQ's codes give a better frozen-feature classifier than KmeansVQ's and GumbelVQ's "
                   f"(Table 3), K={k}", verdict, evidence))  # fmt: skip
    # an ordering names every pair: HyperVQ > GumbelVQ, GumbelVQ > KmeansVQ and HyperVQ > KmeansVQ
    claim(f"HyperVQ has the highest codebook perplexity, then GumbelVQ, then KmeansVQ (Table 4: 220 / 170 / 58), K={k}",
          [_compare(runs, k, a, b, "perplexity", "above")
           for a, b in _ordered_pairs((h, "gumbel", "kmeans"))])  # fmt: skip
    claim(f"HyperVQ's clusters are more compact than KmeansVQ's: higher silhouette, lower Davies-Bouldin, K={k}"
          + BEYOND_THE_PAPER,
          [_compare(runs, k, h, "kmeans", "silhouette", "above", digits=3),
           _compare(runs, k, h, "kmeans", "davies_bouldin", "below", digits=3)],
          " (paper, at dimension 3 and K = 16: 0.565 vs 0.487; 0.553 vs 0.732)")  # fmt: skip
    claim(f"HyperVQ's clusters stay more compact under noise, K={k}" + BEYOND_THE_PAPER,
          [_compare(runs, k, h, "kmeans", "noisy_silhouette", "above", digits=3),
           _compare(runs, k, h, "kmeans", "noisy_davies_bouldin", "below", digits=3)],
          " (paper's noisy silhouette, at dimension 3 and K = 16: 0.564 vs 0.310)")  # fmt: skip
    if cluster_runs:
        if isinstance(cluster_runs, dict):
            cluster_runs = [{"row": q, "seed": 0, **metrics} for q, metrics in cluster_runs.items()]
        cells = [{"codebook_size": 16, **run} for run in cluster_runs]
        claim("HyperVQ's clusters are more compact than KmeansVQ's: higher silhouette, lower Davies-Bouldin, latent "
              "dimension 3, K=16 (Table 5's setting)",
              [_compare(cells, 16, h, "kmeans", "silhouette", "above", digits=3),
               _compare(cells, 16, h, "kmeans", "davies_bouldin", "below", digits=3)])  # fmt: skip
        claim("HyperVQ's clusters stay more compact under noise, latent dimension 3, K=16 (Table 5's setting)",
              [_compare(cells, 16, h, "kmeans", "noisy_silhouette", "above", digits=3),
               _compare(cells, 16, h, "kmeans", "noisy_davies_bouldin", "below", digits=3)])  # fmt: skip
    table = aggregate(runs)
    anchors = "".join(f"; context, {name}: {100 * table[(q, k)]['accuracy'][0]:.1f}%" for q, name in ANCHORS.items()
                      if "accuracy" in table.get((q, k), {}))  # fmt: skip
    verdict, evidence = accuracy_verdict(runs, k, [(h, q) for q in ("hyperbolic_embedding", "kmeans", "gumbel",
                                                                    "hyperbolic_kmeans")])  # fmt: skip
    claims.append((f"Ablation: HyperVQ's codes classify better than HyperEmbMatVQ's, KmeansVQ's, GumbelVQ's and "
                   f"HyperKmeansVQ's (Table 7), K={k}", verdict,
                   evidence + " (paper: HyperVQ 31.6 > KmeansVQ 30.0 > HyperEmbMatVQ 28.3 > GumbelVQ 26.0 > "
                   "HyperKmeansVQ 22.4)" + anchors))  # fmt: skip
    return claims


def decide_win(runs: list[dict], row: str, base: str, k: int, *, split: str = "validation") -> str:
    """Whether `row` wins over `base` (the rule of `WIN_RULE`) on `split`: more codes used beyond the noise, and no
    loss beyond the margins in MSE, accuracy (every protocol) and silhouette. On validation, runs without validation
    numbers give `NOT_ON_VALIDATION`: the test split is never the fallback of a selection."""
    if split == "validation" and not has_validation(runs, (row, base), k):
        return NOT_ON_VALIDATION
    gain = decide(paired(runs, row, base, "codes_used", k, split=split), "above")
    mse = decide(paired(runs, row, base, "reconstruction_mse", k, ratio=True, split=split), "below", MSE_RATIO_MARGIN)
    accuracy, _ = accuracy_verdict(runs, k, [(row, base)], threshold=-ACCURACY_MARGIN, split=split)
    silhouette = decide(paired(runs, row, base, "silhouette", k, split=split), "above", -SILHOUETTE_MARGIN)
    return win(gain, [mse, accuracy, silhouette])


def recipe_verdict(runs: list[dict], row: str, base: str, k: int, *, split: str = "validation") -> str:
    """Whether `row` earns its setting a place in `base`'s recipe, on `split`: a gain beyond the noise in codes used
    or in MSE (the ratio's upper bound below 1), and no loss beyond the margins (`WIN_RULE`'s)."""
    if split == "validation" and not has_validation(runs, (row, base), k):
        return NOT_ON_VALIDATION
    usage = decide(paired(runs, row, base, "codes_used", k, split=split), "above")
    mse = paired(runs, row, base, "reconstruction_mse", k, ratio=True, split=split)
    gains = (usage, decide(mse, "below", 1.0))
    gain = "holds" if "holds" in gains else "does not hold" if set(gains) == {"does not hold"} else combine(gains)
    accuracy, _ = accuracy_verdict(runs, k, [(row, base)], threshold=-ACCURACY_MARGIN, split=split)
    silhouette = decide(paired(runs, row, base, "silhouette", k, split=split), "above", -SILHOUETTE_MARGIN)
    return win(gain, [decide(mse, "below", MSE_RATIO_MARGIN), accuracy, silhouette])


def choose_recipe(runs: list[dict], candidates, base: str, k: int) -> str | None:
    """The candidate row (of `candidates`) that a recipe takes: among those whose `recipe_verdict` is "yes" on
    validation, the one with the lowest mean validation MSE; None when none is."""
    winners = [row for row in candidates if recipe_verdict(runs, row, base, k) == "yes"]
    if not winners:
        return None

    def mean_mse(row):
        values = [_value(r, "reconstruction_mse", "validation") for r in runs if r["row"] == row]
        return statistics.fmean(v for v in values if v is not None)

    return min(winners, key=mean_mse)


def diversity_table(runs: list[dict], k: int, comparisons=None) -> str:
    """Each Gumbel quantizer with the diversity term against itself without, paired by seed: what the term buys in
    usage and costs in MSE, accuracy (each protocol) and silhouette on the test split, and whether it wins
    (`decide_win`, decided on the validation split; `WIN_RULE`). `comparisons`: `(label, row with the term, row
    without)` triples, by default the rows of `DIVERSITY_ROWS`; a comparison without runs gets no line."""
    if comparisons is None:
        comparisons = [(PAPER_QUANTIZERS[base], row, base) for row, base in DIVERSITY_ROWS.items()]
    lines = ["| quantizer | codes used (share), with − without | MSE, with / without | accuracy, with − without "
             f"({' / '.join(PROTOCOL_NAMES.values())}) | silhouette, with − without | wins on usage, no loss beyond "
             "the margins | decided on |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, row, base in comparisons:
        usage = paired(runs, row, base, "codes_used", k)
        if usage.n == 0:
            continue
        mse = paired(runs, row, base, "reconstruction_mse", k, ratio=True)
        accuracy = " / ".join(paired(runs, row, base, p, k).text(**POINTS) for p in PROTOCOL_NAMES)
        silhouette = paired(runs, row, base, "silhouette", k)
        verdict = decide_win(runs, row, base, k)
        split = "—" if verdict == NOT_ON_VALIDATION else "validation"
        lines.append(f"| {label} | {usage.text(digits=2)} | {mse.text()} | {accuracy} | {silhouette.text(digits=3)} "
                     f"| {verdict} | {split} |")  # fmt: skip
    return "\n".join(lines)


def best_row(runs: list[dict], rows, metric: str, *, lower_is_better: bool) -> tuple[str, float] | None:
    """The row of `rows` with the best mean `metric` over its seeds on the validation split, and that mean; None
    when a row's runs lack validation numbers (`has_validation`): the test split chooses nothing."""
    rows = [row for row in rows if any(r["row"] == row for r in runs)]
    if not rows or not has_validation(runs, rows):
        return None
    means = {}
    for row in rows:
        values = [_value(r, metric, "validation") for r in runs if r["row"] == row]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            means[row] = statistics.fmean(values)
    if len(means) < len(rows):
        return None  # a row without the metric on validation (or a failed run) would be passed over unseen
    best = (min if lower_is_better else max)(means, key=means.get)
    return best, means[best]


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


def scatter_points(model, pixel_values: torch.Tensor, num_points: int = 1000, seed: int = 0) -> dict:
    """What the Table-5-style scatter of a tokenizer with 3-dimensional latents shows, as lists (a run's file keeps
    them): `num_points` latents of `pixel_values` (a seeded draw), their codes, the codebook, the quantizer and its
    curvature."""
    quantizer = model.quantizer
    if quantizer.dim != 3:
        raise ValueError(f"the scatter panels need 3-dimensional latents, got embedding_dim={quantizer.dim}")
    with torch.no_grad():
        encoded = model.encode(pixel_values)
    latents = encoded.latents.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = encoded.image_tokens.reshape(-1)
    keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:num_points]
    return {"quantizer_type": model.config.quantizer_type, "curvature": getattr(quantizer, "curvature", None),
            "latents": latents[keep].tolist(), "codes": codes[keep].tolist(),
            "codebook": quantizer.codebook.detach().tolist()}  # fmt: skip


def embedding_panels(points: dict) -> list:
    r"""The scatter panels of `scatter_points`, for `plot_embedding_scatter`: the latents coloured by code, next to
    the codebook (KmeansVQ and the other Euclidean-codebook quantizers), or for HyperVQ a second panel with the
    latents on the ball next to its hyperplanes' closest points to the origin, :math:`\exp_0(r_k a_k / \|a_k\|)`."""
    latents, codes, codebook = (torch.tensor(points[key]) for key in ("latents", "codes", "codebook"))
    name = QUANTIZERS[points["quantizer_type"]].paper_name
    if points["quantizer_type"] != "hyperbolic":
        return [(f"{name}: latents z_e and codebook", latents, codes, codebook)]
    c = points["curvature"]
    return [
        (f"{name}: latents z_e", latents, codes, None),
        (f"{name}: z_h on the ball, hyperplane points", expmap0_projected(latents, c=c), codes,
         expmap0_projected(codebook, c=c)),
    ]  # fmt: skip


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
    header = (f"| claim | verdict | evidence (ours), paired by seed: mean difference or ratio [{CONFIDENCE:.0%} "
              "interval], the smallest effect the seeds could detect |")  # fmt: skip
    return f"{header}\n|---|---|---|\n{rows}"


def write_report(path, *, title: str, setup: str, sections: list[tuple[str, str]], commands: list[str]) -> None:
    """Write a markdown report: `title`, the `setup` paragraph, each `(heading, body)` section, and the commands that
    made it."""
    body = "".join(f"## {heading}\n\n{text.strip()}\n\n" for heading, text in sections)
    command_lines = "\n".join(commands)
    write_text(path, f"# {title}\n\n{setup}\n\n{body}## Commands\n\nThe report, as it was made (every run's "
                     f"setting is in `results.json`):\n\n```bash\n{command_lines}\n```\n")  # fmt: skip
