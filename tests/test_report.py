"""The study's verdict rules (`hf_hypervq.training.report`, issue 35) on made-up runs: ratios on the log scale, every
pair of an ordering, margins for "no loss", protocol-robust accuracy, the smallest detectable effect, and selection
on the validation split."""

import math
import statistics

import pytest

from hf_hypervq.training.report import (
    ACCURACIES,
    ACCURACY_MARGIN,
    MSE_RATIO_MARGIN,
    NOT_ON_VALIDATION,
    Paired,
    best_row,
    check_claims,
    choose_recipe,
    combine,
    decide,
    decide_win,
    diversity_table,
    paired,
    recipe_verdict,
    win,
)


T_975_2 = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom: the 95% interval of 3 seeds


def make_runs(rows: dict[str, dict[str, list[float]]], k: int = 512, validation=None) -> list[dict]:
    """One run per row and seed: `rows[row][metric]` lists the metric's value per seed; `validation[row][metric]`
    likewise gives the runs' validation numbers."""
    runs = []
    for row, metrics in rows.items():
        for seed in range(len(next(iter(metrics.values())))):
            run = {"row": row, "codebook_size": k, "seed": seed, **{m: v[seed] for m, v in metrics.items()}}
            if validation is not None:
                run["validation"] = {m: v[seed] for m, v in validation[row].items()}
            runs.append(run)
    return runs


def every_protocol(values: list[float]) -> dict[str, list[float]]:
    return dict.fromkeys(ACCURACIES, values)


def test_a_ratio_is_averaged_on_the_log_scale_and_swapping_the_rows_inverts_it():
    runs = make_runs({"a": {"reconstruction_mse": [2.0, 2.4, 1.9]}, "b": {"reconstruction_mse": [1.0, 1.1, 1.3]}})
    forward = paired(runs, "a", "b", "reconstruction_mse", 512, ratio=True)
    backward = paired(runs, "b", "a", "reconstruction_mse", 512, ratio=True)
    logs = [math.log(2.0 / 1.0), math.log(2.4 / 1.1), math.log(1.9 / 1.3)]
    assert forward.mean == pytest.approx(math.exp(statistics.fmean(logs)))  # the geometric mean of the ratios
    assert backward.mean == pytest.approx(1 / forward.mean)
    assert backward.low == pytest.approx(1 / forward.high) and backward.high == pytest.approx(1 / forward.low)
    assert forward.detectable == pytest.approx(backward.detectable)
    assert decide(forward, "above") == "holds" and decide(backward, "below") == "holds"  # no difference is 1
    # a ratio of a non-positive number has no logarithm: not measurable, not a verdict
    zero = make_runs({"a": {"perplexity": [0.0, 1.0]}, "b": {"perplexity": [1.0, 1.0]}})
    assert decide(paired(zero, "a", "b", "perplexity", 512, ratio=True), "above") == "not measurable"


def test_the_smallest_detectable_difference_is_the_intervals_half_width():
    runs = make_runs({"a": {"accuracy": [0.6, 0.7, 0.8]}, "b": {"accuracy": [0.5, 0.5, 0.5]}})
    difference = paired(runs, "a", "b", "accuracy", 512)  # differences 0.1, 0.2, 0.3: sd 0.1
    assert difference.detectable == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-6)
    assert difference.detectable_text(100, 1, " points") == "smallest detectable: ±24.8 points"

    runs = make_runs({"a": {"reconstruction_mse": [1.0, 2.0, 4.0]}, "b": {"reconstruction_mse": [1.0, 1.0, 1.0]}})
    ratio = paired(runs, "a", "b", "reconstruction_mse", 512, ratio=True)  # logs 0, log 2, 2 log 2: sd log 2
    assert ratio.mean == pytest.approx(2.0)
    assert ratio.detectable == pytest.approx(math.exp(T_975_2 * math.log(2) / math.sqrt(3)), rel=1e-6)
    assert ratio.detectable_text() == "smallest detectable: ×/÷5.59"
    one = paired(runs[:1] + runs[3:4], "a", "b", "reconstruction_mse", 512, ratio=True)
    assert one.n == 1 and one.detectable == math.inf
    assert one.detectable_text() == "smallest detectable: none (fewer than 2 seeds)"
    # the claims' evidence carries it
    claims = check_claims(make_runs({"hyperbolic": {"reconstruction_mse": [1.0, 2.0, 4.0]},
                                     "kmeans": {"reconstruction_mse": [1.0, 1.0, 1.0]}}), 512)  # fmt: skip
    assert (
        claims[0][2].startswith("MSE, HyperVQ / KmeansVQ: 2.00× [") and "smallest detectable: ×/÷5.59" in claims[0][2]
    )


