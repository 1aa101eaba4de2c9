"""Loading data sets for the scripts: the embedded digits, local folders and files, columns, and clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset, Value
from datasets import Image as ImageFeature
from PIL import Image

from hf_hypervq import HyperVQImageProcessor
from hf_hypervq.training.data import (
    REPEATED,
    DataError,
    collate,
    digits_dataset,
    label_names,
    load_image_dataset,
    with_image_transform,
)
from hf_hypervq.training.loop import PartsRead


def make_image_folder(root, per_class=3, size=(12, 10)):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, (i * 40, 80, 160 if name == "dog" else 20)).save(folder / f"{i}.png")
    return root


def test_digits_is_real_data_split_80_20():
    splits = digits_dataset()
    assert len(splits["train"]) + len(splits["test"]) == 1797
    assert len(splits["test"]) == 360
    assert label_names(splits["train"]) == [str(d) for d in range(10)]
    image = splits["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"


def test_default_dataset_is_digits():
    data = load_image_dataset(None, split="test", require_labels=True)
    assert data.column_names == ["image", "label"] and len(data) == 360


def test_image_folder_save_to_disk_and_parquet(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    data = load_image_dataset(str(folder), split="train", require_labels=True)
    assert len(data) == 6 and label_names(data) == ["cat", "dog"]

    features = Features({"img": ImageFeature(), "fine_label": ClassLabel(names=["a", "b"])})
    table = Dataset.from_dict({"img": [Image.new("RGB", (8, 8))] * 4, "fine_label": [0, 1, 0, 1]}, features=features)
    DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "saved")
    saved = load_image_dataset(str(tmp_path / "saved"), split="test", require_labels=True)  # columns found by name
    assert saved.column_names == ["image", "label"] and label_names(saved) == ["a", "b"]

    table.to_parquet(tmp_path / "data.parquet")
    parquet = load_image_dataset(str(tmp_path / "data.parquet"), image_column="img", label_column="fine_label")
    assert parquet.column_names == ["image", "label"] and len(parquet) == 4
    # one file has one split: asking for another used to return the training rows as "test" rows
    with pytest.raises(DataError, match="--validation_split_percentage"):
        load_image_dataset(str(tmp_path / "data.parquet"), split="test", image_column="img")


def test_streaming_yields_examples():
    stream = load_image_dataset(None, split="train", streaming=True)
    first = next(iter(stream))
    assert set(first) == {"image", "label"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_column="pixels"), "--image_column 'pixels' is not a column"),
        (dict(label_column="target"), "--label_column 'target' is not a column"),
        (dict(split="validation"), "split 'validation'"),
    ],
)
def test_bad_columns_and_splits(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_image_dataset(None, **{"split": "train", **kwargs})


def test_missing_labels_are_reported(tmp_path):
    Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4))]}, features=Features({"image": ImageFeature()})
    ).save_to_disk(tmp_path / "unlabelled")
    assert load_image_dataset(str(tmp_path / "unlabelled")).column_names == ["image"]
    with pytest.raises(DataError, match="no label column"):
        load_image_dataset(str(tmp_path / "unlabelled"), require_labels=True)


def test_hub_dataset_offline_is_one_clear_error():
    with pytest.raises(DataError, match=r"cannot load data set 'nobody/no-such-dataset'"):
        load_image_dataset("nobody/no-such-dataset")


def test_unreadable_image_is_reported_before_training(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    (folder / "train" / "cat" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"unreadable image .*broken\.png"):
        load_image_dataset(str(folder), split="train")


def test_transform_and_collate(tmp_path):
    data = load_image_dataset(None, split="test", require_labels=True).select(range(5))
    processed = with_image_transform(data, HyperVQImageProcessor(size={"height": 16, "width": 16}))
    batch = collate([processed[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"], torch.tensor(data["label"]))
    flipped = with_image_transform(
        data, HyperVQImageProcessor(size={"height": 16, "width": 16}), lambda im, key: im.transpose(0)
    )
    assert torch.equal(collate([flipped[0]])["pixel_values"], batch["pixel_values"][:1].flip(-1))


def shifted(image, key):
    """An augmentation whose random numbers show in the output: a random shift of the image."""
    rng = key.rng()
    return image.rotate(0, translate=(rng.randint(-3, 3), rng.randint(-3, 3)))


def epoch_batches(examples, epoch, num_workers):
    examples.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=collate, num_workers=num_workers)
    return torch.cat([batch["pixel_values"] for batch in loader])


def test_augmentation_numbers_depend_on_seed_epoch_and_index_only():
    """Two loader workers used to draw the same numbers, and epoch 1 repeated epoch 0; a resume restarted them."""
    image = load_image_dataset(None, split="test").select(range(1))[0]["image"]
    data = Dataset.from_dict({"image": [image] * 16}, features=Features({"image": ImageFeature()}))
    processor = HyperVQImageProcessor(size={"height": 8, "width": 8})
    examples = with_image_transform(data, processor, shifted, seed=0)
    epoch0 = epoch_batches(examples, 0, num_workers=0)
    assert torch.equal(epoch_batches(examples, 0, num_workers=2), epoch0)  # workers change nothing
    assert not torch.equal(epoch0[:4], epoch0[4:8])  # the two workers' first batches (same images) differ
    assert not torch.equal(epoch_batches(examples, 1, num_workers=0), epoch0)  # a new epoch, new numbers
    examples.set_epoch(0)
    assert torch.equal(examples[9]["pixel_values"], epoch0[9])  # index 9 alone, as a resume would fetch it
    other_seed = with_image_transform(data, processor, shifted, seed=1)
    assert not torch.equal(epoch_batches(other_seed, 0, num_workers=0), epoch0)


def test_streams_are_shuffled_per_epoch_through_a_buffer():
    stream = load_image_dataset(None, split="train", require_labels=True, streaming=True)
    in_order = [example["label"] for example in stream.take(64)]
    processor = HyperVQImageProcessor(size={"height": 8, "width": 8})
    shuffled = with_image_transform(stream.take(64), processor, seed=0, shuffle_buffer_size=32)

    def labels(epoch):
        shuffled.set_epoch(epoch)
        return [int(example["labels"]) for example in shuffled]

    assert sorted(labels(0)) == sorted(in_order) and labels(0) != in_order
    assert labels(0) == labels(0) and labels(1) != labels(0)
    unshuffled = with_image_transform(stream.take(64), processor, seed=0)
    assert [int(example["labels"]) for example in unshuffled] == in_order


def _numbered_examples(shards):
    for shard in shards:
        for number in shard:
            yield {"image": Image.new("RGB", (8, 8), (number, 0, 0)), "label": number}


def numbered_stream(shard_sizes) -> IterableDataset:
    """A stream of small images whose `label` is their number, in shards of `shard_sizes` examples."""
    ends = np.cumsum(shard_sizes).tolist()
    shards = [list(range(end - size, end)) for size, end in zip(shard_sizes, ends)]
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    return IterableDataset.from_generator(_numbered_examples, features=features, gen_kwargs={"shards": shards})


@pytest.mark.parametrize("shard_sizes, num_workers", [([37], 0), ([3, 14, 5, 15], 0), ([3, 14, 5, 15], 2)])
def test_a_stream_split_across_processes_gives_each_example_to_one_of_them(shard_sizes, num_workers):
    """Two processes' parts of a stream (`split_dataset_by_node`: every other example of one shard, or two whole
    shards each of four; two loader workers take a shard each): no example twice, none lost, every one read before
    the loop hears that the part is read (the shards differ in length), and augmentation keys that differ between
    the processes."""
    processor = HyperVQImageProcessor(size={"height": 8, "width": 8})
    labels, keys = {}, {}
    for rank in (0, 1):
        keys[rank] = []

        def record(image, key, keys=keys[rank]):
            keys.append(key)
            return image

        stream = with_image_transform(
            numbered_stream(shard_sizes), processor, record if num_workers == 0 else None, seed=0,
            shuffle_buffer_size=8, rank=rank, world_size=2,
        )  # fmt: skip
        stream.set_epoch(1)
        loader = torch.utils.data.DataLoader(stream, batch_size=1, collate_fn=collate, num_workers=num_workers)
        parts, labels[rank] = PartsRead(num_workers), []
        for batch in loader:  # it does not end: a process goes round its part until every process has read its own
            repeated = batch[REPEATED]
            parts.see(batch)
            if parts.read:
                break
            if not repeated:
                labels[rank].append(int(batch["labels"]))
    assert sorted(labels[0] + labels[1]) == list(range(37))
    if len(shard_sizes) == 1:
        assert sorted(len(part) for part in labels.values()) == [18, 19]  # every other example
    else:
        ends = np.cumsum(shard_sizes)
        shards_of = [{int(np.searchsorted(ends, n, side="right")) for n in part} for part in labels.values()]
        assert [len(shards) for shards in shards_of] == [2, 2]  # whole shards
    if num_workers == 0:
        assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
        assert {key.epoch for key in keys[0]} == {1}


def test_a_stream_read_by_one_process_ends_after_its_examples():
    stream = with_image_transform(numbered_stream([3, 2]), HyperVQImageProcessor(size={"height": 8, "width": 8}))
    examples = list(stream)
    assert [int(e["labels"]) for e in examples] == list(range(5)) and REPEATED not in examples[0]


def test_vqsa_augmentation_depends_on_the_key_only():
    from hf_hypervq.training.data import SampleKey
    from hf_hypervq.training.vqsa import TrainAugmentation

    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    augment = TrainAugmentation(32, corruptions=False)
    first = np.asarray(augment(image, SampleKey(0, 0, 5)))
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, np.asarray(augment(image, SampleKey(0, 0, 5))))  # the same key, the same crop
    others = [np.asarray(augment(image, SampleKey(0, epoch, 5))) for epoch in (1, 2, 3)]
    assert not all(np.array_equal(first, other) for other in others)


def test_token_dataset_items():
    from hf_hypervq.training.data import TokenDataset

    tokens, labels = torch.arange(12).reshape(3, 2, 2), torch.tensor([2, 0, 1])
    assert set(TokenDataset(tokens, labels)[1]) == {"image_tokens", "class_labels"}
    assert (
        torch.equal(TokenDataset(tokens, None)[2]["image_tokens"], tokens[2]) and len(TokenDataset(tokens, None)) == 3
    )


def _disc_photo(width=200, height=100):
    """A 2:1 photo with a centred disc, as a JPEG would carry it."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (30, 60, 90))
    r = 0.4 * height
    ImageDraw.Draw(image).ellipse([width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r], fill="white")
    return image


