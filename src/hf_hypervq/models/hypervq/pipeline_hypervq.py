"""The `image-tokenization` pipeline: images in, HyperVQ token grids (and reconstructions) out."""

import torch
from transformers import Pipeline
from transformers.image_utils import load_image


class ImageTokenizationPipeline(Pipeline):
    """Tokenize images with a HyperVQ-VAE tokenizer.

    `pipeline("image-tokenization", model=path_or_repo, trust_remote_code=True)` (every saved tokenizer holds this
    file and names it in its config's `custom_pipelines`, which transformers loads only when trusted) accepts a PIL image, a local path or a URL (or a list of
    them) and returns, per image, `{"image_tokens": [[...], ...]}` (the `(h, w)` grid of code ids) and, with
    `return_reconstruction=True`, `"reconstruction"`: the decoded tokens as a PIL image.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False  # else transformers probes for a "HyperVQVideoProcessor" and asks about remote code

    def _sanitize_parameters(self, return_reconstruction=None, timeout=None, **kwargs):
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess = {} if return_reconstruction is None else {"return_reconstruction": return_reconstruction}
        return preprocess, {}, postprocess

    def preprocess(self, image, timeout=None):
        return self.image_processor(images=load_image(image, timeout=timeout), return_tensors="pt").to(self.dtype)

    def _forward(self, model_inputs):
        tokens = self.model.get_image_tokens(model_inputs["pixel_values"])
        return {"image_tokens": tokens}

    def postprocess(self, model_outputs, return_reconstruction=False):
        tokens = model_outputs["image_tokens"]  # (1, h, w)
        result = {"image_tokens": tokens[0].tolist()}
        if return_reconstruction:
            with torch.inference_mode():
                reconstruction = self.model.decode_tokens(tokens.to(self.model.device))
            result["reconstruction"] = self.image_processor.postprocess_reconstruction(reconstruction)[0]
        return result
