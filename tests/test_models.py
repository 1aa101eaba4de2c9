"""The transformers models: tokenizer, frozen-feature classifier, VQ-SA head, image processor, Auto classes, pipelines."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    pipeline,
)

from hf_hypervq import (
    QUANTIZER_TYPES,
    QUANTIZERS,
    HyperVQImageProcessor,
    HyperVQPriorConfig,
    HyperVQSAConfig,
    HyperVQSAForImageClassification,
    HyperVQVAEConfig,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
)


TINY = dict(hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16, num_residual_layers=1)
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
LABELS = {"id2label": {0: "zero", 1: "one", 2: "two"}, "label2id": {"zero": 0, "one": 1, "two": 2}}


def tiny_config(**overrides) -> HyperVQVAEConfig:
    return HyperVQVAEConfig(**{**TINY, **overrides})


def images(batch=2, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_tokenizer(model, path, size=16):
    model.save_pretrained(path)
    HyperVQImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return str(path)


def pil_image(seed=0, size=(20, 17)):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


# ---- configs ----


@pytest.mark.parametrize("config_class", [HyperVQVAEConfig, HyperVQSAConfig, HyperVQPriorConfig])
def test_every_config_field_is_documented(config_class):
    own_fields = {f.name for f in dataclasses.fields(config_class)} - {
        f.name for f in dataclasses.fields(config_class.__mro__[1])
    }
    assert own_fields
    for name in own_fields:
        assert f"    {name} (`" in config_class.__doc__, name


def test_config_quantizer_names_match_the_quantizers():
    assert QUANTIZER_TYPES == tuple(QUANTIZERS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantizer_type="nearest"), "quantizer_type"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(hidden_size=6, num_downsamples=3), "hidden_size"),
        (dict(num_downsamples=0), "num_downsamples"),
        (dict(curvature=0.0), "curvature"),
        (dict(commitment_weight=-1.0), "commitment_weight"),
        (dict(gumbel_temperature=[0.5, 2.0, 0.9]), "gumbel_temperature"),
        (dict(diversity_weight=-0.1), "diversity_weight"),
        (dict(diversity_weight=float("inf")), "diversity_weight"),
        (dict(feature_clip=0.0), "feature_clip"),
        (dict(feature_clip=float("nan")), "feature_clip"),
    ],
)
def test_bad_config_is_rejected_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperVQVAEConfig(**kwargs)


def test_commitment_weight_defaults_to_each_quantizers_own():
    """`None` takes the quantizer's default: none for the MLR quantizers (the paper), VQ-VAE's 0.25 otherwise."""
    expected = {"hyperbolic": 0.0, "hyperbolic_embedding": 0.0, "kmeans": 0.25, "hyperbolic_kmeans": 0.25}
    for quantizer_type, weight in expected.items():
        model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type))
        assert model.quantizer.commitment_weight == weight, quantizer_type
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, commitment_weight=0.1))
    assert model.quantizer.commitment_weight == 0.1


def test_hyperplane_init_options_reach_the_quantizer():
    torch.manual_seed(0)
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, offset_init_scale=0.0, normal_init_scale=2.0))
    assert torch.all(model.quantizer.offsets == 0) and model.quantizer.normal_init_scale == 2.0
    with pytest.raises(ValueError, match="normal_init_scale"):
        HyperVQVAEConfig(normal_init_scale=0.0)


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "gumbel", "hyperbolic_embedding"])
def test_gumbel_temperature_survives_save_and_load(quantizer_type, tmp_path):
    """The update count is saved with the weights: a reloaded model trained further goes on from its temperature
    (it used to restart at tau_max)."""
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type, gumbel_temperature=[2, 0.5, 0.99]))
    model.set_num_updates(100)
    expected = model.quantizer.current_temperature
    assert expected == pytest.approx(2 * 0.99**100)
    model.save_pretrained(tmp_path)
    reloaded = HyperVQVAEModel.from_pretrained(tmp_path).train()
    assert int(reloaded.quantizer.num_updates) == 100
    assert reloaded.quantizer.current_temperature == pytest.approx(expected)


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "gumbel", "hyperbolic_embedding"])
def test_diversity_weight_and_feature_clip_survive_save_and_load(quantizer_type, tmp_path):
    """The options reach the quantizers that take them and come back from `from_pretrained`; a config saved
    before they existed (an older checkpoint) loads with them off, the paper's quantizer."""
    config = tiny_config(quantizer_type=quantizer_type, diversity_weight=0.2, feature_clip=2)
    assert config.feature_clip == 2.0 and isinstance(config.feature_clip, float)  # an int (hand-written JSON) is fine
    model = HyperVQVAEModel(config)
    takes_clip = quantizer_type != "gumbel"
    assert model.quantizer.diversity_weight == 0.2
    assert getattr(model.quantizer, "feature_clip", None) == (2.0 if takes_clip else None)
    model.save_pretrained(tmp_path / "new")
    reloaded = HyperVQVAEModel.from_pretrained(tmp_path / "new")
    assert (reloaded.config.diversity_weight, reloaded.config.feature_clip) == (0.2, 2.0)
    assert reloaded.quantizer.diversity_weight == 0.2
    assert getattr(reloaded.quantizer, "feature_clip", None) == (2.0 if takes_clip else None)

    path = tmp_path / "older"
    model.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    del saved["diversity_weight"], saved["feature_clip"]
    (path / "config.json").write_text(json.dumps(saved))
    older = HyperVQVAEModel.from_pretrained(path)
    assert (older.config.diversity_weight, older.config.feature_clip) == (0.0, None)
    assert older.quantizer.diversity_weight == 0.0 and getattr(older.quantizer, "feature_clip", None) is None


