"""Token datasets: scripts/tokenize_dataset.py on one and two processes, resumed, pushed to the local Hub server and
loaded back with `datasets`, priors trained from them, and the tokenizer check."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import DatasetCard
from PIL import Image
from safetensors.torch import load_file

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.training.data import DataError, load_image_dataset
from hf_hypervq.training.evaluation import metric
from hf_hypervq.training.hub import PublishError, build_dataset_card, push_token_dataset
from hf_hypervq.training.token_datasets import TokenGrids, check_tokenizer, load_token_dataset, token_dtype


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = dict(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16, num_residual_layers=1)
# The digits at 8×8 pixels: 2×2 grids of K = 16 codes; shards of 100 images, so the train split has 15, the test 4.
SHARDS = ["--shard_size", "100"]
TINY_PRIOR = ["--num_layers", "2", "--hidden_size", "8", "--head_hidden_size", "16", "--num_sample_images", "4"]


def run(command, env=ENV, cwd=None, check=True, timeout=300):
    result = subprocess.run(list(map(str, command)), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def tokenize(*args, **kwargs):
    return run([sys.executable, SCRIPTS / "tokenize_dataset.py", *args], **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tokenizer(folder, seed=0, **config):
    """A tiny KmeansVQ tokenizer whose codes are 16 latents of digits, so that the digits use many codes (a tokenizer
    fresh from its initialisation gives every image the same token)."""
    torch.manual_seed(seed)
    model = HyperVQVAEModel(HyperVQVAEConfig(quantizer_type="kmeans", **{**TINY, **config})).eval()
    processor = HyperVQImageProcessor(size={"height": 8, "width": 8})
    images = load_image_dataset(None, split="train")[:64]["image"]
    with torch.no_grad():
        latents = model.encode(
            processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        )
        vectors = latents.latents.permute(0, 2, 3, 1).reshape(-1, model.config.embedding_dim)
        chosen = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[
            : model.config.codebook_size
        ]
        model.quantizer.embedding.copy_(vectors[chosen])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def token_dataset(tokenizer_dir, tmp_path_factory):
    """The digits' train and test splits tokenized by one process."""
    output = tmp_path_factory.mktemp("tokens")
    result = tokenize("--tokenizer", tokenizer_dir, "--output_dir", output, *SHARDS)
    assert "tokenizing with 1 process(es)" in result.stdout
    return output


def metadata_of(folder) -> dict:
    metadata = json.loads((Path(folder) / "tokenization.json").read_text())
    metadata.pop("command")  # names the output folder
    return metadata


def shard_files(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted((Path(folder) / "data").iterdir())}


def test_help_documents_every_flag():
    from hf_hypervq.commands import tokenize_dataset

    actions = [action for action in tokenize_dataset.build_parser()._actions if action.help != "==SUPPRESS=="]
    assert all(action.help for action in actions) and len(actions) > 15


