"""Token datasets: an image data set tokenized once by a frozen tokenizer and kept as a `datasets` data set, so that
token models (the prior, or any MaskGIT- or LlamaGen-style model) train on it many times without the tokenizer.

A token dataset is a folder laid out as a Hub dataset repository, which is what `hub.push_token_dataset` uploads:

    data/train-00000-of-00015.parquet ...  one Parquet file per shard: `input_ids`, the token grid flattened row-major
                                           in the smallest unsigned integer type that holds K, and `label` when the
                                           source has one
    tokenization.json                      how the tokens were made: the tokenizer (where from, its revision, the
                                           SHA-256 of its weights), image size, grid, K, the image processor, the
                                           source, and each split's codebook usage

    README.md                              the dataset card (`hub.build_dataset_card`), with the `configs` and
                                           `dataset_info` that datasets reads

so `datasets.load_dataset(folder_or_repo_id)` reads it anywhere, and `load_token_dataset` adds `tokenization.json`.
Nothing half-written is ever visible: finished shards wait in the hidden folder `.tokenizing/` (datasets skips
dot-folders), which a rerun of the same tokenization resumes from, and move into `data/` only when every shard is
done, just before the card and `tokenization.json`.
"""

import contextlib
import json
import math
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset, List, Value
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from tqdm.auto import tqdm

from ..metrics.codebook_usage.codebook_usage import usage_from_counts
from .data import DataError, SampleKey, decoded_rows, unbatch
from .generation import recorded_tokenizer, weights_sha256
from .outputs import write_json


METADATA_FILE = "tokenization.json"
STAGING_DIR = ".tokenizing"  # an unfinished run's shards and settings, hidden from datasets until the run completes
PARTIAL_METADATA_FILE = f"{STAGING_DIR}/{METADATA_FILE}"  # what an unfinished run is doing, for its resume
DATA_DIR = "data"
CARD_FILE = "README.md"
FORMAT = "hf-hypervq token dataset"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = "500MB"  # datasets' own default for `push_to_hub`
MAX_STREAM_SHARDS = 1000
# The split names datasets accepts (and that can name a file).
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")
# The image processor settings the dataset card shows (the whole processor is in tokenization.json).
PROCESSOR_SETTINGS = ("size", "resample", "do_center_crop", "crop_size", "do_pad", "pad_size", "do_convert_rgb",
                      "image_mean", "image_std")  # fmt: skip


def parse_size(size) -> int:
    """Bytes from an int or a string such as "500MB" or "1GiB" (as datasets' `max_shard_size`)."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size if not str(size).isdigit() else int(size))
    except ValueError:
        raise ValueError("not a size: write it as e.g. 500MB or 1GB") from None
    if value < 1:
        raise ValueError("must be at least 1 byte")
    return value


def token_dtype(codebook_size: int) -> str:
    """The smallest unsigned integer type that holds K: the ids are 0 to K - 1, and K itself fits too, so a token
    model can use it as an extra (mask or start) token without a cast."""
    for dtype in ("uint8", "uint16", "uint32"):
        if codebook_size <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a codebook of {codebook_size} codes does not fit 32-bit token ids")


def shard_path(folder, split: str, index: int, count: int, staged: bool = False) -> Path:
    """Where shard `index` of `count` of a split goes: datasets' own naming, which it reads as that split; with
    `staged`, where it waits until the run completes."""
    return Path(folder) / (STAGING_DIR if staged else "") / DATA_DIR / f"{split}-{index:05d}-of-{count:05d}.parquet"


def is_hub_id(name) -> bool:
    """Whether `name` reads as a Hub repo id ('namespace/name') rather than a local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "~", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def resolve_commit(repo_id: str, revision: str | None, *, repo_type: str = "model", filename: str, flag: str) -> str:
    """The commit that `revision` (a branch, tag or commit; default main) of a Hub repo is at, resolved once so that
    every later read uses the same files: the snapshot folder `filename` lands in is named after it (which also works
    offline, from the cache). `DataError` in one line naming `flag` otherwise."""
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type))
    except EntryNotFoundError:  # the repo is there, the file not: the caller says what that means
        raise
    except Exception as error:  # not found, offline and not cached, no such revision, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        at = f" at revision {revision!r}" if revision else ""
        raise DataError(f"{flag} {repo_id}{at}: cannot read it from the Hub ({reason})") from None
    return path.parents[len(Path(filename).parts) - 1].name  # .../snapshots/<commit>/<filename>


