"""`study/check_defaults.py`: the library's targets measured through the scripts a user runs, with their defaults."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))

import check_defaults  # noqa: E402


def runs(hyperbolic: dict, kmeans: dict, seeds=(0, 1)) -> list[dict]:
    return [{"quantizer": q, "seed": s, **values} for s in seeds for q, values in (("hyperbolic", hyperbolic),
                                                                                  ("kmeans", kmeans))]  # fmt: skip


def test_each_target_is_checked_per_seed_against_kmeans_of_the_same_seed():
    met = runs({"codes_used": 0.95, "reconstruction_mse": 0.0105, "accuracy": 0.795},
               {"codes_used": 0.3, "reconstruction_mse": 0.01, "accuracy": 0.80})  # fmt: skip
    assert [ok for _, _, ok in check_defaults.verdicts(met)] == [True, True, True]
    missed = runs({"codes_used": 0.89, "reconstruction_mse": 0.0115, "accuracy": 0.785},
                  {"codes_used": 0.3, "reconstruction_mse": 0.01, "accuracy": 0.80})  # fmt: skip
    verdicts = check_defaults.verdicts(missed)
    assert [ok for _, _, ok in verdicts] == [False, False, False]
    assert verdicts[1][1] == pytest.approx([1.15, 1.15]) and verdicts[2][1] == pytest.approx([1.5, 1.5])
    one_seed_misses = missed[:2] + runs({"codes_used": 0.95, "reconstruction_mse": 0.0105, "accuracy": 0.795},
                                        {"codes_used": 0.3, "reconstruction_mse": 0.01, "accuracy": 0.80}, seeds=(1,))  # fmt: skip
    assert [ok for _, _, ok in check_defaults.verdicts(one_seed_misses)] == [False, False, False]


def test_extra_flags_go_to_both_quantizers_runs_alike():
    own, tokenizer, classifier = check_defaults.split_extra(
        ["--seeds", "0", "--tokenizer_args", "--max_train_steps", "5", "--classifier_args", "--max_train_steps", "3"]
    )
    assert (
        own == ["--seeds", "0"]
        and tokenizer == ["--max_train_steps", "5"]
        and classifier == ["--max_train_steps", "3"]
    )


@pytest.mark.slow
def test_the_real_scripts_run_and_a_rerun_reuses_them(tmp_path):
    tiny = ["--hidden_size", "16", "--residual_hidden_size", "8", "--embedding_dim", "8", "--codebook_size", "16",
            "--max_train_steps", "4", "--max_train_samples", "256"]  # fmt: skip
    command = [sys.executable, str(ROOT / "study" / "check_defaults.py"), "--seeds", "0", "--output_dir", tmp_path,
               "--tokenizer_args", *tiny, "--classifier_args", "--max_train_steps", "3", "--max_train_samples", "256"]  # fmt: skip
    first = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    measured = json.loads((tmp_path / "defaults-digits.json").read_text())
    assert {r["quantizer"] for r in measured} == {"hyperbolic", "kmeans"}
    for run in measured:  # the numbers are the scripts' own final evaluations
        folder = tmp_path / "digits" / f"{run['quantizer']}-seed0"
        assert run["accuracy"] == json.loads((folder / "classifier" / "eval_results.json").read_text())["accuracy"]
        args = json.loads((folder / "tokenizer" / "all_results.json").read_text())["args"]
        assert args["quantizer"] == run["quantizer"] and args["max_train_steps"] == 4
    report = (tmp_path / "DEFAULTS-digits.md").read_text()
    assert "| HyperVQ uses at least 90% of its codes |" in report and "| kmeans | 0 |" in report
    again = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "train_vqvae.py" not in again.stdout  # every run reused
    assert json.loads((tmp_path / "defaults-digits.json").read_text()) == measured
    # a run cut off after its last checkpoint resumes from it (a fresh start would refuse the folder's checkpoints)
    (tmp_path / "digits" / "kmeans-seed0" / "classifier" / "eval_results.json").unlink()
    resumed = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("train_classifier.py") == 1 and "resumed from" in resumed.stderr
    assert json.loads((tmp_path / "defaults-digits.json").read_text()) == measured
