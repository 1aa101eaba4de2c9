"""`scripts/reproduce.py --quick` and `scripts/ablate.py --quick`: the whole study pipeline, end to end, in minutes;
and the shared protocol's pieces (`scripts/study.py`) on their own."""

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


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import study  # noqa: E402


def _run(script, *args, timeout=1200):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quick_reproduction_writes_the_report(tmp_path):
    results = tmp_path / "results"
    _run("reproduce.py", "--quick", "--output_dir", results)
    report = (results / "REPORT.md").read_text()
    pictures = ("mse_vs_k.png", "accuracy_vs_k.png", "codebook_usage.png", "embedding_scatter.png", "codebooks.png")
    for name in (*pictures, "results.json"):
        assert (results / name).exists(), name
    assert "Quick mode" in report and "## The paper's claims, one by one" in report and "## Mechanism" in report
    for quantizer in ("HyperVQ", "KmeansVQ", "GumbelVQ", "HyperKmeansVQ", "HyperEmbMatVQ", "VectorQuantize (anchor)"):
        assert f"| {quantizer} | 16 |" in report, quantizer
    # Figure 5: one panel per quantizer of its 16 decoded codes, linked from the report
    assert "## Decoded codes (the paper's Figure 5)" in report and "](codebooks.png)" in report
    assert "16 code vectors decoded on their own" in report and "4×4-pixel patch" in report
    with Image.open(results / "codebooks.png") as picture:
        assert picture.height > picture.width / 4  # six panels stacked, not one strip
    runs = json.loads((results / "results.json").read_text())["runs"]
    assert len(runs) == 6 and all(0 <= run["accuracy"] <= 1 for run in runs)
    anchor = next(r for r in runs if r["quantizer"] == study.ANCHOR)
    assert anchor["setting"]["quantizer"] == "vq_pytorch" and "mean_max_probability" not in anchor  # no logits
    assert anchor["versions"][study.ANCHOR_PACKAGE] == importlib.metadata.version("vector-quantize-pytorch")
    assert anchor["dead_codes"] < 16 and anchor["reconstruction_mse"] < 1
    # the protocol is the same for every quantizer: same updates, same temperature rule, same classifier search
    assert len({(r["setting"]["steps"], r["setting"]["schedule"]) for r in runs}) == 1
    assert all(r["classifier_learning_rate"] in study.CLASSIFIER_LEARNING_RATES for r in runs)

    _run("reproduce.py", "--quick", "--output_dir", results, timeout=600)  # a rerun reuses every finished run
    assert json.loads((results / "results.json").read_text())["runs"] == runs  # wall times included


def test_quick_ablation_writes_every_row(tmp_path):
    rows = ("defaults", "beta_0.25", "kmeans", "vq_pytorch")
    _run("ablate.py", "--quick", "--seeds", "0", "--rows", *rows, "--output_dir", tmp_path)
    table = (tmp_path / "ABLATIONS.md").read_text()
    for row in rows:
        assert f"| `{row}` |" in table
    rows = {r["row"]: r for r in json.loads((tmp_path / "ablations.json").read_text())}
    assert rows["beta_0.25"]["setting"]["commitment_weight"] == 0.25
    assert rows["defaults"]["setting"]["commitment_weight"] is None
    for key in ("train_perplexity", "perplexity", "dead_codes", "ball_norm", "logit_margin", "mean_max_probability"):
        assert key in rows["defaults"], key
    assert "ball_norm" not in rows["kmeans"]  # a Euclidean quantizer has no ball
    assert rows["vq_pytorch"]["setting"]["quantizer"] == study.ANCHOR and "ball_norm" not in rows["vq_pytorch"]


def test_validation_split_is_stratified_and_disjoint_from_the_classifier_training_split():
    data = study.load_digits_tensors()
    train, validation = data["classifier_train"][1], data["validation"][1]
    assert len(train) + len(validation) == len(data["train"][1])
    for label in range(10):  # 20% of each class, give or take rounding
        share = (validation == label).sum() / (data["train"][1] == label).sum()
        assert abs(share.item() - 0.2) < 0.02
    pixels = data["train"][0].flatten(1)
    held_out = data["validation"][0].flatten(1)
    assert not any(torch.equal(held_out[0], row) for row in data["classifier_train"][0].flatten(1))
    assert any(torch.equal(held_out[0], row) for row in pixels)


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
        pixels = torch.rand(300, 3, study.IMAGE_SIZE, study.IMAGE_SIZE) * 2 - 1  # 3 batches per epoch
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
        return {"reconstruction_mse": 0.1 * len(measured), "wall_seconds": 0.0}

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