def test_train_vqvae_flags_set_diversity_weight_and_feature_clip(tmp_path, capsys):
    from hf_hypervq.commands import train_vqvae as script

    args = script.parse_args(["--output_dir", str(tmp_path), "--diversity_weight", "0.1", "--feature_clip", "2.5"])
    config = script.build_config(args, num_updates=10)
    assert (config.diversity_weight, config.feature_clip) == (0.1, 2.5)
    default = script.build_config(script.parse_args(["--output_dir", str(tmp_path)]), num_updates=10)
    assert (default.diversity_weight, default.feature_clip) == (0.0, None)  # the paper's quantizers
    for flag, value in (("--feature_clip", "0"), ("--diversity_weight", "-1")):
        with pytest.raises(SystemExit):
            script.parse_args(["--output_dir", str(tmp_path), flag, value])
        assert flag.lstrip("-") in capsys.readouterr().err.splitlines()[-1]


def test_frozen_tokenizer_keeps_its_schedule_while_the_head_trains():
    classifier = HyperVQVAEForImageClassification(HyperVQVAEConfig(**TINY, num_labels=3))
    classifier.set_num_updates(50)
    assert int(classifier.hypervq.quantizer.num_updates) == 0


def test_loading_another_kind_of_model_is_an_error_not_random_weights(tmp_path):
    from hf_hypervq import HyperVQPriorModel

    HyperVQVAEModel(HyperVQVAEConfig(**TINY)).save_pretrained(tmp_path / "tokenizer")
    HyperVQPriorModel(HyperVQPriorConfig(codebook_size=16, num_layers=2)).save_pretrained(tmp_path / "prior")
    with pytest.raises(ValueError, match="holds a 'hypervq_vae' model; HyperVQPriorModel loads 'hypervq_prior'"):
        HyperVQPriorModel.from_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="holds a 'hypervq_prior' model"):
        HyperVQVAEForImageClassification.from_pretrained(tmp_path / "prior", num_labels=3)
    config = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "tokenizer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no `model_type`"):
        HyperVQVAEModel.from_pretrained(tmp_path / "tokenizer")