def test_token_ids_take_the_smallest_type_that_holds_k():
    assert [token_dtype(k) for k in (16, 255, 256, 65535, 65536)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_token_dataset(token_dataset, tokenizer_dir, tmp_path):
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", free_port(), SCRIPTS / "tokenize_dataset.py", "--cpu",
        "--tokenizer", tokenizer_dir, "--output_dir", two, *SHARDS,
    ]  # fmt: skip
    result = run(command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert "tokenizing with 2 process(es)" in result.stdout
    files = shard_files(token_dataset)
    assert len(files) == 15 + 4 and "train-00014-of-00015.parquet" in files and "test-00003-of-00004.parquet" in files
    assert shard_files(two) == files  # byte for byte, so row for row
    assert metadata_of(two) == metadata_of(token_dataset)

    data, metadata = load_token_dataset(token_dataset)
    assert {split: len(rows) for split, rows in data.items()} == {"train": 1437, "test": 360}
    assert str(data["train"].features["input_ids"]) == "List(Value('uint8'), length=4)"
    assert data["train"].features["label"].names == [str(d) for d in range(10)]
    assert metadata["codebook_size"] == 16 and metadata["grid"] == [2, 2] and metadata["image_size"] == [8, 8]
    assert metadata["tokenizer"]["name_or_path"] == str(tokenizer_dir.resolve())
    assert metadata["tokenizer"]["revision"] is None and len(metadata["tokenizer"]["weights_sha256"]) == 64
    for split, rows in data.items():  # each split's usage, as the codebook_usage metric computes it
        ids = rows.with_format("numpy")[:]["input_ids"].ravel()
        usage = metric("codebook_usage").compute(predictions=ids, codebook_size=16)
        recorded = metadata["splits"][split]
        assert recorded["perplexity"] == pytest.approx(usage["perplexity"]) and recorded["perplexity"] > 4
        assert (recorded["codes_used"], recorded["dead_codes"]) == (usage["codes_used"], usage["dead_codes"])
        assert recorded["num_tokens"] == usage["num_tokens"] == 4 * len(rows)


def test_the_tokens_are_those_of_get_image_tokens(token_dataset, tokenizer_dir):
    data, metadata = load_token_dataset(token_dataset)
    items = TokenGrids(data["test"], metadata["grid"], with_labels=True)
    rows = items.__getitems__(list(range(len(items))))
    tokens = torch.stack([row["image_tokens"] for row in rows])
    labels = torch.stack([row["class_labels"] for row in rows])
    assert torch.equal(items[7]["image_tokens"], tokens[7]) and set(TokenGrids(data["test"], [2, 2], False)[0]) == {
        "image_tokens"
    }
    images = load_image_dataset(None, split="test")
    tokenizer = HyperVQVAEModel.from_pretrained(tokenizer_dir).eval()
    processor = HyperVQImageProcessor.from_pretrained(tokenizer_dir)
    pixel_values = processor(images=[image.convert("RGB") for image in images["image"]], return_tensors="pt")
    with torch.no_grad():
        expected = tokenizer.get_image_tokens(pixel_values["pixel_values"])
        reconstruction = tokenizer(pixel_values["pixel_values"]).reconstruction
        decoded = tokenizer.decode_tokens(tokens)
    assert tokens.dtype == torch.long and tokens.shape == (360, 2, 2)
    assert torch.equal(tokens, expected) and len(expected.unique()) > 8
    assert torch.equal(labels, torch.tensor(images["label"]))
    torch.testing.assert_close(decoded, reconstruction)  # the images the tokens stand for


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_redoing_finished_shards(token_dataset, tokenizer_dir, tmp_path):
    folder = tmp_path / "tokens"
    shutil.copytree(token_dataset, folder)
    # what a run killed in the middle leaves: its settings and its finished shards in the hidden staging folder, some
    # shards not yet there, a shard being written, and nothing in data/ (so datasets sees no partial data)
    staging = folder / ".tokenizing"
    (staging / "data").mkdir(parents=True)
    os.replace(folder / "tokenization.json", staging / "tokenization.json")
    (folder / "README.md").unlink()
    for path in (folder / "data").iterdir():
        os.replace(path, staging / "data" / path.name)
    (folder / "data").rmdir()
    removed = ["train-00003-of-00015.parquet", "train-00007-of-00015.parquet", "test-00002-of-00004.parquet"]
    for name in removed:
        (staging / "data" / name).unlink()
    (staging / "data" / ".partial-train-00003-of-00015.parquet.4242").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="unfinished token dataset: rerun"):
        load_token_dataset(folder)
    with pytest.raises(Exception, match="(?i)no (supported )?data files|doesn't contain any data files|empty"):
        datasets.load_dataset(str(folder))  # the staged shards are hidden from datasets
    kept = {path.name: path.stat() for path in (staging / "data").glob("*.parquet")}
    # the same tokenizer reached another way (a copy of its folder) is the same tokenizer: the run resumes
    shutil.copytree(tokenizer_dir, tmp_path / "moved")
    tokenize("--tokenizer", tmp_path / "moved", "--output_dir", folder, *SHARDS)
    for name, before in kept.items():  # moved into data/, not written again
        after = (folder / "data" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert shard_files(folder) == shard_files(token_dataset)  # the removed ones are back, and the half one gone
    resumed, original = metadata_of(folder), metadata_of(token_dataset)
    assert resumed["tokenizer"].pop("name_or_path") == str((tmp_path / "moved").resolve())
    original["tokenizer"].pop("name_or_path")
    assert resumed == original
    assert not staging.exists() and (folder / "README.md").is_file()

    # a finished folder holds these tokens only: other settings are refused before anything is written
    refused = tokenize(
        "--tokenizer", tokenizer_dir, "--output_dir", folder, *SHARDS, "--image_size", "16", check=False
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --output_dir {folder} holds tokens made differently (") and "image_size" in last
    assert "--overwrite_output_dir" in last
    assert shard_files(folder) == shard_files(token_dataset)


def test_views_kept_columns_and_loader_workers(tokenizer_dir, tmp_path):
    """--views flip stores each image's grid and its mirror image's (the first is the plain tokens), ten_crop ten
    grids; --keep_columns and the row index come along; two loader workers write the very bytes one process does."""
    digits = load_image_dataset(None, split="test").select(range(40))
    digits = digits.add_column("caption", [f"a handwritten {label}" for label in digits["label"]])
    digits.to_parquet(str(tmp_path / "digits.parquet"))
    common = ["--tokenizer", tokenizer_dir, "--dataset", tmp_path / "digits.parquet", "--split", "train",
              "--shard_size", "16", "--keep_columns", "caption"]  # fmt: skip
    tokenize(*common, "--output_dir", tmp_path / "center")
    tokenize(*common, "--output_dir", tmp_path / "flip", "--views", "flip", "--dataloader_num_workers", "2")
    tokenize(*common, "--output_dir", tmp_path / "flip-main", "--views", "flip")
    tokenize(*common, "--output_dir", tmp_path / "ten", "--views", "ten_crop")
    assert shard_files(tmp_path / "flip") == shard_files(tmp_path / "flip-main")

    (center, _), (flip, flip_metadata), (ten, ten_metadata) = (
        load_token_dataset(tmp_path / name) for name in ("center", "flip", "ten")
    )
    assert set(center["train"].column_names) == {"input_ids", "index", "label", "caption"}
    center, flip, ten = center["train"].with_format("numpy")[:], flip["train"].with_format("numpy")[:], ten["train"]
    assert center["index"].tolist() == list(range(40)) and center["caption"].tolist() == digits[:]["caption"]
    assert flip_metadata["views"] == ["center", "center_flipped"] and flip["input_ids"].shape == (40, 2, 4)
    assert (flip["input_ids"][:, 0] == center["input_ids"]).all()
    tokenizer = HyperVQVAEModel.from_pretrained(tokenizer_dir).eval()
    processor = HyperVQImageProcessor.from_pretrained(tokenizer_dir)
    mirrored = [image.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT) for image in digits["image"]]
    with torch.no_grad():
        expected = tokenizer.get_image_tokens(processor(images=mirrored, return_tensors="pt")["pixel_values"])
    assert (flip["input_ids"][:, 1] == expected.flatten(1).numpy()).all()
    assert (flip["input_ids"][:, 1] != flip["input_ids"][:, 0]).any()
    assert len(ten_metadata["views"]) == 10 and ten_metadata["views"][0] == "center"
    assert str(ten.features["input_ids"]) == "List(List(Value('uint8'), length=4), length=10)"
    assert ten_metadata["splits"]["train"]["num_tokens"] == 40 * 10 * 4

    # a prior draws one view per image and epoch, from (seed, epoch, index); evaluation takes the first
    drawn = TokenGrids(load_token_dataset(tmp_path / "flip")[0]["train"], [2, 2], False, views=2, seed=0)
    first = TokenGrids(load_token_dataset(tmp_path / "flip")[0]["train"], [2, 2], False, views=2)
    views = torch.tensor(flip["input_ids"]).long().view(40, 2, 2, 2)

    def chosen(dataset, epoch):
        dataset.set_epoch(epoch)
        grids = torch.stack([row["image_tokens"] for row in dataset.__getitems__(list(range(40)))])
        return [next(v for v in range(2) if torch.equal(grids[i], views[i, v])) for i in range(40)]

    mixed = [i for i in range(40) if not torch.equal(views[i, 0], views[i, 1])]
    epochs = [chosen(drawn, epoch) for epoch in range(3)]
    assert epochs[1] == chosen(drawn, 1)  # a resumed epoch draws the same views
    assert all(0 < sum(epoch[i] for i in mixed) < len(mixed) for epoch in epochs) and epochs[0] != epochs[1]
    assert chosen(first, 5) == [0] * 40


def test_bad_views_and_kept_columns_are_one_line(tokenizer_dir, tmp_path):
    for args, expected in (
        (["--keep_columns", "index"], "--keep_columns index: the token dataset has its own 'index' column"),
        (["--keep_columns", "caption"], "--keep_columns 'caption' is not a column of"),
        (["--views", "five"], "argument --views: invalid choice: 'five'"),
    ):
        result = tokenize("--tokenizer", tokenizer_dir, "--output_dir", tmp_path / "x", *args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr, result.stderr


def test_shards_are_sized_in_bytes(tokenizer_dir, tmp_path, capsys):
    # 2×2 uint8 ids, an int64 index and an int64 label: 20 bytes a row, so 2KB (2,000 bytes) hold 100 of the 360
    tokenize("--tokenizer", tokenizer_dir, "--output_dir", tmp_path, "--split", "test", "--max_shard_size", "2KB")
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == [
        f"test-0000{i}-of-00004.parquet" for i in range(4)
    ]
    assert json.loads((tmp_path / "tokenization.json").read_text())["shard_size"] == 100
    from hf_hypervq.commands import tokenize_dataset

    with pytest.raises(SystemExit):
        tokenize_dataset.parse_args(
            ["--tokenizer", "t", "--output_dir", str(tmp_path / "x"), "--max_shard_size", "big"]
        )
    assert "--max_shard_size 'big': not a size" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stream_gives_the_same_rows(token_dataset, tokenizer_dir, tmp_path):
    tokenize("--tokenizer", tokenizer_dir, "--output_dir", tmp_path, "--streaming", "--split", "test")
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["test-00000-of-00001.parquet"]
    streamed, metadata = load_token_dataset(tmp_path)
    assert metadata["source"]["streaming"] and metadata["shard_size"] is None
    downloaded = load_token_dataset(token_dataset)[0]["test"]
    assert streamed["test"].features == downloaded.features and streamed["test"][:] == downloaded[:]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no tokenizer", "the folder has no config.json, so it holds no saved model"),
        ("no images", "has no image column among ['label', 'text']; pass --image_column"),
        ("no such split", "split 'validation' is not in scikit-learn digits (splits: ['train', 'test'])"),
    ],
)
def test_bad_input_is_one_line(case, message, tokenizer_dir, tmp_path, run_command):
    from datasets import Dataset

    args = ["--tokenizer", tokenizer_dir, "--output_dir", tmp_path / "out"]
    if case == "no tokenizer":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif case == "no images":
        Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(tmp_path / "text.parquet")
        args += ["--dataset", tmp_path / "text.parquet", "--split", "train"]
    else:
        args += ["--split", "train", "validation"]
    status, stderr = run_command("tokenize_dataset", *args)
    assert status == 2 and message in stderr.strip().splitlines()[-1], stderr[-3000:]
    assert not (tmp_path / "out" / "data").exists()


@pytest.mark.slow
def test_train_a_prior_from_a_token_dataset_folder(token_dataset, tokenizer_dir, tmp_path):
    """Without --tokenizer, the one that made the tokens is used (for the prior's samples and its record); the prior
    is the one that tokenizing the images in the run gives."""
    output, direct = tmp_path / "prior", tmp_path / "direct"
    args = ["--max_train_steps", "3", "--class_conditional", *TINY_PRIOR]
    run([sys.executable, SCRIPTS / "train_prior.py", "--token_dataset", token_dataset, "--output_dir", output, *args])
    run([sys.executable, SCRIPTS / "train_prior.py", "--tokenizer", tokenizer_dir, "--output_dir", direct, *args])
    weights = load_file(direct / "model.safetensors")
    assert all(torch.equal(load_file(output / "model.safetensors")[name], value) for name, value in weights.items())
    config = json.loads((output / "config.json").read_text())
    assert (config["codebook_size"], config["grid_size"], config["num_classes"]) == (16, [2, 2], 10)
    assert config["tokenizer_name_or_path"] == str(tokenizer_dir.resolve())
    results = json.loads((output / "eval_results.json").read_text())
    assert results["dataset"] == token_dataset.name and results["split"] == "test"  # no local path in results
    assert results["num_eval_samples"] == 360 and results["bits_per_token"] > 0
    assert (output / "samples.png").exists()


def test_a_mismatched_tokenizer_is_refused(token_dataset, tokenizer_dir, tmp_path, run_command):
    _, metadata = load_token_dataset(token_dataset)
    check_tokenizer(metadata, HyperVQVAEModel.from_pretrained(tokenizer_dir), "tok", "tokens")  # the same: accepted
    others = {
        "K=32 codes, the tokens K=16": HyperVQVAEModel(HyperVQVAEConfig(**{**TINY, "codebook_size": 32})),
        "into 4×4 token grids, the tokens are 2×2": HyperVQVAEModel(HyperVQVAEConfig(**TINY, num_downsamples=1)),
        "its weights differ": HyperVQVAEModel.from_pretrained(make_tokenizer(tmp_path / "other", seed=1)),
    }
    for message, tokenizer in others.items():
        with pytest.raises(DataError, match=re.escape(message)):
            check_tokenizer(metadata, tokenizer, "other", "tokens")
    status, stderr = run_command("train_prior", "--token_dataset", token_dataset, "--tokenizer", tmp_path / "other",
                                 "--output_dir", tmp_path / "prior", *TINY_PRIOR)  # fmt: skip
    assert status == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --tokenizer {tmp_path / 'other'} is not the tokenizer that made the tokens of")
    assert "its weights differ" in last and not (tmp_path / "prior" / "config.json").exists()

    # without --tokenizer, a recorded one that is not on this machine is one line saying to pass it
    moved = tmp_path / "moved"
    shutil.copytree(token_dataset, moved)
    metadata = json.loads((moved / "tokenization.json").read_text())
    metadata["tokenizer"]["name_or_path"] = str(tmp_path / "elsewhere")
    (moved / "tokenization.json").write_text(json.dumps(metadata))
    status, stderr = run_command("train_prior", "--token_dataset", moved, "--output_dir", tmp_path / "prior",
                                 *TINY_PRIOR)  # fmt: skip
    assert status == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: the token dataset's tokenizer {tmp_path / 'elsewhere'}: no such folder; pass --tokenizer, the "
        "tokenizer that made them"
    )


