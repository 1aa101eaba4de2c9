"""Data sets for the training scripts: a Hub id, a local image folder / saved data set / data file, the embedded
default, scikit-learn's handwritten digits, or Fashion-MNIST from Debian's `dataset-fashion-mnist` package (real
data that needs no network)."""

import gzip
import io
import random
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader


# Columns of well-known Hub data sets (their dataset cards), tried when --image_column/--label_column are not given.
IMAGE_COLUMNS = ("image", "img", "pixel_values", "png", "jpg")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")
DEFAULT_DATASET = "scikit-learn digits"
# Local data sets up to this size have every image opened before training starts.
IMAGES_TO_CHECK = 64  # opened up front: a data set of unreadable files fails at once
STREAM_SHARDS = 64  # a folder written by save_to_disk, streamed: its shards
# `--dataset fashion_mnist`: Fashion-MNIST read from the IDX files of Debian's `dataset-fashion-mnist` package.
FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_FOLDER = "/usr/share/datasets/fashion-mnist"
# The class names of the Hub's zalando-datasets/fashion_mnist (its spelling, so that label names and a classifier's
# id2label agree whichever copy a model was trained on).
FASHION_MNIST_CLASSES = (
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}  # split -> IDX file prefix
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 resp. 1 dimensions


class DataError(ValueError):
    """A problem with the data the user asked for, reported as one line before training starts."""


def digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels) as a `DatasetDict` with a stratified 80/20
    train/test split; `image` is a PIL grey image, `label` a `ClassLabel` of "0" ... "9"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    data = Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )
    return data.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")


def read_idx(path, *, images: bool) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed when its name ends in .gz) as a `(count, rows, cols)` array of
    images or a `(count,)` array of labels. A file that is not one raises `DataError` naming it."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError on a damaged file
        raise DataError(f"cannot read IDX file {path}: {error}") from None
    dimensions, magic = (3, _IDX_IMAGES_MAGIC) if images else (1, _IDX_LABELS_MAGIC)
    header = 4 + 4 * dimensions
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        kind = "images" if images else "labels"
        found_text = "none: the file is shorter than 4 bytes" if found is None else f"0x{found:08x}"
        raise DataError(f"{path} is not an IDX file of {kind}: magic number {found_text}, expected 0x{magic:08x}")
    if len(raw) < header:
        raise DataError(f"{path} is damaged: it ends inside its {header}-byte header ({len(raw)} bytes)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=dimensions, offset=4))  # big-endian sizes
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"{path} is damaged: its header gives sizes {' × '.join(map(str, shape))}, which take "
            f"{header + int(np.prod(shape))} bytes, but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist_examples(images_path: str, labels_path: str, file_stamps: tuple):
    # `file_stamps` (the files' sizes and modification times) is not used here: it is an argument so that datasets'
    # cache key, and with it the built split, changes when the files do.
    images, labels = read_idx(images_path, images=True), read_idx(labels_path, images=False)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path} has label {labels.max()}; Fashion-MNIST's labels are 0 to 9")
    for image, label in zip(images, labels):
        yield {"image": Image.fromarray(image, mode="L"), "label": int(label)}