def test_an_interval_that_straddles_the_margin_is_inconclusive_never_as_well():
    straddling = Paired(1.0, 0.9, 1.2, 3, ratio=True)
    assert decide(straddling, "below", MSE_RATIO_MARGIN) == "inconclusive"
    assert decide(Paired(1.0, 0.95, 1.05, 3, ratio=True), "below", MSE_RATIO_MARGIN) == "holds"
    assert decide(Paired(1.3, 1.15, 1.45, 3, ratio=True), "below", MSE_RATIO_MARGIN) == "does not hold"
    # Table 1 on runs: HyperVQ's MSE is KmeansVQ's on average, but the seeds scatter too much to show "about as well"
    runs = make_runs({"hyperbolic": {"reconstruction_mse": [0.9, 1.2, 0.95]},
                      "kmeans": {"reconstruction_mse": [1.0, 1.0, 1.0]}})  # fmt: skip
    verdict = check_claims(runs, 512)[0][1]
    assert verdict == "inconclusive"


def accuracy_runs(unnormalized_difference: float) -> list[dict]:
    """HyperVQ 5 points ahead of KmeansVQ and GumbelVQ with standardised features and early stopping, and
    `unnormalized_difference` ahead with the paper's head, every seed within 0.2 points of that."""
    jitter = [0.0, 0.001, 0.002]
    base = {protocol: [0.7 + j for j in jitter] for protocol in ACCURACIES}
    ahead = {protocol: [0.75 + 2 * j for j in jitter] for protocol in ACCURACIES}
    ahead["accuracy_unnormalized"] = [0.7 + unnormalized_difference + 2 * j for j in jitter]
    return make_runs({"hyperbolic": ahead, "kmeans": base, "gumbel": base})


def test_an_accuracy_claim_holds_only_under_every_protocol():
    table_3 = 1  # the claims' order: Table 1, Table 3, ...
    holds = check_claims(accuracy_runs(+0.05), 512)[table_3]
    assert holds[1] == "holds"
    disagree = check_claims(accuracy_runs(-0.05), 512)[table_3]
    assert disagree[1] == "depends on the protocol"
    # the evidence gives each protocol's verdict and intervals
    evidence = disagree[2]
    assert "[standardised features: holds]" in evidence and "[the paper's head: does not hold]" in evidence
    assert "[early stopping: holds]" in evidence
    assert "accuracy (the paper's head), HyperVQ − KmeansVQ: -4.9 points [" in evidence
    assert "accuracy (early stopping), HyperVQ − GumbelVQ: +5.1 points [" in evidence
    # one protocol that cannot tell leaves the claim open, it does not make it depend on the protocol
    assert check_claims(accuracy_runs(0.0), 512)[table_3][1] == "inconclusive"

    assert combine(["holds", "does not hold", "holds"], over="protocols") == "depends on the protocol"
    assert combine(["does not hold"] * 3, over="protocols") == "does not hold"
    assert combine(["does not hold", "inconclusive", "does not hold"], over="protocols") == "inconclusive"
    assert combine(["holds", "not measurable", "holds"], over="protocols") == "not measurable"
    assert combine(["holds", "depends on the protocol"]) == "depends on the protocol"
    with pytest.raises(ValueError, match="`over` must be"):
        combine(["holds"], over="seeds")