def _disc_aspect(pixel_values: torch.Tensor) -> float:
    """Width over height of the bright disc in a processed (channels, height, width) image."""
    bright = pixel_values.mean(0) > 0.5
    rows, columns = bright.any(1).nonzero(), bright.any(0).nonzero()
    return (columns.max() - columns.min() + 1).item() / (rows.max() - rows.min() + 1).item()


def test_the_image_rule_keeps_a_photo_in_proportion():
    """--image_size N: shorter side to N, centre N×N crop. Resizing to N×N made the 2:1 photo's disc an ellipse."""
    photo = _disc_photo()
    rule = HyperVQImageProcessor.for_image_size(32)(images=photo, return_tensors="pt")["pixel_values"][0]
    assert rule.shape == (3, 32, 32) and abs(_disc_aspect(rule) - 1) < 0.1
    squashed = HyperVQImageProcessor(size={"height": 32, "width": 32})(images=photo, return_tensors="pt")
    assert abs(_disc_aspect(squashed["pixel_values"][0]) - 0.5) < 0.1
    square = Image.new("RGB", (8, 8), (10, 200, 30))  # a square image is simply resized, as before
    before = HyperVQImageProcessor(size={"height": 16, "width": 16})(images=square, return_tensors="pt")
    after = HyperVQImageProcessor.for_image_size(16)(images=square, return_tensors="pt")
    assert torch.equal(before["pixel_values"], after["pixel_values"])
    with pytest.raises(ValueError, match="`image_size` must be a positive integer"):
        HyperVQImageProcessor.for_image_size(0)