def test_damaged_or_missing_folders_are_named(tmp_path):
    """transformers used to answer these with a safetensors header error, "Repo id must be in the form ...", or a
    config error that did not say which file."""
    folder = tmp_path / "tokenizer"
    HyperVQVAEModel(HyperVQVAEConfig(**TINY)).save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        HyperVQVAEModel.from_pretrained(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        HyperVQVAEModel.from_pretrained(str(tmp_path / "typo"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantizer_type": "nearest"}))
    with pytest.raises(ValueError, match=r"tokenizer/config\.json: `quantizer_type` must be one of"):
        HyperVQVAEModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(OSError, match=r"model\.safetensors is damaged"):
        HyperVQVAEModel.from_pretrained(folder)


def tiny_models(quantizer_type="hyperbolic"):
    """One model of each class, tiny, with `quantizer_type`."""
    return [
        HyperVQVAEModel(tiny_config(quantizer_type=quantizer_type)),
        HyperVQVAEForImageClassification(tiny_config(quantizer_type=quantizer_type, num_labels=3)),
        HyperVQSAForImageClassification(
            HyperVQSAConfig(backbone_config=TINY_RESNET, quantizer_type=quantizer_type, codebook_size=8, num_labels=3)
        ),
    ]


def test_from_pretrained_none_with_a_state_dict_builds_the_model():
    """transformers' `from_pretrained(None, config=..., state_dict=...)` used to raise a TypeError (`Path(None)`)."""
    for model in tiny_models("gumbel"):
        model.set_num_updates(7)
        loaded = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        fresh = type(model).from_pretrained(None, config=model.config, state_dict={})
        assert all(int(m.num_updates) == 0 for m in fresh.modules() if hasattr(m, "num_updates"))


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "gumbel", "hyperbolic_embedding"])
def test_init_weights_sets_the_update_count_of_a_model_built_on_meta(quantizer_type):
    """A model built on the meta device (how transformers loads) gets its buffers from `_init_weights`; the Gumbel
    update count used to keep whatever memory `to_empty` gave it."""
    for model_class in (HyperVQVAEModel, HyperVQVAEForImageClassification):
        with torch.device("meta"):
            model = model_class(tiny_config(quantizer_type=quantizer_type, num_labels=3))
        model.to_empty(device="cpu")
        counts = [m.num_updates for m in model.modules() if hasattr(m, "num_updates")]
        assert counts
        for count in counts:
            count.fill_(12345)  # what uninitialised memory may hold
        model.init_weights()
        assert all(int(count) == 0 for count in counts)


def test_meta_tensors_get_a_message_naming_them():
    """A meta input used to fail inside autocast ("unsupported scalarType") or on `.item()`; a model built on meta
    used to return garbage from its first conv."""
    meta_images = images().to("meta")
    for model in tiny_models():
        with pytest.raises(ValueError, match="^`pixel_values` is on the meta device"):
            model(meta_images)
    for quantizer_type in QUANTIZER_TYPES:
        quantizer = HyperVQVAEModel(tiny_config(quantizer_type=quantizer_type)).quantizer
        for mode in (True, False):
            with pytest.raises(ValueError, match=r"got `z` on the meta device"):
                quantizer.train(mode)(torch.randn(4, 8, device="meta"))
    with torch.device("meta"):
        model = HyperVQVAEModel(tiny_config())
    with pytest.raises(ValueError, match="^the model's weights are on the meta device"):
        model(images())


def test_codebook_size_missing_from_config_json_is_one_line(tmp_path):
    """A config.json without `codebook_size` next to K = 16 weights used to end in transformers' size-mismatch
    report, one row per quantizer tensor."""
    HyperVQVAEModel(tiny_config(codebook_size=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "codebook_size"}))
    missing = r"holds a codebook of 16 codes, but .*config\.json has no `codebook_size`, so the default 512 applies"
    for loader in (HyperVQVAEModel, HyperVQVAEForImageClassification, AutoModel):
        with pytest.raises(ValueError, match=missing) as error:
            loader.from_pretrained(tmp_path)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="holds a codebook of 16 codes, but the config says codebook_size=32"):
        HyperVQVAEModel.from_pretrained(tmp_path, codebook_size=32)
    with pytest.raises(ValueError, match="holds a codebook of 16 codes, but the config says codebook_size=8"):
        HyperVQVAEModel.from_pretrained(tmp_path, config=tiny_config(codebook_size=8))
    assert HyperVQVAEModel.from_pretrained(tmp_path, codebook_size=16).quantizer.codebook_size == 16
    resized = HyperVQVAEModel.from_pretrained(tmp_path, codebook_size=32, ignore_mismatched_sizes=True)
    assert resized.quantizer.codebook_size == 32


