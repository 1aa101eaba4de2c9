"""The output folder: the final model (moved in with `config.json` last), the results files, figures and the push
to the Hub, every file written atomically, and a write that fails for want of space reported as such."""

import contextlib
import errno
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator


# Below this much free space, a failed write is reported as a full disk.
NEARLY_FULL_BYTES = 64 * 2**20
# The console command of each command module (`[project.scripts]`), as results and cards name them.
COMMANDS = {
    "train_vqvae": "hypervq-train-vqvae",
    "train_classifier": "hypervq-train-classifier",
    "train_vqsa": "hypervq-train-vqsa",
    "train_prior": "hypervq-train-prior",
    "tokenize_dataset": "hypervq-tokenize",
    "push_to_hub": "hypervq-push",
    "push_metric": "hypervq-push-metric",
    "sample": "hypervq-sample",
    "evaluate_model": "hypervq-evaluate",
}


def portable(value):
    """A value as results files record it: an absolute local path (which can hold a user's name, and names nothing
    on another machine) as its last part; anything else as is."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return Path(value).name
    return value


def portable_command(program: str | None = None) -> str:
    """How this run was started, as a reader can rerun it: the console command (`program`, else the one of the
    running module) and its arguments, absolute paths shortened by `portable`."""
    program = program or COMMANDS.get(Path(sys.argv[0]).stem, Path(sys.argv[0]).name)
    arguments = []
    for argument in sys.argv[1:]:
        flag, equals, value = argument.partition("=")
        arguments.append(f"{flag}={portable(value)}" if equals and flag.startswith("--") else portable(argument))
    return shlex.join([program, *arguments])


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


def save_model(accelerator: Accelerator, model, processor, output_dir) -> None:
    """Write the final model and image processor into `output_dir`: first into a temporary folder, then moved in
    with `config.json` last, so a folder with a `config.json` always holds complete weights."""
    accelerator.wait_for_everyone()
    model = getattr(model, "_orig_mod", model)  # `--torch_compile`'s wrapper would prefix every name with `_orig_mod.`
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


def write_text(path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename): a run killed meanwhile leaves the old file or
    none, never half of one."""
    path = Path(path)
    partial = path.with_name(f".partial-{path.name}")
    with reported_write_failure(path):
        partial.write_text(text)
    os.replace(partial, path)


def write_json(path, data: dict) -> None:
    """Write JSON atomically (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_results(args, results: dict) -> None:
    """`eval_results.json` (the final evaluation, what model cards read) and `all_results.json` (that plus the
    training loss, the step count and every flag)."""
    training_only = ("epoch", "step", "train_loss", "train_perplexity", "train_codes_used")
    evaluation = {k: v for k, v in results.items() if k not in training_only}
    # everything here is published with the model: no local path, no token
    source = {"dataset": portable(args.dataset) or "scikit-learn/digits", "split": args.eval_split or "test"}
    if getattr(args, "dataset_revision", None):  # the commit of a Hub data set
        source["dataset_revision"] = args.dataset_revision
    if "protocol" in evaluation:  # the protocol names the data it was measured on, too
        evaluation["protocol"] = results["protocol"] = {**source, **evaluation["protocol"]}
    arguments = {k: portable(v) for k, v in vars(args).items() if k != "hub_token"}
    results = {k: portable(v) for k, v in results.items()}
    write_json(Path(args.output_dir) / "eval_results.json", {**source, **evaluation})
    write_json(
        Path(args.output_dir) / "all_results.json",
        {**source, **results, "command": portable_command(), "args": arguments},
    )


def save_figure(save, path) -> None:
    """Call `save(temporary_path)` and rename the result to `path`."""
    path = Path(path)
    partial = path.with_name(f".partial-{path.name}")
    save(partial)
    os.replace(partial, path)