def tokenizer_record(name_or_path, tokenizer, revision: str | None = None) -> dict:
    """How a token dataset records its tokenizer: a Hub id with the commit it was loaded at (`revision`, resolved
    by `resolve_commit`), or a local folder as its absolute path (usable on this machine only: such a dataset cannot
    be pushed); the SHA-256 of its weights (which identifies it anywhere), its quantizer and downsampling factor, and
    its own evaluation when its folder or repository has `eval_results.json`."""
    from .evaluation import protocol_line

    folder = Path(name_or_path).expanduser()
    evaluation = {}
    if folder.is_dir():
        results_file, revision = folder / "eval_results.json", None
    else:
        try:
            results_file = Path(hf_hub_download(str(name_or_path), "eval_results.json", revision=revision))
        except Exception:  # offline, not published with it, ...: the card then goes without
            results_file = None
    if results_file is not None and results_file.is_file():
        with contextlib.suppress(ValueError):
            results = json.loads(results_file.read_text())
            keys = ("reconstruction_mse", "psnr", "perplexity", "codes_used")
            evaluation = {k: results[k] for k in keys if isinstance(results.get(k), (int, float))}
            if isinstance(results.get("protocol"), dict):
                evaluation["protocol"] = protocol_line(results["protocol"])
    return {
        "name_or_path": recorded_tokenizer(name_or_path),
        "revision": revision,
        "weights_sha256": weights_sha256(tokenizer),
        "quantizer_type": tokenizer.config.quantizer_type,
        "downsampling_factor": tokenizer.config.downsampling_factor,
        "evaluation": evaluation or None,
    }


VIEWS = ("center", "flip", "ten_crop")
# `--views ten_crop`, as LlamaGen stores ImageNet: the shorter side to 1.1·N, the five N×N crops (centre, corners)
# and their mirror images.
TEN_CROP_SCALE = 1.1
_CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


def view_names(views: str) -> list[str]:
    """The views `--views` stores of each image, in their order in `input_ids`; the first is always the image as
    the tokenizer's own rule (shorter side to N, centre crop) shows it."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, not {views!r}")
    crops = {"center": ["center"], "flip": ["center"], "ten_crop": list(_CROPS)}[views]
    return crops + ([f"{crop}_flipped" for crop in crops] if views != "center" else [])


def image_views(image, views: str, size: int, resample) -> list:
    """The PIL images of `view_names(views)` for one image. `center` and `flip` leave resizing and cropping to the
    processor; `ten_crop` cuts `size`×`size` crops, which the processor then leaves as they are."""
    if views == "center":
        return [image]
    if views == "flip":
        return [image, image.transpose(Image.FLIP_LEFT_RIGHT)]
    width, height = image.size
    scale = round(size * TEN_CROP_SCALE) / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((width, height), resample)
    corners = {"center": ((width - size) // 2, (height - size) // 2), "top_left": (0, 0),
               "top_right": (width - size, 0), "bottom_left": (0, height - size),
               "bottom_right": (width - size, height - size)}  # fmt: skip
    crops = [resized.crop((left, top, left + size, top + size)) for left, top in (corners[c] for c in _CROPS)]
    return crops + [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]


def pixel_values(processor, images) -> torch.Tensor:
    """PIL images as the tokenizer's input `(B, C, H, W)` by `processor`'s rule."""
    images = [image.convert("RGB") if processor.do_convert_rgb else image for image in images]
    return processor(images=images, return_tensors="pt")["pixel_values"]


class TokenizerInputs:
    """What a loader worker makes of a batch of rows: `pixel_values` `(B, V, C, H, W)`, every view of every image;
    `index`, each row's position in its split; and the carried columns (`label`, `--keep_columns`) as they are."""

    def __init__(self, processor, views: str, size: int, carried: list[str]):
        self.processor, self.views, self.size, self.carried = processor, views, size, carried

    def __call__(self, rows: dict, indices: list[int]) -> dict:
        resample = getattr(self.processor, "resample", Image.BILINEAR)
        views = [view for image in rows["image"] for view in image_views(image, self.views, self.size, resample)]
        values = pixel_values(self.processor, views)
        out = {"pixel_values": values.view(len(indices), -1, *values.shape[1:]), "index": list(indices)}
        return {**out, **{column: rows[column] for column in self.carried}}