def _fashion_mnist_split(folder, split: str) -> Dataset:
    if split not in _FASHION_MNIST_FILES:
        raise DataError(f"split {split!r} is not in Fashion-MNIST (splits: {list(_FASHION_MNIST_FILES)})")
    prefix = _FASHION_MNIST_FILES[split]
    paths = [Path(folder) / f"{prefix}-images-idx3-ubyte.gz", Path(folder) / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST is not installed: {missing[0]} is missing (apt-get install dataset-fashion-mnist, or "
            "use the Hub's copy: --dataset zalando-datasets/fashion_mnist)"
        )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    # Built once into datasets' cache (the files are read only then), memory-mapped from it afterwards.
    try:
        return Dataset.from_generator(
            _fashion_mnist_examples,
            features=features,
            gen_kwargs={"images_path": str(paths[0]), "labels_path": str(paths[1]), "file_stamps": stamps},
            split=datasets.NamedSplit(split),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):  # our one line, not datasets' wrapper around it
            raise error.__cause__ from None
        raise


def fashion_mnist_dataset(folder=FASHION_MNIST_FOLDER) -> DatasetDict:
    """Fashion-MNIST (Zalando's 70,000 28×28 grey images of 10 kinds of clothing) from the four IDX files in `folder`
    (Debian's `dataset-fashion-mnist` package puts them in /usr/share/datasets/fashion-mnist), as a `DatasetDict` of
    `train` (60,000) and `test` (10,000), with the columns of the Hub's zalando-datasets/fashion_mnist: `image`, a
    PIL grey image, and `label`, a `ClassLabel` of `FASHION_MNIST_CLASSES`. Each split is built once into datasets'
    cache; a missing or damaged file raises `DataError` naming it."""
    return DatasetDict({split: _fashion_mnist_split(folder, split) for split in _FASHION_MNIST_FILES})


def _load(name_or_path: str, config_name: str | None, split: str, streaming: bool, revision: str | None = None):
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DataError(f"split {split!r} is not in {name_or_path} (splits: {list(loaded)})")
            loaded = loaded[split]
        # in shards, so that processes and loader workers can each take whole shards of the stream
        return loaded.to_iterable_dataset(num_shards=min(STREAM_SHARDS, max(1, len(loaded)))) if streaming else loaded
    if path.is_dir():  # images (`imagefolder`) or data files (a local copy of a Hub data set's Parquet shards)
        return datasets.load_dataset(str(path), split=split, streaming=streaming)
    if path.is_file():
        builder = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".json": "json"}.get(path.suffix)
        if builder is None:
            raise DataError(f"{name_or_path}: data files must be .parquet, .csv, .json or .jsonl")
        if split != "train":  # datasets would hand back the same rows for any split name
            raise DataError(
                f"{name_or_path} is one data file, so it has only a 'train' split, not {split!r}: pass "
                "--validation_split_percentage N to hold out N% of it for evaluation"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    return datasets.load_dataset(name_or_path, config_name, split=split, streaming=streaming, revision=revision)


def _pick_column(columns, explicit: str | None, candidates, flag: str, name: str, required: bool) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{flag} {explicit!r} is not a column of {name}; its columns are {sorted(columns)}")
        return explicit
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise DataError(f"{name} has no {flag[2:].replace('_', ' ')} among {sorted(columns)}; pass {flag}")
    return found


def load_image_dataset(
    name_or_path: str | None = None,
    *,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
    streaming: bool = False,
    revision: str | None = None,
    keep_columns=(),
) -> Dataset | IterableDataset:
    """One split of an image data set, with its columns renamed to `image` (and `label` when there is one).

    `name_or_path` is a Hub id (`uoft-cs/cifar100`, `ylecun/mnist`, `ILSVRC/imagenet-1k`), a folder of
    `split/class/*.png` images, a folder written by `save_to_disk`, a data file, `None` for the embedded digits, or
    `"fashion_mnist"` for Fashion-MNIST from Debian's package (`fashion_mnist_dataset`; a local folder or file of that
    name is read as one).
    Every problem (no such data set offline, a missing column, an unreadable image) raises `DataError` with one
    line that names it. `revision` (a branch, tag or commit) applies to a Hub id. `keep_columns` are kept as they
    are (the others are dropped).
    """
    name = name_or_path or DEFAULT_DATASET
    from_debian = name_or_path == FASHION_MNIST and not Path(name_or_path).exists()
    if name_or_path is None:
        splits = digits_dataset()
        if split not in splits:
            raise DataError(f"split {split!r} is not in {DEFAULT_DATASET} (splits: {list(splits)})")
        data = splits[split].to_iterable_dataset() if streaming else splits[split]
    elif from_debian:
        data = _fashion_mnist_split(FASHION_MNIST_FOLDER, split)  # only the split asked for is built
        data = data.to_iterable_dataset() if streaming else data
    else:
        try:
            data = _load(name_or_path, config_name, split, streaming, revision)
        except DataError:
            raise
        except Exception as error:  # datasets raises many types here: not found, offline, bad split, ...
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"cannot load data set {name!r} (split {split!r}): {message}") from None
    columns = list(data.column_names or data.features or [])
    image = _pick_column(columns, image_column, IMAGE_COLUMNS, "--image_column", name, required=True)
    label = _pick_column(columns, label_column, LABEL_COLUMNS, "--label_column", name, required=require_labels)
    renames = {old: new for old, new in ((image, "image"), (label, "label")) if old is not None and old != new}
    for column in keep_columns:
        if column not in columns:
            raise DataError(f"--keep_columns {column!r} is not a column of {name}; its columns are {sorted(columns)}")
        if column in (image, label, *renames.values()):
            raise DataError(f"--keep_columns {column!r} is {name}'s image or label column, which is always kept")
    keep = ["image"] + (["label"] if label else []) + list(keep_columns)
    data = data.rename_columns(renames) if renames else data
    data = data.select_columns(keep)
    if name_or_path is not None and Path(name_or_path).is_file():
        data = _images_from_paths(data, Path(name_or_path))
    if not streaming and not from_debian:  # Fashion-MNIST's images were encoded here, from the IDX bytes
        check_images(data, name)
    return data


