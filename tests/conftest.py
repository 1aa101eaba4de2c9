"""Test-session settings: never touch the network, keep torch to the cores we have."""

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


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
