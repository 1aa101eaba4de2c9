"""The training loop shared by every script, after transformers' `run_image_classification_no_trainer.py` and
accelerate's examples, with their known defects fixed: the learning-rate schedule moves per optimizer update and is
checkpointed, `--resume_from_checkpoint latest` really finds the latest checkpoint, data order and random numbers are
restored so a resumed run ends with the weights of an uninterrupted one, and a finished run resumed trains no
further."""

import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from ..metrics.codebook_usage.codebook_usage import usage_from_counts
from ..models.hypervq.quantizers import code_counts
from .checkpointing import resume, save_checkpoint
from .data import REPEATED, DataError


logger = get_logger(__name__)
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # each process holds only a part of the weights
# Training steps (batches) in a row with a NaN or inf loss after which a run has clearly diverged. A GradScaler
# skips a few while it finds its scale (fp16), and an overflow now and then is normal; a hundred in a row is not.
DIVERGED_AFTER = 100


class TrainingDivergedError(RuntimeError):
    """The loss stayed NaN or inf for `DIVERGED_AFTER` steps in a row; the scripts report it in one line."""


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
    `evaluate(model, final) -> dict` (`final`: the run's last evaluation, which may measure more); returns the last
    evaluation plus the training loss. Calls the model's `set_num_updates` after every update, writes checkpoints,
    logs to the trackers and shows a progress bar."""
    steps_per_epoch = None if args.streaming else math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch) if steps_per_epoch else sys.maxsize
    codebook_size = getattr(accelerator.unwrap_model(model).config, "codebook_size", None)
    epoch_stats = EpochStatistics(codebook_size or 0, accelerator.device)
    accelerator.register_for_checkpointing(epoch_stats)  # a resume mid-epoch keeps the epoch's loss and codes
    completed_steps, start_epoch, skip_batches = resume(args, accelerator, epoch_stats, steps_per_epoch)
    if completed_steps >= args.max_train_steps:  # a finished run resumed: evaluate, train no further
        num_epochs = start_epoch
    accelerator.unwrap_model(model).set_num_updates(completed_steps)
    _announce(args, accelerator, num_epochs if steps_per_epoch else "?")
    progress = tqdm(total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc="train")  # fmt: skip
    results: dict = {}
    shown_eval: dict = {}  # the last evaluation's codebook numbers, kept in the progress bar
    # a stream split across processes does not end (`data.ImageStream`): its epoch ends once every part is read
    parts = PartsRead(args.dataloader_num_workers) if getattr(train_loader.dataset, "endless", False) else None
    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_loader.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):  # augmentation and stream shuffling (accelerate may not)
            train_loader.dataset.set_epoch(epoch)
        ended = False  # a resumed epoch of a split stream may have ended at the step its checkpoint was saved
        if parts is not None:
            batches = parts.start_epoch(train_loader, skip_batches)
            if skip_batches and completed_steps % args.logging_steps == 0:  # where the run checked it last
                ended = epoch_stats.check_divergence(accelerator, completed_steps, parts.read)[1]
        else:
            batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        if not skip_batches:  # a resumed epoch goes on with the statistics its checkpoint saved
            epoch_stats.reset(epoch)
        skip_batches = 0
        if not ended:
            completed_steps = _train_epoch(
                args, accelerator, model, optimizer, scheduler, batches, epoch_stats, completed_steps, progress,
                shown_eval, parts,
            )  # fmt: skip
        final = completed_steps >= args.max_train_steps or epoch == num_epochs - 1
        evaluation = evaluate(model, final=final) if final or not args.eval_at_end_only else {}
        results = {"epoch": epoch, "step": completed_steps, **epoch_stats.summary(accelerator), **evaluation}
        shown_eval.update({k: _short(evaluation[k]) for k in PROGRESS_EVAL_KEYS if k in evaluation})
        _log_epoch(args, accelerator, epoch, results)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    if not results:  # resumed at the very end: evaluate once anyway, with the last epoch's saved statistics
        results = {"step": completed_steps, **epoch_stats.summary(accelerator), **evaluate(model, final=True)}
    results["num_processes"] = accelerator.num_processes
    results["weights_identical_across_processes"] = _same_weights_everywhere(accelerator, model)
    return results


def _train_epoch(
    args, accelerator, model, optimizer, scheduler, batches, epoch_stats, completed_steps, progress, shown_eval,
    parts=None,
):  # fmt: skip
    """One epoch's optimizer updates (or those left of it); returns the updates completed so far. With `parts` (a
    stream split across processes), the epoch ends at the first logging step at which every process has read its
    part of it."""
    unwrapped = accelerator.unwrap_model(model)
    every = int(args.checkpointing_steps) if str(args.checkpointing_steps).isdigit() else None
    every_part_read = False
    for batch in _keeping_global_rng(batches):
        if parts is not None:
            parts.see(batch)
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
        if completed_steps % args.logging_steps == 0:  # reading the loss waits for the device: not every step
            shown = {"loss": f"{outputs.loss.item():.4f}"}
            if getattr(outputs, "perplexity", None) is not None:
                shown["train_perplexity"] = f"{outputs.perplexity.item():.1f}"
            nonfinite, every_part_read = epoch_stats.check_divergence(
                accelerator, completed_steps, None if parts is None else parts.read
            )
            if nonfinite:
                shown["nonfinite_steps"] = str(nonfinite)
            progress.set_postfix({**shown, **shown_eval})
            if args.with_tracking:
                scalars = {f"train/{k}": float(v) for k, v in shown.items()}
                scalars["train/learning_rate"] = optimizer.param_groups[0]["lr"]
                accelerator.log(scalars, step=completed_steps)
        if every and completed_steps % every == 0:
            save_checkpoint(accelerator, args.output_dir, completed_steps, args.checkpoints_total_limit)
        if completed_steps >= args.max_train_steps or (parts is not None and every_part_read):
            break
    else:
        if parts is not None:  # it goes round its part again: only an empty part ends
            raise DataError(
                f"process {accelerator.process_index} of {accelerator.num_processes} has no examples of the stream "
                "(its part, by datasets' split_dataset_by_node, is empty): use fewer processes or more examples"
            )
    return completed_steps


class PartsRead:
    """Whether this process has read all of its part of a split stream's epoch: its loader marks the batches of a
    further round over the part `REPEATED` (`data.ImageStream`). With `num_workers` loader workers, which take
    turns, the part is read once the last `num_workers` batches in a row were (each worker goes round its own
    shards). A Python bool per batch: no waiting for the device."""

    def __init__(self, num_workers: int):
        self.needed = max(1, num_workers)
        self.in_a_row = 0

    @property
    def read(self) -> bool:
        return self.in_a_row >= self.needed

    def see(self, batch: dict) -> None:
        self.in_a_row = self.in_a_row + 1 if batch.pop(REPEATED) else 0

    def start_epoch(self, loader, skip: int = 0):
        """`loader`'s batches, after the first `skip` (a resumed epoch): those are read here and dropped, so that
        `read` says what it said in the uninterrupted run."""
        self.in_a_row = 0
        iterator = iter(loader)
        with torch.random.fork_rng(devices=[]):  # as `_keeping_global_rng`
            for _ in range(skip):
                batch = next(iterator, None)
                if batch is None:
                    break
                self.see(batch)
        return iterator


def _announce(args, accelerator: Accelerator, num_epochs) -> None:
    if args.with_tracking:
        accelerator.init_trackers(Path(sys.argv[0]).stem, config=_tracker_config(args))
    logger.info(
        f"***** training: {args.max_train_steps} updates, {num_epochs} epochs, batch "
        f"{args.per_device_train_batch_size} × {accelerator.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation *****",
        main_process_only=True,
    )


def _log_epoch(args, accelerator: Accelerator, epoch: int, results: dict) -> None:
    scalars = {k: v for k, v in results.items() if _is_number(v) and k != "epoch"}
    logger.info(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()), main_process_only=True)
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in scalars.items()}, step=results["step"])


def _keeping_global_rng(batches):
    """The batches of a data loader, with the seed its new iterator draws from the global random generator given
    back. accelerate drops the generator of a loader it dispatches, so that draw would move the quantizer's noise by
    one number at every epoch start and at a resume, and a resumed run would not repeat an uninterrupted one."""
    iterator = iter(batches)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, None)  # the loader's iterator (and its seed) is made here
    if first is not None:
        yield first
        yield from iterator


class EpochStatistics:
    """The running training loss of an epoch, its batch count, the codes its steps used (the Gumbel samples, for
    the MLR/Gumbel quantizers) and its steps with a NaN or inf loss, kept on the device so that adding to them costs
    no host sync. Saved in every checkpoint, so a resumed run knows where in which epoch it stopped (for a stream,
    there is no other way).

    A non-finite loss (an fp16 overflow: the GradScaler skips that step) is counted, not added to the mean; the
    count is read where the loop reads the loss anyway (`check_divergence`), and is in the epoch's summary."""

    def __init__(self, codebook_size: int, device):
        self.codebook_size, self.device = codebook_size, device
        self.consecutive_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # across epochs
        self.reset(0)

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self.code_counts = torch.zeros(self.codebook_size, dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | None) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.count += 1
        self.nonfinite += ~finite
        self.consecutive_nonfinite = (self.consecutive_nonfinite + 1) * ~finite
        if self.codebook_size and tokens is not None:
            self.code_counts += code_counts(tokens.detach(), self.codebook_size)

    def check_divergence(self, accelerator: Accelerator, step: int, part_read: bool | None = None) -> tuple[int, bool]:
        """The epoch's non-finite steps so far (on this process), and whether every process has read its part of the
        epoch (`part_read`: this one's, for a stream split across processes; else True); raises
        `TrainingDivergedError` once any process has had `DIVERGED_AFTER` non-finite steps in a row. Every process
        calls it at the same steps (it gathers both in one)."""
        unread = torch.tensor(0 if part_read in (None, True) else 1, device=self.device)
        flags = torch.stack([self.consecutive_nonfinite, unread]).reshape(1, 2)
        in_a_row, unread = accelerator.gather(flags).max(dim=0).values.tolist()
        if in_a_row >= DIVERGED_AFTER:
            raise TrainingDivergedError(
                f"training diverged: the loss was NaN or inf in the last {in_a_row} steps (update {step}); lower "
                "--learning_rate, or resume from an earlier checkpoint with --resume_from_checkpoint"
            )
        return int(self.nonfinite.item()), not unread

    def summary(self, accelerator: Accelerator) -> dict:
        """The epoch's training loss (over its finite steps), its count of steps with a NaN or inf loss and, for
        a tokenizer, its training-sample usage, summed over the processes; empty before the epoch's first batch."""
        if not self.count:
            return {}
        nonfinite = accelerator.reduce(self.nonfinite.clone(), reduction="sum").item()
        finite_steps = self.count * accelerator.num_processes - nonfinite
        loss_sum = accelerator.reduce(self.loss_sum.clone(), reduction="sum").item()
        summary = {"train_loss": loss_sum / finite_steps if finite_steps else math.nan, "nonfinite_steps": nonfinite}
        if self.codebook_size:
            counts = accelerator.reduce(self.code_counts, reduction="sum").cpu()
            if counts.any():  # models whose outputs carry no tokens (the classifier, the prior) have nothing to show
                summary.update(_train_usage(counts))
        return summary

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loss_sum": self.loss_sum.cpu(), "count": self.count,
                "nonfinite": self.nonfinite.cpu(), "code_counts": self.code_counts.cpu()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.count = state["count"]
        self.nonfinite = state.get("nonfinite", torch.zeros((), dtype=torch.long)).to(self.device)  # older checkpoints
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
    # float32 on the device (MPS has no float64): equal weights give equal sums, whatever their rounding
    checksum = sum(p.detach().float().sum() + p.detach().float().pow(2).sum() for p in model.parameters())
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    return bool((checksums == checksums[0]).all())


def _tracker_config(args) -> dict:
    # TensorBoard's hparams accept numbers, strings and booleans only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