def _images_from_paths(data, data_file: Path):
    """A CSV, JSON or Parquet file whose image column holds file paths (relative to the file) or URLs: datasets'
    `Image()` feature loads them. Paths are made absolute first, so the run may start from any folder."""
    feature = (data.features or {}).get("image")
    if isinstance(feature, ImageFeature):
        return data
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(
            f"{data_file}: its image column holds {feature}, not images or paths to them; store file paths (relative "
            "to the file) or URLs, or encoded images (datasets' Image() feature, as in Parquet files on the Hub)"
        )
    folder = data_file.resolve().parent

    def absolute(batch):
        return {"image": [path if "://" in path else str(folder / path) for path in batch["image"]]}

    return data.map(absolute, batched=True).cast_column("image", ImageFeature())


def check_images(data: Dataset, name: str, count: int = IMAGES_TO_CHECK) -> None:
    """Open the first `count` images up front, so that a data set of unreadable files (the wrong folder, a
    truncated download) stops the run before training. Not every image: that would read each one twice; an
    unreadable image further on stops the run when the loader meets it, naming its row (`ImageExamples`)."""
    raw = data.cast_column("image", ImageFeature(decode=False))
    for index in range(min(count, len(raw))):
        entry = raw[index]["image"]
        try:
            if entry is None:
                raise ValueError("no image")
            source = entry.get("path") if entry.get("bytes") is None else io.BytesIO(entry["bytes"])
            with Image.open(source) as image:
                image.verify()
        except Exception as error:
            where = entry.get("path") if isinstance(entry, dict) and entry.get("path") else f"row {index}"
            raise DataError(f"unreadable image in {name}: {where} ({type(error).__name__}: {error})") from None


def label_names(data: Dataset | IterableDataset) -> list[str] | None:
    """Class names of the `label` column (from its `ClassLabel` feature), or None."""
    feature = (data.features or {}).get("label")
    return list(feature.names) if isinstance(feature, ClassLabel) else None


class SampleKey(NamedTuple):
    """What an example's augmentation random numbers are drawn from: the run's seed, the epoch and the example's
    index. They do not depend on the worker, the process or what came before, so two loader workers never draw the
    same numbers, every epoch draws new ones, and a resumed run draws those of an uninterrupted one."""

    seed: int
    epoch: int
    index: int

    def rng(self) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{self.index}")  # str seeds hash with SHA-512: stable


class _ImageTransform:
    """`image` -> `pixel_values` with `processor`, after `augment(pil_image, key) -> pil_image` when given."""

    def __init__(self, processor, augment, seed: int):
        self.processor, self.augment, self.seed, self.epoch = processor, augment, seed, 0

    def __call__(self, batch: dict, indices) -> dict:
        images = [image.convert("RGB") if self.processor.do_convert_rgb else image for image in batch["image"]]
        if self.augment is not None:
            images = [self.augment(image, SampleKey(self.seed, self.epoch, i)) for image, i in zip(images, indices)]
        out = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        if "label" in batch:
            out["labels"] = torch.as_tensor(batch["label"])
        return out


