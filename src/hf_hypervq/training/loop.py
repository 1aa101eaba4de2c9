"""What the training scripts share: their common flags, the accelerate setup, the training loop with resumable
checkpoints, and atomic writes of everything they leave in the output folder.

The loop follows transformers' `run_image_classification_no_trainer.py` and accelerate's examples, with their known
defects fixed: `--resume_from_checkpoint latest` really finds the latest checkpoint, a checkpoint is
written under a temporary name and renamed (a run killed while saving never leaves a half-written one behind), data
order and random numbers are restored so a resumed run ends with the weights of an uninterrupted one, and every run
ends with `accelerator.end_training()`.
"""

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..metrics.codebook_usage.codebook_usage import usage_from_counts
from .data import DataError, collate, load_image_dataset, with_image_transform
from .hub import PublishError, push_to_hub


logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # each process holds only a part of the weights


def add_common_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, epochs: int, batch_size: int):
    """The flags every training script takes."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default=None,
        help="Hub id (uoft-cs/cifar100, ylecun/mnist, ILSVRC/imagenet-1k), a local image folder (split/class/*.png), "
        "a folder written by datasets' save_to_disk, or a .parquet/.csv/.json file. Default: scikit-learn's "
        "handwritten digits, which ship with scikit-learn and need no network.",
    )
    data.add_argument("--dataset_config", default=None, help="configuration name of a Hub data set")
    data.add_argument("--train_split", default="train", help="split to train on (default: train)")
    data.add_argument("--eval_split", default=None, help="split to evaluate on (default: test, else validation)")
    data.add_argument("--image_column", default=None, help="image column (default: image, img, ... whichever exists)")
    data.add_argument("--label_column", default=None, help="label column (default: label, fine_label, ...)")
    data.add_argument(
        "--validation_split_percentage", type=int, default=None,
        help="evaluate on N%% of the training split, held out with --seed (stratified by label when there is one), "
        "instead of a separate split; needed for a single data file",
    )  # fmt: skip
    data.add_argument("--streaming", action="store_true", help="stream the data set instead of downloading it")
    data.add_argument(
        "--shuffle_buffer_size", type=int, default=10_000,
        help="--streaming: shuffle the stream through a buffer of N examples, reseeded every epoch (default: 10000; 0: in stream order)",
    )  # fmt: skip
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training examples")
    data.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N evaluation examples")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="worker processes per data loader")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", required=True, help="where the model, checkpoints and results go")
    train.add_argument("--seed", type=int, default=0, help="random seed (initialisation, data order, noise)")
    train.add_argument("--num_train_epochs", type=int, default=epochs, help=f"epochs (default: {epochs})")
    train.add_argument(
        "--max_train_steps", type=int, default=None, help="optimizer updates in total; overrides --num_train_epochs"
    )
    train.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=batch_size,
        help=f"batch per process (default: {batch_size})",
    )
    train.add_argument("--per_device_eval_batch_size", type=int, default=256, help="eval batch per process")
    train.add_argument(
        "--learning_rate", type=float, default=learning_rate, help=f"peak learning rate ({learning_rate})"
    )
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer update")
    train.add_argument(
        "--lr_scheduler_type",
        default="constant",
        choices=["constant", "cosine", "linear"],
        help="learning-rate schedule",
    )
    train.add_argument("--num_warmup_steps", type=int, default=0, help="linear warm-up updates")
    train.add_argument(
        "--mixed_precision", default=None, choices=["no", "bf16", "fp16"], help="autocast dtype (quantizer stays fp32)"
    )
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    train.add_argument(
        "--checkpointing_steps", default=None, help="save a resumable checkpoint every N updates, or 'epoch'"
    )
    train.add_argument(
        "--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints (default: 2)"
    )
    train.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or 'latest' for the newest in --output_dir",
    )
    train.add_argument("--with_tracking", action="store_true", help="log scalars to TensorBoard in --output_dir/runs")
    train.add_argument("--logging_steps", type=int, default=10, help="updates between tracker logs (default: 10)")
    train.add_argument(
        "--eval_at_end_only", action="store_true", help="evaluate once after training instead of after every epoch"
    )
    train.add_argument(
        "--compile_quantizer", action="store_true", help="fuse the quantizer's elementwise kernels with torch.compile"
    )
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="push the final model to the Hub")
    hub.add_argument("--hub_model_id", default=None, help="repo id to push to, e.g. user/hypervq-cifar100")
    hub.add_argument("--hub_private", action="store_true", help="create the Hub repo as private")
    return parser


def check_common_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject inconsistent flags with argparse's one-line error (exit status 2)."""
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error("--max_train_steps must be >= 1")
    if not 0 < args.learning_rate < math.inf:  # also NaN
        parser.error(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    if not 0 <= args.weight_decay < math.inf:
        parser.error(f"--weight_decay must be a finite number >= 0, got {args.weight_decay}")
    for name in ("seed", "dataloader_num_workers", "num_warmup_steps", "shuffle_buffer_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (leave it out to use every example), got {getattr(args, name)}")
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        parser.error("--mixed_precision fp16 needs a GPU; on a CPU use bf16")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder")
    try:  # find out now, not after training, that the results could not be written
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"  # one per process: accelerate starts several
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"--output_dir {args.output_dir} is not writable: {error.strerror or error}")
    if args.checkpointing_steps not in (None, "epoch") and not (
        str(args.checkpointing_steps).isdigit() and int(args.checkpointing_steps) > 0
    ):
        parser.error("--checkpointing_steps must be a positive integer or 'epoch'")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be >= 1")
    if args.validation_split_percentage is not None:
        if not 1 <= args.validation_split_percentage <= 50:
            parser.error("--validation_split_percentage must be between 1 and 50")
        if args.streaming or args.eval_split is not None:
            parser.error("--validation_split_percentage cannot be combined with --streaming or --eval_split")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length)")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")


