#!/usr/bin/env python
"""Check hf-hypervq on one device in one bounded command, and print one table: a row per check, ok / FAILED / n/a.

    python tools/check_device.py --device cuda --output device-check.json    # a GPU (at most --time_limit, 9 min)
    python tools/check_device.py --device mps                                # Apple silicon
    python tools/check_device.py --device cpu                                # about 3 minutes on 2 cores
    python tools/check_device.py --device cpu --quick                        # what the tests run: under 2 minutes

The checks, in this order, all on the named device:

- reference <quantizer>: the tests of tests/test_quantizers.py that hold each of the five quantizers to its reference
  formula (REFERENCE_TESTS), run by pytest with HF_HYPERVQ_TEST_DEVICE set to the device, on every kernel path
  (native, eager, compiled). Needs pytest (`pip install -e ".[dev]"`).
- train fp32 / bf16 / fp16: 50 updates of a tiny tokenizer on the embedded digits (scripts/train_vqvae.py with
  accelerate's --mixed_precision no / bf16 / fp16): the final training loss and eval MSE, which must be finite (the
  updates whose loss was NaN or inf, which the training loop counts and leaves out, are reported too). A
  precision the device or accelerate cannot run is n/a with the reason (on a CPU, fp16: accelerate 1.16 applies no
  fp16 autocast there, so train_vqvae.py refuses it).
- train fp32 +torch_compile: the fp32 run again with --torch_compile (the whole model compiled by inductor).
- tokenization: the fp32 tokenizer loaded with AutoModel, `get_image_tokens` on a batch of digits; the tokens must lie
  in [0, K) and equal the eval-mode quantizer's indices of the encoder's latents; tokens per second. In a child
  process, so that --time_limit bounds it too.
- no host sync (CUDA only): a training step (forward and backward) of a tiny tokenizer with each of the five
  quantizers under `torch.cuda.set_sync_debug_mode("error")`, which raises at any copy to the host or other
  synchronisation; n/a elsewhere. Also in a child process.
- benchmark recipe: benchmarks/benchmark_recipe.py at the ImageNet recipe's shapes (recipes/imagenet/): on a GPU
  its measured images per second and GPU-hours replace the projection that a CPU run gives.
- benchmark quantizers / benchmark training: benchmarks/benchmark_quantizers.py and benchmarks/benchmark_training.py with
  --device, one small shape and 3 rounds (their tables go into --output).

In every check, the quantizer's kernels must take their fast path on the device: a fallback to eager torch code
(torch.compile or the native CPU build failing, which the kernels report with one warning) fails the check.

The whole run stops starting checks after --time_limit seconds (a check still running is stopped at the limit and
fails), so one command has a known bound. The exit status is 1 if any check failed, 2 for a device this machine does
not have (one `error:` line). --output writes the table as markdown, or as JSON for a .json path, with each
benchmark's table and each failure's output.
"""

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
BENCHMARKS = ROOT / "benchmarks"
QUANTIZERS = ["HyperVQ", "KmeansVQ", "GumbelVQ", "HyperKmeansVQ", "HyperEmbMatVQ"]
# The tests of tests/test_quantizers.py that hold a quantizer to its reference formula (eval argmax, the straight-
# through Gumbel-softmax, the fused kernels against float64, the codebook r_k a_k/|a_k|, the loss terms, the code
# histogram). Each takes the file's `device` fixture; a test parametrized by quantizer counts for each of them.
REFERENCE_TESTS = {
    "test_eval_is_deterministic_and_matches_indices_to_codes": None,
    "test_training_output_is_exactly_the_chosen_code": None,
    "test_hypervq_codebook_is_offset_times_unit_normal": "HyperVQ",
    "test_hypervq_train_samples_codes_from_softmax_of_logits": "HyperVQ",
    "test_gumbel_straight_through_equals_gumbel_softmax_reference": None,
    "test_fused_kernels_draw_the_same_noise_on_every_path": "HyperVQ",
    "test_codebook_loss_moves_only_the_codebook_and_commitment_only_the_input": None,
    "test_commitment_weight_scales_the_only_loss_term": None,
    "test_perplexity_counts_code_usage": "KmeansVQ",
}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # row name -> accelerate's --mixed_precision
# 50 updates of a tokenizer small enough to train in seconds on a CPU (16×16 digits -> 4×4 codes).
TINY_TOKENIZER = [
    "--max_train_steps", "50", "--per_device_train_batch_size", "32", "--hidden_size", "32",
    "--residual_hidden_size", "8", "--num_residual_layers", "1", "--embedding_dim", "16", "--codebook_size", "64",
    "--eval_at_end_only", "--logging_steps", "10", "--seed", "0",
]  # fmt: skip
# How the quantizer's kernels say that their fast path failed on this device (torch.compile, or the native CPU
# build) and that they run as eager torch code instead: on a device check, a failure.
KERNEL_FALLBACK = re.compile(
    r"hf_hypervq: (compiling the quantizer's kernels failed|could not build the quantizer's native CPU kernels).*"
)