def decoded_rows(data: Dataset, positions: list[int], first_index: int = 0) -> dict:
    """Rows `positions` of `data` as a batch, their images decoded (by datasets); an unreadable image is a
    `DataError` naming the rows, numbered from `first_index`."""
    try:
        return data[positions]
    except Exception as error:
        first, last = first_index + positions[0], first_index + positions[-1]
        raise DataError(f"unreadable image among rows {first}..{last}: {type(error).__name__}: {error}") from None


def unbatch(batch: dict, count: int) -> list[dict]:
    """A batch of `count` rows (a dict of columns) as a list of rows, as a loader's `__getitems__` returns them."""
    return [{key: value[i] for key, value in batch.items()} for i in range(count)]


class ImageExamples(torch.utils.data.Dataset):
    """A map-style data set's rows as model inputs (`pixel_values`, `labels`), transformed as the loader fetches
    them; `set_epoch` tells the augmentation which epoch it is in."""

    def __init__(self, data: Dataset, transform: _ImageTransform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.transform.epoch = epoch

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return unbatch(self.transform(decoded_rows(self.data, indices), indices), len(indices))

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


# In the examples (and batches) of a stream split across processes: True once they come from a further round over
# the process's own part of the epoch, which it reads while the other processes finish theirs (`ImageStream`).
REPEATED = "repeated"
# Stream examples decoded and transformed together (the processor takes a list of images).
STREAM_CHUNK = 64


class ImageStream(torch.utils.data.IterableDataset):
    """A streaming data set as model inputs, shuffled through a buffer of `shuffle_buffer_size` examples (reseeded
    every epoch) when that is given. An example's augmentation key is its position in what its loader worker has
    read of the epoch, made distinct across loader workers and processes.

    With `world_size` > 1, process `rank` reads only its own part of the stream (`split_dataset_by_node`: whole shards
    when their number divides by `world_size`, else every `world_size`-th example of the shuffled stream, so a
    different part every epoch; the other processes' examples are skipped before they are decoded), and its loader
    workers split that part further when it has enough shards. The parts differ in length, so such a stream does not
    end: after its part of the epoch, a process goes round it again (examples marked `REPEATED`, with new
    augmentation keys) until every process has read its own, which the training loop checks where it reads the loss
    (`loop.train`)."""

    def __init__(self, data: IterableDataset, transform: _ImageTransform, shuffle_buffer_size: int | None,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.transform, self.rank, self.world_size = transform, rank, world_size
        self.endless = world_size > 1
        if world_size > 1:  # applied by datasets as it iterates: to the shards, or to the shuffled examples
            data = split_dataset_by_node(data, rank=rank, world_size=world_size)
        if shuffle_buffer_size is not None:
            data = data.shuffle(seed=transform.seed, buffer_size=shuffle_buffer_size)
        # Decoded by datasets as it yields them, transformed here: a datasets `map` would run under the split, on
        # the other processes' examples too
        self.data = data

    def _transform(self, batch: dict, positions: list[int]) -> dict:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        keys = [(position * workers + worker_id) * self.world_size + self.rank for position in positions]
        return self.transform(batch, keys)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)
        self.transform.epoch = epoch

    def __iter__(self):
        position, repeated = 0, False
        while True:
            start = position
            chunk = []
            for example in self.data:
                chunk.append(example)
                if len(chunk) == STREAM_CHUNK:
                    yield from self._examples(chunk, position, repeated)
                    position, chunk = position + len(chunk), []
            if chunk:
                yield from self._examples(chunk, position, repeated)
                position += len(chunk)
            if not self.endless or position == start:  # a worker without shards reads nothing: it stops
                return
            repeated = True

    def _examples(self, chunk: list[dict], position: int, repeated: bool):
        batch = {column: [example[column] for example in chunk] for column in chunk[0]}
        out = self._transform(batch, list(range(position, position + len(chunk))))
        for i in range(len(chunk)):
            example = {key: value[i] for key, value in out.items()}
            if self.endless:
                example[REPEATED] = repeated
            yield example


def with_image_transform(data, processor, augment=None, *, seed: int = 0, shuffle_buffer_size: int | None = None,
                         rank: int = 0, world_size: int = 1):  # fmt: skip
    """Lazily turn `image` into `pixel_values` with `processor` (and `label` into `labels`), as a torch data set with
    `set_epoch`. `augment(pil_image, key) -> pil_image` runs first: it draws its random numbers from `key.rng()`
    (a `SampleKey` of `seed`, the epoch and the example's index). A streaming data set is shuffled through a buffer
    of `shuffle_buffer_size` examples when given, and process `rank` of `world_size` reads only its part of it
    (`ImageStream`)."""
    transform = _ImageTransform(processor, augment, seed)
    if isinstance(data, IterableDataset):
        return ImageStream(data, transform, shuffle_buffer_size, rank=rank, world_size=world_size)
    return ImageExamples(data, transform)


def collate(examples: list[dict]) -> dict:
    """Stack `pixel_values` (and `labels`) of a list of examples into a batch."""
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.as_tensor([int(e["labels"]) for e in examples])
    if REPEATED in examples[0]:  # a Python bool, which the loop reads without waiting for the device
        batch[REPEATED] = bool(examples[-1][REPEATED])
    return batch


# ---- the splits and loaders the training flags ask for ----


class ShuffledIndices(torch.utils.data.Sampler):
    """A shuffled order of `num_rows` indices, a function of (seed, epoch) alone (accelerate calls `set_epoch`), taken
    from a tensor a chunk at a time: torch's `RandomSampler` turns the whole permutation into a Python list, 150 MB
    at 4 M rows, in every process."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def __len__(self) -> int:
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for chunk in torch.randperm(self.num_rows, generator=generator).split(1 << 16):
            yield from chunk.tolist()


def make_loader(dataset, batch_size: int, collate_fn, args, shuffle: bool, large: bool = False) -> DataLoader:
    """`large`: a data set of many small rows (token grids), shuffled by `ShuffledIndices` so that memory does not
    grow with it."""
    # The loader's own generator keeps its per-epoch seed draw off the global RNG, which the quantizer's Gumbel
    # noise uses and a checkpoint restores.
    shuffle = shuffle and not args.streaming
    sampler = ShuffledIndices(len(dataset), args.seed) if shuffle and large else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    return _prepared_as_is(loader) if isinstance(dataset, ImageStream) else loader


def _prepared_as_is(loader: DataLoader):
    """A stream's loader as `accelerator.prepare` hands loaders back (batches on the device, `set_epoch`, known to
    gradient accumulation), but neither dispatched nor split again: its `ImageStream` reads only this process's part.
    Passed to `prepare` as it is, accelerate 1.16 would send every batch from process 0 (`dispatch_batches`, its
    default for an IterableDataset: one process decodes every image), or with `dispatch_batches=False` wrap it in an
    `IterableDatasetShard` (every process reads all of it, keeping one batch in N). Its `prepare_data_loader` for one
    process gives the loader without either; `prepare` then passes it through, as it does every prepared loader."""
    from accelerate.data_loader import prepare_data_loader
    from accelerate.state import PartialState

    prepared = prepare_data_loader(loader, PartialState().device, num_processes=1, process_index=0,
                                   put_on_device=True, dispatch_batches=False)  # fmt: skip
    prepared._is_accelerate_prepared = True
    return prepared


def make_loaders(args, train_data, eval_data, processor, augment=None) -> tuple[DataLoader, DataLoader]:
    """The training and evaluation loaders of images turned into `pixel_values` by `processor`; `augment(image,
    key)` (training only) draws its random numbers from the example's `SampleKey` of (--seed, epoch, index)."""
    processes = {}
    if isinstance(train_data, IterableDataset):  # each process streams its own part
        from accelerate.state import PartialState

        state = PartialState()
        processes = {"rank": state.process_index, "world_size": state.num_processes}
    train_examples = with_image_transform(
        train_data, processor, augment, seed=args.seed, shuffle_buffer_size=args.shuffle_buffer_size or None,
        **processes,
    )  # fmt: skip
    train_loader = make_loader(train_examples, args.per_device_train_batch_size, collate, args, shuffle=True)
    eval_loader = make_loader(with_image_transform(eval_data, processor), args.per_device_eval_batch_size, collate,
                              args, shuffle=False)  # fmt: skip
    return train_loader, eval_loader


