"""tools/check_device.py: the whole check, run for real on the CPU (--quick), and how it reports what fails."""

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ROWS = [
    "reference HyperVQ",
    "reference KmeansVQ",
    "reference GumbelVQ",
    "reference HyperKmeansVQ",
    "reference HyperEmbMatVQ",
    "train fp32",
    "train bf16",
    "train fp16",
    "train fp32 +torch_compile",
    "tokenization",
    "no host sync",
    "benchmark quantizers",
    "benchmark training",
    "benchmark recipe",
]


@pytest.fixture
def check_device(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports the benchmarks' shared `benchmarking` module
    spec = importlib.util.spec_from_file_location("check_device", TOOLS / "check_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(TOOLS / "check_device.py"), *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_whole_check_runs_on_cpu(tmp_path):
    """Every check, end to end: one table, a row per check, ok except fp16, which accelerate cannot run on a CPU."""
    result = run_check("--device", "cpu", "--quick", "--output", tmp_path / "check.json", "--time_limit", 540)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | status | result | s |" and result.stdout.count("| check |") == 1
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] is True and report["torch"] == torch.__version__
    assert "device check on cpu (" in report["title"] and f"torch {torch.__version__}" in report["title"]
    rows = {row["check"]: row for row in report["rows"]}
    assert list(rows) == ROWS
    assert [line.split("|")[1].strip() for line in table[1:]] == ROWS  # the printed table has the same rows
    statuses = {name: row["status"] for name, row in rows.items()}
    assert statuses == {name: "n/a" if name in ("train fp16", "no host sync") else "ok" for name in ROWS}, report
    assert "needs a GPU" in rows["train fp16"]["result"] and "CUDA only" in rows["no host sync"]["result"]
    for quantizer in ("HyperVQ", "KmeansVQ", "GumbelVQ", "HyperKmeansVQ", "HyperEmbMatVQ"):
        passed, total = rows[f"reference {quantizer}"]["result"].split()[0].split("/")
        assert passed == total and int(total) >= 3
    for name in ("train fp32", "train bf16", "train fp32 +torch_compile"):
        assert rows[name]["result"].endswith("finite")
        loss = float(rows[name]["result"].split(",")[0].split()[1])
        assert 0 < loss < 1  # digits scaled to [-1, 1]: an untrained model starts near 0.5 or above
    assert (
        "tokens/s" in rows["tokenization"]["result"] and "= eval quantizer indices" in rows["tokenization"]["result"]
    )
    assert "HyperVQ ÷ VectorQuantize: train" in rows["benchmark quantizers"]["result"]
    assert "| HyperVQ |" in rows["benchmark quantizers"]["details"]  # the benchmark's own table goes to --output
    assert "hyperbolic:" in rows["benchmark training"]["result"] and "images/s" in rows["benchmark training"]["result"]
    assert (
        "tokenizer: 15.6 GFLOPs/image" in rows["benchmark recipe"]["result"]
        and "(projected)" in rows["benchmark recipe"]["result"]
    )
    assert all(row["seconds"] >= 0 for row in report["rows"])


def unavailable_devices():
    devices = ["cuda:99", "tpu", "cuda:x"]  # never on any machine
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", unavailable_devices())
def test_a_device_this_machine_lacks_is_one_line(device):
    result = run_check("--device", device, timeout=120)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: --device") and "Traceback" not in result.stderr


def test_reference_tests_exist_take_the_device_and_cover_every_quantizer(check_device):
    """A renamed test, or one that ignores HF_HYPERVQ_TEST_DEVICE, would silently check nothing on the device."""
    tree = ast.parse((ROOT / "tests" / "test_quantizers.py").read_text())
    arguments = {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}
    for name in check_device.REFERENCE_TESTS:
        assert "device" in arguments.get(name, []), name
    # (that each quantizer gets at least 3 passing cases, the whole check above asserts)
    # a parametrization names the quantizer; KmeansVQ must not claim HyperKmeansVQ's cases
    assert check_device.quantizer_of("test_x[GumbelVQ-compiled]") == "GumbelVQ"
    assert check_device.quantizer_of("test_x[HyperKmeansVQ]") == "HyperKmeansVQ"
    assert check_device.quantizer_of("test_perplexity_counts_code_usage") == "KmeansVQ"
    assert check_device.quantizer_of("test_fused_kernels_draw_the_same_noise_on_every_path[eager]") == "HyperVQ"


def test_training_rows(check_device, tmp_path):
    Outcome, deadline = check_device.Outcome, check_device.Deadline(60)

    def row(returncode, stderr, results=None, precision="fp32"):
        if results is not None:
            (tmp_path / "all_results.json").write_text(json.dumps(results))
        outcome = Outcome(returncode, "", stderr, 1.0)
        return check_device.training_row(precision, "cpu", outcome, tmp_path, deadline)

    ran = "INFO distributed: DistributedType.NO, processes: 1, device: cpu, mixed precision: no\n***** training: 50\n"
    assert row(0, ran, {"train_loss": 0.27, "reconstruction_mse": 0.26}).status == "ok"
    for loss, mse in ((math.nan, 0.26), (0.27, math.inf), (None, 0.26)):  # json writes NaN and Infinity
        failed = row(0, ran, {"train_loss": loss, "reconstruction_mse": mse})
        assert failed.status == "FAILED" and "not finite" in failed.result
    epochs = "epoch 0: step=45, train_loss=0.45, nonfinite_steps=2, x=1\nepoch 1: step=50, train_loss=0.27, nonfinite_steps=1\n"
    overflowed = row(0, ran + epochs, {"train_loss": 0.27, "reconstruction_mse": 0.26})
    assert overflowed.status == "ok" and overflowed.result.endswith("; 3 updates with a non-finite loss, left out")
    wrong_precision = row(0, ran, {"train_loss": 0.27, "reconstruction_mse": 0.26}, precision="bf16")
    assert wrong_precision.status == "FAILED" and "not as asked" in wrong_precision.result
    refused = row(2, "usage: ...\ntrain_vqvae.py: error: --mixed_precision fp16 needs a GPU; on a CPU use bf16\n")
    assert refused.status == "n/a" and refused.result == (
        "train_vqvae.py refuses it: --mixed_precision fp16 needs a GPU; on a CPU use bf16"
    )
    crashed = row(1, ran + "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: out of memory\n")
    assert crashed.status == "FAILED" and crashed.result == "exit status 1: RuntimeError: CUDA error: out of memory"
    # an error under mixed precision once training ran is a failure, not a precision the device lacks
    midway = row(2, ran + "error: the loss is not finite under mixed precision at update 12\n")
    assert midway.status == "FAILED"
    fallback = "hf_hypervq: compiling the quantizer's kernels failed (BackendCompilerFailed: no triton); they run"
    fell_back = row(0, ran + f"UserWarning: {fallback}\n", {"train_loss": 0.27, "reconstruction_mse": 0.26})
    assert fell_back.status == "FAILED" and fell_back.result == fallback
    stopped = check_device.training_row("fp32", "cpu", Outcome(None, "", "", 60.0), tmp_path, deadline)
    assert stopped.status == "FAILED" and "--time_limit" in stopped.result


def test_tokenization_runs_in_a_child_that_the_time_limit_stops(check_device):
    spec = {"model_dir": "/no/such/tokenizer", "sizes": asdict(check_device.QUICK)}
    failed = check_device.bounded_row("tokenization", "cpu", spec, check_device.Deadline(120))
    assert failed.status == "FAILED" and failed.result.startswith("exit status 1") and "/no/such" in failed.details
    stopped = check_device.bounded_row("tokenization", "cpu", spec, check_device.Deadline(0.5))
    assert stopped.status == "FAILED" and "--time_limit" in stopped.result


def test_a_failing_check_is_its_row_and_the_exit_status(check_device, tmp_path, monkeypatch, capsys):
    deadline = check_device.Deadline(60)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    (row,) = check_device.guarded("tokenization", broken, deadline)
    assert (row.check, row.status) == ("tokenization", "FAILED")
    assert row.result == "RuntimeError: CUDA error: an illegal memory access was encountered"
    (late,) = check_device.guarded("benchmark training", broken, check_device.Deadline(1))
    assert late.status == "FAILED" and late.result.startswith("not run: --time_limit")

    Row = check_device.Row
    rows = [Row("train fp32", "ok", "loss 0.27", 3.0), Row("tokenization", "FAILED", "a | b", 1.0, "output")]
    monkeypatch.setattr(check_device, "run_checks", lambda *args: rows)
    assert check_device.main(["--device", "cpu", "--output", str(tmp_path / "check.md")]) == 1
    printed = capsys.readouterr().out
    assert "| tokenization | FAILED | a / b |" in printed and "1 ok, 1 FAILED, 0 n/a" in printed
    written = (tmp_path / "check.md").read_text()
    assert written.startswith("# hf-hypervq") and "## tokenization (FAILED)" in written and "output" in written
    rows[1] = Row("tokenization", "n/a", "no trained tokenizer", 0.0)
    assert check_device.main(["--device", "cpu"]) == 0  # n/a is not a failure


def test_a_failing_or_skipped_reference_case_fails_its_quantizer_only(check_device):
    def case(name, inner=""):
        return f'<testcase classname="tests.test_quantizers" name="{name}" time="0.5">{inner}</testcase>'

    report = "<testsuites><testsuite>" + "".join([
        case("test_eval_is_deterministic_and_matches_indices_to_codes[KmeansVQ]"),
        case("test_eval_is_deterministic_and_matches_indices_to_codes[HyperKmeansVQ]",
             '<failure message="AssertionError: indices differ&#10;more">trace</failure>'),
        case("test_gumbel_straight_through_equals_gumbel_softmax_reference[GumbelVQ-compiled]",
             '<skipped message="no triton" />'),
        case("test_hypervq_codebook_is_offset_times_unit_normal"),
        case("test_commitment_weight_scales_the_only_loss_term[HyperEmbMatVQ]"),
    ]) + "</testsuite></testsuites>"  # fmt: skip
    rows = {row.check: row for row in check_device.rows_from_test_report(report, "pytest output")}
    assert [rows[f"reference {q}"].status for q in check_device.QUANTIZERS] == ["ok", "ok", "FAILED", "FAILED", "ok"]
    assert rows["reference HyperKmeansVQ"].result == (
        "0/1 tests passed; test_eval_is_deterministic_and_matches_indices_to_codes[HyperKmeansVQ]: "
        "failure: AssertionError: indices differ"
    )
    assert rows["reference GumbelVQ"].result.endswith("skipped: no triton")
    assert rows["reference KmeansVQ"].seconds == 0.5 and rows["reference HyperKmeansVQ"].details == "pytest output"
    assert check_device.rows_from_test_report("<testsuites/>", "")[0].result == "no reference test ran"


def test_a_numbered_gpu_is_the_only_one_its_child_processes_see(check_device, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert check_device.child_device("cuda:1") == ("cuda", {"CUDA_VISIBLE_DEVICES": "5"})
    assert check_device.child_device("cuda") == ("cuda", {})
    assert check_device.child_device("cpu") == ("cpu", {})


def test_a_reference_test_that_is_gone_fails_every_reference_row(check_device, monkeypatch, tmp_path):
    monkeypatch.setattr(check_device, "REFERENCE_TESTS", {"test_renamed_away": "HyperVQ"})
    rows = check_device.reference_rows("cpu", tmp_path, check_device.Deadline(120))
    assert [row.status for row in rows] == ["FAILED"] * 5
    assert (
        rows[0].result.startswith("pytest exit status 4: ERROR: not found:") and "test_renamed_away" in rows[0].result
    )
