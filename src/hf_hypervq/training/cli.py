"""The training scripts' command line: their common flags and checks, the accelerate setup those flags ask for,
and the one-line reporting of errors a user can fix."""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DynamoBackend, ProjectConfiguration, TorchDynamoPlugin, set_seed

from ..models.hypervq.kernels import set_compiled_kernels
from .data import DataError
from .hub import PublishError
from .loop import TrainingDivergedError


logger = get_logger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, epochs: int, batch_size: int):
    """The flags every training script takes."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default=None,
        help="Hub id (uoft-cs/cifar100, ylecun/mnist, ILSVRC/imagenet-1k), a local image folder (split/class/*.png), "
        "a folder written by datasets' save_to_disk, a .parquet/.csv/.json file, or fashion_mnist (Fashion-MNIST "
        "from Debian's dataset-fashion-mnist package, offline). Default: scikit-learn's handwritten digits, which "
        "ship with scikit-learn and need no network.",
    )
    data.add_argument("--dataset_config", default=None, help="configuration name of a Hub data set")
    data.add_argument(
        "--dataset_revision", default=None,
        help="the Hub data set's branch, tag or commit (default: main), resolved to a commit that every read uses",
    )  # fmt: skip
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
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start a new run in an --output_dir that holds an earlier run's checkpoints (they are deleted)",
    )
    train.add_argument(
        "--with_tracking", action="store_true", help="log scalars to the --report_to trackers, in --output_dir/runs"
    )
    train.add_argument(
        "--report_to", default="tensorboard",
        help="with --with_tracking: the trackers accelerate logs to, comma-separated (tensorboard, wandb, comet_ml, "
        "mlflow, ..., or all that are installed; default: tensorboard)",
    )  # fmt: skip
    train.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="updates between progress-bar and tracker updates of the loss, which wait for the device (default: 10)",
    )
    train.add_argument(
        "--eval_at_end_only", action="store_true", help="evaluate once after training instead of after every epoch"
    )
    train.add_argument(
        "--quantizer_kernels", choices=["auto", "compiled", "eager"], default="auto",
        help="the quantizer's fused N×K kernels: native on CPU and compiled with torch.compile for large inputs "
        "elsewhere (auto, the default), compiled always, or never (eager torch code)",
    )  # fmt: skip
    train.add_argument(
        "--torch_compile", action="store_true",
        help="compile the whole model with torch.compile (docs/performance.md#whole-model-compile)",
    )  # fmt: skip
    train.add_argument(
        "--torch_compile_backend",
        default="inductor",
        help="torch.compile backend for --torch_compile (default: inductor)",
    )
    add_hub_arguments(parser, "--hub_model_id", "the model repo to push to, e.g. user/hypervq-cifar100")
    return parser


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: hidden from --help, and says which flag replaces it."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"warning: {option_string} is deprecated and will be removed in the next release: use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated_alias(parser, old: str, new: str, *, flag: bool = False, dest: str | None = None, **kwargs) -> None:
    """Accept `old` as a hidden alias of `new` (a store_true flag with `flag`), setting `dest` (default: `new`'s)."""
    if flag:
        kwargs.update(nargs=0, const=True)
    parser.add_argument(old, dest=dest or new.lstrip("-"), action=DeprecatedAlias, replacement=new, **kwargs)


def add_hub_arguments(parser: argparse.ArgumentParser, repo_flag: str, repo_help: str) -> None:
    """The Hub flags of every command that pushes, as transformers' `TrainingArguments` spells them."""
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="push the result to the Hub when done")
    hub.add_argument(repo_flag, default=None, help=f"{repo_help}, 'user/name' or 'org/name'")
    hub.add_argument("--hub_private_repo", action="store_true", help="create the Hub repo as private")
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    hub.add_argument("--hub_revision", default=None, help="the branch to push to (created if missing; default: main)")
    hub.add_argument(
        "--license", default=None,
        help="the license the card declares (a Hub license id, e.g. cc-by-4.0; default: the training data's, where "
        "the Hub knows it; a push needs one)",
    )  # fmt: skip
    add_deprecated_alias(hub, "--hub_private", "--hub_private_repo", flag=True)


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
    if args.mixed_precision == "fp16" and (args.cpu or not _has_accelerator()):
        # accelerate would go on in fp32 without saying so: no autocast and no GradScaler on a CPU
        parser.error("--mixed_precision fp16 needs a GPU (CUDA, MPS or XPU); on a CPU use bf16")
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
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts over and --resume_from_checkpoint goes on: pass one of them")
    if args.validation_split_percentage is not None:
        if not 1 <= args.validation_split_percentage <= 50:
            parser.error("--validation_split_percentage must be between 1 and 50")
        if args.streaming or args.eval_split is not None:
            parser.error("--validation_split_percentage cannot be combined with --streaming or --eval_split")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length)")
    check_hub_arguments(args, parser, "hub_model_id")
    if args.dataset_revision and not _is_hub_dataset(args.dataset):
        parser.error("--dataset_revision applies to a Hub data set, not to --dataset's folder, file or default")
    backends = [b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO]
    if args.torch_compile_backend.lower() not in backends:
        parser.error(f"--torch_compile_backend must be one of {', '.join(backends)}; got {args.torch_compile_backend}")