def test_an_ordering_tests_every_pair_it_names():
    """HyperVQ > GumbelVQ > KmeansVQ in perplexity: GumbelVQ's seeds scatter too much to place it against either,
    but HyperVQ is below KmeansVQ beyond the noise, so the ordering does not hold."""
    runs = make_runs({"hyperbolic": {"perplexity": [30.0, 33.0, 31.0]}, "gumbel": {"perplexity": [20.0, 60.0, 32.0]},
                      "kmeans": {"perplexity": [70.0, 72.0, 75.0]}})  # fmt: skip
    table_4 = 2
    claim, verdict, evidence = check_claims(runs, 512)[table_4]
    assert verdict == "does not hold"
    assert [part.split(":")[0] for part in evidence.split("; ")] == [
        "perplexity, HyperVQ / GumbelVQ",
        "perplexity, HyperVQ / KmeansVQ",
        "perplexity, GumbelVQ / KmeansVQ",
    ]
    assert decide(paired(runs, "hyperbolic", "gumbel", "perplexity", 512, ratio=True), "above") == "inconclusive"
    assert decide(paired(runs, "gumbel", "kmeans", "perplexity", 512, ratio=True), "above") == "inconclusive"


def diversity_runs(accuracy_change: float, *, on: str = "validation") -> list[dict]:
    """`with` uses every code and changes the accuracy by `accuracy_change` under every protocol, the same MSE and
    silhouette; its `on` numbers ("validation" or "test") are these, its other split's the reverse (fewer codes)."""
    jitter = [0.0, 0.001, 0.002]
    without = {"codes_used": [0.2 + j for j in jitter], "reconstruction_mse": [0.02 + j / 10 for j in jitter],
               "silhouette": [0.1 + j for j in jitter], **every_protocol([0.7 + j for j in jitter])}  # fmt: skip
    better = {**without, "codes_used": [1.0 - j for j in jitter],
              **every_protocol([0.7 + accuracy_change + 2 * j for j in jitter])}  # fmt: skip
    worse = {**without, "codes_used": [0.1 + j for j in jitter]}
    decided, other = {"with": better, "without": without}, {"with": worse, "without": without}
    if on == "validation":
        return make_runs(other, validation=decided)
    return make_runs(decided, validation=other)


def test_a_win_needs_the_gain_and_no_loss_beyond_any_margin():
    assert decide_win(diversity_runs(+0.0), "with", "without", 512) == "yes"
    # more codes, the same MSE and silhouette, but 3 points of accuracy lost beyond the noise: not a win
    assert decide_win(diversity_runs(-0.03), "with", "without", 512) == "no"
    # 1 point lost on average: the interval straddles the margin, so the runs cannot show there is no loss
    assert decide_win(diversity_runs(-ACCURACY_MARGIN), "with", "without", 512) == "inconclusive"
    assert win("holds", ["holds", "holds", "holds"]) == "yes"
    assert win("does not hold", ["holds", "holds", "holds"]) == "no"
    assert win("holds", ["holds", "depends on the protocol", "holds"]) == "depends on the protocol"
    assert win("holds", ["inconclusive", "holds", "holds"]) == "inconclusive"


def test_selection_is_made_on_validation_and_ignores_the_test_numbers():
    # the test split says the option loses usage; validation, the split that decides, says it wins
    runs = diversity_runs(0.0, on="validation")
    assert paired(runs, "with", "without", "codes_used", 512).mean < 0
    assert paired(runs, "with", "without", "codes_used", 512, split="validation").mean > 0
    assert decide_win(runs, "with", "without", 512) == "yes"
    table = diversity_table(runs, 512, [("the option", "with", "without")])
    assert table.splitlines()[2].startswith("| the option | -0.10 [")  # the test numbers, for the report
    assert table.splitlines()[2].endswith("| yes | validation |")
    # and the reverse: a test split that would say yes chooses nothing
    assert decide_win(diversity_runs(0.0, on="test"), "with", "without", 512) == "no"
    # old runs without validation numbers: no decision, never a fallback to test
    old = [{key: value for key, value in run.items() if key != "validation"} for run in diversity_runs(0.0, on="test")]
    assert decide_win(old, "with", "without", 512) == NOT_ON_VALIDATION
    assert diversity_table(old, 512, [("the option", "with", "without")]).endswith(f"| {NOT_ON_VALIDATION} | — |")

    # the best row: test numbers favour `a`, validation numbers `b`
    rows = {"a": {"reconstruction_mse": [0.01, 0.011]}, "b": {"reconstruction_mse": [0.02, 0.021]}}
    validation = {"a": {"reconstruction_mse": [0.03, 0.031]}, "b": {"reconstruction_mse": [0.02, 0.022]}}
    assert best_row(make_runs(rows, validation=validation), ["a", "b"], "reconstruction_mse",
                    lower_is_better=True) == ("b", pytest.approx(0.021))  # fmt: skip
    assert best_row(make_runs(rows), ["a", "b"], "reconstruction_mse", lower_is_better=True) is None
    with pytest.raises(ValueError, match="`split` must be one of"):
        paired(make_runs(rows), "a", "b", "reconstruction_mse", 512, split="train")


