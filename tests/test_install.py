"""What a plain `pip install hf-hypervq` brings, in a fresh virtual environment: enough to use a published model,
and nothing of the training stack, whose import then names the extra to install."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_hypervq import HyperVQImageProcessor, HyperVQVAEConfig, HyperVQVAEModel


ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("datasets", "accelerate", "evaluate", "scikit-learn", "scikit-image", "matplotlib")
CLIENT = """
import json, sys
import torch
import hf_hypervq
from transformers import AutoImageProcessor, AutoModel
from PIL import Image

model = AutoModel.from_pretrained(sys.argv[1]).eval()
processor = AutoImageProcessor.from_pretrained(sys.argv[1])
pixel_values = processor(images=Image.new("RGB", (8, 8), (10, 200, 30)), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    tokens = model.get_image_tokens(pixel_values)
try:
    import hf_hypervq.training
    training = "imported"
except ImportError as error:
    training = str(error)
try:
    from hf_hypervq import metrics
    metrics.load("codebook_usage")
    metric = "loaded"
except ImportError as error:
    metric = str(error)
print(json.dumps({"tokens": tokens.tolist(), "training": training, "metric": metric}))
"""


def run(*command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_core_install_loads_a_tokenizer_and_names_the_training_extra(tmp_path):
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel", ROOT
    )
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    venv = tmp_path / "core"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", f"torch=={__import__('torch').__version__.split('+')[0]}")
    run(python, "-m", "pip", "install", "-q", wheel)  # the core dependencies only
    installed = {p["name"].lower() for p in json.loads(run(python, "-m", "pip", "list", "--format", "json").stdout)}
    assert {"torch", "transformers", "geoopt", "safetensors"} <= installed
    assert not installed & set(TRAINING_ONLY), installed & set(TRAINING_ONLY)

    folder = tmp_path / "tokenizer"
    model = HyperVQVAEModel(
        HyperVQVAEConfig(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16)
    )
    model.save_pretrained(folder)
    processor = HyperVQImageProcessor(size={"height": 8, "width": 8})
    processor.save_pretrained(folder)
    out = json.loads(run(python, "-c", CLIENT, folder, cwd=tmp_path).stdout.strip().splitlines()[-1])
    from PIL import Image

    pixel_values = processor(images=Image.new("RGB", (8, 8), (10, 200, 30)), return_tensors="pt")["pixel_values"]
    assert out["tokens"] == model.eval().get_image_tokens(pixel_values).tolist()
    for message in (out["training"], out["metric"]):
        assert "pip install 'hf-hypervq[train]'" in message, message
