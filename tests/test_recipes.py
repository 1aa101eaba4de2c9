"""recipes/: every command parses with today's scripts, every accelerate config loads, the recipe's benchmark measures
the shapes the commands train, and the rehearsal data set is what it says."""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet"


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their shared `benchmarking`


def _commands():
    text = (RECIPE / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


def _split(words):
    """`(accelerate's arguments, the script's name, the script's arguments)` of `accelerate launch ... scripts/x.py`."""
    assert words[:2] == ["accelerate", "launch"]
    script = next(i for i, word in enumerate(words) if word.startswith("scripts/"))
    return words[2:script], Path(words[script]).stem, words[script + 1 :]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_command_parses_with_the_scripts_of_today():
    commands = _commands()
    assert len(commands) == 5  # the tokenizer on one and two machines, tokenization, the prior, VQ-SA
    for words in commands:
        launcher, script, arguments = _split(words)
        config = launcher[launcher.index("--config_file") + 1]
        assert (ROOT / config).is_file(), config
        parser = importlib.import_module(f"hf_hypervq.commands.{script}").build_parser()
        parser.parse_args(arguments)  # an unknown or misspelt flag exits here


@pytest.mark.parametrize("name, processes, machines", [("one_node_8_gpus", 8, 1), ("two_nodes_8_gpus", 16, 2)])
def test_the_accelerate_configs_load(name, processes, machines):
    config = load_config_from_file(str(RECIPE / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, "bf16")


def test_both_tokenizer_commands_keep_the_papers_global_batch():
    one, two = (command for command in _commands() if "scripts/train_vqvae.py" in command)
    for words, processes in ((one, 8), (two, 16)):
        arguments = _split(words)[2]
        batch = int(arguments[arguments.index("--per_device_train_batch_size") + 1])
        assert batch * processes == 4 * 128  # 4 A100s with 128 images each


def test_the_benchmark_measures_the_shapes_the_recipe_trains():
    benchmark = _module(ROOT / "benchmarks" / "benchmark_recipe.py", "benchmark_recipe")
    parsers = {name: importlib.import_module(f"hf_hypervq.commands.{name}").build_parser() for name in
               ("train_vqvae", "train_prior", "train_vqsa")}  # fmt: skip
    recipe = {}
    for words in _commands():
        _, script, arguments = _split(words)
        if script in parsers:
            recipe[script] = vars(parsers[script].parse_args(arguments))
    tokenizer = recipe["train_vqvae"]
    assert {key: tokenizer[key] for key in benchmark.TOKENIZER} == benchmark.TOKENIZER
    assert tokenizer["image_size"] == benchmark.JOBS["tokenizer"]["image_size"]
    assert tokenizer["num_train_epochs"] == benchmark.JOBS["tokenizer"]["epochs"]
    prior = recipe["train_prior"]
    assert (prior["num_layers"], prior["hidden_size"]) == (
        benchmark.PRIOR["num_layers"],
        benchmark.PRIOR["hidden_size"],
    )
    assert prior["num_train_epochs"] == benchmark.JOBS["prior"]["epochs"]
    assert 128 // 2 ** tokenizer["num_downsamples"] == benchmark.JOBS["prior"]["grid"]  # the prior's token grid
    vqsa = recipe["train_vqsa"]
    assert (vqsa["codebook_size"], vqsa["image_size"]) == (
        benchmark.VQSA["codebook_size"],
        benchmark.JOBS["vqsa"]["image_size"],
    )
    assert vqsa["num_train_epochs"] == benchmark.JOBS["vqsa"]["epochs"]


def test_the_recipe_benchmark_counts_flops():
    """Each job's FLOPs are in the range its architecture implies."""
    benchmark = _module(ROOT / "benchmarks" / "benchmark_recipe.py", "benchmark_recipe")
    # ResNet-50's forward is about 4.1 GMACs, 8.2 GFLOPs at 224×224; forward and backward about three times that
    assert 20e9 < benchmark.flops_per_image("vqsa") < 30e9
    assert benchmark.flops_per_image("tokenizer") > 0 and benchmark.flops_per_image("prior") > 0


def test_the_rehearsal_data_is_deterministic_and_shaped_like_imagenet(tmp_path):
    import datasets
    from PIL import Image

    make = _module(ROOT / "benchmarks" / "make_rehearsal_data.py", "make_rehearsal_data")
    first, second = make.make_rehearsal_data(tmp_path / "a", 40), make.make_rehearsal_data(tmp_path / "b", 40)
    files = sorted(p.relative_to(first) for p in first.rglob("*.jpg"))
    assert len(files) == 44 and files == sorted(p.relative_to(second) for p in second.rglob("*.jpg"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)  # the same bytes
    sizes = [Image.open(first / f).size for f in files]
    assert sum(width > height for width, height in sizes) > len(sizes) / 2  # mostly landscape
    assert sum(max(size) == 500 for size in sizes) > len(sizes) / 2  # mostly 500 px on the long side
    folder = datasets.load_dataset("imagefolder", data_dir=str(first / "images"))
    parquet = datasets.load_dataset("parquet", data_dir=str(first / "parquet"))
    assert folder["train"].num_rows == parquet["train"].num_rows == 40
    assert parquet["validation"].num_rows == 4 and parquet["train"].features["label"].num_classes == 10
    assert (
        parquet["train"][3]["image"].size == Image.open(first / "images" / "train" / "n00000003" / "0000003.jpg").size
    )


@pytest.mark.slow
def test_the_rehearsal_runs_end_to_end(tmp_path):
    """The recipe's four jobs at a test's size on the ImageNet-shaped photos: a tokenizer trained with random crops
    and flips, its token dataset with flipped views (decoded by two loader workers), a prior on those tokens, and
    VQ-SA for a few steps. The two-machine launch of the same scripts is tests/test_multinode.py."""
    import json
    import os
    import subprocess
    import sys

    import datasets

    make = _module(ROOT / "benchmarks" / "make_rehearsal_data.py", "make_rehearsal_data")
    images = make.make_rehearsal_data(tmp_path / "data", 48) / "images"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(script, *args):
        command = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--cpu", *map(str, args)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    workers = ["--dataloader_num_workers", "2"]
    tiny = ["--hidden_size", "16", "--residual_hidden_size", "8", "--embedding_dim", "8", "--codebook_size", "16"]
    run("train_vqvae", "--dataset", images, "--eval_split", "validation", "--image_size", "32", "--train_augmentation",
        "crop_flip", *tiny, "--max_train_steps", "4", "--per_device_train_batch_size", "8", *workers,
        "--output_dir", tmp_path / "tokenizer")  # fmt: skip
    assert (
        "random crop and flip (`--train_augmentation crop_flip`)" in (tmp_path / "tokenizer" / "README.md").read_text()
    )
    run("tokenize_dataset", "--tokenizer", tmp_path / "tokenizer", "--dataset", images, "--split", "train",
        "validation", "--views", "flip", *workers, "--output_dir", tmp_path / "tokens")  # fmt: skip
    metadata = json.loads((tmp_path / "tokens" / "tokenization.json").read_text())
    assert metadata["image_size"] == [32, 32] and metadata["grid"] == [8, 8] and len(metadata["views"]) == 2
    tokens = datasets.load_dataset(str(tmp_path / "tokens"))
    assert tokens["train"].num_rows == 48 and tokens["validation"].num_rows == 4
    run("train_prior", "--token_dataset", tmp_path / "tokens", "--class_conditional", "--num_layers", "2",
        "--hidden_size", "8", "--max_train_steps", "3", "--per_device_train_batch_size", "8",
        "--num_sample_images", "2", "--output_dir", tmp_path / "prior")  # fmt: skip
    assert json.loads((tmp_path / "prior" / "all_results.json").read_text())["step"] == 3
    run("train_vqsa", "--dataset", images, "--eval_split", "validation", "--image_size", "32", "--codebook_size",
        "16", "--max_train_steps", "2", "--per_device_train_batch_size", "4", *workers, "--output_dir",
        tmp_path / "vqsa")  # fmt: skip
    assert json.loads((tmp_path / "vqsa" / "all_results.json").read_text())["step"] == 2