@dataclass(frozen=True)
class Sizes:
    eval_samples: int  # evaluation images of each training run
    token_batch: int  # images per get_image_tokens call
    token_rounds: int
    quantizer_benchmark: tuple  # benchmark_quantizers.py flags
    training_benchmark: tuple  # benchmark_training.py flags
    recipe_benchmark: tuple  # benchmark_recipe.py flags


FULL = Sizes(
    eval_samples=256,
    token_batch=256,
    token_rounds=20,
    quantizer_benchmark=("--sizes", "8192", "--codebook-sizes", "512", "--rounds", "3"),
    training_benchmark=("--rounds", "3"),  # the README's shape (32×32, batch 128, K = 512), every variant
    recipe_benchmark=("--steps", "3"),  # the ImageNet recipe's three jobs at its shapes, with their memory
)
QUICK = Sizes(
    eval_samples=64,
    token_batch=64,
    token_rounds=5,
    quantizer_benchmark=(
        "--sizes", "2048", "--codebook-sizes", "128", "--rounds", "2", "--variants", "VectorQuantize,HyperVQ",
        "--no-memory",  # each variant's memory runs in a fresh process: seconds of imports apiece
    ),
    training_benchmark=(
        "--image_size", "16", "--batch_size", "16", "--codebook_size", "64", "--rounds", "2",
        "--variants", "kmeans,hyperbolic",
    ),
    recipe_benchmark=("--steps", "1", "--jobs", "tokenizer", "--no-memory"),
)  # fmt: skip


@dataclass
class Row:
    check: str
    status: str  # "ok", "FAILED" or "n/a"
    result: str  # the key number, or why it failed or cannot run
    seconds: float
    details: str = field(default="", repr=False)  # --output only: a benchmark's table, a failure's output