def check_hub_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser, repo: str) -> None:
    """--push_to_hub needs the repo flag, and a repo id is checked before any work."""
    from .hub import check_repo_id

    if args.push_to_hub and not getattr(args, repo):
        parser.error(f"--push_to_hub needs --{repo}")
    if getattr(args, repo):
        try:
            check_repo_id(getattr(args, repo), f"--{repo}")
        except ValueError as error:
            parser.error(str(error))


def _is_hub_dataset(name) -> bool:
    from .hub import _is_hub_id

    return name is not None and _is_hub_id(name)


def resolve_dataset_revision(args: argparse.Namespace) -> None:
    """Set `args.dataset_revision` to the commit a Hub --dataset is at (at --dataset_revision, default main), once,
    so that every split is read at it and the results record it; offline it stays as given (datasets reads the
    cache)."""
    if _is_hub_dataset(getattr(args, "dataset", None)):
        from huggingface_hub import HfApi

        with contextlib.suppress(Exception):  # offline, or not found (datasets says so when it loads it)
            args.dataset_revision = HfApi().dataset_info(args.dataset, revision=args.dataset_revision).sha


def check_license_known(args: argparse.Namespace) -> None:
    """With --push_to_hub, the card must declare a license: found before training, not at the push after it."""
    from .hub import dataset_license

    data = args.dataset or getattr(args, "token_dataset", None) or "scikit-learn/digits"
    if args.push_to_hub and not args.license and not dataset_license(data, args.dataset_revision):
        raise ValueError(
            f"--push_to_hub needs --license: the license of {data} is not known to the Hub (e.g. --license "
            "cc-by-4.0, or other)"
        )


def quiet_logs(is_local_main_process: bool) -> None:
    """As the transformers examples set them: no line per HTTP request, datasets at WARNING and transformers at INFO
    on the main process, errors only on the others."""
    import datasets
    import transformers

    for client in ("httpx", "httpx2"):  # huggingface_hub 1.x's HTTP client, and 2.x's
        logging.getLogger(client).setLevel(logging.WARNING)
    if is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def finish(accelerator) -> None:
    """End a command: every process waits for the others, then the process group is destroyed. Without the barrier
    a process that finishes first tears down its gloo connections while another is still destroying its group; and
    a group destroyed while one of gloo's threads still waits for the GIL to finish the last collective hangs its
    process at exit (pytorch/pytorch#56297), and with it `accelerate launch`: the pause lets those threads finish."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(0.2)  # releases the GIL
    accelerator.end_training()


@contextlib.contextmanager
def reported_errors():
    """Turn the errors a user can fix (bad data, a model or checkpoint that is not there or of the wrong kind, a
    value our checks reject, a missing optional package) into one `error:` line and exit status 2.

    Under `accelerate launch`, the process whose error it is also writes the line into the launcher's error file, so
    the launcher's failure summary, printed last, ends with it; a process that merely lost contact with a failed one
    says so in a line instead of a traceback from gloo or NCCL."""
    try:
        yield
    except (DataError, PublishError, TrainingDivergedError, OSError, ImportError, ValueError, TypeError) as error:
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


def _has_accelerator() -> bool:
    mps, xpu = getattr(torch.backends, "mps", None), getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to.split(",") if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/runs"),
        # data order from (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # `prepare` compiles the model; `outputs.save_model` saves the module inside the compiled wrapper
        dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend if args.torch_compile else "no"),
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # `ACCELERATE_USE_CPU=1` (`accelerate launch --cpu`, `use_cpu: true`) moves the run to the CPU after the
        # argument checks, where accelerate would go on in fp32 without saying so
        raise ValueError(
            "--mixed_precision fp16 needs a GPU, but accelerate runs this on the CPU (ACCELERATE_USE_CPU, or "
            "use_cpu in the accelerate config); on a CPU use bf16"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    quiet_logs(accelerator.is_local_main_process)
    resolve_dataset_revision(args)
    check_license_known(args)
    logger.info(
        f"distributed: {accelerator.distributed_type}, processes: {accelerator.num_processes}, "
        f"device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}",
        main_process_only=True,
    )
    set_seed(args.seed)
    set_compiled_kernels({"auto": None, "compiled": True, "eager": False}[args.quantizer_kernels])
    return accelerator