@contextlib.contextmanager
def reported_errors():
    """Turn the errors a user can fix (bad data, a model or checkpoint that is not there or of the wrong kind, a
    value our checks reject, a missing optional package) into one `error:` line and exit status 2.

    Under `accelerate launch`, the process whose error it is also writes the line into the launcher's error file, so
    the launcher's failure summary, printed last, ends with it; a process that merely lost contact with a failed one
    says so in a line instead of a traceback from gloo or NCCL."""
    try:
        yield
    except (DataError, PublishError, OSError, ImportError, ValueError, TypeError) as error:
        _report(f"error: {error}")
    except RuntimeError as error:
        if not _lost_contact(error):
            raise
        rank = torch.distributed.get_rank()
        print(f"error: process {rank} stopped: it lost contact with another process, which failed", file=sys.stderr)
        raise SystemExit(2) from None


# How gloo and NCCL say that another process has gone (torch raises them as plain RuntimeErrors).
LOST_CONTACT = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
)


def _lost_contact(error: RuntimeError) -> bool:
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return distributed and (
        isinstance(error, torch.distributed.DistError) or any(sign in str(error) for sign in LOST_CONTACT)
    )


def _report(line: str):
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun / accelerate launch for each process
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    raise SystemExit(2) from None


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/runs"),
        # data order from (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    logger.info(
        f"distributed: {accelerator.distributed_type}, processes: {accelerator.num_processes}, "
        f"device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}",
        main_process_only=True,
    )
    set_seed(args.seed)
    if args.compile_quantizer:
        from ..models.hypervq.kernels import set_compiled_kernels

        set_compiled_kernels(True)
    return accelerator


def make_loader(dataset, batch_size: int, collate_fn, args, shuffle: bool) -> DataLoader:
    # The loader's own generator keeps its per-epoch seed draw off the global RNG, which the quantizer's Gumbel
    # noise uses and a checkpoint restores.
    shuffle = shuffle and not args.streaming
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )


def make_loaders(args, train_data, eval_data, processor, augment=None) -> tuple[DataLoader, DataLoader]:
    """The training and evaluation loaders of images turned into `pixel_values` by `processor`; `augment(image,
    key)` (training only) draws its random numbers from the example's `SampleKey` of (--seed, epoch, index)."""
    train_examples = with_image_transform(
        train_data, processor, augment, seed=args.seed, shuffle_buffer_size=args.shuffle_buffer_size or None
    )
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


# ---- checkpoints ----


def checkpoint_steps(output_dir) -> list[int]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir())


def resolve_checkpoint(resume_from_checkpoint: str, output_dir) -> Path | None:
    """The folder to resume from: 'latest' gives the newest complete checkpoint in `output_dir` (None if there is
    none yet, so a first run with 'latest' simply starts), anything else must be a checkpoint folder."""
    if resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        return Path(output_dir) / "checkpoints" / f"step_{steps[-1]}" if steps else None
    path = Path(resume_from_checkpoint)
    if not CHECKPOINT_PATTERN.match(path.name) or not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder")
    return path