def test_a_tokenizer_trained_on_photos_saves_the_rule_with_it(tmp_path, run_command):
    """The processor saved with the tokenizer carries the rule: every later consumer (tokenization, the demo, the
    pipeline) applies it, and the disc comes out round."""
    from transformers import AutoImageProcessor

    for name in ("a", "b"):
        (tmp_path / "photos" / "train" / name).mkdir(parents=True)
        for i in range(4):
            _disc_photo().save(tmp_path / "photos" / "train" / name / f"{i}.jpg")
    status, err = run_command(
        "train_vqvae", "--cpu", "--dataset", tmp_path / "photos", "--output_dir", tmp_path / "out", "--image_size", 16,
        "--max_train_steps", 1, "--hidden_size", 8, "--residual_hidden_size", 4, "--embedding_dim", 4,
        "--codebook_size", 8, "--num_residual_layers", 1, "--per_device_train_batch_size", 4,
        "--validation_split_percentage", 25, "--eval_at_end_only", "--train_augmentation", "crop_flip",
    )  # fmt: skip
    assert status == 0, err
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"shortest_edge": 16} and processor.do_center_crop
    assert abs(_disc_aspect(processor(images=_disc_photo(), return_tensors="pt")["pixel_values"][0]) - 1) < 0.15


def test_the_random_crop_and_flip_is_a_function_of_the_sample_key():
    from hf_hypervq.training.data import RandomCropFlip, SampleKey

    augment, photo = RandomCropFlip(32), _disc_photo()
    crops = [augment(photo, SampleKey(0, 0, index)) for index in range(12)]
    assert all(crop.size == (32, 32) for crop in crops)
    assert np.array_equal(np.asarray(augment(photo, SampleKey(0, 0, 3))), np.asarray(crops[3]))  # repeatable
    assert len({np.asarray(crop).tobytes() for crop in crops}) > 3  # different crops and flips