def test_the_dataset_card_says_which_tokenizer_how_and_how_much(token_dataset):
    card = build_dataset_card(token_dataset, "org/digits-tokens")
    metadata = json.loads((token_dataset / "tokenization.json").read_text())
    data = card.data.to_dict()
    assert data["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}]}]  # fmt: skip
    assert {"hf-hypervq", "image-tokens", "kmeansvq"} <= set(data["tags"])
    assert data["license"] == "cc-by-4.0" and "source_datasets" not in data  # the digits: not on the Hub
    assert data["task_categories"] == ["unconditional-image-generation", "image-classification"]
    assert data["size_categories"] == ["1K<n<10K"] and data["codebook_size"] == 16 and data["grid"] == [2, 2]
    info = data["dataset_info"]  # as `Dataset.push_to_hub` writes it, from datasets' own DatasetInfosDict
    assert [(s["name"], s["num_examples"]) for s in info["splits"]] == [("train", 1437), ("test", 360)]
    assert info["features"][0] == {"name": "input_ids", "list": "uint8", "length": 4}
    assert info["download_size"] == sum(p.stat().st_size for p in (token_dataset / "data").iterdir())
    text = str(card)
    assert f"`{metadata['tokenizer']['weights_sha256']}`" in text and "| codebook size K | 16 |" in text
    train = metadata["splits"]["train"]
    assert f"| train | 1437 | 5748 | {train['perplexity']:.1f} | 16 of 16 (100.0%) | 0 |" in text
    assert "eval mode under `torch.no_grad`" in text and "| size | {'height': 8, 'width': 8} |" in text
    assert "| resample | bilinear |" in text and str(token_dataset.parent) not in text
    assert 'load_dataset("org/digits-tokens", split="train")' in text and ".view(-1, 2, 2)" in text
    assert "tokenizer.decode_tokens(tokens)" in text and "--token_dataset org/digits-tokens" in text
    card.save(token_dataset.parent / "card.md")
    assert DatasetCard.load(token_dataset.parent / "card.md").data.to_dict() == data


def test_tokens_that_name_a_local_tokenizer_are_not_pushed(token_dataset, tmp_path):
    """No Hub runs here: a push that got as far as a request would fail otherwise."""
    with pytest.raises(PublishError, match=r"local folder .*: push the tokenizer first \(hypervq-push TOKENIZER_DIR"):
        push_token_dataset(token_dataset, "org/digits-tokens")
    result = run([*module_of("hypervq-push"), token_dataset, "--hub_model_id", "org/x"], check=False)
    assert result.returncode == 1 and "is a token dataset: pass --hub_dataset_id" in result.stderr
    # an unknown license is refused too (the tokenizer named by a Hub id here)
    folder = tmp_path / "tokens"
    shutil.copytree(token_dataset, folder)
    metadata = json.loads((folder / "tokenization.json").read_text())
    metadata["tokenizer"]["name_or_path"] = "org/tokenizer"
    metadata["source"]["dataset"] = "own-images"
    (folder / "tokenization.json").write_text(json.dumps(metadata))
    with pytest.raises(PublishError, match="does not say under which license.*pass --license"):
        push_token_dataset(folder, "org/digits-tokens", regenerate_card=True)
    assert DatasetCard.load(folder / "README.md").data.license == "unknown"


def module_of(command: str) -> list[str]:
    """A console command (`hypervq-tokenize`) as the interpreter runs it, with or without the entry points installed."""
    from hf_hypervq.training.outputs import COMMANDS

    module = {entry: name for name, entry in COMMANDS.items()}[command]
    return [sys.executable, "-m", f"hf_hypervq.commands.{module}"]


USE_ANYWHERE = """
import json, sys
from pathlib import Path

if sys.argv[1] == "pipeline":  # a Python without hf_hypervq: only the code in the tokenizer's repo
    sys.modules["hf_hypervq"] = None
    from PIL import Image
    from transformers import pipeline

    tokenize = pipeline("image-tokenization", model="org/tokenizer", trust_remote_code=True)
    print(json.dumps({"tokens": tokenize(Image.open(sys.argv[2]))["image_tokens"], "module": type(tokenize).__module__}))
elif sys.argv[1] == "load_dataset":
    from datasets import load_dataset

    data = load_dataset("org/digits-tokens")
    print(json.dumps({split: rows[:] for split, rows in data.items()}))
elif sys.argv[1] == "prior":  # the prior and, through what it records, its tokenizer at its commit
    import torch
    from transformers import AutoModel

    import hf_hypervq  # noqa: F401

    prior = AutoModel.from_pretrained("org/prior")
    tokenizer = AutoModel.from_pretrained(prior.config.tokenizer_name_or_path, revision=prior.config.tokenizer_revision)
    images = tokenizer.decode_tokens(prior.sample(2, seed=0, class_labels=torch.tensor([0, 1])))
    print(json.dumps({"tokenizer": prior.config.tokenizer_name_or_path, "revision": prior.config.tokenizer_revision,
                      "shape": list(images.shape)}))
else:  # the cards, as the Hub validates them
    from huggingface_hub import DatasetCard, ModelCard

    cards = {"tokenizer": ModelCard.load("org/tokenizer"), "prior": ModelCard.load("org/prior"),
             "dataset": DatasetCard.load("org/digits-tokens", repo_type="dataset")}
    for card in cards.values():
        card.validate(repo_type="dataset" if isinstance(card, DatasetCard) else "model")
    print(json.dumps({name: card.data.to_dict() for name, card in cards.items()}))
"""


@pytest.mark.slow
def test_publish_once_use_anywhere(token_dataset, tokenizer_dir, tmp_path):
    """Publish a tokenizer, a token dataset made with it and a prior trained on that, to the test Hub server; then
    use each from a fresh process with a fresh cache and none of the local folders: the pipeline without
    hf_hypervq, `load_dataset`, and `hypervq-train-prior`; the cards carry their metadata and validate."""
    work = tmp_path / "work"
    shutil.copytree(tokenizer_dir, work / "tokenizer")
    image = tmp_path / "digit.png"
    Image.open(ROOT / "tests" / "data" / "digit.png").convert("RGB").save(image)
    with torch.no_grad():
        expected_tokens = (
            HyperVQVAEModel.from_pretrained(tokenizer_dir)
            .get_image_tokens(
                HyperVQImageProcessor.from_pretrained(tokenizer_dir)(images=Image.open(image), return_tensors="pt")[
                    "pixel_values"
                ]
            )[0]
            .tolist()
        )
    with LocalHub(tmp_path / "hub", lfs_threshold=1024) as hub:
        env = hub.client_env(tmp_path / "hf_home", base=ENV)
        fresh = lambda name: {**env, "HF_HOME": str(tmp_path / name)}  # noqa: E731
        # a dataset that names a local tokenizer would be unusable elsewhere: refused before any work
        refused = run([*module_of("hypervq-tokenize"), "--tokenizer", work / "tokenizer", "--output_dir",
                       work / "tokens", "--push_to_hub", "--hub_dataset_id", "org/digits-tokens"], env=env, check=False)  # fmt: skip
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "error: --push_to_hub needs the tokenizer on the Hub" in refused.stderr.strip().splitlines()[-1]
        assert not (work / "tokens").exists() and not hub.requests

        # publish: the tokenizer, then the tokens made with its Hub id, then a prior trained on those
        run([*module_of("hypervq-push"), work / "tokenizer", "--hub_model_id", "org/tokenizer", "--license", "mit"],
            env=env)  # fmt: skip
        tokenize_command = [*module_of("hypervq-tokenize"), "--tokenizer", "org/tokenizer", "--output_dir",
                            work / "tokens", *SHARDS, "--push_to_hub", "--hub_dataset_id", "org/digits-tokens"]  # fmt: skip
        run(tokenize_command, env=env)
        run([*module_of("hypervq-train-prior"), "--token_dataset", "org/digits-tokens", "--output_dir", work / "prior",
             "--max_train_steps", "2", "--class_conditional", *TINY_PRIOR, "--push_to_hub", "--hub_model_id",
             "org/prior", "--license", "cc-by-4.0"], env=env)  # fmt: skip
        local_rows = {split: rows[:] for split, rows in load_token_dataset(work / "tokens")[0].items()}
        tokenizer_commit = hub.snapshot("model", "org/tokenizer", "main")[0]
        dataset_commit = hub.snapshot("dataset", "org/digits-tokens", "main")[0]
        pushed = {  # every file of the three repos, as bytes
            repo: {path: hub.blob_path(entry["sha256"]).read_bytes() for path, entry in hub.snapshot(kind, repo, "main")[1].items()}
            for kind, repo in (("model", "org/tokenizer"), ("dataset", "org/digits-tokens"), ("model", "org/prior"))
        }  # fmt: skip
        shutil.rmtree(work)  # none of the local folders from here on

        def use(what, *args, home):
            result = run([sys.executable, "-c", USE_ANYWHERE, what, *args], env=fresh(home), cwd=tmp_path)
            return json.loads(result.stdout.strip().splitlines()[-1])

        piped = use("pipeline", image, home="fresh-pipeline")
        assert piped["module"].startswith("transformers_modules.") and [piped["tokens"]] == [expected_tokens]
        assert use("load_dataset", home="fresh-data") == local_rows
        prior = use("prior", home="fresh-prior")
        assert prior == {"tokenizer": "org/tokenizer", "revision": tokenizer_commit, "shape": [2, 3, 8, 8]}
        elsewhere = tmp_path / "elsewhere"
        run([*module_of("hypervq-train-prior"), "--token_dataset", "org/digits-tokens", "--output_dir", elsewhere,
             "--max_train_steps", "2", *TINY_PRIOR], env=fresh("fresh-train"), cwd=tmp_path)  # fmt: skip
        cards = use("cards", home="fresh-cards")

    results = json.loads((elsewhere / "all_results.json").read_text())
    assert (results["tokenizer"], results["tokenizer_revision"]) == ("org/tokenizer", tokenizer_commit)
    assert results["token_dataset_revision"] == results["dataset_revision"] == dataset_commit
    dataset = cards["dataset"]
    assert dataset["license"] == "cc-by-4.0" and dataset["tokenizer"] == "org/tokenizer"  # the digits' license
    assert dataset["task_categories"] == ["unconditional-image-generation", "image-classification"]
    assert dataset["size_categories"] == ["1K<n<10K"] and "source_datasets" not in dataset  # not on the Hub
    assert {split["name"]: split["num_examples"] for split in dataset["dataset_info"]["splits"]} == {
        "train": 1437, "test": 360}  # fmt: skip
    assert dataset["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    assert cards["prior"]["license"] == "cc-by-4.0" and "base_model" not in cards["prior"]
    assert cards["tokenizer"]["license"] == "mit"
    # the pipeline travels with the tokenizer, and no pushed file names a local path
    assert {"pipeline_hypervq.py", "README.md"} <= set(pushed["org/tokenizer"])
    assert "README.md" in pushed["org/prior"] and "tokenization.json" in pushed["org/digits-tokens"]
    for repo, files in pushed.items():
        for name, data in files.items():
            assert str(tmp_path).encode() not in data and b"/tmp/" not in data, (repo, name)


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path):
    """docs/token_datasets.md's commands, as written, against the local Hub server, with a tiny tokenizer (trained on
    the digits, as the main job's) standing in for the main job's `outputs/tokenizer`."""
    page = (ROOT / "docs" / "token_datasets.md").read_text()
    section = page.split("## Push the tokenizer, tokenize with its Hub id, load, train")[1].split("\n## ")[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [command[0] for command in commands] == [
        "hypervq-push",
        "hypervq-tokenize",
        "python",
        "hypervq-train-prior",
    ]
    tokenizer = make_tokenizer(tmp_path / commands[0][1])
    (tokenizer / "eval_results.json").write_text(json.dumps({"dataset": "scikit-learn/digits", "split": "test"}))
    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home", base=ENV)
        results = [
            run([*(module_of(command[0]) if command[0] != "python" else [sys.executable]), *command[1:]], env=env,
                cwd=tmp_path)
            for command in commands
        ]  # fmt: skip
    outputs = [result.stdout for result in results]
    assert "pushed to" in outputs[1] and "num_rows: 1437" in outputs[2]
    assert not any("HTTP Request" in result.stderr for result in results)  # no log line per request
    prior = tmp_path / commands[3][commands[3].index("--output_dir") + 1]
    config = json.loads((prior / "config.json").read_text())
    assert config["grid_size"] == [2, 2] and config["tokenizer_name_or_path"] == "your-name/hypervq-digits"
