"""`study/reproduce.py --quick` and `study/ablate.py --quick`: the whole study pipeline, end to end, in minutes;
and the shared protocol's pieces (`hf_hypervq.training.study`) on their own."""

import importlib.metadata
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import hf_hypervq
from hf_hypervq.training import study
from hf_hypervq.training.report import ACCURACIES


ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=1200):
    result = subprocess.run([sys.executable, str(ROOT / "study" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_quick_reproduction_writes_the_report(tmp_path):
    results = tmp_path / "results"
    _run("reproduce.py", "--quick", "--output_dir", results, "--budget_steps", "1000", "4000")
    report = (results / "REPORT.md").read_text()
    pictures = ("budget.png", "codebook_usage.png", "embedding_scatter.png", "codebooks.png")
    for name in (*pictures, "results.json"):
        assert (results / name).exists(), name
    assert "Quick mode" in report and "## The paper's claims, one by one" in report and "## Mechanism" in report
    for row in (
        "HyperVQ",
        "KmeansVQ",
        "GumbelVQ",
        "HyperKmeansVQ",
        "HyperEmbMatVQ",
        "VectorQuantize (anchor)",
    ):
        assert f"| {row} | 16 |" in report, row
    assert "## The paper's Table 5 setting: latent dimension 3, K = 16" in report
    assert "## The budget: does more training change the ranking?" in report and "## Classifier protocols" in report
    # Figure 5: one panel per quantizer of its 16 decoded codes, linked from the report
    assert "## Decoded codes (the paper's Figure 5)" in report and "](codebooks.png)" in report
    assert "16 code vectors decoded on their own" in report and "4×4-pixel patch" in report
    with Image.open(results / "codebooks.png") as picture:
        assert picture.height > picture.width / 4  # six panels stacked, not one strip
    runs = json.loads((results / "results.json").read_text())["runs"]
    # six rows, HyperVQ and KmeansVQ at two other budgets (1000 and 4000 updates, quick: 20 and 80) and in Table 5's
    # setting (latent dimension 3)
    assert len(runs) == 6 + 4 + 2 and all(0 <= run[key] <= 1 for run in runs for key in ACCURACIES)
    table_5 = [r for r in runs if r["setting"]["embedding_dim"] == 3]
    assert sorted(r["row"] for r in table_5) == ["hyperbolic", "kmeans"] and "scatter_points" not in table_5[0]
    assert "scatter_points" in json.loads(study.run_path(results / "runs", table_5[0]["setting"], 0, True).read_text())
    assert sorted(r["setting"]["steps"] for r in runs if r["row"] == "hyperbolic" and r not in table_5) == [20, 40, 80]
    assert all(r["setting"]["dataset"] == "digits" and "validation" in r for r in runs)
    for run in runs:  # Figure 5's pictures are stored beside each run: K codes of 4×4 pixels side by side
        setting = run["setting"]
        with Image.open(study.run_path(results / "runs", setting, 0, True).with_suffix(".png")) as strip:
            assert strip.size == (4 * setting["codebook_size"], 4)
    anchor = next(r for r in runs if r["row"] == study.ANCHOR)
    assert anchor["setting"]["quantizer"] == "vq_pytorch" and "mean_max_probability" not in anchor  # no logits
    assert anchor["versions"][study.ANCHOR_PACKAGE] == importlib.metadata.version("vector-quantize-pytorch")
    assert anchor["dead_codes"] < 16 and anchor["reconstruction_mse"] < 1
    # the protocol is the same for every quantizer: same updates, same temperature rule, same classifier search
    grid = [r for r in runs if r["setting"]["steps"] == 40]
    assert len(grid) == 8 and len({r["setting"]["schedule"] for r in grid}) == 1
    assert all(r["early_stopping_learning_rate"] in study.CLASSIFIER_LEARNING_RATES for r in runs)

    # a rerun reuses every finished run
    _run("reproduce.py", "--quick", "--output_dir", results, "--budget_steps", "1000", "4000", timeout=600)
    assert json.loads((results / "results.json").read_text())["runs"] == runs  # wall times included


@pytest.mark.slow
def test_quick_ablation_writes_every_row(tmp_path):
    rows = ("defaults", "beta_0.25", "diversity_0.1", "kmeans", "vq_pytorch")
    _run("ablate.py", "--quick", "--seeds", "0", "--rows", *rows, "--output_dir", tmp_path)
    table = (tmp_path / "ABLATIONS.md").read_text()
    for row in rows:
        assert f"| `{row}` |" in table
    # the diversity section pairs each weight with its quantizer's row without it; one seed decides nothing
    diversity = table.split("## The diversity weight, for every Gumbel quantizer")[1]
    # decided on validation numbers; runs made before study.py measured them decide nothing
    decided = "| inconclusive | validation |" in diversity or "| not measured on validation | — |" in diversity
    assert "| HyperVQ, weight 0.1 |" in diversity and decided
    assert "GumbelVQ, weight" not in diversity  # its rows did not run
    rows = {r["row"]: r for r in json.loads((tmp_path / "ablations.json").read_text())}
    assert rows["beta_0.25"]["setting"]["commitment_weight"] == 0.25
    assert rows["defaults"]["setting"]["commitment_weight"] is None
    for key in ("train_perplexity", "perplexity", "dead_codes", "ball_norm", "logit_margin", "mean_max_probability"):
        assert key in rows["defaults"], key
    assert "ball_norm" not in rows["kmeans"]  # a Euclidean quantizer has no ball
    assert rows["vq_pytorch"]["setting"]["quantizer"] == study.ANCHOR and "ball_norm" not in rows["vq_pytorch"]


@pytest.mark.usefixtures("fashion_mnist")
def test_the_fashion_mnist_study_data():
    """What `load_tensors("fashion_mnist")` does to Fashion-MNIST, on a few of its images (the whole set takes a
    minute and gigabytes): 28×28 grey centred on a 32×32 black canvas in [-1, 1], and a fixed classifier subset of
    6,250 images, 20% of each class held out for early stopping."""
    from hf_hypervq.training.data import load_image_dataset

    images = load_image_dataset("fashion_mnist", split="test").select(range(4))["image"]
    pixels = study.DATASETS["fashion_mnist"].image_processor()(
        images=[image.convert("RGB") for image in images], return_tensors="pt"
    )["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert (pixels[:, :, :2] == -1).all() and (pixels[:, :, :, -2:] == -1).all()  # the black frame
    assert (pixels[:, :, 2:30, 2:30] > -1).any()

    labels = torch.arange(54_000) % 10  # Fashion-MNIST's training split less its validation tenth: 5,400 a class
    generator = torch.Generator().manual_seed(0)
    subset = study._stratified_sample(labels, study.DATASETS["fashion_mnist"].classifier_images / 54_000, generator)
    assert subset.sum() == 6_250 and all(subset[labels == c].sum() == 625 for c in range(10))
    validation = study._stratified_sample(labels[subset], 0.2, generator)
    assert validation.sum() == 1_250 and all(validation[labels[subset] == c].sum() == 125 for c in range(10))


def test_temperature_rules():
    assert study.temperature_for("per_update", 1500) == [2.0, 0.5, 0.999995]
    tau_max, tau_min, decay = study.temperature_for("run_length", 1500)
    assert tau_max * decay**1499 == pytest.approx(tau_min)  # update j runs at index j - 1
    with pytest.raises(ValueError, match="schedule"):
        study.temperature_for("cosine", 10)


def test_the_study_reaches_tau_min_at_its_last_update():
    """`run_length` in the study's own training: the Gumbel draw of the last update is made at τ = 0.5."""
    from hf_hypervq.models.hypervq.quantizers import VectorQuantizer

    temperatures = []

    def record(module, inputs):
        if isinstance(module, VectorQuantizer) and module.training:
            temperatures.append(module.current_temperature)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        pixels = torch.rand(300, 3, 16, 16) * 2 - 1  # 3 batches per epoch
        setting = study.setting_of({"steps": 5, "codebook_size": 16})
        study.train_tokenizer(setting, study.QUICK_MODEL, 0, {"train": (pixels, torch.zeros(300))})
    finally:
        hook.remove()
    assert len(temperatures) == 5 and temperatures[0] == 2.0
    assert temperatures[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:]))


def test_run_files_are_named_by_their_setting_and_code(tmp_path, monkeypatch):
    base = study.setting_of({})
    assert study.run_path(tmp_path, base, 0, False) == study.run_path(tmp_path, dict(base), 0, False)
    assert study.run_path(tmp_path, base, 0, False) != study.run_path(tmp_path, {**base, "curvature": 0.1}, 0, False)
    assert study.run_path(tmp_path, base, 0, False) != study.run_path(tmp_path, base, 1, False)
    before = study.run_path(tmp_path, base, 0, False)
    monkeypatch.setattr(study, "code_fingerprint", lambda: "0123456789abcdef")
    assert study.run_path(tmp_path, base, 0, False) != before


def test_a_run_is_reused_only_by_the_code_that_computed_it(tmp_path, monkeypatch):
    measured = []

    def fake_measure(setting, seed, quick):  # the training itself is not what this test is about
        measured.append(seed)
        return {"reconstruction_mse": 0.1 * len(measured), "compute_seconds": 0.0}

    monkeypatch.setattr(study, "measure", fake_measure)
    setting = study.setting_of({}, quick=True)
    monkeypatch.setattr(study, "code_fingerprint", lambda: "aaaaaaaaaaaaaaaa")
    first = study.run_one(setting, 0, True, tmp_path)
    assert measured == [0] and first["code_fingerprint"] == "aaaaaaaaaaaaaaaa"
    assert first["versions"]["hf-hypervq"] == hf_hypervq.__version__
    assert first["versions"]["torch"] == torch.__version__
    written = study.run_path(tmp_path, setting, 0, True)
    assert json.loads(written.read_text()) == first
    assert study.run_one(setting, 0, True, tmp_path) == first and measured == [0]  # same code: reused

    monkeypatch.setattr(study, "code_fingerprint", lambda: "bbbbbbbbbbbbbbbb")  # the code changed: recomputed
    second = study.run_one(setting, 0, True, tmp_path)
    assert measured == [0, 0] and second["code_fingerprint"] == "bbbbbbbbbbbbbbbb"
    assert second["reconstruction_mse"] != first["reconstruction_mse"] and written.exists()

    # a file under the current name that other code wrote (copied, or from before fingerprints) is not trusted
    current = study.run_path(tmp_path, setting, 1, True)
    current.write_text(json.dumps({**first, "seed": 1}))
    assert study.run_one(setting, 1, True, tmp_path)["code_fingerprint"] == "bbbbbbbbbbbbbbbb"
    assert measured == [0, 0, 1]


def test_runs_of_code_before_the_fingerprint_are_never_reused():
    """The committed `results/runs` of older code (their files carry no fingerprint) resolve to no current name."""
    old = [
        p for p in (ROOT / "results" / "runs").glob("*.json") if "code_fingerprint" not in json.loads(p.read_text())
    ]
    for path in old:
        run = json.loads(path.read_text())
        assert study.run_path(path.parent, run["setting"], run["seed"], quick=False) != path


def test_the_fingerprint_covers_the_files_the_study_computes_with(tmp_path, monkeypatch):
    package = Path(hf_hypervq.__file__).resolve().parent
    assert all((package / name).is_file() for name in study.FINGERPRINT_SOURCES)
    for name in ("models/hypervq/quantizers.py", "models/hypervq/cpu_kernels.py", "training/evaluation.py"):
        assert name in study.FINGERPRINT_SOURCES
    fingerprint = study.code_fingerprint()
    assert len(fingerprint) == 16 and study.code_fingerprint() == fingerprint

    # a copy of the package: editing documentation keeps the fingerprint, editing code (C source included) does not
    copy = tmp_path / "hf_hypervq"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(study.hf_hypervq, "__file__", str(copy / "__init__.py"))

    def fingerprint_after(edit):
        study.code_fingerprint.cache_clear()
        kernels = copy / "models/hypervq/cpu_kernels.py"
        kernels.write_text(edit((package / "models/hypervq/cpu_kernels.py").read_text()))
        return study.code_fingerprint()

    try:
        assert fingerprint_after(lambda text: text) == fingerprint
        assert (
            fingerprint_after(lambda text: text.replace('"""', '"""Edited docs. ', 1) + "\n# a comment\n")
            == fingerprint
        )
        assert fingerprint_after(lambda text: text.replace("#include", "// changed\n#include", 1)) != fingerprint
    finally:
        study.code_fingerprint.cache_clear()


def test_the_package_version_is_the_one_pyproject_declares():
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert hf_hypervq.__version__ == declared  # the reports stamp it into every run


GOOD = {"reconstruction_mse": 0.01, "accuracy": 0.9, "perplexity": 200.0, "silhouette": 0.5, "davies_bouldin": 0.5,
        "noisy_silhouette": 0.5, "accuracy_unnormalized": 0.9, "accuracy_early_stopping": 0.9,
        "noisy_davies_bouldin": 0.5}  # fmt: skip
BAD = {"reconstruction_mse": 0.02, "accuracy": 0.5, "perplexity": 50.0, "silhouette": 0.1, "davies_bouldin": 2.0,
       "noisy_silhouette": 0.1, "accuracy_unnormalized": 0.5, "accuracy_early_stopping": 0.5,
       "noisy_davies_bouldin": 2.0}  # fmt: skip


def synthetic_runs(hyperbolic_wins: bool, seeds=(0, 1, 2), jitter=0.001) -> list[dict]:
    """Runs made up so that each claim's verdict is known in advance: every seed shifts every number a little (so the
    paired intervals are narrow but not empty), in the same direction for every row."""
    middle = {**BAD, "perplexity": 100.0, "accuracy": 0.6}
    winner, loser = (GOOD, BAD) if hyperbolic_wins else (BAD, GOOD)
    rows = {"hyperbolic": winner, "kmeans": loser, "gumbel": middle, "hyperbolic_kmeans": BAD,
            "hyperbolic_embedding": BAD}  # fmt: skip
    return [{"row": row, "codebook_size": 512, "seed": seed, **{m: v * (1 + jitter * (seed + i))
                                                                  for i, (m, v) in enumerate(metrics.items())}}
            for row, metrics in rows.items() for seed in seeds]  # fmt: skip


def test_check_claims_on_synthetic_runs():
    from hf_hypervq.training.report import check_claims

    for wins, verdict in ((True, "holds"), (False, "does not hold")):
        claims = check_claims(synthetic_runs(wins), 512)
        verdicts = {claim: found for claim, found, _ in claims}
        assert len(claims) == 6
        assert all(found == verdict for found in verdicts.values()), verdicts
    claims = check_claims(synthetic_runs(True), 512)
    assert claims[0][2].startswith("MSE, HyperVQ / KmeansVQ: 0.50× [0.50, 0.50] (3 seeds)")
    assert (
        "accuracy (standardised features), HyperVQ − KmeansVQ: +40.1 points [+40.0, +40.2] (3 seeds)" in claims[1][2]
    )


def test_paired_intervals_decide_only_what_the_seeds_can_tell():
    from hf_hypervq.training.report import Paired, combine, decide, paired

    def runs(a: list, b: list) -> list[dict]:
        return [{"row": row, "codebook_size": 8, "seed": seed, "accuracy": value}
                for row, values in (("a", a), ("b", b)) for seed, value in enumerate(values)]  # fmt: skip

    # differences 0.1, 0.2, 0.3: mean 0.2, t(0.975, 2) = 4.303, interval 0.2 ± 4.303 · 0.1 / √3
    difference = paired(runs([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]), "a", "b", "accuracy", 8)
    assert difference.n == 3 and difference.mean == pytest.approx(0.2)
    assert difference.high - difference.mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert decide(difference, "above") == "inconclusive"  # the interval reaches below 0
    assert decide(paired(runs([0.6, 0.61, 0.62], [0.5, 0.5, 0.5]), "a", "b", "accuracy", 8), "above") == "holds"
    assert (
        decide(paired(runs([0.4, 0.41, 0.42], [0.5, 0.5, 0.5]), "a", "b", "accuracy", 8), "above") == "does not hold"
    )
    # paired by seed: a large spread shared by both rows is no uncertainty about their difference
    assert decide(paired(runs([0.31, 0.61, 0.91], [0.3, 0.6, 0.9]), "a", "b", "accuracy", 8), "above") == "holds"
    one = paired(runs([0.9], [0.1]), "a", "b", "accuracy", 8)
    assert one.n == 1 and decide(one, "above") == "inconclusive"  # one seed is never evidence
    ratio = paired(runs([2.0, 2.2, 2.4], [1.0, 1.1, 1.2]), "a", "b", "accuracy", 8, ratio=True)
    assert ratio.mean == pytest.approx(2.0) and decide(ratio, "below", threshold=1.1) == "does not hold"
    # a bound that rounds onto "no difference" gets the digits that show on which side it lies
    assert Paired(1.06, 1.0036, 1.11, 3, ratio=True).text() == "1.06× [1.004, 1.11] (3 seeds)"
    assert Paired(0.02, -0.0004, 0.06, 3).text(100, 1, " points") == "+2.0 points [-0.04, +6.0] (3 seeds)"
    assert combine(["holds", "inconclusive"]) == "inconclusive"
    assert combine(["holds", "does not hold", "not measurable"]) == "does not hold"
    assert combine(["holds", "holds"]) == "holds"
    with pytest.raises(ValueError, match="`claimed` must be"):
        decide(difference, "higher")


def test_a_missing_or_nan_run_is_not_measurable_not_a_verdict():
    """A compared number that is NaN (a failed run) or missing (no run) would otherwise rank as if it were one."""
    from hf_hypervq.training.report import check_claims

    failed = synthetic_runs(False)  # HyperVQ loses every comparison where its numbers exist
    for run in failed:
        if run["row"] == "hyperbolic":
            run.update({m: math.nan for m in GOOD})
    verdicts = [verdict for _, verdict, _ in check_claims(failed, 512)]
    # one comparison that does not hold decides its claim: GumbelVQ's perplexity is below KmeansVQ's here
    assert verdicts == ["not measurable", "not measurable", "does not hold"] + ["not measurable"] * 3

    missing = [r for r in synthetic_runs(True) if r["row"] != "gumbel"]  # its claims cannot be decided
    verdicts = [verdict for _, verdict, _ in check_claims(missing, 512)]
    assert verdicts == ["holds", "not measurable", "not measurable", "holds", "holds", "not measurable"]
    scatter = {"hyperbolic": {"silhouette": 0.5, "davies_bouldin": math.inf, "noisy_silhouette": 0.5},
               "kmeans": {"silhouette": 0.1, "davies_bouldin": 2.0, "noisy_silhouette": 0.1}}  # fmt: skip
    claims = check_claims(synthetic_runs(True), 512, scatter)  # the dimension-3 claims: compact, and under noise
    assert len(claims) == 8 and claims[5][1] == "not measurable"  # an infinite Davies-Bouldin
    assert claims[6][1] == "not measurable"  # no noisy Davies-Bouldin
    scatter["hyperbolic"]["davies_bouldin"] = 0.5
    assert check_claims(synthetic_runs(True), 512, scatter)[5][1] == "inconclusive"  # one tokenizer each


def test_the_diversity_and_protocol_tables_pair_by_seed():
    from hf_hypervq.training.report import diversity_table, protocol_table

    runs = synthetic_runs(True)
    for run in [r for r in runs if r["row"] == "hyperbolic"]:  # the term: more codes, the same MSE and accuracy
        runs.append({**run, "row": "hyperbolic+diversity", "codes_used": 0.95, "accuracy": run["accuracy"] + 0.001})
        run["codes_used"] = 0.2 + 0.01 * run["seed"]
        runs.append({**run, "row": "gumbel+diversity", "codes_used": 0.9, "accuracy": run["accuracy"] - 0.2})
    for run in runs:
        if run["row"] == "gumbel":
            run.update(codes_used=0.3, reconstruction_mse=run["reconstruction_mse"] * 0 + 0.01,
                       **dict.fromkeys(ACCURACIES, 0.9))  # fmt: skip
        if run["row"] == "gumbel+diversity":  # its 20 points lost under the other protocols too
            run.update({key: run[key] - 0.2 for key in ACCURACIES if key != "accuracy"})
    assert diversity_table(runs, 512).splitlines()[2].endswith("| not measured on validation | — |")
    for run in runs:  # the win is decided on validation numbers, here the same as the test numbers
        run["validation"] = {
            key: run.get(key) for key in ("codes_used", "reconstruction_mse", "silhouette", *ACCURACIES)
        }
    table = diversity_table(runs, 512)
    assert "| HyperVQ | +0.74 [" in table and table.splitlines()[2].endswith("| yes | validation |")
    assert table.splitlines()[3].startswith("| GumbelVQ |") and table.splitlines()[3].endswith("| no | validation |")
    assert "HyperEmbMatVQ" not in table  # no runs with the term: no row
    chosen = diversity_table(runs, 512, [("GumbelVQ at 0.1", "gumbel+diversity", "gumbel"), ("none", "x", "y")])
    assert chosen.splitlines()[2].startswith("| GumbelVQ at 0.1 |") and len(chosen.splitlines()) == 3
    for run in runs:
        run.update(accuracy_unnormalized=run["accuracy"] / 2, accuracy_early_stopping=math.nan)
    protocols = protocol_table(runs, 512)
    assert "| HyperVQ | 90.2 ± 0.09 | 45.1 ± 0.045 | – |" in protocols
    assert protocols.splitlines()[-1].startswith("| HyperVQ − KmeansVQ, paired | +40.1 points [+40.0, +40.2]")
    assert protocols.splitlines()[-1].endswith("| not measured |")


def test_the_anchor_adapter_quacks_like_a_library_quantizer():
    from hf_hypervq.models.hypervq.quantizers import QuantizerOutput, VectorQuantizer

    torch.manual_seed(0)
    quantizer = study.VectorQuantizeAnchor(8, 16).train()
    assert isinstance(quantizer, VectorQuantizer) and not list(quantizer.parameters())  # EMA: no optimizer state
    z = torch.randn(4, 4, 4, 8, requires_grad=True)  # 64 vectors: enough for the k-means of 16 codes
    out = quantizer(z)
    assert isinstance(out, QuantizerOutput) and out.logits is None
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (4, 4, 4) and out.indices.dtype == torch.long
    assert ((out.indices >= 0) & (out.indices < 16)).all()
    assert out.loss.shape == () and out.loss.requires_grad and out.loss.item() > 0  # the commitment term
    assert 1 <= out.perplexity.item() <= 16
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert quantizer.codebook.shape == (16, 8)

    quantizer.eval()
    codebook = quantizer.codebook.clone()
    with torch.no_grad():
        evaluated = quantizer(z)
    assert torch.equal(quantizer.codebook, codebook)  # evaluation moves no code
    nearest = ((z.detach()[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
    assert torch.equal(evaluated.indices, nearest)
    assert torch.equal(evaluated.quantized, quantizer.indices_to_codes(evaluated.indices))
    assert evaluated.loss.item() == 0

    with pytest.raises(RuntimeError, match="train it before evaluating"):
        study.VectorQuantizeAnchor(8, 16).eval()(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"expects `z` of shape \(\.\.\., dim=8\)"):
        quantizer(torch.randn(3, 7))


def _train_the_anchor_tokenizer(steps: int = 25):
    torch.manual_seed(0)
    model = study.build_tokenizer(
        study.setting_of({"quantizer": study.ANCHOR, "codebook_size": 16}), study.QUICK_MODEL
    )
    model.train()
    pixels = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        loss = model(pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_num_updates(step + 1)
        losses.append(loss.item())
    return model.eval(), pixels, losses


def test_the_anchor_trains_inside_the_vqvae_deterministically():
    model, pixels, losses = _train_the_anchor_tokenizer()
    assert isinstance(model.quantizer, study.VectorQuantizeAnchor)
    # uniform noise: the loss can only fall towards its variance, 1/3, from 0.343; it does, steadily
    assert sum(losses[-5:]) / 5 < 0.99 * losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses
    _, _, again = _train_the_anchor_tokenizer()
    assert again == losses  # same seed, same numbers
    # what the study reads from a tokenizer: tokens, their decoding, every code decoded alone (Figure 5)
    with torch.no_grad():
        tokens = model.get_image_tokens(pixels)
        assert tokens.shape == (64, 4, 4)
        torch.testing.assert_close(model.decode_tokens(tokens), model(pixels).reconstruction)
        assert model.decode_codebook().shape == (16, 3, 4, 4)
    # the same encoder and decoder as KmeansVQ's model under the same seed: only the quantizer differs
    torch.manual_seed(0)
    kmeans = study.build_tokenizer(study.setting_of({"quantizer": "kmeans", "codebook_size": 16}), study.QUICK_MODEL)
    torch.manual_seed(0)
    anchor = study.build_tokenizer(
        study.setting_of({"quantizer": study.ANCHOR, "codebook_size": 16}), study.QUICK_MODEL
    )
    assert torch.equal(anchor.encoder.layers[0].weight, kmeans.encoder.layers[0].weight)
    with pytest.raises(ValueError, match=r"setting\['quantizer'\] must be one of"):
        study.build_tokenizer(study.setting_of({"quantizer": "vq"}), study.QUICK_MODEL)


def test_anchor_runs_are_keyed_by_its_package_version(tmp_path, monkeypatch):
    installed = importlib.metadata.version("vector-quantize-pytorch")
    assert study.package_versions()[study.ANCHOR_PACKAGE] == installed
    anchor, library = study.setting_of({"quantizer": study.ANCHOR}, quick=True), study.setting_of({}, quick=True)
    before = {name: study.run_path(tmp_path, s, 0, True) for name, s in (("anchor", anchor), ("library", library))}
    assert before["anchor"].name.startswith("vq_pytorch-K64-")

    measured = []
    monkeypatch.setattr(study, "measure", lambda setting, seed, quick: measured.append(seed) or {"compute_seconds": 0})
    first = study.run_one(anchor, 0, True, tmp_path)
    assert study.run_one(anchor, 0, True, tmp_path) == first and measured == [0]  # reused

    monkeypatch.setattr(study, "anchor_version", lambda: "0.0.1")  # another vector-quantize-pytorch
    assert study.run_path(tmp_path, anchor, 0, True) != before["anchor"]
    assert study.run_path(tmp_path, library, 0, True) == before["library"]  # the library's rows do not depend on it
    assert study.run_one(anchor, 0, True, tmp_path)["versions"][study.ANCHOR_PACKAGE] == "0.0.1" and measured == [0, 0]

    # a file under the current name that records another version (copied) is not trusted
    current = study.run_path(tmp_path, anchor, 1, True)
    current.write_text(json.dumps({**first, "seed": 1}))
    study.run_one(anchor, 1, True, tmp_path)
    assert measured == [0, 0, 1]


def test_the_library_never_imports_vector_quantize_pytorch():
    """A dev dependency: only the study's anchor row uses it, and imports it when that row is built."""
    package = Path(hf_hypervq.__file__).resolve().parent
    importing = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+vector_quantize_pytorch", path.read_text(), re.MULTILINE)]  # fmt: skip
    assert importing == ["training/study.py"]
    probe = "import sys, hf_hypervq.training.study; print('vector_quantize_pytorch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert imported.stdout.strip() == "False", imported.stderr[-3000:]


def test_the_anchor_row_is_context_not_a_claim():
    from hf_hypervq.training.report import QUANTIZER_NAMES, check_claims

    assert set(QUANTIZER_NAMES) == set(study.STUDY_QUANTIZERS)
    runs = synthetic_runs(True)  # the anchor beats everything: no verdict changes, the ranking's evidence names it
    runs += [{"row": study.ANCHOR, "codebook_size": 512, "seed": seed, "reconstruction_mse": 0.001, "accuracy": 0.99,
              "perplexity": 500.0} for seed in range(3)]  # fmt: skip
    claims = check_claims(runs, 512)
    assert [verdict for _, verdict, _ in claims] == ["holds"] * 6
    assert claims[-1][2].endswith("; context, VectorQuantize (anchor): 99.0%")
    assert "anchor" not in check_claims(synthetic_runs(True), 512)[-1][2]


def test_decoded_codebooks_figure(tmp_path):
    from hf_hypervq.training.report import codes_by_usage, plot_decoded_codebooks

    assert codes_by_usage([0, 5, 2, 5, 0]) == [1, 3, 2, 0, 4]  # most used first, ties in code order
    images = [Image.new("RGB", (4, 4), (16 * i, 0, 0)) for i in range(16)]
    path = tmp_path / "codebooks.png"
    plot_decoded_codebooks({"hyperbolic": (images, list(range(16))), study.ANCHOR: (images, [1] * 16)}, path)
    with Image.open(path) as picture:
        assert picture.width > 0 and picture.height > 0
    with pytest.raises(ValueError, match=r"codebooks\['kmeans'\]`: 16 code images but 3 code counts"):
        plot_decoded_codebooks({"kmeans": (images, [1, 2, 3])}, path)


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "kmeans"])
def test_embedding_panels_show_the_latents_and_the_codes_of_a_dim_3_tokenizer(quantizer_type):
    from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel
    from hf_hypervq.models.hypervq.hyperbolic import expmap0_projected
    from hf_hypervq.training.report import embedding_panels, scatter_points

    torch.manual_seed(0)
    config = HyperVQVAEConfig(num_channels=1, hidden_size=8, num_residual_layers=0, residual_hidden_size=4,
                              embedding_dim=3, codebook_size=16, quantizer_type=quantizer_type)  # fmt: skip
    model = HyperVQVAEModel(config).eval()
    pixels = torch.rand(4, 1, 16, 16) * 2 - 1
    panels = embedding_panels(
        json.loads(json.dumps(scatter_points(model, pixels, num_points=50)))
    )  # as a run keeps it
    tokens = model.get_image_tokens(pixels).reshape(-1)
    title, points, codes, specials = panels[0]
    assert points.shape == (50, 3) and codes.shape == (50,)
    assert set(codes.tolist()) <= set(tokens.tolist())
    if quantizer_type == "kmeans":
        assert len(panels) == 1 and title.startswith("KmeansVQ")
        torch.testing.assert_close(specials, model.quantizer.codebook.detach())
    else:
        assert len(panels) == 2 and specials is None
        _, on_ball, ball_codes, hyperplane_points = panels[1]
        torch.testing.assert_close(on_ball, expmap0_projected(points, c=1.0))
        assert torch.equal(ball_codes, codes) and hyperplane_points.shape == (16, 3)
        assert (hyperplane_points.norm(dim=-1) < 1).all()


def test_embedding_panels_refuse_latents_that_are_not_3_dimensional():
    from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel
    from hf_hypervq.training.report import scatter_points

    model = HyperVQVAEModel(HyperVQVAEConfig(num_channels=1, hidden_size=8, num_residual_layers=0,
                                             residual_hidden_size=4, embedding_dim=4, codebook_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="3-dimensional latents, got embedding_dim=4"):
        scatter_points(model, torch.zeros(1, 1, 16, 16))