class DeviceError(ValueError):
    """A --device this machine cannot run on."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, help="cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--quick", action="store_true",
        help="smaller evaluation, token batch and benchmark shapes (every check still runs; what CI runs)",
    )  # fmt: skip
    parser.add_argument("--output", default=None, help="also write the table here: markdown, or JSON for *.json")
    parser.add_argument(
        "--time_limit", type=float, default=540.0,
        help="seconds for the whole run; a check still running then is stopped and fails (default: 540)",
    )  # fmt: skip
    parser.add_argument(
        "--work_dir", default=None,
        help="keep the trained tokenizers and the test report here (default: a temporary folder, removed at the end)",
    )  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a bounded check's own process
    args = parser.parse_args(argv)
    if not args.time_limit > 0:
        parser.error(f"--time_limit must be a number of seconds > 0, got {args.time_limit}")
    return args


def resolve_device(name: str) -> str:
    """The canonical device string, or DeviceError with one line saying why this machine cannot run on it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device must be cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:  # (ROCm's torch calls its GPUs cuda too)
            raise DeviceError(f"--device {name}: this torch ({torch.__version__}) is built without CUDA")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, the driver)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: there are only {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return str(device)
    if device.type == "mps":
        if not torch.backends.mps.is_built():
            raise DeviceError(f"--device {name}: this torch ({torch.__version__}) is built without MPS")
        if not torch.backends.mps.is_available():
            raise DeviceError(
                f"--device {name}: MPS is not available (it needs Apple silicon and macOS 12.3 or later)"
            )
        return "mps"
    raise DeviceError(f"--device must be cpu, cuda, cuda:N or mps, got {name!r}")


def describe_device(device: str) -> str:
    """The hardware behind `device`, for the table's header."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return (
            f"{torch.cuda.get_device_name(index)}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}, "
            + (f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}")
        )
    if device == "mps":
        return f"Apple MPS, {platform.machine()}, macOS {platform.mac_ver()[0]}"
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def header(device: str, quick: bool) -> str:
    try:
        version = importlib.metadata.version("hf-hypervq")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    return (
        f"hf-hypervq {version}{source_revision()} device check on {device} ({describe_device(device)}); "
        f"torch {torch.__version__}; Python {platform.python_version()}; {platform.platform()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}" + ("; --quick" if quick else "")
    )


def source_revision() -> str:
    """The checkout's commit, which says more than an editable install's version number."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changes = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    if commit.returncode != 0:
        return ""
    return f" (commit {commit.stdout.strip()}{', with local changes' if changes.stdout.strip() else ''})"


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Outcome:
    returncode: int | None  # None: stopped at the time limit
    stdout: str
    stderr: str
    seconds: float


def run(command, deadline: Deadline, env=None) -> Outcome:
    """Run a command in its own process group, stopped (the whole group) when the time limit is reached."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(part) for part in command],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=max(deadline.left(), 1.0))
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        stop(process)
        stdout, stderr = process.communicate()
        returncode = None
    except BaseException:  # Ctrl-C: in a session of its own, the child does not get it from the terminal
        stop(process)
        raise
    return Outcome(returncode, stdout, stderr, time.perf_counter() - started)


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its process group: the benchmark's memory children too


def last_line(text: str) -> str:
    """The last meaningful line of a process's output (progress bars redraw with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "(no output)"


def failure(outcome: Outcome, deadline: Deadline) -> str:
    if outcome.returncode is None:
        return f"stopped after {outcome.seconds:.0f} s: --time_limit {deadline.seconds:.0f} s reached"
    return f"exit status {outcome.returncode}: {last_line(outcome.stderr or outcome.stdout)}"


def output_tail(outcome: Outcome, characters: int = 4000) -> str:
    return (outcome.stdout[-characters:] + "\n" + outcome.stderr[-characters:]).strip()


def child_device(device: str) -> tuple[str, dict]:
    """The device a child process is told, and its environment: cuda:N becomes the child's only GPU, so that what
    runs on the current GPU there (accelerate's choice, the benchmarks' CUDA events) runs on the one asked for."""
    index = torch.device(device).index
    if not device.startswith("cuda") or index is None:
        return device, {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return "cuda", {"CUDA_VISIBLE_DEVICES": ids[index].strip()}


# ---- the reference tests ----


def quantizer_of(test_name: str) -> str | None:
    """The quantizer a test case holds to its formula: its parametrization's class, else the test's own."""
    name, _, params = test_name.partition("[")
    for param in params.rstrip("]").split("-"):
        if param in QUANTIZERS:
            return param
    return REFERENCE_TESTS.get(name)


def reference_rows(device: str, work: Path, deadline: Deadline) -> list[Row]:
    report = work / "reference-tests.xml"
    command = [
        sys.executable, "-m", "pytest", *[f"tests/test_quantizers.py::{name}" for name in REFERENCE_TESTS],
        "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
        # a case whose kernels fell back to eager torch code would check nothing about their fast path here (the
        # kernels' two fallback warnings are the UserWarnings that start with "hf_hypervq")
        "-W", "error:hf_hypervq:UserWarning",
    ]  # fmt: skip
    device, env = child_device(device)
    outcome = run(command, deadline, env={**env, "HF_HYPERVQ_TEST_DEVICE": device})
    if outcome.returncode not in (0, 1) or not report.exists():  # 0: all passed, 1: some failed; else it did not run
        error = next((line for line in outcome.stderr.splitlines() if line.startswith("ERROR")), None)  # pytest's
        if "No module named pytest" in outcome.stderr:
            reason = "pytest is not installed (pip install -e '.[dev]')"
        else:
            reason = f"pytest exit status {outcome.returncode}: {error}" if error else failure(outcome, deadline)
        return [Row(f"reference {q}", "FAILED", reason, outcome.seconds, output_tail(outcome)) for q in QUANTIZERS]
    return rows_from_test_report(report.read_text(), output_tail(outcome))


def rows_from_test_report(junit_xml: str, details: str) -> list[Row]:
    """A row per quantizer from pytest's JUnit XML: ok when every one of its cases passed (a skip is a failure:
    it checked nothing on the device); the seconds are its cases' own."""
    cases = {q: [] for q in QUANTIZERS}  # quantizer -> [(test, seconds, failure message or None)]
    for case in ElementTree.fromstring(junit_xml).iter("testcase"):
        problem = next((case.find(tag) for tag in ("failure", "error", "skipped") if case.find(tag) is not None), None)
        message = None
        if problem is not None:
            lines = (problem.get("message") or problem.text or "").strip().splitlines()
            message = f"{problem.tag}: {lines[0] if lines else '(no message)'}"
        quantizer = quantizer_of(case.get("name"))
        if quantizer is not None:
            cases[quantizer].append((case.get("name"), float(case.get("time", 0)), message))
    rows = []
    for quantizer, results in cases.items():
        seconds = sum(s for _, s, _ in results)
        failed = [(name, message) for name, _, message in results if message]
        if not results:
            rows.append(Row(f"reference {quantizer}", "FAILED", "no reference test ran", seconds, details))
        elif failed:
            first, message = failed[0]
            summary = f"{len(results) - len(failed)}/{len(results)} tests passed; {first}: {message}"
            rows.append(Row(f"reference {quantizer}", "FAILED", summary[:300], seconds, details))
        else:
            rows.append(Row(f"reference {quantizer}", "ok", f"{len(results)}/{len(results)} tests passed", seconds))
    return rows


# ---- training ----


def training_row(precision: str, device: str, outcome: Outcome, output_dir: Path, deadline: Deadline) -> Row:
    name = f"train {precision}"
    stderr = outcome.stderr
    refusal = last_line(stderr)
    # the scripts refuse what cannot run with one `error:` line and exit status 2, before training starts
    if outcome.returncode == 2 and re.search(r"mixed.precision", refusal) and "***** training" not in stderr:
        reason = re.sub(r"^(train_vqvae\.py: )?error: ", "", refusal)
        return Row(name, "n/a", f"train_vqvae.py refuses it: {reason}", outcome.seconds)
    if outcome.returncode != 0:
        return Row(name, "FAILED", failure(outcome, deadline), outcome.seconds, output_tail(outcome))
    if fallback := KERNEL_FALLBACK.search(stderr):
        return Row(name, "FAILED", fallback[0][:300], outcome.seconds, output_tail(outcome))
    used = re.search(r"device: (\S+), mixed precision: (\w+)", stderr)
    if used is None or torch.device(used[1]).type != torch.device(device).type or used[2] != PRECISIONS[precision]:
        where = f"{used[1]} with mixed precision {used[2]}" if used else "an unknown device"
        return Row(name, "FAILED", f"ran on {where}, not as asked", outcome.seconds, output_tail(outcome))
    results = json.loads((output_dir / "all_results.json").read_text())
    # the loop counts (and leaves out of the mean) the updates whose loss was NaN or inf, in each epoch's log line
    nonfinite = sum(int(n) for n in re.findall(r"epoch \d+: step=\d+,[^\n]*?nonfinite_steps=(\d+)", stderr))
    row = loss_row(name, results.get("train_loss"), results.get("reconstruction_mse"), outcome.seconds)
    if nonfinite:
        row.result += f"; {nonfinite} updates with a non-finite loss, left out"
    return row


def loss_row(name: str, loss, mse, seconds: float) -> Row:
    """A training run's row from its final training loss and eval MSE: ok only when both are finite numbers."""
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (loss, mse))
    text = ", ".join(
        f"{label} {value:.4g}" if isinstance(value, (int, float)) else f"{label} {value}"
        for label, value in (("loss", loss), ("MSE", mse))
    )
    return Row(name, "ok" if finite else "FAILED", text + (", finite" if finite else ": not finite"), seconds)


def tokenizer_dir(work: Path, precision: str) -> Path:
    return work / f"tokenizer-{precision}"


def train_row(device: str, precision: str, sizes: Sizes, work: Path, deadline: Deadline, compiled=False) -> Row:
    """50 updates of the tiny tokenizer in one precision, into `tokenizer_dir(work, precision)`; with `compiled`,
    the whole model compiled (--torch_compile), into a folder of its own."""
    device, env = child_device(device)
    output_dir = tokenizer_dir(work, precision + ("-compiled" if compiled else ""))
    command = [
        sys.executable, SCRIPTS / "train_vqvae.py", "--output_dir", output_dir, "--mixed_precision",
        PRECISIONS[precision], "--max_eval_samples", str(sizes.eval_samples), *TINY_TOKENIZER,
        *(["--cpu"] if device == "cpu" else []),  # elsewhere accelerate takes the GPU (or MPS) by itself
        *(["--torch_compile"] if compiled else []),
    ]  # fmt: skip
    row = training_row(precision, device, run(command, deadline, env), output_dir, deadline)
    if compiled:
        row.check += " +torch_compile"
    return row


# ---- tokenization ----


def tokenization_row(device: str, model_dir: str, sizes: Sizes) -> Row:
    sys.path.insert(0, str(BENCHMARKS))
    from benchmarking import Timer
    from transformers import AutoImageProcessor, AutoModel
    from transformers.utils.logging import disable_progress_bar

    import hf_hypervq  # noqa: F401  (registers the Auto classes)
    from hf_hypervq.training.data import digits_dataset

    disable_progress_bar()  # the weights' loading bar would interleave with this script's progress lines
    started = time.perf_counter()
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # the timer's CUDA events go to the current GPU
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = digits_dataset()["test"]["image"][: sizes.token_batch]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    timer = Timer(device)
    with torch.no_grad():
        tokens = model.get_image_tokens(pixel_values)
        # the quantizer on its own, in eval mode, on the encoder's channel-last latents
        reference = model.quantizer(model.encoder(pixel_values).permute(0, 2, 3, 1))
        milliseconds = statistics.median(
            timer(model.get_image_tokens, pixel_values) for _ in range(sizes.token_rounds)
        )
    codebook_size = model.config.codebook_size
    grid = pixel_values.shape[-1] // model.config.downsampling_factor
    problems = []
    if tokens.dtype != torch.int64 or tuple(tokens.shape) != (len(images), grid, grid):
        problems.append(f"tokens are {tokens.dtype} {tuple(tokens.shape)}, not int64 {(len(images), grid, grid)}")
    low, high = tokens.min().item(), tokens.max().item()
    if low < 0 or high >= codebook_size:
        problems.append(f"tokens span [{low}, {high}], outside [0, {codebook_size})")
    if not torch.equal(tokens, reference.indices):
        problems.append(
            f"{(tokens != reference.indices).sum().item()} tokens differ from the eval quantizer's indices"
        )
    if reference.logits is not None and not torch.equal(tokens, reference.logits.argmax(-1)):
        problems.append("tokens differ from the argmax of the eval logits")
    seconds = time.perf_counter() - started
    if problems:
        return Row("tokenization", "FAILED", "; ".join(problems), seconds)
    rate = tokens.numel() / (milliseconds / 1e3)
    summary = f"{rate:,.0f} tokens/s; {tokens.numel()} tokens in [0, {codebook_size}), = eval quantizer indices"
    return Row("tokenization", "ok", summary, seconds)


def host_sync_row(device: str) -> Row:
    """A training step (forward and backward) of a tiny tokenizer with each quantizer, under CUDA's sync debug mode
    set to raise: the cheap proof that nothing in the step waits for the GPU."""
    if not device.startswith("cuda"):
        return Row("no host sync", "n/a", "CUDA only (torch.cuda.set_sync_debug_mode)", 0.0)
    from hf_hypervq import HyperVQVAEConfig, HyperVQVAEModel
    from hf_hypervq.models.hypervq.quantizers import QUANTIZER_TYPES

    started = time.perf_counter()
    pixel_values = torch.rand(8, 3, 32, 32, device=device) * 2 - 1
    failures = []
    for quantizer in QUANTIZER_TYPES:
        config = HyperVQVAEConfig(hidden_size=32, residual_hidden_size=8, embedding_dim=16, codebook_size=64,
                                  num_residual_layers=1, quantizer_type=quantizer)  # fmt: skip
        model = HyperVQVAEModel(config).to(device).train()
        model(pixel_values).loss.backward()  # a first step: lazy initialisation (cuBLAS handles) may synchronise
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(pixel_values).loss.backward()
        except RuntimeError as error:
            failures.append(f"{quantizer}: {str(error).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    seconds = time.perf_counter() - started
    if failures:
        return Row("no host sync", "FAILED", "; ".join(failures)[:300], seconds)
    return Row("no host sync", "ok", f"a training step of each of {len(QUANTIZER_TYPES)} quantizers", seconds)


CHILD_CHECKS = {"tokenization": lambda device, spec: tokenization_row(device, spec["model_dir"], Sizes(**spec["sizes"])),
                "no host sync": lambda device, spec: host_sync_row(device)}  # fmt: skip


def bounded_row(name: str, device: str, spec: dict, deadline: Deadline) -> Row:
    """Run one of CHILD_CHECKS in a child process of this script, stopped at the time limit like the others."""
    device, env = child_device(device)
    command = [
        sys.executable,
        Path(__file__).resolve(),
        "--device",
        device,
        "--child",
        json.dumps({**spec, "check": name}),
    ]
    outcome = run(command, deadline, env)
    lines = [line for line in outcome.stdout.splitlines() if line.startswith("{")]
    if outcome.returncode != 0 or not lines:
        return Row(name, "FAILED", failure(outcome, deadline), outcome.seconds, output_tail(outcome))
    return Row(**json.loads(lines[-1]))


def run_child(device: str, spec: str) -> int:
    spec = json.loads(spec)
    print(json.dumps(asdict(CHILD_CHECKS[spec["check"]](device, spec))), flush=True)
    return 0


# ---- benchmarks ----


def table_rows(text: str, first_cells: set[str], column: int) -> dict[str, list[str]]:
    """The cells of a markdown table's rows whose `column`-th cell is one of `first_cells`, by that cell."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > column and cells[column] in first_cells:
            rows[cells[column]] = cells
    return rows


def number(cell: str) -> float:
    try:
        return float(cell.rstrip("×"))
    except ValueError:
        return math.nan


def benchmark_row(name: str, outcome: Outcome, variants: list[str], column: int, times: list[int], key, deadline):
    """A benchmark's row: it ran, its table has every variant with finite, positive times, no kernel fell back."""
    if outcome.returncode != 0:
        return Row(name, "FAILED", failure(outcome, deadline), outcome.seconds, output_tail(outcome))
    if fallback := KERNEL_FALLBACK.search(outcome.stderr):
        return Row(name, "FAILED", fallback[0][:300], outcome.seconds, output_tail(outcome))
    rows = table_rows(outcome.stdout, set(variants), column)
    bad = [v for v in variants if v not in rows or not all(number(rows[v][i]) > 0 for i in times)]
    if bad:
        return Row(name, "FAILED", f"no finite times for {', '.join(bad)}", outcome.seconds, outcome.stdout)
    return Row(name, "ok", key(rows), outcome.seconds, outcome.stdout.strip())


def flag(flags: tuple, name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def quantizer_benchmark_row(device: str, sizes: Sizes, deadline: Deadline) -> Row:
    flags = list(sizes.quantizer_benchmark)
    if device == "mps" and "--no-memory" not in flags:
        flags.append("--no-memory")  # it measures the process's RSS off CUDA, which says nothing about MPS memory
    variants = flag(sizes.quantizer_benchmark, "--variants", "").split(",")
    if variants == [""]:
        import benchmark_quantizers

        variants = benchmark_quantizers.VARIANTS
    n, k = flag(flags, "--sizes", "?"), flag(flags, "--codebook-sizes", "?")

    def key(rows):
        hyper = rows["HyperVQ"]
        memory = f", peak memory {hyper[9]}" if hyper[9] != "-" else ""
        return f"HyperVQ ÷ VectorQuantize: train {hyper[6]}, eval {hyper[4]}{memory} (N={n}, K={k})"

    device, env = child_device(device)
    command = [sys.executable, BENCHMARKS / "benchmark_quantizers.py", "--device", device, *flags]
    return benchmark_row("benchmark quantizers", run(command, deadline, env), variants, 2, [3, 5], key, deadline)


def training_benchmark_row(device: str, sizes: Sizes, deadline: Deadline) -> Row:
    variants = flag(sizes.training_benchmark, "--variants", "").split(",")
    if variants == [""]:
        import benchmark_training

        variants = benchmark_training.VARIANTS
    batch = flag(sizes.training_benchmark, "--batch_size", "128")

    def key(rows):
        hyper = rows["hyperbolic"]
        return f"hyperbolic: {hyper[1]} ms/step, {hyper[2]} images/s, {hyper[3]} KmeansVQ's step (batch {batch})"

    device, env = child_device(device)
    command = [sys.executable, BENCHMARKS / "benchmark_training.py", "--device", device, *sizes.training_benchmark]
    return benchmark_row("benchmark training", run(command, deadline, env), variants, 0, [1, 2], key, deadline)


def recipe_benchmark_row(device: str, sizes: Sizes, work: Path, deadline: Deadline) -> Row:
    """The ImageNet recipe's jobs at their shapes for a few steps: on a GPU, measured images per second and
    GPU-hours in place of the projection the CPU gives."""
    device, env = child_device(device)
    output = work / "recipe.json"
    command = [sys.executable, BENCHMARKS / "benchmark_recipe.py", "--device", device, "--output", output,
               *sizes.recipe_benchmark]  # fmt: skip
    outcome = run(command, deadline, env)
    if outcome.returncode != 0 or not output.exists():
        return Row("benchmark recipe", "FAILED", failure(outcome, deadline), outcome.seconds, output_tail(outcome))
    jobs = json.loads(output.read_text())["jobs"]
    label = "measured" if device.startswith("cuda") else "projected"
    summary = "; ".join(
        f"{job}: {r['gflops_per_image']:.1f} GFLOPs/image, {r['gpu_images_per_second']:,.0f} images/s per GPU "
        f"({label}), {r['gpu_hours']:,.1f} GPU-hours"
        for job, r in jobs.items()
    )
    return Row("benchmark recipe", "ok", summary[:300], outcome.seconds, outcome.stdout[-4000:])


# ---- the run ----


def guarded(name: str, check, deadline: Deadline) -> list[Row]:
    """Run one check (it returns a row or a list of rows): an exception becomes its FAILED row, so the other
    checks still run, and no check starts once the time limit is (nearly) reached."""
    if deadline.left() < 5:
        return [Row(name, "FAILED", f"not run: --time_limit {deadline.seconds:.0f} s reached", 0.0)]
    print(f"check_device: {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        rows = check()
    except Exception as error:
        lines = str(error).strip().splitlines()
        rows = Row(name, "FAILED", f"{type(error).__name__}: {lines[0] if lines else ''}"[:300], 0.0)
        rows.seconds = time.perf_counter() - started
    rows = rows if isinstance(rows, list) else [rows]
    for row in rows:
        print(f"check_device: {row.check}: {row.status}, {row.result} ({row.seconds:.1f} s)", file=sys.stderr)
    return rows


def run_checks(device: str, sizes: Sizes, work: Path, deadline: Deadline) -> list[Row]:
    rows = guarded("reference tests", lambda: reference_rows(device, work, deadline), deadline)
    trained = None  # the tokenizer that the tokenization check loads: the first that trained, fp32's if it did
    for precision in PRECISIONS:
        (row,) = guarded(
            f"train {precision}", lambda p=precision: train_row(device, p, sizes, work, deadline), deadline
        )
        rows.append(row)
        if trained is None and row.status == "ok":
            trained = tokenizer_dir(work, precision)
    rows += guarded("train fp32 +torch_compile", lambda: train_row(device, "fp32", sizes, work, deadline, True),
                    deadline)  # fmt: skip
    if trained is None:
        rows.append(Row("tokenization", "n/a", "no trained tokenizer: every training run failed", 0.0))
    else:
        spec = {"model_dir": str(trained), "sizes": asdict(sizes)}
        rows += guarded("tokenization", lambda: bounded_row("tokenization", device, spec, deadline), deadline)
    on_cuda = device.startswith("cuda")  # elsewhere n/a at once, without a child process
    sync_check = (
        (lambda: bounded_row("no host sync", device, {}, deadline)) if on_cuda else (lambda: host_sync_row(device))
    )
    rows += guarded("no host sync", sync_check, deadline)
    rows += guarded("benchmark quantizers", lambda: quantizer_benchmark_row(device, sizes, deadline), deadline)
    rows += guarded("benchmark training", lambda: training_benchmark_row(device, sizes, deadline), deadline)
    rows += guarded("benchmark recipe", lambda: recipe_benchmark_row(device, sizes, work, deadline), deadline)
    return rows


def markdown(title: str, rows: list[Row], seconds: float) -> str:
    lines = [f"# {title}", "", "| check | status | result | s |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.result.replace('|', '/')} | {r.seconds:.1f} |" for r in rows]
    counts = {status: sum(r.status == status for r in rows) for status in ("ok", "FAILED", "n/a")}
    lines += ["", f"{counts['ok']} ok, {counts['FAILED']} FAILED, {counts['n/a']} n/a in {seconds:.0f} s"]
    return "\n".join(lines)


def write_output(path: str, title: str, rows: list[Row], seconds: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        report = {
            "title": title,
            "torch": torch.__version__,
            "seconds": round(seconds, 1),
            "ok": not any(r.status == "FAILED" for r in rows),
            "rows": [asdict(r) for r in rows],
        }
        path.write_text(json.dumps(report, indent=2) + "\n")
        return
    text = markdown(title, rows, seconds)
    for row in rows:
        if row.details:
            text += f"\n\n## {row.check} ({row.status})\n\n```text\n{row.details}\n```"
    path.write_text(text + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.child:
        return run_child(device, args.child)
    started = time.perf_counter()
    deadline = Deadline(args.time_limit)
    title = header(device, args.quick)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="check_device-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_checks(device, QUICK if args.quick else FULL, work, deadline)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    print(markdown(title, rows, seconds), flush=True)
    if args.output:
        write_output(args.output, title, rows, seconds)
    return 1 if any(r.status == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