def test_vqsa_attention_gets_its_kaiming_normal_init():
    """transformers 5 skips `_init_weights` for modules without parameters of their own; VQ-SA's attention init
    used to be PyTorch's default (std 0.036 at D = 256 instead of kaiming-normal's 0.088)."""
    torch.manual_seed(0)
    resnet = dict(embedding_size=8, hidden_sizes=[8, 256], depths=[1, 1], layer_type="basic")
    model = HyperVQSAForImageClassification(HyperVQSAConfig(backbone_config=resnet, num_labels=3))
    for projection in (model.attention.query, model.attention.key, model.attention.value):
        assert projection.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
def test_quantizer_is_float32_under_a_float16_default_dtype(quantizer_type):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type=quantizer_type))
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in model.quantizer.parameters())


def test_from_resnet_on_another_model_is_an_error(tmp_path):
    HyperVQVAEModel(HyperVQVAEConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a transformers ResNet"):
        HyperVQSAForImageClassification.from_resnet(str(tmp_path))


def test_tokenizer_output_carries_the_mlr_logits():
    model = HyperVQVAEModel(HyperVQVAEConfig(**TINY)).eval()
    out = model(torch.randn(2, 3, 8, 8))
    assert out.logits.shape == (2, 2, 2, 16)
    assert torch.equal(out.logits.argmax(-1), out.image_tokens)
    assert HyperVQVAEModel(HyperVQVAEConfig(**TINY, quantizer_type="kmeans"))(torch.randn(2, 3, 8, 8)).logits is None


def test_config_field_types_are_checked():
    with pytest.raises(StrictDataclassError, match="codebook_size"):
        HyperVQVAEConfig(codebook_size="512")
    with pytest.raises(ValueError, match="feature_scale"):
        HyperVQSAConfig(feature_scale="batchnorm")
    with pytest.raises(ValueError, match="ResNet"):
        HyperVQSAConfig(backbone_config={"model_type": "vit"})


# ---- the tokenizer ----


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
def test_tokenizer_forward_and_token_round_trip(quantizer_type):
    model = HyperVQVAEModel(tiny_config(quantizer_type=quantizer_type))
    assert type(model.quantizer) is QUANTIZERS[quantizer_type].cls
    x = images()
    out = model.train()(x)
    assert out.reconstruction.shape == x.shape
    assert out.image_tokens.shape == (2, 4, 4) and out.image_tokens.dtype == torch.int64
    assert out.latents.shape == out.quantized_latents.shape == (2, 8, 4, 4)
    torch.testing.assert_close(out.reconstruction_loss, F.mse_loss(out.reconstruction, x))
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.quantizer_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())

    model.eval()
    with torch.no_grad():
        tokens = model.get_image_tokens(x)
        assert torch.equal(model.decode_tokens(tokens), model(x).reconstruction)
        assert torch.equal(tokens, model(x).image_tokens)


def test_set_num_updates_reaches_the_quantizer():
    model = HyperVQVAEModel(tiny_config(gumbel_temperature=[2.0, 0.5, 0.5]))
    model.set_num_updates(1)
    assert model.quantizer.current_temperature == 1.0


