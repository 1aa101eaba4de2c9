"""Pieces of the training loop, fast and in-process: checkpoint resolution and rotation, damaged checkpoints, a full
disk, and what a CPU run cannot reach (saving and checking the weights of sharded training)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.training import checkpointing, loop, outputs


TINY = dict(hidden_size=8, residual_hidden_size=4, embedding_dim=4, codebook_size=8, num_residual_layers=1)


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def test_the_final_save_writes_the_gathered_state_dict(accelerator, tmp_path, monkeypatch):
    """Under FSDP or DeepSpeed a process's parameters are only its shard; the full weights come from
    `accelerator.get_state_dict` (the final save used to bypass it and write the local parameters)."""
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY))
    gathered = {name: torch.full_like(value, 0.5) for name, value in model.state_dict().items()}
    monkeypatch.setattr(accelerator, "get_state_dict", lambda m, unwrap=True: dict(gathered))
    outputs.save_model(accelerator, model, HyperVQImageProcessor(), tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved and all(torch.equal(saved[name], gathered[name]) for name in saved)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_identical_weights_are_not_claimed_for_sharded_parameters(accelerator, kind, monkeypatch):
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY))
    assert loop._same_weights_everywhere(accelerator, model) is True
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    assert loop._same_weights_everywhere(accelerator, model) is None


def test_a_full_disk_is_reported_as_such(accelerator, tmp_path, monkeypatch):
    """torch's writer reports a full disk as "unexpected pos 704 vs 598", without an errno."""

    def full(folder):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(accelerator, "save_state", full)
    free = lambda folder: shutil._ntuple_diskusage(total=2**30, used=2**30 - 2**20, free=2**20)  # noqa: E731
    monkeypatch.setattr(outputs.shutil, "disk_usage", free)
    with pytest.raises(OSError, match=r"no space left on the disk of .*step_3 \(1 MiB free\)"):
        checkpointing.save_checkpoint(accelerator, tmp_path, 3, total_limit=2)
    assert not (tmp_path / "checkpoints" / "step_3").exists()


def test_a_failed_write_with_space_left_keeps_its_own_error(accelerator, tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "save_state", lambda folder: (_ for _ in ()).throw(RuntimeError("bad tensor")))
    with pytest.raises(RuntimeError, match="bad tensor"):
        checkpointing.save_checkpoint(accelerator, tmp_path, 3, total_limit=2)


def test_damaged_checkpoint_files_are_named(tmp_path):
    folder = tmp_path / "step_2"
    folder.mkdir()
    torch.save({"state": torch.zeros(100)}, folder / "optimizer.bin")
    checkpointing.check_checkpoint_files(folder)  # complete: no error
    data = (folder / "optimizer.bin").read_bytes()
    (folder / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"optimizer\.bin is damaged"):
        checkpointing.check_checkpoint_files(folder)


def test_checkpoints_are_resolved_and_rotated(accelerator, tmp_path):
    assert checkpointing.resolve_checkpoint("latest", tmp_path) is None  # nothing yet: a first run simply starts
    for step in (2, 10, 4):
        checkpointing.save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert checkpointing.checkpoint_steps(tmp_path) == [4, 10]  # by number, not by name: step_10 is the newest
    (tmp_path / "checkpoints" / ".partial-step_12").mkdir()  # a save that was killed never counts
    (tmp_path / "checkpoints" / "step_13").write_text("a file, not a checkpoint")
    assert checkpointing.resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoints" / "step_10"
    assert checkpointing.resolve_checkpoint(str(tmp_path / "checkpoints" / "step_4"), tmp_path).name == "step_4"
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        checkpointing.resolve_checkpoint(str(tmp_path / "checkpoints" / "step_3"), tmp_path)


@pytest.mark.parametrize(
    "changed, message",
    [({"codebook_size": 16}, "the checkpoint was made with K=8 codes and this run asks for K=16 (codebook_size)"),
     ({"hidden_size": 16}, "the checkpoint's decoder.layers.0.bias has shape [8] and this run's model [16]"),
     ({"quantizer_type": "kmeans"}, "the checkpoint's weights are another model's (it has quantizer.normal_directions, "
      "quantizer.normal_scales and 2 more, it lacks quantizer.embedding)")],
)  # fmt: skip
def test_a_checkpoint_of_other_model_options_is_refused_before_loading(tmp_path, changed, message):
    """A resume with another --codebook_size (or another model) used to end in torch's size-mismatch traceback."""
    saving = Accelerator(cpu=True)
    saving.prepare(HyperVQVAEModel(HyperVQVAEConfig(**TINY)))
    checkpointing.save_checkpoint(saving, tmp_path, 2, total_limit=None)
    folder = tmp_path / "checkpoints" / "step_2"
    checkpointing.check_checkpoint_fits(folder, saving)  # the same model fits

    resuming = Accelerator(cpu=True)
    resuming.prepare(HyperVQVAEModel(HyperVQVAEConfig(**{**TINY, **changed})))
    with pytest.raises(ValueError) as error:
        checkpointing.check_checkpoint_fits(folder, resuming)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"--resume_from_checkpoint {folder}: ")


def test_fp16_is_refused_when_accelerate_itself_puts_the_run_on_the_cpu(tmp_path):
    """`ACCELERATE_USE_CPU=1` (`accelerate launch --cpu`, `use_cpu: true`) bypasses the argument check, which sees
    `--cpu` unset and, on a GPU machine, a GPU; accelerate would then train in fp32 without a word."""
    code = (
        "from types import SimpleNamespace\n"
        "from hf_hypervq.training import cli\n"
        f"args = SimpleNamespace(cpu=False, mixed_precision='fp16', gradient_accumulation_steps=1, with_tracking=False,"
        f" output_dir={str(tmp_path)!r}, seed=0, torch_compile=False, torch_compile_backend='inductor',"
        " quantizer_kernels='auto')\n"
        "try:\n    cli.make_accelerator(args)\nexcept ValueError as error:\n    print(error)\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--mixed_precision fp16 needs a GPU, but accelerate runs this on the CPU" in result.stdout