class _SplitRows(torch.utils.data.Dataset):
    """A shard of a map-style split, decoded and processed by the loader's workers (`TokenizerInputs`)."""

    def __init__(self, data: Dataset, inputs: TokenizerInputs, first_index: int):
        self.data, self.inputs, self.first_index = data, inputs, first_index

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, positions: list[int]) -> list[dict]:
        indices = [self.first_index + position for position in positions]
        rows = decoded_rows(self.data, positions, self.first_index)
        return unbatch(self.inputs(rows, indices), len(positions))


def _collate_rows(rows: list[dict]) -> dict:
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    batch["pixel_values"] = torch.stack(batch["pixel_values"])
    return batch


def _shard_loader(shard, inputs: TokenizerInputs, first_index: int, batch_size: int, num_workers: int):
    """A loader of a shard's rows as tokenizer inputs, in order, decoded in `num_workers` worker processes (a stream's
    shard, one source file or a group of them, in one); positions count from the shard's start."""
    if isinstance(shard, IterableDataset):
        columns = list(shard.column_names or ["image", *inputs.carried])
        rows = shard.map(inputs, batched=True, batch_size=batch_size, with_indices=True, remove_columns=columns)
        # one worker (beside this process) reads the shard's files in order: datasets would give more workers other
        # files, and their rows would interleave
        num_workers = min(num_workers, 1)
    else:
        rows = _SplitRows(shard, inputs, first_index)
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=_collate_rows, num_workers=num_workers)


def _first_image(data, split: str):
    try:
        return next(iter(data))["image"] if isinstance(data, IterableDataset) else data[0]["image"]
    except (StopIteration, IndexError):
        raise DataError(f"split {split!r} has no images") from None


def _num_shards(data, shard_size: int) -> int:
    # A stream is cut where its source is (its files): a stream cannot be sliced without reading what comes before.
    # A streamed image folder has a file per image: its files are grouped into at most `MAX_STREAM_SHARDS`.
    return (
        min(data.num_shards, MAX_STREAM_SHARDS)
        if isinstance(data, IterableDataset)
        else math.ceil(len(data) / shard_size)
    )


def _shard(data, index: int, count: int, shard_size: int):
    if isinstance(data, IterableDataset):
        return data.shard(count, index)  # contiguous: the stream's own order, shard after shard
    return data.select(range(index * shard_size, index * shard_size + _shard_rows(data, index, shard_size)))


def _shard_rows(data, index: int, shard_size: int) -> int | None:
    return None if isinstance(data, IterableDataset) else min(shard_size, len(data) - index * shard_size)


