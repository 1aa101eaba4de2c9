"""Test-session settings: never touch the network, keep torch to the cores we have, and skip the slow tests unless
RUN_SLOW=1 (as transformers does: its own `@slow` tests, run by tests/test_transformers_conformance.py, read the same
variable)."""

import contextlib
import os
from types import SimpleNamespace


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from optional_parts import env_flag, require_fashion_mnist  # noqa: E402


# Under pytest-xdist each worker gets its share of the cores, so that workers do not oversubscribe them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
RUN_SLOW = env_flag("RUN_SLOW")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (long trainings, the study pipeline, the browser, multi-process launches) are skipped by
    default: `RUN_SLOW=1 python -m pytest tests` runs them too (CI does), with `-m slow` only them."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: RUN_SLOW=1 runs it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fashion_mnist():
    """For tests that read the real Fashion-MNIST: skipped with the reason (failed under HF_HYPERVQ_STRICT_SKIPS) where
    Debian's `dataset-fashion-mnist` is not installed."""
    require_fashion_mnist()


@pytest.fixture
def run_command(capsys):
    """`run(name, *args)`: the command `hf_hypervq.commands.<name>` (what `scripts/<name>.py` runs) in this process;
    returns its exit status and stderr. For the checks of bad input, which stop a command before it trains: a
    subprocess would spend seconds importing torch and transformers for a check that takes milliseconds."""

    def run(name: str, *args) -> tuple[int, str]:
        import importlib

        from accelerate.state import AcceleratorState

        main = importlib.import_module(f"hf_hypervq.commands.{name}").main
        capsys.readouterr()
        try:
            main([str(arg) for arg in args])
            status = 0
        except SystemExit as exit:  # argparse and `reported_errors` exit with status 2
            status = exit.code if isinstance(exit.code, int) else 1
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)  # the next command starts from a clean state
        return status, capsys.readouterr().err

    return run


@pytest.fixture
def torch_threads():
    """`with torch_threads(n):` runs torch on n intra-op threads, then restores the count."""

    @contextlib.contextmanager
    def use(count):
        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return use


@pytest.fixture
def run_training_loop(tmp_path):
    """`run(model, steps, num_batches, accelerator=None, logging_steps=100)`: the real training loop (`loop.train`)
    on `num_batches` batches of four random 8×8 images, with AdamW, on one CPU process; returns its results."""

    def run(model, steps: int, num_batches: int, accelerator=None, logging_steps: int = 100) -> dict:
        from accelerate import Accelerator
        from torch.utils.data import DataLoader

        from hf_hypervq.training.loop import train

        accelerator = accelerator or Accelerator(cpu=True)
        images = [{"pixel_values": torch.rand(3, 8, 8) * 2 - 1} for _ in range(4 * num_batches)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(images, batch_size=4))
        args = SimpleNamespace(max_train_steps=steps, num_train_epochs=None, streaming=False,
                               gradient_accumulation_steps=1, resume_from_checkpoint=None, output_dir=tmp_path,
                               checkpointing_steps=None, checkpoints_total_limit=None, logging_steps=logging_steps,
                               with_tracking=False, eval_at_end_only=True, per_device_train_batch_size=4)  # fmt: skip
        return train(args, accelerator, model, optimizer, loader, lambda m, final: {})

    return run