@pytest.mark.parametrize("quantizer_type", QUANTIZER_TYPES)
def test_save_and_from_pretrained_give_identical_outputs(quantizer_type, tmp_path):
    """Guards the re-initialisation traps of transformers 5 loading: `_init_weights` runs again on loaded modules, so
    an init that bypasses `transformers.initialization` would overwrite the loaded weights."""
    model = HyperVQVAEModel(tiny_config(quantizer_type=quantizer_type)).eval()
    with torch.no_grad():  # move every parameter away from its init, so a re-init would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_tokenizer(model, tmp_path)
    for loaded in (HyperVQVAEModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is HyperVQVAEModel
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        x = images()
        with torch.no_grad():
            assert torch.equal(model(x).reconstruction, loaded.eval()(x).reconstruction)
    assert AutoConfig.from_pretrained(tmp_path).quantizer_type == quantizer_type
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "pixel_values, error, match",
    [
        (torch.randn(2, 1, 16, 16), ValueError, r"\(batch, 3, height, width\)"),
        (torch.randn(2, 3, 2, 2), ValueError, "multiples of 4"),
        (torch.randn(2, 3, 18, 16), ValueError, "multiples of 4"),
        (torch.randn(3, 16, 16), ValueError, "shape"),
        (torch.randint(0, 255, (2, 3, 16, 16)), TypeError, "float tensor"),
        (torch.randn(2, 3, 0, 0), ValueError, "multiples of 4"),
        (torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError, r"float64 but the model's weights torch\.float32"),
    ],
)
def test_tokenizer_rejects_bad_images(pixel_values, error, match):
    with pytest.raises(error, match=match):
        HyperVQVAEModel(tiny_config())(pixel_values)


