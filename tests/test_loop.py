"""Pieces of the training loop that a CPU run cannot reach: saving and checking the weights of sharded training."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel
from hf_hypervq.training import loop


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
    loop.save_model(accelerator, model, HyperVQImageProcessor(), tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved and all(torch.equal(saved[name], gathered[name]) for name in saved)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_identical_weights_are_not_claimed_for_sharded_parameters(accelerator, kind, monkeypatch):
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY))
    assert loop._same_weights_everywhere(accelerator, model) is True
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    assert loop._same_weights_everywhere(accelerator, model) is None