def load_splits(args, require_labels: bool = False):
    """The training and evaluation splits the flags ask for, cut to --max_train_samples / --max_eval_samples; sets
    `args.eval_split` to the evaluation split actually used (results and cards record it). Call it inside
    `accelerator.main_process_first()`, so that the other processes find the data set cached."""
    common = dict(
        config_name=args.dataset_config,
        image_column=args.image_column,
        label_column=args.label_column,
        require_labels=require_labels,
        revision=getattr(args, "dataset_revision", None),  # the commit `cli.make_accelerator` resolved
    )
    train_data = load_image_dataset(args.dataset, split=args.train_split, streaming=args.streaming, **common)
    if args.validation_split_percentage:
        label = "label" if "label" in train_data.column_names else None
        try:
            parts = train_data.train_test_split(
                test_size=args.validation_split_percentage / 100, seed=args.seed, stratify_by_column=label
            )
        except ValueError:  # too few examples of a class to stratify
            parts = train_data.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train_data, eval_data = parts["train"], parts["test"]
        args.eval_split = f"{args.train_split} ({args.validation_split_percentage}% held out, seed {args.seed})"
    elif args.eval_split is not None:
        eval_data = load_image_dataset(args.dataset, split=args.eval_split, **common)
    else:  # test, else validation (ImageNet has no labelled test split)
        try:
            eval_data = load_image_dataset(args.dataset, split="test", **common)
            args.eval_split = "test"
        except DataError:
            eval_data = load_image_dataset(args.dataset, split="validation", **common)
            args.eval_split = "validation"  # recorded as the split actually used
    if args.max_train_samples:
        if args.streaming:
            train_data = train_data.take(args.max_train_samples)
        else:
            train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    if args.max_eval_samples:
        eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
    return train_data, eval_data


