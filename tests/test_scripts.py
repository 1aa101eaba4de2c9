"""The training and evaluation scripts, run for real as subprocesses: outputs, two-process training, kill and
resume, and clear errors."""

import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, pipeline

import hf_hypervq  # noqa: F401
from hf_hypervq import HyperVQImageProcessor


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# A tokenizer small enough for a test: 8×8 digits -> 2×2 codes of 8 dims from 16.
TINY_VQVAE = [
    "--hidden_size", "16", "--residual_hidden_size", "8", "--embedding_dim", "8", "--codebook_size", "16",
    "--image_size", "8", "--per_device_train_batch_size", "32", "--max_train_samples", "200",
    "--max_eval_samples", "51", "--per_device_eval_batch_size", "20",
]  # fmt: skip


def run_script(name, *args, timeout=300, check=True):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("tokenizer")
    run_script(
        "train_vqvae.py", "--output_dir", output, "--max_train_steps", "12", "--with_tracking", "--logging_steps", "4",
        *TINY_VQVAE,
    )  # fmt: skip
    return output


@pytest.mark.parametrize(
    "name",
    ["train_vqvae", "train_classifier", "train_vqsa", "evaluate_model", "train_prior", "sample", "push_to_hub",
     "push_metric", "reproduce", "ablate"],
)  # fmt: skip
def test_help_documents_every_flag(name):
    if name in ("reproduce", "ablate"):  # the study's commands, in study/
        spec = importlib.util.spec_from_file_location(name, ROOT / "study" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"hf_hypervq.commands.{name}")
    parser = module.build_parser()
    for action in parser._actions:
        if action.help != "==SUPPRESS==":
            assert action.help, action.option_strings
    assert "--output_dir" in parser.format_help() or name in ("evaluate_model", "sample", "push_to_hub", "push_metric")


