"""The token prior (Gated PixelCNN), sampling, codebook pictures, FID and IS, and the generation scripts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from transformers import AutoModel

from hf_hypervq import (
    HyperVQImageProcessor,
    HyperVQPriorConfig,
    HyperVQPriorModel,
    HyperVQVAEConfig,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
    metrics,
)
from hf_hypervq.metrics.fid_inception_score.fid_inception_score import frechet_distance, inception_score


ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY_PRIOR = dict(codebook_size=12, hidden_size=8, num_layers=3, head_hidden_size=16, grid_size=[4, 5])


def tiny_prior(**overrides) -> HyperVQPriorModel:
    return HyperVQPriorModel(HyperVQPriorConfig(**{**TINY_PRIOR, **overrides})).eval()


@pytest.mark.parametrize("num_layers, first_kernel", [(1, 3), (3, 7), (5, 5)])
def test_logits_of_a_token_do_not_depend_on_it_or_later_tokens(num_layers, first_kernel):
    prior = tiny_prior(num_layers=num_layers, first_kernel_size=first_kernel)
    tokens = torch.randint(0, 12, (2, 4, 5))
    with torch.no_grad():
        logits = prior(image_tokens=tokens).logits
        for position in range(20):
            changed = tokens.clone().view(2, -1)
            changed[:, position:] = (changed[:, position:] + torch.randint(1, 12, changed[:, position:].shape)) % 12
            row, column = divmod(position, 5)
            after = prior(image_tokens=changed.view(2, 4, 5)).logits
            torch.testing.assert_close(after[:, :, row, column], logits[:, :, row, column])


def test_logits_see_earlier_tokens_including_above_right():
    """No blind spot: a token's logits depend on the row above to its right (gated PixelCNN's vertical stack)."""
    prior = tiny_prior(num_layers=3, first_kernel_size=3)
    tokens = torch.randint(0, 12, (1, 4, 5))
    with torch.no_grad():
        logits = prior(image_tokens=tokens).logits
        for earlier in [(1, 3), (2, 1), (2, 0)]:  # above-right, directly left, further left of (2, 2)
            changed = tokens.clone()
            changed[0, earlier[0], earlier[1]] = (changed[0, earlier[0], earlier[1]] + 1) % 12
            assert not torch.allclose(prior(image_tokens=changed).logits[0, :, 2, 2], logits[0, :, 2, 2]), earlier


def test_class_conditioning_and_bad_inputs():
    prior = tiny_prior(num_classes=3)
    tokens = torch.randint(0, 12, (2, 4, 5))
    a = prior(image_tokens=tokens, class_labels=torch.tensor([0, 0])).logits
    b = prior(image_tokens=tokens, class_labels=torch.tensor([2, 2])).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        prior(image_tokens=tokens)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior()(image_tokens=tokens, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        tiny_prior()(image_tokens=torch.full((1, 4, 5), 12))
    with pytest.raises(ValueError, match="height, width"):
        tiny_prior()(image_tokens=torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="odd"):
        HyperVQPriorConfig(kernel_size=4)
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="`num_images` must be a positive integer"):
            tiny_prior().sample(bad)
    for bad in (float("nan"), 0.0, float("inf")):
        with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
            tiny_prior().sample(1, temperature=bad)


def test_loss_is_cross_entropy_and_training_lowers_it():
    prior = tiny_prior().train()
    tokens = torch.randint(0, 3, (16, 4, 5))  # a skewed distribution a prior can learn
    out = prior(image_tokens=tokens)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, tokens))
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    first = out.loss.item()
    for _ in range(30):
        loss = prior(image_tokens=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 0.5


def test_sampling_is_seeded_and_temperature_sharpens(tmp_path):
    prior = tiny_prior()
    a, b = prior.sample(6, seed=1), prior.sample(6, seed=1)
    assert torch.equal(a, b) and a.shape == (6, 4, 5) and a.dtype == torch.int64
    assert not torch.equal(a, prior.sample(6, seed=2))
    assert prior.sample(2, grid_size=(3, 3), seed=0).shape == (2, 3, 3)
    cold, hot = prior.sample(200, seed=0, temperature=0.1), prior.sample(200, seed=0, temperature=10.0)
    assert len(cold[:, 0, 0].unique()) < len(hot[:, 0, 0].unique())
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(1, temperature=0)

    prior.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is HyperVQPriorModel
    tokens = torch.randint(0, 12, (2, 4, 5))
    assert torch.equal(loaded(image_tokens=tokens).logits, prior(image_tokens=tokens).logits)
    assert torch.equal(loaded.sample(3, seed=5), prior.sample(3, seed=5))


def test_decode_codebook_is_each_code_as_a_one_by_one_latent():
    tokenizer = HyperVQVAEModel(
        HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16)
    )
    images = tokenizer.decode_codebook()
    assert images.shape == (16, 3, 4, 4)
    torch.testing.assert_close(images[5:6], tokenizer.decode_tokens(torch.tensor([[[5]]])))


def test_frechet_distance_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) * 2 + 1
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: sum((sqrt(s_a) - sqrt(s_b))^2) + |mu_a - mu_b|^2, exactly
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])
    y = x * 3 + 1
    sx, sy = x.double().var(0), y.double().var(0)
    closed = ((x.double().mean(0) - y.double().mean(0)) ** 2).sum() + ((sx.sqrt() - sy.sqrt()) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(closed.item())


def test_inception_score_by_hand():
    assert inception_score(torch.full((100, 10), 0.1), splits=5) == pytest.approx((1.0, 0.0))
    one_hot = torch.eye(4).repeat(25, 1)  # confident and evenly spread over 4 classes
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(4.0, rel=1e-6)
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    marginal = p.mean(0)
    kl = (p * (p / marginal).log()).sum(1).mean()
    assert inception_score(p, splits=1)[0] == pytest.approx(kl.exp().item(), rel=1e-9)


def test_fid_module_needs_the_extractor_and_matches_the_functions():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g) + 1
    probabilities = torch.softmax(torch.randn(40, 5, generator=g), -1)
    module = metrics.load("fid_inception_score")
    inputs = dict(predictions=torch.cat([real, fake.double()]).numpy(), references=[0] * 50 + [1] * 40)
    with pytest.raises(ValueError, match="`feature_extractor` is required"):
        module.compute(**inputs)
    result = module.compute(**inputs, probabilities=probabilities.numpy(), splits=4, feature_extractor="toy (sha 1)")
    assert result["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-9)
    assert result["inception_score"] == pytest.approx(inception_score(probabilities, splits=4)[0], rel=1e-6)
    assert (result["num_real"], result["num_generated"], result["feature_extractor"]) == (50, 40, "toy (sha 1)")


def run(script, *args, check=True, cwd=None):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        env={**__import__("os").environ, **ENV}, capture_output=True, text=True, timeout=600, cwd=cwd,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_prior_and_sample_with_fid_and_is(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = HyperVQVAEModel(
        HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16)
    )
    tokenizer.save_pretrained(tokenizer_dir)
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tokenizer_dir)
    classifier = HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=10)
    classifier.save_pretrained(tmp_path / "classifier")
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "classifier")

    prior_dir = tmp_path / "prior"
    run("train_prior.py", "--tokenizer", tokenizer_dir, "--output_dir", prior_dir, "--max_train_steps", "6",
        "--num_layers", "3", "--hidden_size", "8", "--head_hidden_size", "16", "--class_conditional",
        "--max_train_samples", "128", "--max_eval_samples", "30", "--num_sample_images", "8")  # fmt: skip
    prior = AutoModel.from_pretrained(prior_dir)
    assert prior.config.grid_size == [2, 2] and prior.config.num_classes == 10
    assert prior.config.tokenizer_name_or_path == str(tokenizer_dir.resolve())
    results = json.loads((prior_dir / "eval_results.json").read_text())
    assert results["num_eval_samples"] == 30 and results["bits_per_token"] > 0
    assert (prior_dir / "samples.png").exists()

    result = run("sample.py", "--prior", prior_dir, "--output", tmp_path / "grid.png", "--num_samples", "40",
                 "--feature_extractor", tmp_path / "classifier", "--class_labels", "3", "7")  # fmt: skip
    metrics = json.loads((tmp_path / "sample_metrics.json").read_text())
    assert metrics["feature_extractor"].startswith("HyperVQVAEForImageClassification from")
    assert metrics["fid"] >= 0 and metrics["inception_score"] >= 1 and metrics["protocol"]["num_samples"] == 40
    assert len(metrics["protocol"]["feature_extractor_sha256"]) == 64 and metrics["protocol"]["resolution"] == [8, 8]
    assert "features from HyperVQVAEForImageClassification" in result.stdout
    assert (tmp_path / "grid.png").exists()

    offline = run(
        "sample.py", "--prior", prior_dir, "--output", tmp_path / "g2.png", "--num_samples", "4", check=False
    )
    assert (
        offline.returncode == 2 and "cannot load the feature extractor 'timm/inception_v3.tv_in1k'" in offline.stderr
    )
    assert "Traceback" not in offline.stderr

    other = tmp_path / "other-tokenizer"  # K = 32: the prior's K = 16 tokens would decode to garbage
    HyperVQVAEModel(HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=32)
                    ).save_pretrained(other)  # fmt: skip
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(other)
    mismatch = run("sample.py", "--prior", prior_dir, "--tokenizer", other, "--output", tmp_path / "g3.png",
                   check=False)  # fmt: skip
    assert mismatch.returncode == 2 and "the prior models 16 codes but the tokenizer" in mismatch.stderr


def test_sample_decodes_the_real_images_in_loader_workers_with_the_same_fid_and_is(tmp_path, run_command):
    """Issue 34: the real images of FID were decoded one by one in the main process, at ImageNet scale the slow part."""
    tokenizer_dir = tmp_path / "tokenizer"
    HyperVQVAEModel(HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=12)
                    ).save_pretrained(tokenizer_dir)  # fmt: skip
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tokenizer_dir)
    HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=10).save_pretrained(tmp_path / "cls")
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "cls")
    tiny_prior(grid_size=[2, 2], tokenizer_name_or_path=str(tokenizer_dir)).save_pretrained(tmp_path / "prior")
    scores = {}
    for workers in (0, 2):
        metrics_file = tmp_path / f"metrics-{workers}.json"
        status, stderr = run_command(
            "sample", "--prior", tmp_path / "prior", "--num_images", "1", "--output", tmp_path / "grid.png",
            "--num_samples", "70", "--feature_extractor", tmp_path / "cls", "--metrics_file", metrics_file,
            "--dataloader_num_workers", workers,
        )  # fmt: skip
        assert status == 0, stderr
        scores[workers] = json.loads(metrics_file.read_text())
    assert scores[0]["protocol"]["num_real_images"] == 70  # two batches of the loader, the second partial
    assert scores[2] == scores[0]  # the same numbers, to the last bit


@pytest.mark.slow
def test_a_prior_finds_its_tokenizer_from_any_folder_and_a_missing_one_is_one_line(tmp_path):
    """A prior used to record the tokenizer path it was given: relative, it meant nothing from another folder, and
    `sample.py` then asked the Hub for it and printed transformers' several-line connection message."""
    work = tmp_path / "work"
    HyperVQVAEModel(HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16)
                    ).save_pretrained(work / "tokenizer")  # fmt: skip
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(work / "tokenizer")
    run("train_prior.py", "--tokenizer", "tokenizer", "--output_dir", "prior", "--max_train_steps", "2",
        "--num_layers", "2", "--hidden_size", "8", "--head_hidden_size", "16", "--max_train_samples", "64",
        "--max_eval_samples", "20", "--num_sample_images", "2", cwd=work)  # fmt: skip
    config = json.loads((work / "prior" / "config.json").read_text())
    assert config["tokenizer_name_or_path"] == str((work / "tokenizer").resolve())
    run("sample.py", "--prior", "work/prior", "--num_images", "2", "--output", "a.png", cwd=tmp_path)
    assert (tmp_path / "a.png").exists()

    def sample_with_recorded(tokenizer, check=False):
        (work / "prior" / "config.json").write_text(json.dumps({**config, "tokenizer_name_or_path": tokenizer}))
        return run("sample.py", "--prior", "work/prior", "--num_images", "2", "--output", "b.png", cwd=tmp_path,
                   check=check)  # fmt: skip

    sample_with_recorded("../tokenizer", check=True)  # an older prior's relative path: also the prior's folder's
    for recorded, message in [
        ("outputs/tokenizer", "the prior's tokenizer outputs/tokenizer: cannot load it (not a folder here, and from "
         "the Hub: "),  # not here, so a Hub id: offline, it cannot be loaded
        ("../../elsewhere/tokenizer", "the prior's tokenizer ../../elsewhere/tokenizer is not a folder here nor in "
         "the prior's folder"),
        (str(tmp_path / "moved"), f"the prior's tokenizer {tmp_path / 'moved'} is not there (moved or deleted?)"),
    ]:  # fmt: skip
        result = sample_with_recorded(recorded)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "pass --tokenizer" in last, last


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_images", "0"], "--num_images must be >= 1"),
        (["--num_samples", "1"], "--num_samples must be >= 2"),
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    ],
)
def test_sample_flags_are_checked_before_loading(flags, message, tmp_path, run_command):
    status, stderr = run_command("sample", "--prior", tmp_path / "no-such-prior", *flags)
    assert status == 2 and message in stderr  # not the missing prior: the flags come first


@pytest.mark.slow
def test_train_prior_on_two_cpu_processes(tmp_path):
    import socket

    tokenizer_dir = tmp_path / "tokenizer"
    HyperVQVAEModel(
        HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16)
    ).save_pretrained(tokenizer_dir)
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tokenizer_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "scripts" / "train_prior.py"), "--cpu", "--tokenizer", str(tokenizer_dir),
        "--output_dir", str(tmp_path / "prior"), "--max_train_steps", "4", "--num_layers", "2", "--hidden_size", "8",
        "--head_hidden_size", "16", "--max_train_samples", "101", "--max_eval_samples", "31", "--num_sample_images", "4",
    ]  # fmt: skip
    env = {**__import__("os").environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "prior" / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["weights_identical_across_processes"]
    assert results["num_eval_samples"] == 31  # every held-out grid once: gathered without the padded duplicates
