"""Many machines, rehearsed on one: two `accelerate launch --num_machines 2` on localhost (CPU, gloo) form one world
of two processes. Training and tokenization there must give what two processes on one machine give, bit for bit;
and a checkpoint resumes on another number of processes."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
TINY = [
    "--hidden_size", "16", "--residual_hidden_size", "8", "--embedding_dim", "8", "--codebook_size", "16",
    "--image_size", "8", "--max_train_samples", "200", "--max_eval_samples", "51", "--per_device_eval_batch_size", "20",
    "--seed", "1",
]  # fmt: skip
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(num_processes: int, num_machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    """`accelerate launch` on the CPU; with `--multi_gpu`, torchrun forms the world (with `--cpu` each "machine"
    would be a world of its own), and the scripts' `--cpu` keeps the Accelerator on the CPU with gloo."""
    if num_processes == 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", str(num_machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip


def run_on_two_machines(script: str, *args, logs: Path, timeout: float = 600) -> None:
    """Both launchers write to files, not pipes (a pipe nobody drains yet can fill up and block its machine). If they
    have not finished in `timeout` seconds, every process of both gets SIGABRT, which makes Python print each
    thread's stack (PYTHONFAULTHANDLER), and the failure shows both logs: where a hang was, not only that it was."""
    port = free_port()
    env = {**ENV, "PYTHONFAULTHANDLER": "1"}
    machines = []
    for rank in (0, 1):
        log = logs / f"{Path(script).stem}-machine-{rank}.log"
        command = [*launcher(2, 2, rank, port), str(SCRIPTS / script), "--cpu", *map(str, args)]
        with log.open("w") as out:
            machines.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        for process, _ in machines:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process, _ in machines:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.send_signal(signal.SIGABRT)
        for process, _ in machines:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            process.kill()
        pytest.fail(
            f"{script} on two machines did not finish in {timeout:.0f} s:\n"
            + "\n".join(f"--- machine {rank} ---\n{log.read_text()[-6000:]}" for rank, (_, log) in enumerate(machines))
        )
    for rank, (process, log) in enumerate(machines):
        assert process.returncode == 0, f"machine {rank}: {log.read_text()[-4000:]}"


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_machines_train_and_tokenize_as_two_processes_on_one(tmp_path):
    train = ["--max_train_steps", "6", "--per_device_train_batch_size", "16", *TINY]
    run_on_two_machines("train_vqvae.py", "--output_dir", tmp_path / "machines", *train, logs=tmp_path)
    run([*launcher(2), str(SCRIPTS / "train_vqvae.py"), "--cpu", "--output_dir", str(tmp_path / "one"), *train])
    machines = json.loads((tmp_path / "machines" / "all_results.json").read_text())
    assert machines["num_processes"] == 2 and machines["weights_identical_across_processes"]
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "machines" / "model.safetensors"),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)

    tokenize = ["--tokenizer", tmp_path / "one", "--max_train_samples", "60", "--max_eval_samples", "30"]
    run_on_two_machines("tokenize_dataset.py", "--output_dir", tmp_path / "tokens-machines", *tokenize, logs=tmp_path)
    run([sys.executable, str(SCRIPTS / "tokenize_dataset.py"), "--cpu", "--output_dir", str(tmp_path / "tokens-one"),
         *map(str, tokenize)])  # fmt: skip
    import datasets

    two_machines = datasets.load_dataset(str(tmp_path / "tokens-machines"))
    one_process = datasets.load_dataset(str(tmp_path / "tokens-one"))
    for split in one_process:
        assert two_machines[split].num_rows == one_process[split].num_rows
        assert two_machines[split]["input_ids"] == one_process[split]["input_ids"]


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(saved_by, resumed_by, tmp_path):
    """The same global batch (32 images: 2 × 16 or 1 × 32): the same data order, so the resumed run ends where an
    uninterrupted run on the resuming number of processes ends, up to the reductions' rounding."""

    def train(processes: int, output: Path, steps: int, *extra):
        batch = str(32 // processes)
        return run([*launcher(processes), str(SCRIPTS / "train_vqvae.py"), "--cpu", "--output_dir", str(output),
                    "--max_train_steps", str(steps), "--per_device_train_batch_size", batch, "--checkpointing_steps",
                    "3", "--quantizer", "kmeans", *TINY, *extra])  # fmt: skip

    train(saved_by, tmp_path / "run", 3)
    resumed = train(resumed_by, tmp_path / "run", 6, "--resume_from_checkpoint", "latest")
    assert f"saved by {saved_by} process(es) and this run has {resumed_by}" in resumed.stderr
    train(resumed_by, tmp_path / "straight", 6)
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["step"] == 6 and results["num_processes"] == resumed_by
    straight, after = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "run" / "model.safetensors"),
    )
    for name, value in straight.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-5)