# Below this much free space, a failed write is reported as a full disk.
NEARLY_FULL_BYTES = 64 * 2**20


@contextlib.contextmanager
def reported_write_failure(path):
    """Report a write into `path` that failed for want of space as "no space left", naming `path`. torch's writer
    raises a RuntimeError without an errno then ("unexpected pos ..."), so the free space is checked too."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        folder = next(p for p in (Path(path), *Path(path).parents) if p.exists())
        free = shutil.disk_usage(folder).free
        if getattr(error, "errno", None) == errno.ENOSPC or free < NEARLY_FULL_BYTES:
            raise OSError(
                errno.ENOSPC, f"no space left on the disk of {path} ({free / 2**20:.0f} MiB free) while writing it"
            ) from None
        raise


def check_checkpoint_files(folder: Path) -> None:
    """Name a damaged file of a checkpoint before `load_state` fails on it with a deep torch error. torch.save's
    files (`*.bin`, `*.pkl`) are zip archives whose directory is at the end, and safetensors' header lists its
    tensors' extents, so a truncated file of either kind fails here without being read in full."""
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix in (".bin", ".pkl"):
                with zipfile.ZipFile(path):
                    pass
            elif path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):
                    pass
        except (zipfile.BadZipFile, SafetensorError, OSError) as error:
            raise OSError(f"{path} is damaged ({error}): resume from another checkpoint") from None


