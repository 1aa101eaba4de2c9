"""Resumable checkpoints: `accelerator.save_state` written under a temporary name and renamed once complete (a run
killed while saving never leaves a half-written checkpoint), rotation, and the checks a resume makes before it
loads one: the folder is this run's, complete, and undamaged."""

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open

from .outputs import reported_write_failure


logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
PROCESSES_FILE = "processes.json"  # how many processes saved a checkpoint


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


def check_checkpoint_fits(folder: Path, accelerator: Accelerator) -> None:
    """Refuse, in one line, a checkpoint whose weights are not this run's model's (other parameters, or other shapes:
    the run was started with other model options, e.g. another --codebook_size), before `load_state` fails with
    torch's list of mismatches. Reads only the headers of the `model*.safetensors` files; sharded checkpoints (FSDP,
    DeepSpeed) are left to accelerate."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return
    for index, model in enumerate(accelerator._models):  # what `load_state` loads into, in its order and naming
        weights = folder / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
        if not weights.is_file():
            continue
        wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        with safe_open(weights, framework="pt") as saved:
            found = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
        where = f"--resume_from_checkpoint {folder}: "
        extra, missing = sorted(found.keys() - wanted.keys()), sorted(wanted.keys() - found.keys())
        if extra or missing:  # e.g. another --quantizer: other parameters
            raise ValueError(
                where + f"the checkpoint's weights are another model's ({_names('it has', extra)}"
                f"{', ' if extra and missing else ''}{_names('it lacks', missing)}): {RESUME_ADVICE}"
            )
        mismatched = {name: (shape, wanted[name]) for name, shape in found.items() if shape != wanted[name]}
        if mismatched:
            raise ValueError(where + _mismatch(mismatched, getattr(accelerator.unwrap_model(model), "config", None)))


RESUME_ADVICE = "resume with the model options it was made with, or train into a new --output_dir"


def _names(verb: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{verb} {', '.join(names[:2])}{more}"


def _mismatch(mismatched: dict, config) -> str:
    """What differs between a checkpoint's weights and the run's model: the codebook size K when every mismatched
    axis is K here and one other number there, else the first tensor that differs."""
    codebook_size = getattr(config, "codebook_size", None)
    saved_sizes, explained = set(), bool(codebook_size)
    for saved, wanted in mismatched.values():
        if len(saved) != len(wanted):
            explained = False
            continue
        for there, here in zip(saved, wanted):
            if there != here:
                explained &= here == codebook_size
                saved_sizes.add(there)
    if explained and len(saved_sizes) == 1:
        return (f"the checkpoint was made with K={saved_sizes.pop()} codes and this run asks for K={codebook_size} "
                f"(codebook_size): {RESUME_ADVICE}")  # fmt: skip
    name, (saved, wanted) = next(iter(mismatched.items()))
    return (f"the checkpoint's {name} has shape {list(saved)} and this run's model {list(wanted)}: it was made with "
            f"other model options; {RESUME_ADVICE}")  # fmt: skip


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
        if accelerator.is_main_process:  # a resume on another number of processes says so (`resume`)
            (partial / PROCESSES_FILE).write_text(json.dumps({"num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit:
            for old in checkpoint_steps(output_dir)[:-total_limit]:
                shutil.rmtree(folder / f"step_{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(args, accelerator: Accelerator, epoch_stats, steps_per_epoch: int | None) -> tuple[int, int, int]:
    """Load the checkpoint `--resume_from_checkpoint` names, if any; returns `(completed updates, epoch to start,
    batches of it to skip)`. A new run into a folder with another run's checkpoints is refused: their rotation
    would delete this run's own checkpoints and keep the stale ones."""
    if not args.resume_from_checkpoint:
        if checkpoint_steps(args.output_dir) and getattr(args, "overwrite_output_dir", False):
            if accelerator.is_main_process:
                shutil.rmtree(Path(args.output_dir) / "checkpoints")
            accelerator.wait_for_everyone()
        elif checkpoint_steps(args.output_dir):
            raise FileExistsError(
                f"{Path(args.output_dir) / 'checkpoints'} holds checkpoints of an earlier run: resume it with "
                "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or train into a new "
                "--output_dir"
            )
        return 0, 0, 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        logger.info("no checkpoint to resume from yet: starting from scratch", main_process_only=True)
        return 0, 0, 0
    try:
        saved_processes = json.loads((checkpoint / PROCESSES_FILE).read_text())["num_processes"]
    except (OSError, ValueError, KeyError):  # a checkpoint of hf-hypervq 0.2: one random state per process
        saved_processes = len(list(checkpoint.glob("random_states_*.pkl")))
    states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if saved_processes == accelerator.num_processes and not states.exists():
        raise FileNotFoundError(f"{checkpoint} is incomplete: it has no {states.name}")  # a lost file, not a resize
    if saved_processes != accelerator.num_processes:
        logger.warning(
            f"{checkpoint} was saved by {saved_processes} process(es) and this run has {accelerator.num_processes}: "
            "the weights, optimizer and schedule resume exactly, and so does the data order if the global batch "
            "(per-device batch × processes × accumulation) is the same; the random numbers of the processes "
            "beyond the saved ones start afresh from --seed",
            main_process_only=True,
        )
    check_checkpoint_files(checkpoint)
    check_checkpoint_fits(checkpoint, accelerator)
    accelerator.load_state(str(checkpoint))
    completed = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
    logger.info(f"resumed from {checkpoint} at update {completed}", main_process_only=True)
    if steps_per_epoch is None:  # a stream of unknown length: go on after the batch the checkpoint saw last
        return completed, epoch_stats.epoch, epoch_stats.count
    return (completed, completed // steps_per_epoch,
            (completed % steps_per_epoch) * args.gradient_accumulation_steps)  # fmt: skip
