"""hf-hypervq: hyperbolic vector quantization (HyperVQ, arXiv 2403.13015) for the Hugging Face ecosystem."""

from .models.hypervq.kernels import set_compiled_kernels
from .models.hypervq.quantizers import (
    GumbelVQ,
    HyperEmbMatVQ,
    HyperKmeansVQ,
    HyperVQ,
    KmeansVQ,
    QuantizerOutput,
    VectorQuantizer,
)


__version__ = "0.1.0"

__all__ = [
    "GumbelVQ",
    "HyperEmbMatVQ",
    "HyperKmeansVQ",
    "HyperVQ",
    "KmeansVQ",
    "QuantizerOutput",
    "VectorQuantizer",
    "set_compiled_kernels",
]