@contextlib.contextmanager
def _datasets_progress_bars_off():
    """One progress bar for the whole tokenization instead of datasets' per shard."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


# What identifies the tokenizer for a resume: its weights and shape, not where it was loaded from (a folder that
# moved, its Hub id, a commit that changed only the README).
TOKENIZER_IDENTITY = ("weights_sha256", "quantizer_type", "downsampling_factor")


def _resumable(metadata: dict) -> dict:
    """What a resumed run must share with the one it resumes: the tokenizer's weights, K, the grid, the image
    processor, the source and the shards; not the outcome, the command, or where the tokenizer came from."""
    kept = {k: v for k, v in metadata.items() if k not in ("splits", "command", "tokenizer")}
    tokenizer = {k: metadata["tokenizer"].get(k) for k in TOKENIZER_IDENTITY}
    splits = {split: {"num_shards": s["num_shards"]} for split, s in metadata["splits"].items()}
    return {**kept, "tokenizer": tokenizer, "splits": splits}


def _check_resumable(folder: Path, settings: dict, overwrite: bool = False) -> None:
    for name in (METADATA_FILE, PARTIAL_METADATA_FILE):
        if (folder / name).is_file():
            try:
                before = _resumable(json.loads((folder / name).read_text()))
            except (ValueError, KeyError, TypeError, AttributeError):
                before = None
            now = _resumable(settings)
            different = sorted(key for key in {**now, **(before or {})} if (before or {}).get(key) != now.get(key))
            if before is None or different:
                if overwrite:  # --overwrite_output_dir: start over
                    _remove_tokens(folder)
                    return
                if before is None:
                    raise DataError(
                        f"{folder / name} is damaged: pass --overwrite_output_dir to start over, or delete the folder"
                    )
                raise DataError(
                    f"--output_dir {folder} holds tokens made differently ({', '.join(different)} differ): "
                    "choose another folder, or pass --overwrite_output_dir to start over"
                )
            return


def _remove_tokens(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)
    shutil.rmtree(folder / DATA_DIR, ignore_errors=True)
    for name in (METADATA_FILE, CARD_FILE):
        (folder / name).unlink(missing_ok=True)


def write_token_dataset(
    splits: dict, tokenizer, processor, output_dir, accelerator, *, record: dict, source: dict, batch_size: int = 256,
    shard_size: int | None = None, max_shard_bytes: int | None = None, command: str | None = None,
    overwrite: bool = False, write_card=None, views: str = "center", keep_columns=(), num_workers: int = 0,
) -> dict:  # fmt: skip
    """Tokenize each split of `splits` (`{name: Dataset or IterableDataset}` with an `image` column, and `label` when
    there is one, and the `keep_columns`) into the token dataset folder `output_dir`; returns its metadata
    (`tokenization.json`). Every row keeps `index`, its position in its split (for a stream: in its shard), and
    `input_ids` holds the token grids of `view_names(views)`: one flat grid for `center`, one per view otherwise.

    Each split is cut into shards (`shard_size` images, or as many as `max_shard_bytes` of uncompressed tokens and
    labels hold, default `DEFAULT_MAX_SHARD_SIZE`; a stream where its source files are) that the processes
    take in turn, so several processes write exactly what one would. A shard's images are decoded and processed by
    `num_workers` DataLoader workers, tokenized in batches of `batch_size` images and streamed into a Parquet file in
    the hidden `.tokenizing/` folder under a temporary name, then renamed: a rerun skips the shards that are there. When all are done they move into
    `data/`, then `write_card(folder)` writes the card and `tokenization.json` comes last. `record` is
    `tokenizer_record(...)`, `source` says where the images came from; both go into `tokenization.json` with the image
    size, the grid, K and each split's codebook usage. `overwrite` starts over in a folder that holds other tokens."""
    folder = Path(output_dir)
    first_split = next(iter(splits))
    tokenizer.eval()  # the quantizer's argmax, no noise
    probe = pixel_values(processor, [_first_image(splits[first_split], first_split)])  # gives the image size and grid
    with torch.no_grad():
        grid = tuple(tokenizer.get_image_tokens(probe.to(tokenizer.device)).shape[1:])  # (h, w)
    codebook_size = tokenizer.config.codebook_size
    image_size, factor = list(probe.shape[2:]), tokenizer.config.downsampling_factor
    if views == "ten_crop" and image_size[0] != image_size[1]:
        raise DataError(f"--views ten_crop cuts square crops, and the processor makes {image_size[0]}×{image_size[1]} "
                        "images: pass --image_size")  # fmt: skip
    names = view_names(views)
    carried = [column for column in ("label", *keep_columns) if column in (splits[first_split].column_names or [])]
    if any(size % factor for size in image_size):
        raise DataError(
            f"the images are {image_size[0]}×{image_size[1]} after processing, not a multiple of the tokenizer's "
            f"downsampling factor {factor}: pass --image_size"
        )
    dtype = token_dtype(codebook_size)
    if shard_size is None:  # rows of `max_shard_bytes`: each row holds h*w ids per view, an index and a label
        row_bytes = len(names) * math.prod(grid) * np.dtype(dtype).itemsize + 16
        shard_size = max(1, (max_shard_bytes or parse_size(DEFAULT_MAX_SHARD_SIZE)) // row_bytes)
    counts = {split: _num_shards(data, shard_size) for split, data in splits.items()}
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"split {empty[0]!r} has no images")
    streaming = any(isinstance(data, IterableDataset) for data in splits.values())
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": record,
        "codebook_size": codebook_size,
        "image_size": image_size,
        "grid": list(grid),
        "dtype": dtype,
        "processor": json.loads(processor.to_json_string()),
        "source": source,
        "views": names,
        "kept_columns": list(keep_columns),
        "shard_size": None if streaming else shard_size,
        "splits": {split: {"num_shards": count} for split, count in counts.items()},
    }
    if overwrite and accelerator.is_main_process:
        _check_resumable(folder, settings, overwrite=True)  # removes tokens made otherwise
    accelerator.wait_for_everyone()
    _check_resumable(folder, settings)  # on every process, before any writes
    if accelerator.is_main_process:
        (folder / STAGING_DIR).mkdir(parents=True, exist_ok=True)
        write_json(folder / PARTIAL_METADATA_FILE, settings)
    (folder / STAGING_DIR / DATA_DIR).mkdir(parents=True, exist_ok=True)

    mine = [(split, index) for split, count in counts.items() for index in range(count)]
    mine = mine[accelerator.process_index :: accelerator.num_processes]
    total = None if streaming else sum(_shard_rows(splits[split], index, shard_size) for split, index in mine)
    done = [(split, index) for split, index in mine  # by an earlier, interrupted run
            if any(shard_path(folder, split, index, counts[split], staged).exists() for staged in (True, False))]  # fmt: skip
    initial = 0 if streaming else sum(_shard_rows(splits[split], index, shard_size) for split, index in done)
    progress = dict(total=total, initial=initial, unit="images", desc="tokenizing")
    with (
        _datasets_progress_bars_off(),
        tqdm(**progress, disable=not accelerator.is_local_main_process) as bar,
    ):
        for split, index in mine:
            if (split, index) in done:
                continue
            data = splits[split]
            features = Features({"input_ids": List(Value(dtype), length=math.prod(grid)), "index": Value("int64")})
            if len(names) > 1:
                features["input_ids"] = List(features["input_ids"], length=len(names))
            for column in carried:
                feature = (data.features or {}).get(column)
                if column == "label" and not isinstance(feature, (ClassLabel, Value)):
                    feature = Value("int64")
                if feature is None:
                    raise DataError(f"--keep_columns {column}: the stream does not say what its type is")
                features[column] = feature
            inputs = TokenizerInputs(processor, views, image_size[0], carried)
            loader = _shard_loader(_shard(data, index, counts[split], shard_size), inputs,
                                   0 if streaming else index * shard_size, batch_size, num_workers)  # fmt: skip
            path = shard_path(folder, split, index, counts[split], staged=True)
            partial = path.with_name(f".partial-{path.name}.{os.getpid()}")
            with pq.ParquetWriter(str(partial), features.arrow_schema) as writer:
                for batch in loader:
                    ids = _token_ids(tokenizer, batch.pop("pixel_values"), grid, dtype)
                    rows = {"input_ids": ids if len(names) > 1 else ids[:, 0], **batch}
                    writer.write_table(Dataset.from_dict(rows, features=features).data.table)
                    bar.update(len(ids))
            os.replace(partial, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / DATA_DIR).mkdir(exist_ok=True)
        for split, count in counts.items():  # every shard is done: now datasets may see them
            for index in range(count):
                staged = shard_path(folder, split, index, count, staged=True)
                if staged.exists():
                    os.replace(staged, shard_path(folder, split, index, count))
        named = {shard_path(folder, split, i, n).name for split, n in counts.items() for i in range(n)}
        for stale in (folder / DATA_DIR).glob("*.parquet"):  # of other settings, before --overwrite_output_dir
            if stale.name not in named:
                stale.unlink()
        metadata = {**settings, "splits": {split: split_usage(folder, split, counts[split], codebook_size)
                                           for split in counts}}  # fmt: skip
        metadata["command"] = command
        if write_card is not None:
            write_card(folder, metadata)
        write_json(folder / METADATA_FILE, metadata)  # last: the folder is complete
        import shutil

        shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)  # with the temporary shards of an interrupted run
    accelerator.wait_for_everyone()
    return read_metadata(folder)


