"""transformers' own common model tests, run on our models the way transformers tests every model it ships.

`ModelTesterMixin` (transformers' tests/test_modeling_common.py) and `ConfigTester` (tests/test_configuration_common.py)
check the `PreTrainedModel` / `PreTrainedConfig` contract: save and load, initialisation on the meta device, missing
and mismatched weights, dtypes, batching, training, determinism. They are not in transformers' wheel:
`python tools/fetch_transformers_tests.py` takes them from the sdist of the installed version and writes them into
`transformers_tests/` (ignored by git), which this module imports.

One test class per model class and quantizer type (`HyperVQVAEModel_hyperbolic_Test`, ...), on tiny configs; those of
HyperVQ run by default, the other quantizers' with `RUN_SLOW=1`. The
tests that cannot apply to these models are skipped with a reason: three by `NOT_APPLICABLE` below, the rest (GPU,
flash attention, DeepSpeed, attention maps, text and generation heads) by the mixin itself (`pytest -rs` lists them).
"""

import importlib.util
import sys
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from optional_parts import missing
from transformers import ResNetConfig

from hf_hypervq import (
    QUANTIZER_TYPES,
    HyperVQSAConfig,
    HyperVQSAForImageClassification,
    HyperVQVAEConfig,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
)


ROOT = Path(__file__).resolve().parents[1]
FETCH = "python tools/fetch_transformers_tests.py"


def fetch_error() -> str | None:
    """Why transformers' common tests cannot be imported (missing, or another version's), or None."""
    if importlib.util.find_spec("parameterized") is None:  # test_modeling_common.py imports it
        return 'transformers\' common tests need `parameterized`: run `pip install -e ".[dev]"`'
    version_file = ROOT / "transformers_tests" / "TRANSFORMERS_VERSION"
    if not version_file.is_file():
        return f"transformers' common tests are missing (no transformers_tests/): run `{FETCH}`"
    fetched = version_file.read_text().strip()
    if fetched != transformers.__version__:
        installed = transformers.__version__
        return f"transformers_tests/ holds transformers {fetched}'s tests, but {installed} is installed: run `{FETCH}`"
    return None


FETCH_ERROR = fetch_error()
if FETCH_ERROR is None:
    if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repository root on the path
        sys.path.append(str(ROOT))
    from transformers_tests import test_modeling_common
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import ModelTesterMixin
else:  # the test classes are not built; the test below fails instead
    ModelTesterMixin = object


def test_transformers_common_tests_are_fetched():
    """Where the common tests are missing this is skipped with the command that fetches them (failed under
    HF_HYPERVQ_STRICT_SKIPS, so CI does not pass without them)."""
    if FETCH_ERROR is not None:
        missing(FETCH_ERROR)


IMAGE_SIZE = 8
NUM_LABELS = 3
TINY_VAE = dict(
    embedding_dim=4,
    codebook_size=8,
    hidden_size=8,
    residual_hidden_size=4,
    num_residual_layers=1,
    num_downsamples=1,
    classifier_hidden_size=8,
)
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")

# Tests of the mixin that cannot apply to these models, each with the reason. transformers skips the same three for
# its own VQ-VAEs (Janus, Chameleon, Anole). Tests that need a GPU, flash attention, attention maps or a text model
# skip themselves inside the mixin, with the mixin's reason (`pytest -rs` lists them).
NO_HIDDEN_STATES = (
    "the models return no per-layer hidden states (no `output_hidden_states`): the tokenizer's output holds its "
    "latents and quantized latents instead"
)
NOT_APPLICABLE = {
    "test_model_get_set_embeddings": "no input embedding table: the models read pixels through a conv",
    "test_hidden_states_output": NO_HIDDEN_STATES,
    "test_retain_grad_hidden_states_attentions": NO_HIDDEN_STATES + ", and no attention maps but VQ-SA's 2×2 one",
}