# ---- token grids, for the prior ----


class TokenDataset(torch.utils.data.Dataset):
    """Token grids (and class labels) held in memory, as the prior trains on them."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor | None):
        self.tokens, self.labels = tokens, labels

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        item = {"image_tokens": self.tokens[index]}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


@torch.no_grad()
def tokenize_split(data, tokenizer, processor, accelerator, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token grids (and labels) of a whole split, computed once, spread over the processes and gathered."""
    loader = make_loader(with_image_transform(data, processor), args.per_device_eval_batch_size, collate, args, False)
    loader = accelerator.prepare(loader)
    tokens, labels = [], []
    for batch in loader:
        image_tokens = tokenizer.get_image_tokens(batch["pixel_values"].to(tokenizer.device))
        gathered = accelerator.gather_for_metrics(
            (
                image_tokens,
                batch.get("labels", torch.zeros(len(image_tokens), dtype=torch.long, device=image_tokens.device)),
            )
        )
        tokens.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
    return torch.cat(tokens), torch.cat(labels) if "label" in data.column_names else None


class RandomCropFlip:
    """`--train_augmentation crop_flip`: the shorter side resized to `size`, a random `size`×`size` crop and a
    horizontal flip half the time, as LlamaGen and TiTok train their tokenizers. Its random numbers come from the
    example's `SampleKey`, so a resumed run draws those of an uninterrupted one."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, key: SampleKey):
        rng = key.rng()
        width, height = image.size
        scale = self.size / min(width, height)
        resized = image.resize((max(self.size, round(width * scale)), max(self.size, round(height * scale))),
                               Image.BILINEAR)  # fmt: skip
        left, top = rng.randint(0, resized.width - self.size), rng.randint(0, resized.height - self.size)
        crop = resized.crop((left, top, left + self.size, top + self.size))
        return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