@torch.no_grad()
def _token_ids(tokenizer, pixel_values: torch.Tensor, grid: tuple, dtype: str) -> np.ndarray:
    """`(B, V, h·w)` token ids of `(B, V, C, H, W)` pixel values, as `dtype`."""
    tokens = tokenizer.get_image_tokens(pixel_values.flatten(0, 1).to(tokenizer.device))
    if tuple(tokens.shape[1:]) != grid:
        raise DataError(
            f"an image gave a {'×'.join(map(str, tokens.shape[1:]))} token grid where the first gave "
            f"{'×'.join(map(str, grid))}: the processor must bring every image to one size (--image_size)"
        )
    return tokens.reshape(*pixel_values.shape[:2], -1).cpu().numpy().astype(dtype)


def split_usage(folder, split: str, count: int, codebook_size: int) -> dict:
    """A split's images, tokens and codebook usage (perplexity, codes used, dead codes), from its shards."""
    counts, images = np.zeros(codebook_size, dtype=np.int64), 0
    for index in range(count):
        column = pq.read_table(shard_path(folder, split, index, count), columns=["input_ids"]).column("input_ids")
        ids = column.combine_chunks()
        while pa.types.is_fixed_size_list(ids.type):  # one grid, or one per view
            ids = ids.flatten()
        ids = ids.to_numpy()
        counts += np.bincount(ids, minlength=codebook_size)
        images += len(column)
    return {"num_shards": count, "num_images": images, "num_tokens": int(counts.sum()), **usage_from_counts(counts)}


