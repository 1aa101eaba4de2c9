"""Sampling images through a token prior and a tokenizer, and the feature extractors that FID and IS need."""

import hashlib

import torch
from PIL import Image
from torch import nn


class FeatureExtractor:
    """Pool features `(N, F)` and class probabilities `(N, C)` of PIL images, from an image classifier; `name`
    says which network produced them (FID/IS values are only comparable for the same extractor)."""

    def __init__(self, model: nn.Module, processor, name: str):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.weights_sha256 = weights_sha256(model)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{name} has no final linear layer to take pool features from")
        self._features = None
        linears[-1].register_forward_hook(lambda module, inputs, output: setattr(self, "_features", inputs[0]))

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        features, probabilities = [], []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            logits = self.model(**inputs).logits
            features.append(self._features.flatten(1).float())
            probabilities.append(torch.softmax(logits.float(), -1))
        return torch.cat(features), torch.cat(probabilities)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's weights (every tensor of its state dict, by name, as float32 bytes): two extractors with
    the same name but other weights give FID/IS values that are not comparable, and this tells them apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Inception-v3 (torchvision's ImageNet weights) through timm, which transformers loads with
# AutoModelForImageClassification: the standard network for FID and IS, when timm and the Hub are reachable.
INCEPTION_V3 = "timm/inception_v3.tv_in1k"


def load_feature_extractor(name_or_path: str = INCEPTION_V3) -> FeatureExtractor:
    """A transformers image classifier (a folder or Hub id) as FID/IS feature extractor: its last linear layer's
    input gives the pool features, its softmax the class probabilities. The default is Inception-v3
    (`INCEPTION_V3`); where it cannot be loaded (offline, or without timm), any classifier works, e.g. one trained
    with `scripts/train_classifier.py`, and the numbers are then only comparable with that same extractor."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_hypervq  # noqa: F401  (registers our classifiers)

    try:
        model = AutoModelForImageClassification.from_pretrained(name_or_path)
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ImportError, ValueError) as error:
        hint = " (Inception-v3 needs timm and the Hub)" if name_or_path == INCEPTION_V3 else ""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"cannot load the feature extractor {name_or_path!r}{hint}: {reason}; pass --feature_extractor with a "
            "folder or Hub id of an image classifier, e.g. one trained with scripts/train_classifier.py"
        ) from None
    return FeatureExtractor(model, processor, f"{type(model).__name__} from {name_or_path}")


@torch.no_grad()
def sample_images(prior, tokenizer, processor, num_images: int, **sample_kwargs) -> list[Image.Image]:
    """Draw token grids from `prior` and decode them with `tokenizer` into PIL images."""
    images = []
    for start in range(0, num_images, 64):
        tokens = prior.sample(min(64, num_images - start), **sample_kwargs)
        images += processor.postprocess_reconstruction(tokenizer.decode_tokens(tokens.to(tokenizer.device)))
        if sample_kwargs.get("seed") is not None:
            sample_kwargs["seed"] += 1  # the next batch draws differently, reproducibly
    return images