def test_bad_latents_labels_and_images_get_our_message_not_a_torch_error():
    """Each of these used to end in a conv, cross-entropy or transformers error that did not name the argument."""
    model = HyperVQVAEModel(tiny_config())
    with pytest.raises(ValueError, match=r"must have 8 channels \(`embedding_dim`\), got 5"):
        model.decode(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\(batch, 8, height, width\)"):
        model.decode(torch.randn(8, 4, 4))
    classifier = HyperVQVAEForImageClassification(tiny_config(num_labels=3))
    vqsa = HyperVQSAForImageClassification(HyperVQSAConfig(backbone_config=TINY_RESNET, codebook_size=8, num_labels=3))
    for model in (classifier, vqsa):
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\); got values from -1 to 0"):
            model(images(), labels=torch.tensor([0, -1]))
        with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
            model(images(), labels=torch.tensor([[0, 1]]))
        with pytest.raises(TypeError, match="`labels` must be an integer tensor"):
            model(images(), labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least 1; got"):
        vqsa(torch.randn(2, 3, 0, 0))
    with pytest.raises(TypeError, match="float64"):
        vqsa(images().double())


@pytest.mark.parametrize(
    "image, match",
    [(np.zeros((8, 8)), r"got an array of shape \(8, 8\) \(for a grey image add a channel axis"),
     (np.zeros((0, 0, 3), dtype=np.uint8), "has no pixels"), (Image.new("RGB", (0, 0)), "0×0 has no pixels")],
)  # fmt: skip
def test_image_processor_says_which_images_it_takes(image, match):
    with pytest.raises(ValueError, match=match):
        HyperVQImageProcessor()(images=image, return_tensors="pt")


def test_decode_tokens_rejects_bad_tokens():
    model = HyperVQVAEModel(tiny_config())
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode_tokens(torch.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match=r"\(batch, height, width\)"):
        model.decode_tokens(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode_tokens(torch.zeros(1, 4, 4))


def test_bf16_load_keeps_the_quantizer_in_fp32_and_trains_finite(tmp_path):
    save_tokenizer(HyperVQVAEModel(tiny_config()), tmp_path)
    model = HyperVQVAEModel.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    assert model.encoder.projection.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.quantizer.parameters())
    out = model(images().to(torch.bfloat16))
    assert torch.isfinite(out.loss) and out.reconstruction.dtype == torch.bfloat16
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    fp32_model = HyperVQVAEModel(tiny_config()).train()  # bf16 autocast training of an fp32 model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_model(images() * 30)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in fp32_model.parameters() if p.grad is not None)


# ---- the frozen-feature classifier ----


@pytest.fixture
def tokenizer_dir(tmp_path):
    model = HyperVQVAEModel(tiny_config())
    return save_tokenizer(model, tmp_path / "tokenizer")


@pytest.mark.parametrize("loader", [HyperVQVAEForImageClassification, AutoModelForImageClassification])
def test_classifier_from_tokenizer_is_frozen_and_trains_only_its_head(loader, tokenizer_dir):
    tokenizer = HyperVQVAEModel.from_pretrained(tokenizer_dir)
    model = loader.from_pretrained(tokenizer_dir, num_labels=3, **LABELS)
    assert type(model) is HyperVQVAEForImageClassification
    for name, p in tokenizer.state_dict().items():
        assert torch.equal(model.hypervq.state_dict()[name], p), name
    assert not any(p.requires_grad for p in model.hypervq.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())

    model.train()
    assert not model.hypervq.training and model.classifier.training
    frozen_before = {k: v.clone() for k, v in model.hypervq.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([0, 2])
    out = model(images(), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.hypervq.state_dict()[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, model.classifier.state_dict()[k]) for k, v in head_before.items())
    assert out.logits.shape == (2, 3)


def test_classifier_checkpoint_round_trip_and_loads_as_a_tokenizer(tokenizer_dir, tmp_path):
    model = HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=3, **LABELS).eval()
    save_tokenizer(model, tmp_path / "classifier")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier").eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert not any(p.requires_grad for p in loaded.hypervq.parameters())
    assert loaded.config.id2label == LABELS["id2label"]
    as_tokenizer = AutoModel.from_pretrained(tmp_path / "classifier").eval()
    assert type(as_tokenizer) is HyperVQVAEModel
    assert torch.equal(as_tokenizer.get_image_tokens(x), model.hypervq.get_image_tokens(x))


def test_classifier_normalized_features_make_the_head_blind_to_their_scale(tokenizer_dir, tmp_path):
    """`classifier_normalize_features`: the head's input is standardised per channel, so the same head gives the same
    logits on features 20 times smaller (HyperVQ's code vectors are 50 times smaller than GumbelVQ's); its running statistics are
    learned in training, used in eval, saved and loaded."""
    model = HyperVQVAEForImageClassification.from_pretrained(
        tokenizer_dir, num_labels=3, classifier_normalize_features=True, **LABELS
    )
    assert isinstance(model.feature_norm, torch.nn.BatchNorm2d) and not list(model.feature_norm.parameters())
    features = torch.randn(8, model.config.embedding_dim, 4, 4) * 3 + 1
    model.train()
    logits = model.classifier(model.feature_norm(features))
    torch.testing.assert_close(model.classifier(model.feature_norm(features / 20)), logits, rtol=1e-4, atol=1e-4)
    model.feature_norm.running_mean.fill_(0.5)  # as after training on such features
    model.feature_norm.running_var.fill_(4.0)
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(
            expected, model.classifier((model.hypervq.encode(x).quantized_latents - 0.5) / (4.0 + 1e-6) ** 0.5)
        )
    save_tokenizer(model, tmp_path / "classifier")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier").eval()
    assert loaded.config.classifier_normalize_features
    assert torch.equal(loaded.feature_norm.running_var, model.feature_norm.running_var)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    plain = HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=3, **LABELS)
    assert isinstance(plain.feature_norm, torch.nn.Identity)  # the paper's head, the model's default


# ---- VQ-SA ----