def synthetic_table(hyperbolic_wins: bool) -> dict:
    """A results table made up so that each claim's verdict is known in advance."""
    good, bad = {"reconstruction_mse": 0.01, "accuracy": 0.9, "perplexity": 200.0, "silhouette": 0.5,
                 "davies_bouldin": 0.5, "noisy_silhouette": 0.5}, {  # fmt: skip
        "reconstruction_mse": 0.02, "accuracy": 0.5, "perplexity": 50.0, "silhouette": 0.1, "davies_bouldin": 2.0,
        "noisy_silhouette": 0.1}  # fmt: skip
    middle = {**bad, "perplexity": 100.0, "accuracy": 0.6}
    winner, loser = (good, bad) if hyperbolic_wins else (bad, good)
    rows = {
        "hyperbolic": winner,
        "kmeans": loser,
        "gumbel": middle,
        "hyperbolic_kmeans": bad,
        "hyperbolic_embedding": bad,
    }
    return {(q, k): {m: (v, 0.0, 3) for m, v in metrics.items()} for q, metrics in rows.items() for k in (64, 512)}


def test_check_claims_on_synthetic_tables():
    from hf_hypervq.training.report import check_claims

    for wins, verdict in ((True, "holds"), (False, "does not hold")):
        claims = check_claims(synthetic_table(wins), [64, 512], scatter=None)
        verdicts = {claim: found for claim, found, _ in claims}
        assert len(claims) == 7
        assert all(found == verdict for found in verdicts.values()), verdicts
    claims = check_claims(synthetic_table(True), [64, 512], scatter=None)
    assert "HyperVQ / KmeansVQ reconstruction MSE: K=64: 0.50×, K=512: 0.50×" in claims[0][2]


def test_a_missing_or_nan_mean_is_not_measurable_not_a_verdict():
    """A compared mean that is NaN (a failed run) or missing (no cell) used to rank first in `max` and `sorted`."""
    from hf_hypervq.training.report import check_claims

    failed = synthetic_table(False)  # HyperVQ loses every comparison where its numbers exist
    for k in (64, 512):
        failed[("hyperbolic", k)] = {m: (math.nan, 0.0, 3) for m in failed[("hyperbolic", k)]}
    claims = check_claims(failed, [64, 512], scatter=None)
    assert len(claims) == 7
    assert all(verdict == "not measurable" for _, verdict, _ in claims), claims

    missing = synthetic_table(True)
    for k in (64, 512):
        del missing[("gumbel", k)]  # no GumbelVQ runs: the claims that compare with it cannot be decided
    verdicts = [verdict for _, verdict, _ in check_claims(missing, [64, 512], scatter=None)]
    assert verdicts == ["holds", "not measurable", "not measurable", "not measurable", "holds", "holds",
                        "not measurable"]  # fmt: skip
    scatter = {"hyperbolic": {"silhouette": 0.5, "davies_bouldin": math.inf, "noisy_silhouette": 0.5},
               "kmeans": {"silhouette": 0.1, "davies_bouldin": 2.0}}  # fmt: skip
    verdicts = [verdict for _, verdict, _ in check_claims(synthetic_table(True), [64, 512], scatter)]
    assert verdicts[-3:-1] == ["not measurable", "not measurable"]


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
    pixels = torch.rand(64, 3, study.IMAGE_SIZE, study.IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
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
    monkeypatch.setattr(study, "measure", lambda setting, seed, quick: measured.append(seed) or {"wall_seconds": 0})
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
    package = Path(hf_hypervq.__file__).resolve().parent
    importing = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+vector_quantize_pytorch", path.read_text(), re.MULTILINE)]  # fmt: skip
    assert importing == []


def test_the_anchor_row_is_context_not_a_claim():
    from hf_hypervq.training.report import QUANTIZER_NAMES, check_claims

    assert set(QUANTIZER_NAMES) == set(study.STUDY_QUANTIZERS)
    table = synthetic_table(True)
    for k in (64, 512):  # the anchor beats everything: no verdict changes, the ranking's evidence names it
        table[(study.ANCHOR, k)] = {m: (v, 0.0, 3) for m, v in {"reconstruction_mse": 0.001, "accuracy": 0.99,
                                                                 "perplexity": 500.0}.items()}  # fmt: skip
    claims = check_claims(table, [64, 512], scatter=None)
    assert [verdict for _, verdict, _ in claims] == ["holds"] * 7
    assert claims[-1][2].endswith("; VectorQuantize (anchor): 99.0%")
    assert "anchor" not in check_claims(synthetic_table(True), [64, 512], scatter=None)[-1][2]


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
    from hf_hypervq.training.report import embedding_panels

    torch.manual_seed(0)
    config = HyperVQVAEConfig(num_channels=1, hidden_size=8, num_residual_layers=0, residual_hidden_size=4,
                              embedding_dim=3, codebook_size=16, quantizer_type=quantizer_type)  # fmt: skip
    model = HyperVQVAEModel(config).eval()
    pixels = torch.rand(4, 1, 16, 16) * 2 - 1
    panels = embedding_panels(model, pixels, num_points=50)
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
    from hf_hypervq.training.report import embedding_panels

    model = HyperVQVAEModel(HyperVQVAEConfig(num_channels=1, hidden_size=8, num_residual_layers=0,
                                             residual_hidden_size=4, embedding_dim=4, codebook_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="3-dimensional latents, got embedding_dim=4"):
        embedding_panels(model, torch.zeros(1, 1, 16, 16))
