"""Sampling images through a token prior and a tokenizer, the tokenizer a prior records, and the feature extractors
that FID and IS need."""

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader


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

    def __call__(self, images: list[Image.Image], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        batches = (
            self.processor(images=[image.convert("RGB") for image in images[start : start + batch_size]],
                           return_tensors="pt")
            for start in range(0, len(images), batch_size)
        )  # fmt: skip
        return self._extract(batches)

    def of_dataset(self, data, num_workers: int = 0, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for the `image` column of a data set: each image is decoded and preprocessed once, by
        `num_workers` DataLoader worker processes (0: this one), while this process runs the network."""
        inputs = ExtractorInputs(data, self.processor)
        return self._extract(DataLoader(inputs, batch_size=batch_size, collate_fn=_as_is, num_workers=num_workers))

    @torch.no_grad()
    def _extract(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        features, probabilities = [], []
        for inputs in batches:
            logits = self.model(**inputs).logits
            features.append(self._features.flatten(1).float())
            probabilities.append(torch.softmax(logits.float(), -1))
        return torch.cat(features), torch.cat(probabilities)


class ExtractorInputs(torch.utils.data.Dataset):
    """A data set's images as a feature extractor's inputs, a batch of rows at a time (`__getitems__`): decoded and
    preprocessed where the loader fetches them, in its workers."""

    def __init__(self, data, processor):
        self.data, self.processor = data.select_columns(["image"]), processor

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> dict:
        from .data import DataError

        try:
            images = self.data[indices]["image"]  # datasets decodes the images here
        except Exception as error:
            raise DataError(f"unreadable image among rows {indices[0]}..{indices[-1]}: {type(error).__name__}: "
                            f"{error}") from None  # fmt: skip
        return dict(self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt"))


def _as_is(batch: dict) -> dict:
    """The loader's collate function: `ExtractorInputs` gives whole batches already (a module-level function, so
    that workers can unpickle it)."""
    return batch


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


def recorded_tokenizer(name_or_path) -> str:
    """How a prior records the tokenizer it was trained on: a local folder as its absolute path (a relative one would
    name another folder, or read as a Hub id, from another working directory), a Hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def find_recorded_tokenizer(prior_source, recorded: str | None) -> str:
    """The tokenizer a prior records, found: an absolute path must still be there; a relative one (older priors
    recorded the path they were given) is looked up in the working directory, then in the prior's folder, and is
    otherwise taken for a Hub id."""
    if not recorded:
        raise FileNotFoundError("the prior does not record its tokenizer: pass --tokenizer")
    path = Path(recorded).expanduser()
    if path.is_absolute():
        if not path.is_dir():
            raise FileNotFoundError(
                f"the prior's tokenizer {recorded} is not there (moved or deleted?): pass --tokenizer"
            )
        return str(path)
    prior_folder = Path(prior_source).expanduser()
    for base in (Path.cwd(), prior_folder if prior_folder.is_dir() else None):
        if base is not None and (base / path).is_dir():
            return str(base / path)
    if recorded.startswith((".", "~")) or recorded.count("/") != 1:  # cannot be a Hub id (namespace/name)
        raise FileNotFoundError(
            f"the prior's tokenizer {recorded} is not a folder here nor in the prior's folder: pass --tokenizer"
        )
    return recorded  # a Hub id, or an older prior's relative folder that is not here: loading says which


def load_tokenizer(name_or_path, flag: str = "--tokenizer", hint: str = "", revision: str | None = None):
    """A trained tokenizer (`HyperVQVAEModel`, in eval mode; a classifier's folder holds one too) and its image
    processor, or one line saying what is wrong: no such folder, a damaged one, a folder that holds a prior (or
    another model) instead, a Hub id that cannot be loaded. `flag` names where the path came from, `hint` ends the
    line of a load that failed; `revision` (a commit, branch or tag) applies to a Hub id."""
    from transformers import AutoImageProcessor

    from ..models.hypervq.modeling_hypervq import HyperVQVAEModel, check_pretrained_source

    check_pretrained_source(name_or_path, flag)
    folder = Path(name_or_path).expanduser()
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())  # check_pretrained_source has read it as JSON
        if config.get("model_type") == "hypervq_prior":
            its_own = config.get("tokenizer_name_or_path")
            raise ValueError(
                f"{flag} {name_or_path} holds a token prior, not a tokenizer: pass a tokenizer's folder or Hub id"
                + (f" (this prior was trained on {its_own})" if its_own else "")
                + hint
            )
    try:
        tokenizer = HyperVQVAEModel.from_pretrained(name_or_path, revision=revision).eval()
        processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
    except OSError as error:  # transformers' Hub errors span several lines
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "" if folder.is_dir() else "not a folder here, and from the Hub: "
        raise OSError(f"{flag} {name_or_path}: cannot load it ({where}{reason}){hint}") from None
    return tokenizer, processor
