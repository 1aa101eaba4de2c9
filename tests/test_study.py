"""The study's protocol (`hf_hypervq.training.study`): the validation split every choice is made on, the heads every
quantizer's classifier starts from, and what a run is keyed by."""

import math

import pytest
import torch

from hf_hypervq.training import study


def test_the_validation_split_is_a_stratified_tenth_apart_from_everything_trained_on():
    data = study.load_tensors("digits")
    train, validation = data["train"][1], data["validation"][1]
    assert len(train) + len(validation) == 1437 and len(data["test"][1]) == 360
    for label in range(10):
        share = (validation == label).sum() / ((train == label).sum() + (validation == label).sum())
        assert abs(share.item() - study.VALIDATION_SHARE) < 0.02
    rows = {tuple(row.tolist()) for row in data["validation"][0].flatten(1)}
    for split in ("train", "classifier_train", "classifier_held_out", "test"):
        assert not rows & {tuple(row.tolist()) for row in data[split][0].flatten(1)}, split
    classifier = len(data["classifier_train"][1]) + len(data["classifier_held_out"][1])
    assert classifier == len(train)  # digits: the classifier learns from the whole training part
    assert abs(len(data["classifier_held_out"][1]) / classifier - 0.2) < 0.02


def test_every_quantizer_s_head_starts_from_the_same_weights_for_a_seed():
    configs = [study.build_config(study.setting_of({"quantizer": q}), study.QUICK_MODEL)
               for q in ("hyperbolic", "kmeans", "gumbel")]  # fmt: skip
    for normalize in (True, False):
        heads = [study.new_head(config, 3, normalize).state_dict() for config in configs]
        assert all(h.keys() == heads[0].keys() for h in heads)
        assert all(torch.equal(h[k], heads[0][k]) for h in heads for k in h)
    other = study.new_head(configs[0], 4, False).state_dict()
    assert any(not torch.equal(other[k], heads[0][k]) for k in other)


def test_a_run_is_keyed_by_its_kernel_path_variables_data_and_versions(tmp_path, monkeypatch):
    environment = study.run_environment("digits")
    assert set(environment) == {"cpu_kernels", "variables", "data_sha256", "versions"}
    assert {"torch", "numpy", "scipy", "pillow", "datasets", "evaluate", "python"} <= set(environment["versions"])
    assert len(environment["data_sha256"]) == 64
    setting = study.setting_of({}, quick=True)
    before = study.run_path(tmp_path, setting, 0, True)
    monkeypatch.setenv("HF_HYPERVQ_NATIVE", "1")  # a variable that may change the numbers: another run
    assert study.run_path(tmp_path, setting, 0, True) != before
    monkeypatch.delenv("HF_HYPERVQ_NATIVE")
    monkeypatch.setattr(study.kernels, "cpu_kernel_path", lambda: "torch, eager")
    assert study.run_path(tmp_path, setting, 0, True) != before
    monkeypatch.undo()
    monkeypatch.setattr(study, "computing_versions", lambda: {**environment["versions"], "torch": "0.0"})
    assert study.run_path(tmp_path, setting, 0, True) != before


def test_the_anchor_s_version_is_pinned():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pinned = re.search(r'"vector-quantize-pytorch==([^"]+)"', pyproject)
    assert pinned and pinned.group(1) == study.anchor_version()


def test_a_quick_run_measures_validation_and_test_alike(tmp_path):
    run = study.run_one(study.setting_of({"codebook_size": 16}, quick=True), 0, True, tmp_path)
    validation = run["validation"]
    for name in (*study.VALIDATION_METRICS, "accuracy", "accuracy_unnormalized", "accuracy_early_stopping"):
        assert isinstance(validation[name], (int, float)) and math.isfinite(validation[name]), name
        assert isinstance(run[name], (int, float)) and math.isfinite(run[name]), name
    assert run["early_stopping_learning_rate"] in study.CLASSIFIER_LEARNING_RATES
    assert run["environment"] == study.run_environment("digits")
    with pytest.raises(KeyError):
        run["validation"]["noisy_silhouette"]  # the noisy cluster scores are a test-split report only


def test_the_anchor_gap_search_options():
    """HyperVQ's search options act as they say, and only on HyperVQ."""
    data = study.load_tensors("digits")
    setting = study.setting_of({"codebook_size": 32}, quick=True)
    model = study.build_tokenizer(setting, study.QUICK_MODEL)
    batch = data["train"][0][:128]
    study.kmeans_init_hyperplanes(model, batch, 0)
    latents = study._latents(model, batch)
    nearest = torch.cdist(model.quantizer.codebook, latents).min(-1).values
    assert nearest.mean() < 0.1 * latents.norm(dim=-1).mean()  # every code vector among the latents

    quick = study.setting_of({"codebook_size": 64}, quick=True)
    plain = study.train_tokenizer(quick, study.QUICK_MODEL, 0, data)[0]
    restarted = study.train_tokenizer({**quick, "restart_dead_after": 5}, study.QUICK_MODEL, 0, data)[0]
    with torch.no_grad():
        used = [len(m.get_image_tokens(data["validation"][0]).unique()) for m in (plain, restarted)]
    assert used[1] > used[0]  # restarted hyperplanes come back into use
    assert study.temperature_for("run_length", 10, 0.1)[1] == 0.1
    with pytest.raises(ValueError, match="apply to HyperVQ"):
        study.train_tokenizer(
            {**quick, "quantizer": "kmeans", "hyperplane_init": "kmeans"}, study.QUICK_MODEL, 0, data
        )