class HyperVQModelTester:
    """Tiny configs and inputs of one model class with one quantizer type, as transformers' model testers give them."""

    def __init__(self, parent, model_class, quantizer_type, batch_size=2):
        self.parent = parent
        self.model_class = model_class
        self.quantizer_type = quantizer_type
        self.batch_size = batch_size
        self.num_channels = 3
        self.image_size = IMAGE_SIZE
        self.num_labels = NUM_LABELS
        self.is_training = True

    def get_config(self):
        if self.model_class is HyperVQSAForImageClassification:
            return HyperVQSAConfig(
                backbone_config=ResNetConfig(**TINY_RESNET).to_dict(),
                quantizer_type=self.quantizer_type,
                codebook_size=8,
                num_labels=self.num_labels,
            )
        return HyperVQVAEConfig(quantizer_type=self.quantizer_type, num_labels=self.num_labels, **TINY_VAE)

    def prepare_config_and_inputs(self):
        pixel_values = torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size)
        labels = torch.randint(0, self.num_labels, (self.batch_size,))
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class HyperVQConformanceTest(ModelTesterMixin):
    """The mixin's tests on `model_class` with `quantizer_type`; subclassed once per pair below."""

    model_class = None
    quantizer_type = None
    test_resize_embeddings = False  # no token embeddings to resize: the input is pixels
    has_attentions = False  # no attention layers (VQ-SA's two-token attention is no transformers attention module)
    # transformers runs this test only for models added from 2023 on (read from a copyright line we do not have)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = HyperVQModelTester(self, self.model_class, self.quantizer_type)
        config = self.model_tester.get_config()
        if isinstance(config, HyperVQSAConfig):
            self.config_tester = ConfigTester(
                self, config_class=HyperVQSAConfig, has_text_modality=False, common_properties=["codebook_size"]
            )
        else:
            self.config_tester = ConfigTester(
                self,
                config_class=HyperVQVAEConfig,
                has_text_modality=False,
                common_properties=["num_channels", "hidden_size", "embedding_dim", "codebook_size"],
                quantizer_type=self.quantizer_type,
                **TINY_VAE,
            )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels for the classes of transformers' own image-classification mapping; ours are not in it.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is not HyperVQVAEModel:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_problem_types(self):
        # The mixin runs it only on classes in transformers' own image-classification mapping, which ours are not in:
        # list them there for the test, so that it runs (multi-label, single-label and regression) instead of passing
        # without checking anything.
        names = dict(test_modeling_common.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
        if self.model_class is not HyperVQVAEModel:  # the tokenizer has no classification head: the mixin skips it
            names["hypervq"] = self.model_class.__name__
        with mock.patch.object(test_modeling_common, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", names):
            super().test_problem_types()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_class(config).eval()
        with torch.no_grad():
            output = model(**inputs)
        batch = self.model_tester.batch_size
        if self.model_class is HyperVQVAEModel:
            grid = IMAGE_SIZE // config.downsampling_factor
            self.assertEqual(output.reconstruction.shape, inputs["pixel_values"].shape)
            self.assertEqual(output.image_tokens.shape, (batch, grid, grid))
        else:
            self.assertEqual(output.logits.shape, (batch, NUM_LABELS))


MODEL_CLASSES = (HyperVQVAEModel, HyperVQVAEForImageClassification, HyperVQSAForImageClassification)
DEFAULT_QUANTIZER = "hyperbolic"
for _model_class in MODEL_CLASSES if FETCH_ERROR is None else ():
    for _quantizer_type in QUANTIZER_TYPES:
        _name = f"{_model_class.__name__}_{_quantizer_type}_Test"
        _attributes = {
            "model_class": _model_class,
            "quantizer_type": _quantizer_type,
            "all_model_classes": (_model_class,),
            "__module__": __name__,
            "__qualname__": _name,
        }
        for _test, _reason in NOT_APPLICABLE.items():
            _attributes[_test] = unittest.skip(_reason)(lambda self: None)
        _test_class = type(_name, (HyperVQConformanceTest, unittest.TestCase), _attributes)
        # The mixin checks the PreTrainedModel contract, which the quantizer does not change: HyperVQ's classes run
        # by default, the other quantizers' with the slow tests (their own tests are in test_quantizers.py).
        globals()[_name] = _test_class if _quantizer_type == DEFAULT_QUANTIZER else pytest.mark.slow(_test_class)