@pytest.fixture
def resnet_dir(tmp_path):
    resnet = ResNetForImageClassification(ResNetConfig(**TINY_RESNET))
    resnet.save_pretrained(tmp_path / "resnet")
    return tmp_path / "resnet"


@pytest.mark.parametrize("quantizer_type", ["hyperbolic", "kmeans"])
def test_vqsa_from_resnet_copies_backbone_and_classifier(resnet_dir, quantizer_type):
    resnet = ResNetForImageClassification.from_pretrained(resnet_dir)
    model = HyperVQSAForImageClassification.from_resnet(
        str(resnet_dir), quantizer_type=quantizer_type, codebook_size=8
    )
    assert model.config.feature_dim == 16 and model.config.num_labels == 5
    for name, p in resnet.resnet.state_dict().items():
        assert torch.equal(model.resnet.state_dict()[name], p), name
    assert torch.equal(model.classifier.weight, resnet.classifier[1].weight)
    labels = torch.tensor([1, 4])
    out = model.train()(images(size=32), labels=labels, output_attentions=True)
    assert out.logits.shape == (2, 5) and out.image_tokens.shape == (2,)
    torch.testing.assert_close(out.attentions.sum(-1), torch.ones(2, 2))
    out.loss.backward()
    assert model.resnet.embedder.embedder.convolution.weight.grad is not None  # VQ-SA fine-tunes the backbone


def test_vqsa_attention_scale_is_the_same_in_train_and_eval():
    model = HyperVQSAForImageClassification(HyperVQSAConfig(backbone_config=TINY_RESNET, codebook_size=8))
    code, feature = torch.randn(3, 16), torch.randn(3, 16)
    tokens = torch.stack([code, feature], 1)
    attention = model.attention
    scores = attention.query(tokens) @ attention.key(tokens).transpose(1, 2) / 2**0.5
    for mode in (True, False):
        attention.train(mode)
        _, weights = attention(code, feature)
        torch.testing.assert_close(weights, scores.softmax(-1))


