"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (CI installs it; without it the tests that read it are skipped): read through the scripts' data
path, checked against the raw IDX bytes; damaged files; the padding to 32×32 and `--dataset fashion_mnist`."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel
from datasets import Image as ImageFeature
from transformers import AutoImageProcessor, AutoModel

from hf_hypervq import HyperVQImageProcessor
from hf_hypervq.training import data as data_module
from hf_hypervq.training.data import (
    FASHION_MNIST_FOLDER,
    DataError,
    fashion_mnist_dataset,
    label_names,
    load_image_dataset,
    read_idx,
)


ROOT = Path(__file__).resolve().parents[1]
HUB_CLASS_NAMES = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]  # fmt: skip  (zalando-datasets/fashion_mnist's ClassLabel)


def raw_idx(name: str, header: int) -> np.ndarray:
    """An IDX file's bytes after its header, read here without the library."""
    with gzip.open(Path(FASHION_MNIST_FOLDER) / name, "rb") as file:
        return np.frombuffer(file.read(), dtype=np.uint8, offset=header)


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())
    return path


def write_fashion_folder(folder: Path, count: int = 3) -> Path:
    """A Fashion-MNIST-shaped folder of `count` synthetic images per split."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = np.arange(count * 28 * 28).reshape(count, 28, 28) % 256
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10, 0x801)
    return folder


@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_mnist_through_the_scripts_data_path_matches_the_idx_bytes():
    train = load_image_dataset("fashion_mnist", split="train", require_labels=True)
    test = load_image_dataset("fashion_mnist", split="test", require_labels=True)
    assert (len(train), len(test)) == (60_000, 10_000)
    for split in (train, test):  # the columns and label names of the Hub's zalando-datasets/fashion_mnist
        assert isinstance(split.features["image"], ImageFeature)
        assert isinstance(split.features["label"], ClassLabel)
        assert label_names(split) == HUB_CLASS_NAMES
    for split, prefix, indices in ((train, "train", [0, 1, 31_337, 59_999]), (test, "t10k", [0, 4_321, 9_999])):
        pixels = raw_idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = raw_idx(f"{prefix}-labels-idx1-ubyte.gz", 8)
        for index in indices:
            row = split[index]
            assert row["image"].size == (28, 28) and row["image"].mode == "L"
            np.testing.assert_array_equal(np.asarray(row["image"]), pixels[index])
            assert row["label"] == labels[index]
    # built once: the second call reads the same cached Arrow files
    again = fashion_mnist_dataset()
    assert again["test"].cache_files == test.cache_files and again["train"].cache_files == train.cache_files


def test_a_synthetic_idx_folder_loads(tmp_path):
    folder = write_fashion_folder(tmp_path / "fashion")
    splits = fashion_mnist_dataset(folder)
    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "test": 3}
    expected = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    np.testing.assert_array_equal(np.asarray(splits["test"][2]["image"]), expected[2])
    assert splits["train"]["label"] == [0, 1, 2]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: write_idx(f / "t10k-images-idx3-ubyte.gz", np.zeros(3), 0x801), "is not an IDX file of images"),
        (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00")),
         "ends inside its 16-byte header"),
        (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + b"\x00" * 100)),
         "its header gives sizes 3 × 28 × 28"),
        (lambda f: (f / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all"), "cannot read IDX file"),
        (lambda f: write_idx(f / "t10k-labels-idx1-ubyte.gz", np.arange(2), 0x801), "holds 3 images but"),
        (lambda f: write_idx(f / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 10]), 0x801), "has label 10"),
    ],
)  # fmt: skip
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path, damage, message):
    folder = write_fashion_folder(tmp_path / "fashion")
    damage(folder)
    with pytest.raises(DataError) as error:
        fashion_mnist_dataset(folder)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert "t10k-" in text and str(folder) in text


def test_read_idx_checks_the_magic_number(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", np.arange(5), 0x801)
    np.testing.assert_array_equal(read_idx(labels, images=False), np.arange(5))
    with pytest.raises(DataError, match=r"labels.gz is not an IDX file of images: magic number 0x00000801"):
        read_idx(labels, images=True)


def test_without_the_debian_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_FOLDER", str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist") as error:
        load_image_dataset("fashion_mnist", split="train")
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"split 'validation' is not in Fashion-MNIST"):
        load_image_dataset("fashion_mnist", split="validation")


def test_the_processor_pads_with_black_around_the_centre():
    image = load_image_dataset("fashion_mnist", split="test")[0]["image"]
    processor = HyperVQImageProcessor(
        size={"height": 28, "width": 28}, do_pad=True, pad_size={"height": 32, "width": 32}
    )
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert tuple(pixel_values.shape) == (3, 32, 32)
    expected = np.asarray(image, dtype=np.float32) / 127.5 - 1  # [0, 255] -> [-1, 1]
    np.testing.assert_allclose(pixel_values[0, 2:30, 2:30].numpy(), expected, atol=1e-5)
    border = pixel_values.clone()
    border[:, 2:30, 2:30] = -1
    assert (border == -1).all()  # black, not transformers' 0 (mid-grey)
    with pytest.raises(ValueError, match=r"`pad_size` 32×32 is smaller than an image of 40×40"):
        HyperVQImageProcessor(size={"height": 40, "width": 40}, do_pad=True, pad_size={"height": 32, "width": 32})(
            images=image
        )


@pytest.mark.usefixtures("fashion_mnist")
def test_train_vqvae_takes_dataset_fashion_mnist_padded_to_32(tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "scripts" / "train_vqvae.py"), "--dataset", "fashion_mnist", "--output_dir",
        str(output), "--hidden_size", "16", "--residual_hidden_size", "8", "--embedding_dim", "8", "--codebook_size",
        "16", "--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "32",
        "--num_train_epochs", "1", "--cpu",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((output / "preprocessor_config.json").read_text())
    assert config["size"] == {"height": 28, "width": 28}
    assert config["do_pad"] and config["pad_size"] == {"height": 32, "width": 32}
    assert json.loads((output / "all_results.json").read_text())["dataset"] == "fashion_mnist"
    assert (output / "reconstructions.png").exists()
    tokenizer, processor = AutoModel.from_pretrained(output), AutoImageProcessor.from_pretrained(output)
    image = load_image_dataset("fashion_mnist", split="test")[0]["image"]
    tokens = tokenizer.get_image_tokens(processor(images=image, return_tensors="pt")["pixel_values"])
    assert tuple(tokens.shape) == (1, 8, 8)  # 32×32 after padding, downsampled 4 times
