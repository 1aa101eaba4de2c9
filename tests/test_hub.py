"""Publishing: generated model cards, and the real push -> load round trip against a local Hub-protocol server."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from PIL import Image

from hf_hypervq import (
    HyperVQImageProcessor,
    HyperVQSAConfig,
    HyperVQSAForImageClassification,
    HyperVQVAEConfig,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
)
from hf_hypervq.training.hub import PublishError, build_model_card, default_repo_id, push_to_hub, write_model_card


ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16, num_residual_layers=1)
TOKENIZER_RESULTS = {"dataset": "uoft-cs/cifar100", "split": "test", "reconstruction_mse": 0.0312, "perplexity": 7.25,
                     "codes_used": 0.5, "silhouette": 0.125, "num_eval_samples": 51}  # fmt: skip


def saved_tokenizer(folder, results=TOKENIZER_RESULTS):
    HyperVQVAEModel(HyperVQVAEConfig(**TINY)).save_pretrained(folder)
    HyperVQImageProcessor(size={"height": 8, "width": 8}).save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(results))
    command = "scripts/train_vqvae.py --output_dir out --quantizer hyperbolic --max_train_steps 12"
    all_results = {**results, "step": 12, "num_processes": 1, "command": command,
                   "args": {"quantizer": "hyperbolic", "learning_rate": 0.001, "output_dir": "out"}}  # fmt: skip
    (folder / "all_results.json").write_text(json.dumps(all_results))
    (folder / "checkpoints" / "step_12").mkdir(parents=True)
    return folder


def test_tokenizer_card_metadata_and_numbers_come_from_the_files(tmp_path):
    card = build_model_card(saved_tokenizer(tmp_path), "org/hypervq-tiny")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    # offline, the Hub cannot say under which license uoft-cs/cifar100 is: "unknown", which a push refuses
    assert data.license == "unknown" and "hypervq" in data.tags and data.datasets == ["uoft-cs/cifar100"]
    assert build_model_card(tmp_path, "org/hypervq-tiny", license="mit").data.license == "mit"
    assert all(r.metric_config is None and r.metric_args is None for r in data.eval_results)  # said once, in the text
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {
        k: TOKENIZER_RESULTS[k] for k in ("reconstruction_mse", "perplexity", "codes_used", "silhouette")
    }
    assert all(r.dataset_split == "test" and r.dataset_type == "uoft-cs/cifar100" for r in data.eval_results)
    text = str(card)
    assert 'AutoModel.from_pretrained("org/hypervq-tiny")' in text
    assert 'AutoModel.from_pretrained("org/hypervq-tiny", trust_remote_code=True)' in text
    assert "accelerate launch scripts/train_vqvae.py --output_dir out" in text and "| learning_rate | 0.001 |" in text
    assert "@article{goswami2024hypervq" in text and "boundary" in text
    assert "### Codebook usage" in text and "8 of the 16 codes are used" in text and "perplexity is 7.2" in text
    card.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in reloaded} == values


def test_tokenizer_card_shows_the_collapse_diagnostics(tmp_path):
    results = {**TOKENIZER_RESULTS, "dead_codes": 8, "mean_max_probability": 0.61}
    folder = saved_tokenizer(tmp_path, results)
    everything = json.loads((folder / "all_results.json").read_text())
    (folder / "all_results.json").write_text(json.dumps({**everything, "train_perplexity": 11.5}))
    text = str(build_model_card(folder, "org/hypervq-tiny"))
    assert "(8 dead codes, never chosen)" in text and "a perplexity of 11.5" in text
    assert "mean largest code probability on that split is 0.61" in text


def test_cards_say_which_options_beyond_the_paper_a_model_was_trained_with(tmp_path):
    paper = str(build_model_card(saved_tokenizer(tmp_path / "paper"), "org/hypervq-tiny"))
    assert "**Options beyond the paper**: none: the quantizer is trained as the paper describes it" in paper
    folder = saved_tokenizer(tmp_path / "options")
    HyperVQVAEModel(HyperVQVAEConfig(**TINY, diversity_weight=0.1, feature_clip=1.0)).save_pretrained(folder)
    text = str(build_model_card(folder, "org/hypervq-tiny"))
    assert ("**Options beyond the paper**: wav2vec 2.0's codebook diversity loss, weight 0.1 (`diversity_weight`); "
            "feature clipping at radius 1.0 before the map onto the ball (`feature_clip`).") in text  # fmt: skip

    classifier = HyperVQVAEForImageClassification(HyperVQVAEConfig(**TINY, num_labels=3))
    for normalize, expected in ((True, "**Head**: a BatchNorm without affine parameters standardises"),
                                (False, "**Head**: the paper's head: conv 3×3")):  # fmt: skip
        classifier.config.classifier_normalize_features = normalize
        classifier.save_pretrained(tmp_path / f"classifier-{normalize}")
        assert expected in str(build_model_card(tmp_path / f"classifier-{normalize}", "org/hypervq-classifier"))


def test_the_tokenizer_card_says_which_augmentation_and_image_rule_trained_it(tmp_path):
    """Issue 34: a card that did not say whether the weights saw random crops and flips or only centre crops."""
    sentences = {
        "none": "**Training images**: no augmentation (`--train_augmentation none`): every training image went "
        "through the evaluation rule, that of the saved image processor: the shorter side resized to 8, then the "
        "centre 8×8 crop.",
        "crop_flip": "**Training images**: random crop and flip (`--train_augmentation crop_flip`): the shorter side "
        "resized to 8, a random 8×8 crop, flipped horizontally half the time. Evaluation used the saved image "
        "processor's rule: the shorter side resized to 8, then the centre 8×8 crop.",
    }
    for augmentation, sentence in sentences.items():
        folder = saved_tokenizer(tmp_path / augmentation)
        HyperVQImageProcessor.for_image_size(8).save_pretrained(folder)
        everything = json.loads((folder / "all_results.json").read_text())
        everything["args"] |= {"train_augmentation": augmentation, "image_size": 8}
        (folder / "all_results.json").write_text(json.dumps(everything))
        assert sentence in str(build_model_card(folder, "org/hypervq-tiny")).replace("\n", " "), augmentation
    padded = saved_tokenizer(tmp_path / "padded")  # the fashion_mnist default: 28×28 on a 32×32 canvas
    HyperVQImageProcessor(size={"height": 28, "width": 28}, do_pad=True,
                          pad_size={"height": 32, "width": 32}).save_pretrained(padded)  # fmt: skip
    assert ("the saved image processor: resized to 28×28, then centred on a 32×32 black canvas."
            in str(build_model_card(padded, "org/hypervq-tiny")))  # fmt: skip


def test_the_tokenizer_card_says_which_recipe_trained_it(tmp_path, monkeypatch):
    from hf_hypervq.commands import train_vqvae
    from hf_hypervq.training import recipes

    monkeypatch.setitem(recipes.RECIPES, "hyperbolic", {"diversity_weight": 0.03})
    lines = {}
    for recipe in ("recommended", "paper"):
        args = train_vqvae.parse_args(["--output_dir", str(tmp_path / recipe), "--recipe", recipe])
        assert args.diversity_weight == (0.03 if recipe == "recommended" else 0.0)
        folder = saved_tokenizer(tmp_path / recipe)
        everything = json.loads((folder / "all_results.json").read_text())
        everything["args"] |= {"recipe": recipe}
        (folder / "all_results.json").write_text(json.dumps(everything))
        lines[recipe] = str(build_model_card(folder, "org/hypervq-tiny")).replace("\n", " ")
    assert ("**Recipe**: the recommended recipe (`--recipe recommended`): the paper's settings with "
            "`--diversity_weight 0.03`.") in lines["recommended"]  # fmt: skip
    assert "**Recipe**: the paper's settings (`--recipe paper`)." in lines["paper"]
    given = train_vqvae.parse_args(["--output_dir", str(tmp_path / "x"), "--diversity_weight", "0.3"])
    assert given.diversity_weight == 0.3  # a flag on the command line wins over the recipe
    assert "**Recipe**" not in str(build_model_card(saved_tokenizer(tmp_path / "old"), "org/hypervq-tiny"))


def test_every_recipe_sets_flags_train_vqvae_leaves_to_it():
    from hf_hypervq import QUANTIZER_TYPES
    from hf_hypervq.commands import train_vqvae
    from hf_hypervq.training.recipes import PAPER_SETTINGS, RECIPES

    assert set(RECIPES) == set(QUANTIZER_TYPES)
    defaults = {action.dest: action.default for action in train_vqvae.build_parser()._actions}
    for flag in {*PAPER_SETTINGS, *(k for recipe in RECIPES.values() for k in recipe)}:
        assert flag in PAPER_SETTINGS and defaults[flag] is None, flag


def test_vqsa_card_names_its_base_model_and_robustness(tmp_path):
    config = HyperVQSAConfig(
        backbone_config=dict(hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), num_labels=3
    )
    HyperVQSAForImageClassification(config).save_pretrained(tmp_path)
    results = {"dataset": "ILSVRC/imagenet-1k", "split": "validation", "accuracy": 0.74, "mCE": 47.6,
               "unknown_mCE": 50.1, "corruption_errors": {"fog": 40.0}}  # fmt: skip
    (tmp_path / "eval_results.json").write_text(json.dumps(results))
    (tmp_path / "all_results.json").write_text(json.dumps({**results, "resnet": "microsoft/resnet-50"}))
    card = build_model_card(tmp_path, "org/hypervq-sa")
    assert card.data.base_model == "microsoft/resnet-50" and card.data.pipeline_tag == "image-classification"
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "mCE", "unknown_mCE"}
    assert "| fog | 40.0 |" in str(card) and "Vector Quantization with Self-Attention" in str(card)


def saved_prior(folder):
    from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel

    config = HyperVQPriorConfig(codebook_size=16, hidden_size=8, num_layers=2, grid_size=[2, 2], num_classes=3,
                                tokenizer_name_or_path="org/hypervq-tiny")  # fmt: skip
    HyperVQPriorModel(config).save_pretrained(folder)
    results = {"dataset": "uoft-cs/cifar100", "split": "test", "eval_loss": 1.5, "bits_per_token": 2.164,
               "num_eval_samples": 51}  # fmt: skip
    (folder / "eval_results.json").write_text(json.dumps(results))
    command = "scripts/train_prior.py --tokenizer org/hypervq-tiny --output_dir out"
    (folder / "all_results.json").write_text(json.dumps({**results, "tokenizer": "org/hypervq-tiny", "step": 30,
                                                         "command": command}))  # fmt: skip
    return folder


def test_prior_card_and_push(tmp_path):
    """Pushing a prior used to fail after training: there was no prior model kind nor card template."""
    folder = saved_prior(tmp_path / "prior")
    card = build_model_card(folder, "org/hypervq-prior")
    # trained from scratch: its tokenizer is named in the text, not as a `base_model` (which reads as fine-tuned from)
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.base_model is None
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "eval_loss": 1.5,
        "bits_per_token": 2.164,
    }
    text = str(card)
    assert "Gated PixelCNN" in text and "2×2 code grids" in text and "conditioned on\n3 classes" in text
    assert (
        'prior = AutoModel.from_pretrained("org/hypervq-prior")' in text
        and "class_labels=torch.arange(16) % 3" in text
    )
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")
        push = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(folder), "--hub_model_id", "org/prior",
                "--license", "mit"]  # fmt: skip
        result = subprocess.run(push, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert {"README.md", "config.json", "model.safetensors"} <= set(hub.snapshot("model", "org/prior", "main")[1])


@pytest.mark.slow
def test_a_prior_of_a_local_tokenizer_is_pushed_once_its_tokenizer_is(tmp_path):
    """`--tokenizer_hub_id` relinks a prior to its pushed tokenizer, at its commit, once the weights match."""
    from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel

    local = saved_tokenizer(tmp_path / "tokenizer")
    other = saved_tokenizer(tmp_path / "other")  # the same shape, other random weights
    config = HyperVQPriorConfig(codebook_size=16, grid_size=[2, 2], tokenizer_name_or_path=str(local))
    HyperVQPriorModel(config).save_pretrained(tmp_path / "prior")
    script = str(ROOT / "scripts" / "push_to_hub.py")
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")

        def push(folder, repo, *flags):
            return subprocess.run([sys.executable, script, str(folder), "--hub_model_id", repo, "--license", "mit",
                                   *flags], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

        assert push(local, "org/tokenizer").returncode == 0 and push(other, "org/other").returncode == 0
        refused = push(tmp_path / "prior", "org/prior", "--tokenizer_hub_id", "org/other")
        assert refused.returncode == 1 and "its weights differ" in refused.stderr.strip().splitlines()[-1]
        result = push(tmp_path / "prior", "org/prior", "--tokenizer_hub_id", "org/tokenizer")
        assert result.returncode == 0, result.stderr[-3000:]
        commit, files, _ = hub.snapshot("model", "org/prior", "main")
        pushed = json.loads(hub.blob_path(files["config.json"]["sha256"]).read_text())
        assert pushed["tokenizer_name_or_path"] == "org/tokenizer"
        assert pushed["tokenizer_revision"] == hub.snapshot("model", "org/tokenizer", "main")[0]
        assert [r for r in hub.requests if "/commit/" in r[1] and "org/prior" in r[1]]  # one commit, after the checks


@pytest.mark.slow
def test_an_installed_wheel_publishes_without_a_checkout(tmp_path):
    """The card templates used to resolve to the checkout's model_cards/, outside the package."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True, timeout=300)  # fmt: skip
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)  # fmt: skip
    saved_tokenizer(tmp_path / "model")
    code = (
        "import sys, hf_hypervq; from hf_hypervq.training.hub import build_model_card; "
        f"assert hf_hypervq.__file__.startswith({str(tmp_path / 'site')!r}), hf_hypervq.__file__; "
        f"print(build_model_card({str(tmp_path / 'model')!r}, 'org/x').data.pipeline_tag)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "image-feature-extraction"


@pytest.mark.parametrize(
    "make_folder, repo_id, message",
    [
        (lambda p: p, "org/x", "has no config.json"),
        (lambda p: (p / "config.json").write_text("{}") and p, "org/x", "no .safetensors"),
        (lambda p: saved_tokenizer(p), "org/bad--name", "not a valid repo id"),
        (lambda p: saved_tokenizer(p), "just-a-name", "must be 'user/name'"),
    ],
)
def test_push_refuses_bad_input_before_any_request(make_folder, repo_id, message, tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(PublishError, match=message):
        push_to_hub(folder or tmp_path, repo_id, license="mit")


def test_push_refuses_what_would_not_work_elsewhere_in_one_line(tmp_path):
    """A prior that names its tokenizer by a local folder, or a card without a license, is refused before any
    request (no Hub runs here: a request would fail otherwise), saying what to do."""
    from hf_hypervq import HyperVQPriorConfig, HyperVQPriorModel

    local = saved_tokenizer(tmp_path / "tokenizer")
    config = HyperVQPriorConfig(codebook_size=16, grid_size=[2, 2], tokenizer_name_or_path=str(local))
    HyperVQPriorModel(config).save_pretrained(tmp_path / "prior")
    with pytest.raises(
        PublishError,
        match=r"local folder .*hypervq-push TOKENIZER_DIR --hub_model_id ORG/NAME.*--tokenizer_hub_id ORG/NAME",
    ):
        push_to_hub(tmp_path / "prior", "org/prior", license="mit")
    with pytest.raises(PublishError, match="does not say under which license.*pass --license"):
        push_to_hub(local, "org/tokenizer")  # uoft-cs/cifar100's license is not known offline


@pytest.mark.slow
def test_a_push_keeps_the_folders_card_unless_asked_to_render_it_again(tmp_path):
    folder = saved_tokenizer(tmp_path / "model")
    script = str(ROOT / "scripts" / "push_to_hub.py")
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")

        def push(*flags):
            result = subprocess.run([sys.executable, script, str(folder), "--hub_model_id", "org/x", *flags], env=env,
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            return hub.blob_path(hub.snapshot("model", "org/x", "main")[1]["README.md"]["sha256"]).read_text()

        card = str(write_model_card(folder, default_repo_id(folder)))  # what the training run wrote
        assert 'from_pretrained("your-name/model")' in card
        (folder / "README.md").write_text(card + "\nA note by the author.\n")
        pushed = push("--license", "mit")  # sets the license and the repo id, keeps the rest
        assert pushed.endswith("A note by the author.\n") and ModelCard(pushed).data.license == "mit"
        assert 'from_pretrained("org/x")' in pushed and "your-name/" not in pushed
        assert not push("--license", "mit", "--regenerate_card").endswith("A note by the author.\n")


def test_network_error_is_one_line_and_a_failed_exit(tmp_path):
    saved_tokenizer(tmp_path / "model")
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")
    # the server has stopped: nothing listens at HF_ENDPOINT any more
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(tmp_path / "model"), "--hub_model_id", "org/x",
         "--license", "mit"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: pushing to org/x failed") and "Traceback" not in result.stderr


CLIENT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[1] == "remote":
        sys.modules["hf_hypervq"] = None  # a Python without the package: only the code in the repo can be used
    else:
        import hf_hypervq
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repo, image = sys.argv[2], Image.open(sys.argv[3])
    remote = sys.argv[1] == "remote"
    model = AutoModel.from_pretrained(repo, trust_remote_code=remote).eval()
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=remote)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    out = {"module": type(model).__module__, "tokens": model.get_image_tokens(pixel_values).tolist(),
           "reconstruction": model(pixel_values).reconstruction.tolist()}
    # the pipeline travels with the tokenizer (`custom_pipelines` and its code in the repo)
    tokenize = pipeline("image-tokenization", model=repo, trust_remote_code=True)
    out["pipeline_module"] = type(tokenize).__module__
    out["pipeline_tokens"] = tokenize(image)["image_tokens"]
    print(json.dumps(out))
    """
)


def test_train_push_and_load_back_from_the_hub(tmp_path):
    with LocalHub(tmp_path / "hub", lfs_threshold=64 * 1024) as hub:
        env = hub.client_env(tmp_path / "hf_home")
        output = tmp_path / "tokenizer"
        train = [
            sys.executable, str(ROOT / "scripts" / "train_vqvae.py"), "--output_dir", str(output),
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_train_samples", "64",
            "--max_eval_samples", "20", "--image_size", "8", "--hidden_size", "16", "--residual_hidden_size", "8",
            "--embedding_dim", "8", "--codebook_size", "16", "--push_to_hub", "--hub_model_id", "org/tiny-direct",
        ]  # fmt: skip
        result = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        push = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(output), "--hub_model_id", "org/tiny"]
        result = subprocess.run(push, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

        files = set(hub.snapshot("model", "org/tiny", "main")[1])
        assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_hypervq.py",
                "eval_results.json", "reconstructions.png", "codebook_usage.png"} <= files  # fmt: skip
        assert not any(name.startswith("checkpoints/") for name in files)
        assert set(hub.snapshot("model", "org/tiny-direct", "main")[1]) == files
        commits = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1] and "org/tiny/" in r[1]]
        assert len(commits) == 1  # one commit for the whole model

        image_path = tmp_path / "digit.png"
        Image.open(ROOT / "tests" / "data" / "digit.png").convert("RGB").save(image_path)
        outputs = {}
        for mode in ("installed", "remote"):
            run = subprocess.run(
                [sys.executable, "-c", CLIENT, mode, "org/tiny", str(image_path)],
                env={**env, "HF_HOME": str(tmp_path / f"hf_home_{mode}")}, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr[-3000:]
            outputs[mode] = json.loads(run.stdout.strip().splitlines()[-1])

    local = HyperVQVAEModel.from_pretrained(output).eval()
    processor = HyperVQImageProcessor.from_pretrained(output)
    pixel_values = processor(images=Image.open(image_path), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens, reconstruction = local.get_image_tokens(pixel_values).tolist(), local(pixel_values).reconstruction
    assert outputs["installed"]["module"].startswith("hf_hypervq.")
    assert outputs["remote"]["module"].startswith("transformers_modules.")
    for out in outputs.values():
        assert out["tokens"] == tokens
        torch.testing.assert_close(torch.tensor(out["reconstruction"]), reconstruction)
    for out in outputs.values():
        assert [out["pipeline_tokens"]] == tokens
    assert all(out["pipeline_module"].startswith("transformers_modules.") for out in outputs.values())
    card = ModelCard.load(output / "README.md")  # every run writes its card into its folder
    assert card.data.license == "cc-by-4.0" and card.data.datasets is None  # the embedded digits are not on the Hub


def test_a_metric_pushed_to_the_hub_loads_with_evaluate_in_a_fresh_process(tmp_path):
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")
        push = [sys.executable, str(ROOT / "scripts" / "push_metric.py"), "codebook_usage", "--hub_space_id",
                "org/hypervq-codebook-usage"]  # fmt: skip
        result = subprocess.run(push, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        files = set(hub.snapshot("space", "org/hypervq-codebook-usage", "main")[1])
        assert {"hypervq-codebook-usage.py", "README.md", "app.py", "requirements.txt"} <= files
        load = (
            "import evaluate, json; "
            "usage = evaluate.load('org/hypervq-codebook-usage'); "
            "print(type(usage).__module__); "
            "print(json.dumps(usage.compute(predictions=[0, 1, 1, 3], codebook_size=4)))"
        )
        run = subprocess.run([sys.executable, "-c", load], env={**env, "HF_HOME": str(tmp_path / "fresh")},
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        module, computed = run.stdout.strip().splitlines()[-2:]
        assert "hypervq-codebook-usage" in module  # the copy from the Hub, not the installed package
        result = json.loads(computed)
        assert result == {
            "perplexity": pytest.approx(2 * 2**0.5),
            "codes_used": 0.75,
            "dead_codes": 1,
            "num_tokens": 4,
        }


def test_the_committed_example_card_shows_each_metric_with_its_protocol():
    examples = ROOT / "model_cards" / "examples"
    card = ModelCard.load(examples / "tokenizer-digits.md")
    evaluation = json.loads((examples / "tokenizer-digits.eval_results.json").read_text())
    results = {r.metric_type: r for r in card.data.eval_results}
    for name in ("reconstruction_mse", "psnr", "ssim", "perplexity", "codes_used", "dead_codes"):
        assert results[name].metric_value == evaluation[name], name  # read from the run's file, not typed
    text = str(card)  # the protocol once, in the text: not repeated under every metric
    assert "360 images, 16x16 pixels, 16 tokens per image (4x4 grid, downsampling 4)" in text
    assert "metric_config" not in text and "config:" not in text.split("---")[1]
    assert (
        "| PSNR (dB) | 24.72 |" in text and "| SSIM | 0.8075 |" in text and "**Protocol**: scikit-learn/digits" in text
    )
    assert "Each image becomes 16 tokens (4×4, downsampling factor" in text
    assert "**Options beyond the paper**: none" in text  # the main job trains the quantizer as the paper does