@pytest.mark.parametrize("feature_scale", ["sqrt_dim", "l2", "none"])
def test_vqsa_round_trip_and_pipeline(feature_scale, resnet_dir, tmp_path):
    model = HyperVQSAForImageClassification.from_resnet(str(resnet_dir), codebook_size=8, feature_scale=feature_scale)
    model.eval()
    model.save_pretrained(tmp_path / "vqsa")
    HyperVQImageProcessor.for_imagenet(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "vqsa")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vqsa")
    assert type(loaded) is HyperVQSAForImageClassification
    x = images(size=32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    classify = pipeline("image-classification", model=str(tmp_path / "vqsa"), trust_remote_code=False)
    result = classify(pil_image())
    assert {r["label"] for r in result} <= set(model.config.id2label.values())


def test_vqsa_frozen_backbone_stays_frozen_after_loading(tmp_path):
    model = HyperVQSAForImageClassification(HyperVQSAConfig(backbone_config=TINY_RESNET, freeze_backbone=True))
    model.save_pretrained(tmp_path)
    loaded = HyperVQSAForImageClassification.from_pretrained(tmp_path).train()
    assert not any(p.requires_grad for p in loaded.resnet.parameters())
    assert not loaded.resnet.training


# ---- image processor and pipelines ----


def test_image_processor_round_trip(tmp_path):
    processor = HyperVQImageProcessor()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is HyperVQImageProcessor
    image = pil_image(size=(32, 32))
    pixel_values = loaded(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and -1 <= pixel_values.min() and pixel_values.max() <= 1
    back = loaded.postprocess_reconstruction(pixel_values)[0]
    assert back.size == (32, 32) and (np.asarray(back) == np.asarray(image)).all()


def test_classification_pipeline_uses_id2label(tokenizer_dir, tmp_path):
    model = HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=3, **LABELS)
    path = save_tokenizer(model, tmp_path / "classifier")
    classify = pipeline("image-classification", model=path, trust_remote_code=False)
    result = classify(pil_image(), top_k=3)
    assert sorted(r["label"] for r in result) == ["one", "two", "zero"]
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def test_image_tokenization_pipeline(tokenizer_dir, tmp_path):
    # a saved tokenizer carries the pipeline (`custom_pipelines`), which transformers loads only when trusted
    tokenize = pipeline("image-tokenization", model=tokenizer_dir, trust_remote_code=True)
    model = HyperVQVAEModel.from_pretrained(tokenizer_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tokenizer_dir)
    image = pil_image()
    path = tmp_path / "image.png"
    image.save(path)
    expected = model.get_image_tokens(processor(images=image, return_tensors="pt")["pixel_values"])[0].tolist()
    assert tokenize(image)["image_tokens"] == expected
    result = tokenize(str(path), return_reconstruction=True)
    assert result["image_tokens"] == expected
    assert isinstance(result["reconstruction"], Image.Image) and result["reconstruction"].size == (16, 16)
    assert [r["image_tokens"] for r in tokenize([image, image])] == [expected, expected]


# ---- remote code: a Python without hf_hypervq ----

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_hypervq"] = None  # importing it now fails: only the code saved with the weights can be used
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    from PIL import Image

    path, image_path = sys.argv[1], sys.argv[2]
    tokenizer = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    pixel_values = processor(images=Image.open(image_path), return_tensors="pt")["pixel_values"]
    classify = pipeline("image-classification", model=path, trust_remote_code=True)
    print(json.dumps({
        "modules": [type(m).__module__ for m in (tokenizer, classifier, processor)],
        "frozen": not any(p.requires_grad for p in classifier.hypervq.parameters()),
        "tokens": tokenizer.get_image_tokens(pixel_values).tolist(),
        "logits": classifier(pixel_values).logits.tolist(),
        "top_label": classify(Image.open(image_path))[0]["label"],
    }))
    """
)


def test_remote_code_loads_without_the_package(tokenizer_dir, tmp_path):
    model = HyperVQVAEForImageClassification.from_pretrained(tokenizer_dir, num_labels=3, **LABELS).eval()
    path = save_tokenizer(model, tmp_path / "classifier")
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_hypervq.HyperVQVAEModel"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_hypervq.HyperVQVAEForImageClassification"
    image_path = tmp_path / "image.png"
    pil_image().save(image_path)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, path, str(image_path)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(m.startswith("transformers_modules.") for m in remote["modules"]), remote["modules"]
    assert remote["frozen"]

    processor = HyperVQImageProcessor.from_pretrained(path)
    pixel_values = processor(images=Image.open(image_path), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert remote["tokens"] == model.hypervq.get_image_tokens(pixel_values).tolist()
        torch.testing.assert_close(torch.tensor(remote["logits"]), model(pixel_values).logits)
    assert remote["top_label"] in LABELS["label2id"]


def test_each_quantizer_takes_the_config_fields_its_registry_entry_names():
    config = tiny_config(curvature=0.5, commitment_weight=0.3, gumbel_temperature=[1.5, 0.5, 0.99])
    assert QUANTIZERS["gumbel"].options(config) == {"temperature": (1.5, 0.5, 0.99), "diversity_weight": 0.0}
    assert QUANTIZERS["kmeans"].options(config) == {"commitment_weight": 0.3}
    assert QUANTIZERS["hyperbolic_kmeans"].options(config) == {"curvature": 0.5, "commitment_weight": 0.3}
    hyperbolic = QUANTIZERS["hyperbolic"].options(tiny_config(curvature=0.5))  # commitment None: the class default
    assert hyperbolic["curvature"] == 0.5 and "commitment_weight" not in hyperbolic
    assert [spec.paper_name for spec in QUANTIZERS.values()] == [
        "HyperVQ", "KmeansVQ", "GumbelVQ", "HyperKmeansVQ", "HyperEmbMatVQ"
    ]  # fmt: skip
