"""hf-hypervq: hyperbolic vector quantization (HyperVQ, arXiv 2403.13015) for the Hugging Face ecosystem.

Importing the package registers its models with transformers' Auto classes and the `image-tokenization` pipeline,
and marks them for remote code, so that `save_pretrained` writes their code and `auto_map` next to the weights.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .models.hypervq.configuration_hypervq import HyperVQPriorConfig, HyperVQSAConfig, HyperVQVAEConfig
from .models.hypervq.image_processing_hypervq import HyperVQImageProcessor
from .models.hypervq.kernels import set_compiled_kernels
from .models.hypervq.modeling_hypervq import (
    HyperVQSAForImageClassification,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
)
from .models.hypervq.modeling_hypervq_prior import HyperVQPriorModel
from .models.hypervq.pipeline_hypervq import ImageTokenizationPipeline
from .models.hypervq.quantizers import (
    QUANTIZER_TYPES,
    QUANTIZERS,
    GumbelVQ,
    HyperEmbMatVQ,
    HyperKmeansVQ,
    HyperVQ,
    KmeansVQ,
    QuantizerOutput,
    QuantizerSpec,
    VectorQuantizer,
)


__version__ = "0.2.0"  # the same as pyproject.toml's (tests/test_reproduce.py checks)


def _register() -> None:
    for config_class in (HyperVQVAEConfig, HyperVQSAConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": HyperVQImageProcessor}, exist_ok=True
        )
        config_class.register_for_auto_class()
    AutoConfig.register(HyperVQPriorConfig.model_type, HyperVQPriorConfig, exist_ok=True)
    HyperVQPriorConfig.register_for_auto_class()
    AutoModel.register(HyperVQVAEConfig, HyperVQVAEModel, exist_ok=True)
    AutoModel.register(HyperVQPriorConfig, HyperVQPriorModel, exist_ok=True)
    AutoModelForImageClassification.register(HyperVQVAEConfig, HyperVQVAEForImageClassification, exist_ok=True)
    AutoModelForImageClassification.register(HyperVQSAConfig, HyperVQSAForImageClassification, exist_ok=True)
    HyperVQVAEModel.register_for_auto_class("AutoModel")
    HyperVQPriorModel.register_for_auto_class("AutoModel")
    HyperVQVAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    HyperVQSAForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    HyperVQImageProcessor.register_for_auto_class("AutoImageProcessor")
    PIPELINE_REGISTRY.register_pipeline(
        "image-tokenization", pipeline_class=ImageTokenizationPipeline, pt_model=AutoModel, type="image"
    )


_register()

__all__ = [
    "QUANTIZERS",
    "QUANTIZER_TYPES",
    "QuantizerSpec",
    "GumbelVQ",
    "HyperEmbMatVQ",
    "HyperKmeansVQ",
    "HyperVQ",
    "HyperVQImageProcessor",
    "HyperVQPriorConfig",
    "HyperVQPriorModel",
    "HyperVQSAConfig",
    "HyperVQSAForImageClassification",
    "HyperVQVAEConfig",
    "HyperVQVAEForImageClassification",
    "HyperVQVAEModel",
    "ImageTokenizationPipeline",
    "KmeansVQ",
    "QuantizerOutput",
    "VectorQuantizer",
    "set_compiled_kernels",
]