def test_table_5s_setting_is_decided_over_seeds_and_the_main_setting_is_labelled_beyond_the_paper():
    good = {"silhouette": [0.5, 0.52, 0.51], "davies_bouldin": [0.5, 0.52, 0.49],
            "noisy_silhouette": [0.45, 0.47, 0.46], "noisy_davies_bouldin": [0.6, 0.61, 0.63]}  # fmt: skip
    bad = {"silhouette": [0.3, 0.31, 0.3], "davies_bouldin": [0.9, 0.93, 0.91],
           "noisy_silhouette": [0.2, 0.22, 0.21], "noisy_davies_bouldin": [1.2, 1.5, 1.3]}  # fmt: skip
    cluster_runs = [{key: value for key, value in run.items() if key != "codebook_size"}
                    for run in make_runs({"hyperbolic": good, "kmeans": bad}, k=16)]  # fmt: skip
    claims = check_claims(make_runs({"hyperbolic": bad, "kmeans": good}), 512, cluster_runs)
    main, main_noisy, paper, paper_noisy = claims[3:7]
    assert "beyond the paper's claim (the paper's Table 5 is latent dimension 3, K = 16)" in main[0]
    assert "beyond the paper's claim" in main_noisy[0] and "beyond the paper's claim" not in paper[0]
    assert main[1] == main_noisy[1] == "does not hold"
    assert "latent dimension 3, K=16" in paper[0] and paper[1] == paper_noisy[1] == "holds"
    assert "(3 seeds)" in paper[2] and "noisy Davies-Bouldin, HyperVQ − KmeansVQ: -0.720 [" in paper_noisy[2]


def test_a_recipe_takes_a_setting_that_wins_on_validation_by_usage_or_mse_and_loses_nothing():
    """`recipe_verdict`/`choose_recipe`: a gain beyond the noise in codes used or in MSE, no loss beyond a margin;
    of two winners the lower validation MSE; the test numbers decide nothing."""
    base = {"reconstruction_mse": [0.024, 0.025, 0.026], "codes_used": [0.15, 0.16, 0.17], "silhouette": [0.1] * 3,
            **every_protocol([0.80, 0.81, 0.79])}  # fmt: skip
    usage = {**base, "codes_used": [0.90, 0.92, 0.91], "reconstruction_mse": [0.0245, 0.0255, 0.0262]}
    sharper = {**base, "reconstruction_mse": [0.020, 0.0205, 0.0212]}
    costly = {**usage, **every_protocol([0.74, 0.75, 0.73])}  # more codes, but 6 points less accurate
    noisy = {**base, "codes_used": [0.10, 0.30, 0.16]}  # a gain the seeds cannot tell from none
    validation = {"defaults": base, "usage": usage, "sharper": sharper, "costly": costly, "noisy": noisy}
    test = {row: {**metrics, "reconstruction_mse": [1.0, 1.0, 1.0]} for row, metrics in validation.items()}
    runs = make_runs(test, validation=validation)
    verdicts = {row: recipe_verdict(runs, row, "defaults", 512) for row in ("usage", "sharper", "costly", "noisy")}
    assert verdicts == {"usage": "yes", "sharper": "yes", "costly": "no", "noisy": "inconclusive"}
    assert choose_recipe(runs, ["usage", "sharper", "costly", "noisy"], "defaults", 512) == "sharper"
    assert choose_recipe(runs, ["costly", "noisy"], "defaults", 512) is None
    without = make_runs(test)  # test numbers only: nothing is chosen
    assert recipe_verdict(without, "usage", "defaults", 512) == NOT_ON_VALIDATION
    assert choose_recipe(without, ["usage", "sharper"], "defaults", 512) is None