def test_train_vqvae_output_folder(tokenizer_dir):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "reconstructions.png",
                 "codebook_usage.png", "eval_results.json", "all_results.json", "modeling_hypervq.py"):  # fmt: skip
        assert (tokenizer_dir / name).exists(), name
    modes = {name: (tokenizer_dir / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes["model.safetensors"] == modes["config.json"], modes  # the weights used to be 0600
    model = AutoModel.from_pretrained(tokenizer_dir)
    assert model.config.codebook_size == 16
    results = json.loads((tokenizer_dir / "all_results.json").read_text())
    assert results["step"] == 12 and results["num_eval_samples"] == 51
    assert 1 <= results["perplexity"] <= 16 and results["reconstruction_mse"] > 0
    assert sum(results["code_counts"]) == 51 * 2 * 2
    assert results["weights_identical_across_processes"]
    # collapse diagnostics: training samples against the eval argmax, dead codes, how decided the MLR is
    assert 1 <= results["train_perplexity"] <= 16 and 0 < results["train_codes_used"] <= 1
    assert results["dead_codes"] == sum(count == 0 for count in results["code_counts"])
    assert 1 / 16 <= results["mean_max_probability"] <= 1
    # the default temperature rule reaches tau_min at the run's last update: the 12th runs at num_updates = 11
    tau_max, tau_min, decay = model.config.gumbel_temperature
    assert tau_max * decay**11 == pytest.approx(tau_min)
    evaluation = json.loads((tokenizer_dir / "eval_results.json").read_text())
    assert (
        evaluation["dataset"] == "scikit-learn/digits"
        and "silhouette" in evaluation
        and "noisy_silhouette" in evaluation
    )
    # PSNR and SSIM beside MSE, and the protocol beside every number
    assert evaluation["psnr"] > 0 and -1 <= evaluation["ssim"] <= 1
    assert evaluation["protocol"] == {
        "dataset": "scikit-learn/digits", "split": "test", "num_images": 51, "resolution": [8, 8],
        "tokens_per_image": 4, "token_grid": [2, 2], "downsampling_factor": 4, "pixel_range": 2.0,
        "ssim_window": "uniform 7x7", "cluster_points": 204,
    }  # fmt: skip


def test_with_tracking_writes_tensorboard_scalars(tokenizer_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tokenizer_dir / "runs" / "train_vqvae")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/train_perplexity", "train/learning_rate", "eval/reconstruction_mse"} <= tags
    # the collapse diagnostics, per epoch
    assert {"eval/train_perplexity", "eval/perplexity", "eval/codes_used", "eval/dead_codes",
            "eval/mean_max_probability"} <= tags  # fmt: skip
    assert [event.step for event in events.Scalars("train/loss")] == [4, 8, 12]


def test_classifier_and_evaluate_scripts(tokenizer_dir, tmp_path):
    output = tmp_path / "classifier"
    run_script(
        "train_classifier.py", "--tokenizer", tokenizer_dir, "--output_dir", output, "--max_train_steps", "10",
        "--max_train_samples", "200", "--max_eval_samples", "51", "--classifier_hidden_size", "16",
    )  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(output)
    assert model.config.id2label[3] == "3" and not any(p.requires_grad for p in model.hypervq.parameters())
    # the default head standardises the features with statistics learned in training, saved with the model
    assert model.config.classifier_normalize_features and int(model.feature_norm.num_batches_tracked) == 10
    assert model.feature_norm.running_var.ne(1).all()
    tokenizer_weights = load_file(tokenizer_dir / "model.safetensors")
    for name, value in model.hypervq.state_dict().items():  # the tokenizer really stayed frozen
        assert torch.equal(value, tokenizer_weights[name]), name
    accuracy = json.loads((output / "eval_results.json").read_text())["accuracy"]
    assert 0 <= accuracy <= 1
    # the classifier's outputs carry no tokens: its log shows no training-code usage rather than a made-up 1 and 0
    assert not {"train_perplexity", "train_codes_used"} & set(json.loads((output / "all_results.json").read_text()))
    assert pipeline("image-classification", model=str(output), trust_remote_code=False)(
        str(ROOT / "tests" / "data" / "digit.png")
    )[0]["label"] in {str(d) for d in range(10)}

    result = run_script(  # its images decoded by two loader workers: the same accuracy
        "evaluate_model.py", output, "--max_eval_samples", "51", "--output_file", tmp_path / "again.json",
        "--dataloader_num_workers", "2",
    )  # fmt: skip
    assert json.loads((tmp_path / "again.json").read_text())["accuracy"] == pytest.approx(accuracy)
    run_script("evaluate_model.py", tokenizer_dir, "--max_eval_samples", "51", "--output_file", tmp_path / "tok.json")
    saved = json.loads((tokenizer_dir / "eval_results.json").read_text())
    again = json.loads((tmp_path / "tok.json").read_text())
    assert again["reconstruction_mse"] == pytest.approx(saved["reconstruction_mse"], rel=1e-5)
    assert f"{tmp_path / 'again.json'}: " in result.stdout  # the summary line names the file it wrote
    tokenizer_summary = run_script("evaluate_model.py", tokenizer_dir, "--max_eval_samples", "51", "--output_file",
                                   tmp_path / "tok2.json").stdout  # fmt: skip
    assert (
        "protocol: scikit-learn/digits test, 51 images, 8x8 pixels, 4 tokens per image (2x2 grid, downsampling 4)"
        in (tokenizer_summary)
    )


def test_train_vqsa_with_corruptions_and_mce(tmp_path):
    output = tmp_path / "vqsa"
    run_script(
        "train_vqsa.py", "--output_dir", output, "--max_train_steps", "4", "--max_train_samples", "64",
        "--max_eval_samples", "20", "--per_device_train_batch_size", "16", "--codebook_size", "8",
        "--image_size", "32",
    )  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(output)
    assert type(model).__name__ == "HyperVQSAForImageClassification"
    assert 0 <= json.loads((output / "eval_results.json").read_text())["accuracy"] <= 1
    run_script(
        "evaluate_model.py", output, "--max_eval_samples", "8", "--corruptions", "extra", "--severities", "1", "5",
        "--output_file", tmp_path / "mce.json",
    )  # fmt: skip
    result = json.loads((tmp_path / "mce.json").read_text())
    assert set(result["corruption_errors"]) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert result["mCE"] is None and result["unknown_mCE"] >= 0


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPTS / "train_vqvae.py"), "--cpu",
        "--output_dir", str(output), "--max_train_steps", "6", *TINY_VQVAE,
    ]  # fmt: skip
    result = subprocess.run(
        command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU" in result.stderr and "processes: 2" in result.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["weights_identical_across_processes"]
    assert results["num_eval_samples"] == 51  # 51 images over 2 processes: the padded duplicate is dropped
    AutoModel.from_pretrained(output)


@pytest.mark.slow
def test_an_error_under_two_processes_ends_the_output(tmp_path):
    """The other process's gloo traceback used to bury the `error:` line; now the launcher's summary ends with it."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPTS / "train_vqvae.py"), "--cpu",
        "--output_dir", str(tmp_path), "--dataset", "nobody/no-such-dataset", *TINY_VQVAE,
    ]  # fmt: skip
    result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    last = [line for line in result.stderr.strip().splitlines() if line.strip("= ")][-1]
    assert "error: cannot load data set 'nobody/no-such-dataset'" in last


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["--max_train_steps", "60", "--checkpointing_steps", "5", "--seed", "3", *TINY_VQVAE]
    run_script("train_vqvae.py", "--output_dir", tmp_path / "straight", *args)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train_vqvae.py"), "--output_dir", str(interrupted), *args],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (interrupted / "checkpoints" / "step_10").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "config.json").exists()  # no final model from a killed run
    complete = sorted(p for p in (interrupted / "checkpoints").iterdir() if not p.name.startswith(".partial"))
    assert complete  # a half-written checkpoint never takes a final name

    run_script("train_vqvae.py", "--output_dir", interrupted, "--resume_from_checkpoint", "latest", *args)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name  # bit for bit, as the README promises
    assert json.loads((interrupted / "all_results.json").read_text())["step"] == 60


@pytest.mark.slow
def test_data_file_evaluates_on_a_held_out_split_and_records_it(tmp_path):
    from datasets import Dataset

    images = [Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype("uint8")) for i in range(40)]
    Dataset.from_dict({"image": images, "label": [i % 2 for i in range(40)]}).to_parquet(tmp_path / "data.parquet")
    common = ["--dataset", tmp_path / "data.parquet", *TINY_VQVAE, "--max_train_steps", "2"]
    refused = run_script("train_vqvae.py", "--output_dir", tmp_path / "refused", *common, check=False)
    assert refused.returncode == 2 and "--validation_split_percentage" in refused.stderr
    run_script("train_vqvae.py", "--output_dir", tmp_path / "out", *common, "--validation_split_percentage", "25")
    evaluation = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert evaluation["split"] == "train (25% held out, seed 0)" and evaluation["num_eval_samples"] == 10


def test_a_prior_folder_as_tokenizer_is_one_clear_error(tmp_path, run_command):
    from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel

    HyperVQPriorModel(HyperVQPriorConfig(codebook_size=16, num_layers=2)).save_pretrained(tmp_path / "prior")
    HyperVQImageProcessor().save_pretrained(tmp_path / "prior")
    status, stderr = run_command(
        "train_classifier", "--tokenizer", tmp_path / "prior", "--output_dir", tmp_path / "out"
    )
    assert status == 2 and "holds a 'hypervq_prior' model" in stderr.strip().splitlines()[-1]
    # train_prior.py used to load the prior with AutoModel and fail deep in tokenization (AttributeError)
    status, stderr = run_command("train_prior", "--tokenizer", tmp_path / "prior", "--output_dir", tmp_path / "out2")
    last = stderr.strip().splitlines()[-1]
    assert status == 2
    assert f"--tokenizer {tmp_path / 'prior'} holds a token prior, not a tokenizer" in last


@pytest.mark.parametrize(
    "damage, message",
    [("truncated weights", "model.safetensors is damaged"), ("no model_type", "config.json has no `model_type`"),
     ("bad quantizer_type", "config.json: `quantizer_type` must be one of"), ("missing", ": no such folder")],
)  # fmt: skip
def test_a_damaged_model_folder_is_one_line_naming_it(damage, message, tokenizer_dir, tmp_path, run_command):
    folder = tmp_path / "tokenizer"
    if damage != "missing":
        shutil.copytree(tokenizer_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    config = json.loads((tokenizer_dir / "config.json").read_text())
    if damage == "truncated weights":
        weights = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "no model_type":
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    elif damage == "bad quantizer_type":
        (folder / "config.json").write_text(json.dumps({**config, "quantizer_type": "nearest"}))
    commands = [("evaluate_model", folder)]
    if damage == "missing":  # it used to say "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
        commands.append(("train_classifier", "--tokenizer", folder, "--output_dir", tmp_path / "out"))
    for name, *args in commands:
        status, stderr = run_command(name, *args)
        assert status == 2 and message in stderr.strip().splitlines()[-1], stderr[-2000:]


@pytest.mark.slow
def test_a_truncated_optimizer_state_stops_the_resume_naming_the_file(tmp_path):
    args = ["--max_train_steps", "2", "--checkpointing_steps", "2", *TINY_VQVAE]
    run_script("train_vqvae.py", "--output_dir", tmp_path, *args)
    optimizer = tmp_path / "checkpoints" / "step_2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = run_script("train_vqvae.py", "--output_dir", tmp_path, *args, "--resume_from_checkpoint", "latest",
                        check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "optimizer.bin is damaged" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_resume_edge_cases(tmp_path):
    args = ["--max_train_steps", "4", "--checkpointing_steps", "2", *TINY_VQVAE]
    run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args)
    before = load_file(tmp_path / "run" / "model.safetensors")
    first = json.loads((tmp_path / "run" / "all_results.json").read_text())
    # rerunning a finished run with 'latest' evaluates again and changes nothing (it used to train one more update)
    run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args, "--resume_from_checkpoint", "latest")
    after = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(after[name], value) for name, value in before.items())
    again = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert again["step"] == 4 and again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    # resumed mid-epoch (all 4 updates are in epoch 0): the epoch's loss covers the batches before the checkpoint
    # too (it used to cover only those after it)
    run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args, "--resume_from_checkpoint",
               tmp_path / "run" / "checkpoints" / "step_2")  # fmt: skip
    resumed = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert resumed["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    assert resumed["train_perplexity"] == pytest.approx(first["train_perplexity"], rel=1e-6)
    assert all(torch.equal(load_file(tmp_path / "run" / "model.safetensors")[n], v) for n, v in before.items())
    # a new run into a folder with another run's checkpoints is refused before training
    refused = run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args, check=False)
    assert refused.returncode == 2 and "holds checkpoints of an earlier run" in refused.stderr
    # unless it asks to start over: the old checkpoints go, the new run's come
    run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args, "--overwrite_output_dir", "--seed", "9")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    overwritten = load_file(tmp_path / "run" / "model.safetensors")
    assert any(not torch.equal(overwritten[name], value) for name, value in before.items())  # another seed's run
    # a resume that asks for another codebook size (its weights would not fit) is one line naming both
    other_k = [*args, "--codebook_size", "32"]  # TINY_VQVAE's 16 is overridden by the later flag
    changed = run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *other_k, "--resume_from_checkpoint",
                         "latest", check=False)  # fmt: skip
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-2000:]
    assert (
        "the checkpoint was made with K=16 codes and this run asks for K=32" in changed.stderr.strip().splitlines()[-1]
    )
    # a checkpoint without its random states stops the resume
    (tmp_path / "run" / "checkpoints" / "step_4" / "random_states_0.pkl").unlink()
    broken = run_script("train_vqvae.py", "--output_dir", tmp_path / "run", *args, "--resume_from_checkpoint",
                        "latest", check=False)  # fmt: skip
    assert broken.returncode == 2 and "has no random_states_0.pkl" in broken.stderr


@pytest.mark.parametrize("flags, message", [(["--checkpoints_total_limit", "-1"], "checkpoints_total_limit"),
                                            (["--checkpointing_steps", "0"], "checkpointing_steps"),
                                            (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
                                             "pass one of them")])  # fmt: skip
def test_checkpoint_flags_that_would_keep_nothing_are_refused(flags, message, tmp_path, run_command):
    status, stderr = run_command("train_vqvae", "--output_dir", tmp_path, *TINY_VQVAE, *flags)
    assert status == 2 and message in stderr


def _learning_rates(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "runs" / "train_vqvae")).Reload()
    return [(e.step, e.value) for e in events.Scalars("train/learning_rate")]


@pytest.mark.slow
def test_cosine_schedule_with_accumulation_steps_per_update_and_resumes(tmp_path):
    """The schedule moves once per optimizer update (not per micro-batch), reaches 0 at the last update, lives in
    the checkpoint, and a resumed run ends with the weights of an uninterrupted one."""
    common = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--gradient_accumulation_steps", "2",
              "--num_warmup_steps", "2", "--with_tracking", "--logging_steps", "1", "--seed", "1", *TINY_VQVAE]  # fmt: skip
    args = [*common, "--lr_scheduler_type", "cosine"]
    straight = tmp_path / "straight"
    run_script("train_vqvae.py", "--output_dir", straight, *args)
    rates = _learning_rates(straight)
    # the rate logged after update j is the one update j + 1 will use: warm-up 2 updates, cosine over the other 6
    expected = [
        1e-3 * min(1.0, j / 2) if j < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (j - 2) / 6)) for j in range(1, 9)
    ]
    assert [step for step, _ in rates] == list(range(1, 9))
    assert [rate for _, rate in rates] == pytest.approx(expected, abs=1e-9)

    resumed = tmp_path / "resumed"
    run_script("train_vqvae.py", "--output_dir", resumed, *args)
    (resumed / "model.safetensors").unlink()
    run_script("train_vqvae.py", "--output_dir", resumed, *args, "--resume_from_checkpoint",
               resumed / "checkpoints" / "step_4")  # fmt: skip
    for name, value in load_file(straight / "model.safetensors").items():
        assert torch.equal(load_file(resumed / "model.safetensors")[name], value), name
    # the epoch's training loss and code counts continue across the resume (they used to restart at it)
    straight_results, resumed_results = (json.loads((d / "all_results.json").read_text()) for d in (straight, resumed))
    for key in ("train_loss", "train_perplexity"):
        assert resumed_results[key] == pytest.approx(straight_results[key], rel=1e-6), key

    constant = tmp_path / "constant"
    run_script("train_vqvae.py", "--output_dir", constant, *common, "--lr_scheduler_type", "constant")
    weights = load_file(straight / "model.safetensors")
    assert any(not torch.equal(load_file(constant / "model.safetensors")[n], v) for n, v in weights.items())


@pytest.mark.slow
def test_a_stream_is_shuffled_and_resumes_where_it_stopped(tmp_path):
    """Streams used to be read in order, and a resume replayed them from the start."""
    args = ["--streaming", "--max_train_steps", "10", "--checkpointing_steps", "3", "--checkpoints_total_limit", "4",
            "--shuffle_buffer_size", "64", *TINY_VQVAE]  # fmt: skip
    straight = tmp_path / "straight"
    run_script("train_vqvae.py", "--output_dir", straight, *args)
    weights = load_file(straight / "model.safetensors")
    # 200 examples in batches of 32: 7 batches an epoch, so step 3 is inside epoch 0 and step 9 inside epoch 1
    for step in (3, 9):
        run_script("train_vqvae.py", "--output_dir", straight, *args, "--resume_from_checkpoint",
                   straight / "checkpoints" / f"step_{step}")  # fmt: skip
        resumed = load_file(straight / "model.safetensors")
        assert all(torch.equal(resumed[name], value) for name, value in weights.items()), step
    in_order = tmp_path / "in_order"
    run_script("train_vqvae.py", "--output_dir", in_order, *args, "--shuffle_buffer_size", "0")
    assert any(not torch.equal(load_file(in_order / "model.safetensors")[n], v) for n, v in weights.items())


# train_vqvae, noting the epoch and labels of the stream examples this process decodes in DECODED_DIR/rank<N>.json
RECORDING_DECODES = """
import json, os, sys, time
from accelerate import Accelerator
from hf_hypervq.commands.train_vqvae import main
from hf_hypervq.training import data

decoded, transform, end_training = [], data.ImageStream._transform, Accelerator.end_training
data.ImageStream._transform = lambda self, batch, positions: (
    decoded.append([self.transform.epoch, batch["label"]]) or transform(self, batch, positions)
)


def ending(accelerator):
    end_training(accelerator)
    with open(os.path.join(os.environ["DECODED_DIR"], f"rank{accelerator.process_index}.json"), "w") as file:
        json.dump(decoded, file)
    # gloo's threads finish the last collective first: a group freed while one of them waits for the GIL hangs the
    # process (pytorch/pytorch#56297; it hung this test once, in process 1, which frees it right after a barrier)
    time.sleep(1)


Accelerator.end_training = ending
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_processes_stream_their_own_parts_to_the_same_weights(tmp_path):
    """Each process decodes only its part of the stream (process 0 used to decode every image and send the others
    their batches), and a part of 33 examples (2 batches) against one of 32 (1 batch) neither hangs nor fails: the
    shorter goes round again until both have read theirs, so each epoch ends after 2 updates everywhere. Two runs
    end with the same weights, and so does one resumed at the update where an epoch ended."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(65)]
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    Dataset.from_dict({"image": images, "label": list(range(65))}, features=features).save_to_disk(tmp_path / "data")
    (tmp_path / "recording.py").write_text(RECORDING_DECODES)

    def train(output, *extra):
        decoded = tmp_path / f"decoded-{output}-{len(extra)}"
        decoded.mkdir()
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(tmp_path / "recording.py"), "--cpu",
            "--output_dir", str(tmp_path / output), "--dataset", str(tmp_path / "data"), "--streaming",
            "--max_train_steps", "7", "--logging_steps", "2", "--checkpointing_steps", "3",
            "--shuffle_buffer_size", "16", *TINY_VQVAE, "--max_train_samples", "65", *extra,
        ]  # fmt: skip
        result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "1", "DECODED_DIR": str(decoded)},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        results = json.loads((tmp_path / output / "all_results.json").read_text())
        assert results["num_processes"] == 2 and results["weights_identical_across_processes"]
        assert results["step"] == 7 and results["epoch"] == 3  # epochs of 2 updates: 1-2, 3-4, 5-6, then 7
        return [json.loads((decoded / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    for records in (train("first"), train("second")):
        for epoch in (0, 1, 2):  # every other example of the epoch's shuffled stream each, so not the same ones
            parts = [{label for e, labels in chunks if e == epoch for label in labels} for chunks in records]
            assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(65)), epoch
            assert sorted(map(len, parts)) == [32, 33]
    weights = load_file(tmp_path / "first" / "model.safetensors")
    assert all(torch.equal(load_file(tmp_path / "second" / "model.safetensors")[n], v) for n, v in weights.items())
    train("first", "--resume_from_checkpoint", tmp_path / "first" / "checkpoints" / "step_6")
    assert all(torch.equal(load_file(tmp_path / "first" / "model.safetensors")[n], v) for n, v in weights.items())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantizer", "nearest"], "invalid choice: 'nearest'"),
        (["--codebook_size", "1"], "codebook_size"),
        (["--dataset", "nobody/no-such-dataset"], "cannot load data set 'nobody/no-such-dataset'"),
        (["--image_column", "pixels"], "--image_column 'pixels' is not a column"),
        (["--resume_from_checkpoint", "/no/such/step_3"], "is not a checkpoint folder"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate=-1e-3"], "--learning_rate must be a finite number > 0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be a finite number >= 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--dataloader_num_workers", "-2"], "--dataloader_num_workers must be >= 0"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be >= 1"),
        (["--image_size", "10"], "--image_size must be a positive multiple of 2**num_downsamples = 4"),
        (["--mixed_precision", "fp16", "--cpu"], "fp16 needs a GPU"),
        (["--torch_compile", "--torch_compile_backend", "tensorrtt"], "--torch_compile_backend must be one of"),
        (["--dataset_revision", "v1"], "--dataset_revision applies to a Hub data set"),
        (
            ["--dataset", "uoft-cs/cifar100", "--push_to_hub", "--hub_model_id", "org/x"],
            "--push_to_hub needs --license",
        ),
        (
            ["--push_to_hub", "--hub_model_id", "org/bad--name"],
            "--hub_model_id 'org/bad--name' is not a valid repo id",
        ),
    ],
)
def test_bad_input_is_one_clear_error_before_training(args, message, tmp_path, run_command):
    status, stderr = run_command("train_vqvae", "--output_dir", tmp_path / "out", *TINY_VQVAE, *args)
    assert status == 2
    assert message in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_input_from_the_script_is_one_line_and_exit_status_2(tmp_path):
    """The same check through `scripts/train_vqvae.py` in its own process: the line, the status, no traceback."""
    result = run_script("train_vqvae.py", "--output_dir", tmp_path / "out", *TINY_VQVAE, "--seed", "-1", check=False)
    assert result.returncode == 2
    assert "--seed must be >= 0" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--severities", "0", "3"], "--severities must be between 1 and 5"), (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
     (["--max_eval_samples", "0"], "--max_eval_samples")],
)  # fmt: skip
def test_evaluate_checks_its_flags_before_loading_anything(args, message, tmp_path, run_command):
    status, stderr = run_command("evaluate_model", tmp_path / "no-model-needed-yet", *args)
    assert status == 2 and message in stderr


def test_an_output_path_that_cannot_take_results_is_refused_before_training(tmp_path, run_command):
    (tmp_path / "file").write_text("not a folder")
    status, stderr = run_command("train_vqvae", "--output_dir", tmp_path / "file", *TINY_VQVAE)
    assert status == 2 and "is a file, not a folder" in stderr
    status, stderr = run_command("train_vqvae", "--output_dir", tmp_path / "file" / "out", *TINY_VQVAE)
    assert status == 2 and "is not writable" in stderr  # a folder below a file cannot be made


def test_unreadable_image_in_a_folder_is_reported(tmp_path, run_command):
    from PIL import Image

    for split in ("train", "test"):
        folder = tmp_path / "data" / split / "a"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "bad.png").write_bytes(b"not an image")
    status, stderr = run_command("train_vqvae", "--output_dir", tmp_path / "out", "--dataset", tmp_path / "data")
    assert status == 2 and "unreadable image" in stderr and "bad.png" in stderr


@pytest.mark.slow
def test_torch_compile_trains_the_compiled_model_and_saves_plain_weights(tmp_path):
    """`--torch_compile` hands `accelerator.prepare` a dynamo plugin; the saved weights must carry the model's own
    names (not the compiled wrapper's `_orig_mod.`) and equal an eager run's to float32 rounding. (aot_eager: the
    inductor kernels are tested in test_quantizers.py, and generating C++ for a whole model takes minutes here.)"""
    args = ["--max_train_steps", "3", "--seed", "2", *TINY_VQVAE]
    run_script("train_vqvae.py", "--output_dir", tmp_path / "eager", *args)
    run_script("train_vqvae.py", "--output_dir", tmp_path / "compiled", *args, "--torch_compile",
               "--torch_compile_backend", "aot_eager")  # fmt: skip
    eager, compiled = (load_file(tmp_path / name / "model.safetensors") for name in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_scripts_are_thin_wrappers_of_the_commands():
    """`scripts/` holds only the commands users run, each a wrapper of `hf_hypervq.commands.<name>.main`, so that
    console entry points can call the same code."""
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert {path.stem for path in scripts} == {
        "train_vqvae", "train_classifier", "train_prior", "train_vqsa", "tokenize_dataset", "sample",
        "evaluate_model", "push_to_hub", "push_metric",
    }  # fmt: skip
    for path in scripts:
        text = path.read_text()
        assert f"from hf_hypervq.commands.{path.stem} import main\n" in text, path.name
        assert len(text.splitlines()) <= 15, f"{path.name} holds code: move it to hf_hypervq.commands.{path.stem}"
        assert callable(importlib.import_module(f"hf_hypervq.commands.{path.stem}").main)


def test_every_command_is_a_console_entry_point():
    """A `pip install` user has the commands, not scripts/: `[project.scripts]` names each command's `main`."""
    import tomllib

    from hf_hypervq.training.outputs import COMMANDS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {entry: f"hf_hypervq.commands.{name}:main" for name, entry in COMMANDS.items()}
    assert {f"hf_hypervq.commands.{path.stem}:main" for path in SCRIPTS.glob("*.py")} == set(declared.values())


def test_old_flag_spellings_still_work_with_a_deprecation_line(tmp_path, capsys):
    from hf_hypervq.commands import push_to_hub, tokenize_dataset

    args = tokenize_dataset.parse_args(["--tokenizer", "org/tok", "--output_dir", str(tmp_path), "--batch_size", "8",
                                        "--max_samples", "5", "--repo_id", "org/x", "--private"])  # fmt: skip
    assert (args.per_device_eval_batch_size, args.max_train_samples, args.max_eval_samples) == (8, 5, 5)
    assert (args.hub_dataset_id, args.hub_private_repo) == ("org/x", True)
    parser = push_to_hub.build_parser()
    args = parser.parse_args([str(tmp_path), "--repo_id", "org/x", "--token", "t", "--revision", "dev"])
    assert (args.repo_id, args.hub_token, args.hub_revision) == ("org/x", "t", "dev")
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        "warning: --batch_size is deprecated and will be removed in the next release: use --per_device_eval_batch_size"
        in lines
        and len(lines) == 7
    )
    assert "--private" not in parser.format_help() and "--hub_private_repo" in parser.format_help()