def save_checkpoint(accelerator: Accelerator, output_dir, step: int, total_limit: int | None) -> None:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoints/step_N` once complete."""
    folder = Path(output_dir) / "checkpoints"
    final, partial = folder / f"step_{step}", folder / f".partial-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with reported_write_failure(partial):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit:
            for old in checkpoint_steps(output_dir)[:-total_limit]:
                shutil.rmtree(folder / f"step_{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


# ---- the loop ----


def total_updates(args, train_loader, accelerator: Accelerator) -> int:
    """The optimizer updates a run will make: `--max_train_steps`, else the epochs' worth of the (not yet
    prepared) loader's batches, as `train` counts them once the loader is split across the processes."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    return args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)


def make_scheduler(args, optimizer, num_updates: int, accelerator: Accelerator):
    """The `--lr_scheduler_type` schedule (with `--num_warmup_steps`) over `num_updates` optimizer updates, for every
    script. Pass it through `accelerator.prepare`: the prepared scheduler then moves only when the optimizer really
    stepped (so gradient accumulation does not speed it up) and is saved and restored with the checkpoints. It steps
    `num_processes` times per update (accelerate's convention), so its length is counted in those steps."""
    from transformers import get_scheduler

    scale = accelerator.num_processes
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * scale,
        num_training_steps=num_updates * scale,
    )


def train(args, accelerator: Accelerator, model, optimizer, train_loader, evaluate, scheduler=None) -> dict:
    """Train `model` (already prepared) until `args.max_train_steps` updates, evaluating after every epoch with
    `evaluate(model, final) -> dict of floats` (`final`: the run's last evaluation, which may measure more); returns the last evaluation plus the training loss. Calls the model's
    `set_num_updates` after every update, writes checkpoints, logs to the trackers and shows a progress bar."""
    steps_per_epoch = None if args.streaming else math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch) if steps_per_epoch else sys.maxsize
    every = int(args.checkpointing_steps) if str(args.checkpointing_steps).isdigit() else None

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    codebook_size = getattr(accelerator.unwrap_model(model).config, "codebook_size", None)
    epoch_stats = EpochStatistics(codebook_size or 0, accelerator.device)
    accelerator.register_for_checkpointing(epoch_stats)  # a resume mid-epoch keeps the epoch's loss and codes
    if not args.resume_from_checkpoint and checkpoint_steps(args.output_dir):
        # their rotation would delete this run's own checkpoints and keep the stale ones
        raise FileExistsError(
            f"{Path(args.output_dir) / 'checkpoints'} holds checkpoints of an earlier run: resume it with "
            "--resume_from_checkpoint latest, or train into a new --output_dir"
        )
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if checkpoint is not None:
            states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
            if not states.exists():  # without it the resumed run would not repeat the uninterrupted one
                raise FileNotFoundError(f"{checkpoint} is incomplete: it has no {states.name}")
            check_checkpoint_files(checkpoint)
            accelerator.load_state(str(checkpoint))
            completed_steps = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
            if steps_per_epoch:
                start_epoch = completed_steps // steps_per_epoch
                skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
            else:  # a stream of unknown length: go on in the epoch and after the batch the checkpoint saw last
                start_epoch, skip_batches = epoch_stats.epoch, epoch_stats.count
            logger.info(f"resumed from {checkpoint} at update {completed_steps}", main_process_only=True)
        else:
            logger.info("no checkpoint to resume from yet: starting from scratch", main_process_only=True)

    if completed_steps >= args.max_train_steps:  # a finished run resumed: evaluate, train no further
        num_epochs = start_epoch
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.set_num_updates(completed_steps)
    if args.with_tracking:
        accelerator.init_trackers(Path(sys.argv[0]).stem, config=_tracker_config(args))
    logger.info(
        f"***** training: {args.max_train_steps} updates, {num_epochs if steps_per_epoch else '?'} epochs, batch "
        f"{args.per_device_train_batch_size} × {accelerator.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation *****",
        main_process_only=True,
    )
    progress = tqdm(
        total=args.max_train_steps,
        initial=completed_steps,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    results: dict = {}
    shown_eval: dict = {}  # the last evaluation's codebook numbers, kept in the progress bar
    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_loader.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):  # augmentation and stream shuffling (accelerate may not)
            train_loader.dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        if not skip_batches:  # a resumed epoch goes on with the statistics its checkpoint saved
            epoch_stats.reset(epoch)
        skip_batches = 0
        for batch in _keeping_global_rng(batches):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
            epoch_stats.add(outputs.loss, getattr(outputs, "image_tokens", None))
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            unwrapped.set_num_updates(completed_steps)
            progress.update(1)
            shown = {"loss": f"{outputs.loss.item():.4f}"}
            if getattr(outputs, "perplexity", None) is not None:
                shown["train_perplexity"] = f"{outputs.perplexity.item():.1f}"
            progress.set_postfix({**shown, **shown_eval})
            if args.with_tracking and completed_steps % args.logging_steps == 0:
                scalars = {f"train/{k}": float(v) for k, v in shown.items()}
                scalars["train/learning_rate"] = optimizer.param_groups[0]["lr"]
                accelerator.log(scalars, step=completed_steps)
            if every and completed_steps % every == 0:
                save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
            if completed_steps >= args.max_train_steps:
                break

        train_loss = accelerator.reduce(epoch_stats.loss_sum, reduction="sum").item() / max(
            1, epoch_stats.count * accelerator.num_processes
        )
        last_epoch = completed_steps >= args.max_train_steps or epoch == num_epochs - 1
        evaluation = evaluate(model, final=last_epoch) if last_epoch or not args.eval_at_end_only else {}
        results = {"epoch": epoch, "step": completed_steps, "train_loss": train_loss}
        if codebook_size and epoch_stats.count:
            results.update(_train_usage(accelerator.reduce(epoch_stats.code_counts, reduction="sum").cpu()))
        results.update(evaluation)
        shown_eval = {k: _short(evaluation[k]) for k in PROGRESS_EVAL_KEYS if k in evaluation}
        scalars = {k: v for k, v in results.items() if _is_number(v) and k != "epoch"}
        logger.info(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()), main_process_only=True)
        if args.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in scalars.items()}, step=completed_steps)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    if not results:  # resumed at the very end: evaluate once anyway, with the last epoch's saved statistics
        results = {"step": completed_steps}
        if epoch_stats.count:
            results["train_loss"] = accelerator.reduce(epoch_stats.loss_sum, reduction="sum").item() / (
                epoch_stats.count * accelerator.num_processes
            )
        results.update(evaluate(model, final=True))
    results["num_processes"] = accelerator.num_processes
    results["weights_identical_across_processes"] = _same_weights_everywhere(accelerator, model)
    return results


def _keeping_global_rng(batches):
    """The batches of a data loader, with the seed its new iterator draws from the global random generator given
    back. accelerate drops a streaming loader's own generator, so that draw would move the quantizer's noise by one
    number at every epoch start and at a resume, and a resumed stream would not repeat an uninterrupted one."""
    iterator = iter(batches)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, None)  # the loader's iterator (and its seed) is made here
    if first is not None:
        yield first
        yield from iterator


class EpochStatistics:
    """The running training loss of an epoch, its batch count and the codes its steps used (the Gumbel samples, for
    the MLR/Gumbel quantizers), kept on the device so that adding to them costs no host sync. Saved in every
    checkpoint, so a resumed run knows where in which epoch it stopped (for a stream, there is no other way)."""

    def __init__(self, codebook_size: int, device):
        self.codebook_size, self.device = codebook_size, device
        self.reset(0)

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.code_counts = torch.zeros(self.codebook_size, dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | None) -> None:
        self.loss_sum += loss.detach().float()
        self.count += 1
        if self.codebook_size and tokens is not None:
            self.code_counts += torch.bincount(tokens.detach().reshape(-1), minlength=self.codebook_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loss_sum": self.loss_sum.cpu(), "count": self.count,
                "code_counts": self.code_counts.cpu()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.count = state["count"]
        self.code_counts = state["code_counts"].to(self.device)


# The evaluation's codebook numbers the progress bar keeps showing after each evaluation.
PROGRESS_EVAL_KEYS = ("perplexity", "codes_used", "dead_codes", "mean_max_probability")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _train_usage(counts: torch.Tensor) -> dict:
    """Perplexity and fraction used of the codes the training steps chose in an epoch."""
    usage = usage_from_counts(counts)
    return {"train_perplexity": usage["perplexity"], "train_codes_used": usage["codes_used"]}


def _same_weights_everywhere(accelerator: Accelerator, model) -> bool | None:
    """Whether every process ended with the same weights (a checksum of all parameters, gathered). None under FSDP
    and DeepSpeed, where each process holds a different shard of one copy of the weights."""
    if accelerator.distributed_type in SHARDED:
        return None
    checksum = sum(p.detach().double().sum() + p.detach().double().pow(2).sum() for p in model.parameters())
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    return bool((checksums == checksums[0]).all())


def _tracker_config(args) -> dict:
    # TensorBoard's hparams accept numbers, strings and booleans only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# ---- the output folder ----


def save_model(accelerator: Accelerator, model, processor, output_dir) -> None:
    """Write the final model and image processor into `output_dir`: first into a temporary folder, then moved in
    with `config.json` last, so a folder with a `config.json` always holds complete weights."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # on every process: FSDP and DeepSpeed gather their shards here
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        partial = output_dir / ".partial-model"
        shutil.rmtree(partial, ignore_errors=True)
        with reported_write_failure(partial):
            accelerator.unwrap_model(model).save_pretrained(partial, state_dict=state_dict)
            processor.save_pretrained(partial)
        (output_dir / "config.json").unlink(missing_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for path in sorted(partial.iterdir(), key=lambda p: p.name == "config.json"):
            os.chmod(path, 0o666 & ~umask)  # safetensors writes its file 0600; every output is readable alike
            os.replace(path, output_dir / path.name)
        partial.rmdir()
    accelerator.wait_for_everyone()


def write_json(path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    partial = path.with_name(f".partial-{path.name}")
    with reported_write_failure(path):
        partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def write_results(args, results: dict) -> None:
    """`eval_results.json` (the final evaluation, what model cards read) and `all_results.json` (that plus the
    training loss, the step count and every flag)."""
    training_only = ("epoch", "step", "train_loss", "train_perplexity", "train_codes_used")
    evaluation = {k: v for k, v in results.items() if k not in training_only}
    source = {"dataset": args.dataset or "scikit-learn/digits", "split": args.eval_split or "test"}
    if "protocol" in evaluation:  # the protocol names the data it was measured on, too
        evaluation["protocol"] = results["protocol"] = {**source, **evaluation["protocol"]}
    command = shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])  # how this run was started
    write_json(Path(args.output_dir) / "eval_results.json", {**source, **evaluation})
    write_json(
        Path(args.output_dir) / "all_results.json", {**source, **results, "command": command, "args": vars(args)}
    )


def push_if_asked(args) -> None:
    """With --push_to_hub: push the output folder with a generated model card (`hub.push_to_hub`)."""
    if args.push_to_hub:
        url = push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private)
        logger.info(f"pushed to {url}", main_process_only=True)


def save_figure(save, path) -> None:
    """Call `save(temporary_path)` and rename the result to `path`."""
    path = Path(path)
    partial = path.with_name(f".partial-{path.name}")
    save(partial)
    os.replace(partial, path)