def read_metadata(folder) -> dict:
    """`tokenization.json` of a token dataset folder, or `DataError` saying why the folder is not (yet) one."""
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        if (folder / STAGING_DIR).is_dir():
            raise DataError(
                f"{folder} is an unfinished token dataset: rerun the hypervq-tokenize command to finish it"
            )
        raise DataError(f"{folder} is not a token dataset: it has no {METADATA_FILE} (hypervq-tokenize writes one)")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except ValueError as error:
        raise DataError(f"{folder / METADATA_FILE} is damaged (not JSON: {error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DataError(f"{folder / METADATA_FILE} does not describe an hf-hypervq token dataset")
    return metadata


def load_token_dataset(name_or_path, revision: str | None = None) -> tuple[DatasetDict, dict]:
    """A token dataset (a folder or a Hub dataset id, at `revision`: a branch, tag or commit) as a `DatasetDict` of
    its splits, and its metadata (`tokenization.json`). A Hub dataset's revision is resolved to a commit once, and
    both reads use it; the metadata records it as `token_dataset_revision`. Any problem is a `DataError` of one line."""
    folder = Path(name_or_path).expanduser()
    text = str(name_or_path)
    try:
        if folder.is_dir():
            metadata = read_metadata(folder)
            data = datasets.load_dataset(str(folder))
        elif not is_hub_id(text):
            raise DataError(f"--token_dataset {name_or_path}: no such folder")
        else:
            try:
                commit = resolve_commit(
                    text, revision, repo_type="dataset", filename=METADATA_FILE, flag="--token_dataset"
                )
                downloaded = hf_hub_download(text, METADATA_FILE, repo_type="dataset", revision=commit)
            except EntryNotFoundError:
                raise DataError(
                    f"{name_or_path} is not a token dataset: it has no {METADATA_FILE} (hypervq-tokenize writes one)"
                ) from None
            metadata = {**read_metadata(Path(downloaded).parent), "token_dataset_revision": commit}
            data = datasets.load_dataset(text, revision=commit)
    except DataError:
        raise
    except Exception as error:  # the Hub's and datasets' many errors: not found, offline, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load token dataset {name_or_path!r}: {reason}") from None
    return data, metadata


def check_tokenizer(metadata: dict, tokenizer, name, token_dataset) -> None:
    """`DataError` unless `tokenizer` (loaded from `name`) is the one that made the tokens of `token_dataset`: the
    same K, the same grid at the tokens' image size, the same weights."""
    made_by = metadata["tokenizer"]
    where = (
        f"--tokenizer {name} is not the tokenizer that made the tokens of {token_dataset} ({made_by['name_or_path']})"
    )
    config = tokenizer.config
    if config.codebook_size != metadata["codebook_size"]:
        raise DataError(f"{where}: it has K={config.codebook_size} codes, the tokens K={metadata['codebook_size']}")
    grid = [size // config.downsampling_factor for size in metadata["image_size"]]
    if grid != metadata["grid"]:
        height, width = metadata["image_size"]
        raise DataError(
            f"{where}: it turns {height}×{width} images into {grid[0]}×{grid[1]} token grids, the tokens are "
            f"{metadata['grid'][0]}×{metadata['grid'][1]}"
        )
    sha256 = weights_sha256(tokenizer)
    if sha256 != made_by["weights_sha256"]:
        raise DataError(
            f"{where}: its weights differ (SHA-256 {sha256[:12]}…, the tokens' {made_by['weights_sha256'][:12]}…)"
        )


def token_splits(data: DatasetDict, args, name) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits of a token dataset that the training flags ask for (--train_split,
    --eval_split or test, else validation, --validation_split_percentage, --max_train_samples, --max_eval_samples);
    sets `args.eval_split` to the split used, as `data.load_splits` does for images."""
    if args.train_split not in data:
        raise DataError(f"split {args.train_split!r} is not in token dataset {name} (splits: {list(data)})")
    train = data[args.train_split]
    if args.validation_split_percentage:
        label = "label" if isinstance(train.features.get("label"), ClassLabel) else None
        try:
            parts = train.train_test_split(
                test_size=args.validation_split_percentage / 100, seed=args.seed, stratify_by_column=label
            )
        except ValueError:  # too few examples of a class to stratify
            parts = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, evaluation = parts["train"], parts["test"]
        args.eval_split = f"{args.train_split} ({args.validation_split_percentage}% held out, seed {args.seed})"
    else:
        wanted = [args.eval_split] if args.eval_split is not None else ["test", "validation"]
        found = next((split for split in wanted if split in data), None)
        if found is None:
            raise DataError(
                f"token dataset {name} has no {' or '.join(map(repr, wanted))} split (splits: {list(data)}): pass "
                "--eval_split or --validation_split_percentage"
            )
        evaluation, args.eval_split = data[found], found
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


class TokenGrids(torch.utils.data.Dataset):
    """A token dataset's split as the prior trains on it: `image_tokens` `(h, w)` int64 (the ids of
    `get_image_tokens`) and, with `with_labels`, `class_labels`. Rows are read from the split's memory-mapped Arrow
    table a batch at a time, never copied whole into RAM (ImageNet's 1.28 M grids of 16×16 tokens would be 2.6 GB
    in every process, 21 GB on an 8-GPU machine); loader workers share the mapping.

    A split stored with several `views` (`--views flip` or `ten_crop`) gives one of them per row: with `seed`, a view
    drawn from the row's `SampleKey` (seed, epoch, index), so every epoch sees other views and a resumed run the
    same ones; without, the first view (the image as the tokenizer's own rule shows it), for evaluation."""

    def __init__(self, split: Dataset, grid, with_labels: bool, views: int = 1, seed: int | None = None):
        columns = ["input_ids", "label"] if with_labels else ["input_ids"]
        self.rows, self.grid, self.with_labels = split.with_format("numpy", columns=columns), tuple(grid), with_labels
        self.views, self.seed, self.epoch = views, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.rows[indices]
        ids = np.asarray(rows["input_ids"])
        if self.views > 1:  # (B, views, h·w): one view per row
            drawn = [0 if self.seed is None else SampleKey(self.seed, self.epoch, i).rng().randrange(self.views)
                     for i in indices]  # fmt: skip
            ids = ids[np.arange(len(indices)), drawn]
        tokens = torch.from_numpy(ids.astype(np.int64)).view(len(indices), *self.grid)
        if not self.with_labels:
            return [{"image_tokens": grid} for grid in tokens]
        labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long)
        return [{"image_tokens": grid, "class_labels": label} for grid, label in zip(tokens, labels)]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]