def test_a_data_file_of_image_paths_relative_to_it_loads_the_images(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (10, 6), (i * 80, 20, 20)).save(tmp_path / "data" / "images" / f"{i}.png")
    rows = "".join(f"images/{i}.png,{i % 2}\n" for i in range(3))
    (tmp_path / "data" / "train.csv").write_text("image,label\n" + rows)
    monkeypatch.chdir(tmp_path)  # the paths are relative to the file, not to where the run starts
    data = load_image_dataset(str(tmp_path / "data" / "train.csv"))
    assert data[2]["image"].size == (10, 6) and data[2]["image"].getpixel((0, 0)) == (160, 20, 20)
    (tmp_path / "data" / "numbers.csv").write_text("image,label\n1,0\n2,1\n")
    with pytest.raises(DataError, match="its image column holds .*not images or paths to them"):
        load_image_dataset(str(tmp_path / "data" / "numbers.csv"))


def test_an_unreadable_image_past_the_checked_ones_is_named_when_the_loader_meets_it(tmp_path):
    """Only the first images are opened up front (every one would be read twice); a bad one further on stops the
    run with its rows named, not a trace from deep inside PIL."""
    from hf_hypervq.training.data import IMAGES_TO_CHECK

    folder = tmp_path / "folder" / "train" / "cat"
    folder.mkdir(parents=True)
    for i in range(IMAGES_TO_CHECK + 2):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i:03d}.png")
    (folder / "999.png").write_bytes(b"this is not a png")  # sorted last
    data = load_image_dataset(str(tmp_path / "folder"), split="train")
    examples = with_image_transform(data, HyperVQImageProcessor(size={"height": 4, "width": 4}))
    examples[0]
    with pytest.raises(DataError, match=f"unreadable image among rows {len(data) - 1}"):
        examples[len(data) - 1]


def test_shuffled_indices_are_a_permutation_of_the_seed_and_epoch():
    from hf_hypervq.training.data import ShuffledIndices

    sampler = ShuffledIndices(200_000, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(200_000)) and first != list(range(200_000))
    assert list(ShuffledIndices(200_000, seed=3)) == first  # a function of (seed, epoch) alone
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_a_folder_of_parquet_shards_loads_as_the_hub_s_copy_would(tmp_path):
    """The rehearsal data's two forms: an image folder and Parquet shards of encoded JPEGs (a local copy of a Hub
    data set); a folder written by save_to_disk streams in shards that processes and loader workers can share."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_rehearsal_data.py"
    spec = importlib.util.spec_from_file_location("make_rehearsal_data", script)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    folder = make.make_rehearsal_data(tmp_path / "data", 12)
    images, shards = (load_image_dataset(str(folder / form), split="train") for form in ("images", "parquet"))
    assert images.num_rows == shards.num_rows == 12 and images.features == shards.features
    assert sorted(i.size for i in images["image"]) == sorted(i.size for i in shards["image"])
    shards.save_to_disk(str(tmp_path / "saved"))
    assert load_image_dataset(str(tmp_path / "saved"), split="train", streaming=True).num_shards == 12
