#!/usr/bin/env python
"""HyperVQ image tokenizer demo (a Gradio app, also a Hugging Face Space).

    python demo/app.py                                        # the published tokenizer (HYPERVQ_MODEL, DEFAULT_MODEL)
    python demo/app.py --model your-name/hypervq-digits --classifier your-name/hypervq-digits-classifier
    python demo/app.py --model outputs/tokenizer --prior outputs/prior      # adds a Sample tab
    HYPERVQ_MODEL=outputs/tokenizer python demo/app.py --server_name 0.0.0.0 --server_port 7860

Pick an example or upload an image: the page shows its reconstruction, its token map (one colour per code id), how
often each code occurs in it, the grid of token ids and, with a classifier, the predicted classes. The Codebook tab
shows every code decoded on its own; with `--prior` (a token prior from hypervq-train-prior) a Sample tab generates
new images. `--model`, `--classifier` and `--prior` take a local folder or a Hub id (also read from HYPERVQ_MODEL,
HYPERVQ_CLASSIFIER and HYPERVQ_PRIOR, a Space's variables). A classifier folder of `HyperVQVAEForImageClassification`
also serves as the tokenizer. On a Space, a model that is not set (HYPERVQ_MODEL empty) or cannot be loaded is said
in one line on the page instead of a failed start.

`run(image, tokenizer, classifier)` is the whole computation, without Gradio; `build_demo` wraps it in a page.
"""

import argparse
import colorsys
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification


try:  # registers the HyperVQ Auto classes; without the package, the code saved next to the weights is used
    import hf_hypervq  # noqa: F401

    TRUST_REMOTE_CODE = False
except ImportError:
    TRUST_REMOTE_CODE = True

# The published tokenizer of the main job (docs/hub.md), so that the folder copied into a Space runs as it is; it is
# listed under `models:` in README.md. HYPERVQ_MODEL (a Space variable) or --model picks another.
DEFAULT_MODEL = "hf-hypervq/hypervq-digits"
EXAMPLES_DIR = Path(__file__).parent / "examples"
# Reconstructions and token maps are small (e.g. 32×32): fill the frame, pixels as sharp blocks rather than blurred.
CSS = ".pixelated img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclass
class LoadedModel:
    """A model in eval mode with the image processor saved next to it."""

    model: Any
    processor: Any
    name: str


class DemoOutput(NamedTuple):
    """What `run` returns for one image, in the order of the page's outputs."""

    reconstruction: Image.Image  # the decoded tokens, at the tokenizer's resolution
    token_map: Image.Image  # one palette colour per token, upscaled (nearest) to the reconstruction's size
    codebook_usage: pd.DataFrame  # columns "code" (str) and "count": the codes this image uses, most used first
    image_tokens: list[list[int]]  # the (h, w) grid of code ids
    summary: str  # a line of Markdown: grid size, codes used, perplexity
    prediction: dict[str, float] | None  # class probabilities, with a classifier


def _load_model(auto_class, name_or_path: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return auto_class.from_pretrained(name_or_path, trust_remote_code=TRUST_REMOTE_CODE).to(device).eval()


def _load(auto_class, name_or_path: str) -> LoadedModel:
    processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=TRUST_REMOTE_CODE)
    return LoadedModel(model=_load_model(auto_class, name_or_path), processor=processor, name=str(name_or_path))


def load_tokenizer(name_or_path: str) -> LoadedModel:
    """A `HyperVQVAEModel` (or a `HyperVQVAEForImageClassification` folder, read as its tokenizer) from a folder or
    a Hub id."""
    return _load(AutoModel, name_or_path)


def load_classifier(name_or_path: str) -> LoadedModel:
    """A `HyperVQVAEForImageClassification` or `HyperVQSAForImageClassification` from a folder or a Hub id."""
    return _load(AutoModelForImageClassification, name_or_path)


def load_prior(name_or_path: str):
    """A `HyperVQPriorModel` (Gated PixelCNN over token grids) from a folder or a Hub id."""
    return _load_model(AutoModel, name_or_path)


def load_image(image, mode: str = "RGB") -> Image.Image:
    """A PIL image in `mode` from a PIL image, an array, a file path or the payload of a `gr.Image` input.

    Raises `gr.Error` (shown in the page) when there is no image or the file is not one PIL can decode.
    """
    if isinstance(image, dict):  # the `gr.Image` input's payload: the click handler skips Gradio's preprocessing
        image = image.get("path")
    if image is None:
        raise gr.Error("Upload an image or pick an example first.", print_exception=False)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as file:
                image = ImageOps.exif_transpose(file).convert(mode)  # upright, as phones tag it; loads the pixels
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise gr.Error(
                f"Could not read {Path(image).name!r} as an image ({error.__class__.__name__}). "
                "Please upload a PNG, JPEG, WebP, BMP or GIF file.",
                title="Not an image",
                print_exception=False,
            ) from None
    if not isinstance(image, Image.Image):
        raise gr.Error(f"Unsupported input of type {type(image).__name__}.", print_exception=False)
    return image.convert(mode)


def code_palette(codebook_size: int) -> np.ndarray:
    """A fixed colour per code id, `(codebook_size, 3)` uint8: hues a golden angle apart (neighbouring ids differ
    clearly), cycling through three saturation/brightness levels so that large codebooks stay distinguishable."""
    colors = [
        colorsys.hsv_to_rgb((code * 0.618033988749895) % 1.0, (0.55, 0.9, 0.75)[code % 3], (0.95, 0.8, 0.6)[code % 3])
        for code in range(codebook_size)
    ]
    return np.round(np.array(colors) * 255).astype(np.uint8)


def token_map_image(image_tokens: torch.Tensor, codebook_size: int, size: tuple[int, int]) -> Image.Image:
    """Code ids `(h, w)` as an RGB picture of `size` (width, height), one palette colour per code id."""
    colors = code_palette(codebook_size)[image_tokens.cpu().numpy()]  # (h, w, 3)
    return Image.fromarray(colors).resize(size, Image.NEAREST)


def codebook_usage(image_tokens: torch.Tensor, codebook_size: int) -> pd.DataFrame:
    """How often each code occurs in `image_tokens`: columns "code" (the id as a string, a category for the bar
    plot) and "count", one row per code used, most used first (ties by code id)."""
    counts = torch.bincount(image_tokens.flatten().cpu(), minlength=codebook_size)
    used = counts.nonzero().flatten()
    used = used[counts[used].argsort(descending=True, stable=True)]
    return pd.DataFrame({"code": [str(code) for code in used.tolist()], "count": counts[used].tolist()})


@torch.inference_mode()
def run(image, tokenizer: LoadedModel, classifier: LoadedModel | None = None) -> DemoOutput:
    """Tokenize `image` (see `load_image` for what it may be), decode the tokens, and classify it if a classifier is
    given. Pure: no Gradio state, so tests and other apps can call it directly."""
    model, config = tokenizer.model, tokenizer.model.config
    image = load_image(image, mode="L" if config.num_channels == 1 else "RGB")
    pixel_values = tokenizer.processor(images=image, return_tensors="pt")["pixel_values"]
    output = model(pixel_values.to(model.device, model.dtype))  # eval mode: argmax codes, no Gumbel noise

    tokens = output.image_tokens[0].cpu()  # (h, w)
    reconstruction = tokenizer.processor.postprocess_reconstruction(output.reconstruction)[0]
    usage = codebook_usage(tokens, config.codebook_size)
    height, width = tokens.shape
    summary = (
        f"**{height}×{width} tokens**, {len(usage)} of {config.codebook_size} codes used, "
        f"perplexity {output.perplexity.item():.2f}"
    )

    prediction = None
    if classifier is not None:
        classifier_inputs = classifier.processor(images=image, return_tensors="pt")["pixel_values"]
        logits = classifier.model(classifier_inputs.to(classifier.model.device, classifier.model.dtype)).logits
        id2label = classifier.model.config.id2label
        prediction = {id2label[i]: p for i, p in enumerate(logits[0].float().softmax(-1).tolist())}

    return DemoOutput(
        reconstruction=reconstruction,
        token_map=token_map_image(tokens, config.codebook_size, reconstruction.size),
        codebook_usage=usage,
        image_tokens=tokens.tolist(),
        summary=summary,
        prediction=prediction,
    )


def build_tokenize_tab(tokenizer: LoadedModel, classifier: LoadedModel | None = None) -> None:
    """The "Tokenize" tab: an image in; reconstruction, token map, code counts, token ids (and classes) out."""
    with gr.Row():
        with gr.Column():
            image_input = gr.Image(
                label="Image", type="filepath", sources=["upload", "clipboard"], height=256, elem_id="input-image"
            )
            run_button = gr.Button("Tokenize", variant="primary", elem_id="run-button")
            examples = sorted(str(path) for path in EXAMPLES_DIR.glob("*.png"))
            if examples:
                gr.Examples(examples=examples, inputs=image_input, elem_id="examples")
        with gr.Column():
            with gr.Row():
                reconstruction = gr.Image(
                    label="Reconstruction",
                    type="pil",
                    format="png",
                    height=256,
                    elem_id="reconstruction",
                    elem_classes="pixelated",
                )
                token_map = gr.Image(
                    label="Token map",
                    type="pil",
                    format="png",
                    height=256,
                    elem_id="token-map",
                    elem_classes="pixelated",
                )
            summary = gr.Markdown()
    with gr.Row():
        palette = code_palette(tokenizer.model.config.codebook_size)
        usage = gr.BarPlot(
            x="code",
            y="count",
            color="code",  # each bar in its code's colour on the token map
            color_map={str(code): "#{:02x}{:02x}{:02x}".format(*color) for code, color in enumerate(palette)},
            colors_in_legend=[],
            sort="-y",
            y_lim=[0, None],  # else the axis starts at the smallest count and hides its bars
            label="Codebook usage (this image)",
            x_title="code id",
            y_title="tokens",
        )
        image_tokens = gr.Dataframe(label="Token ids", datatype="number", interactive=False)
    outputs = [reconstruction, token_map, usage, image_tokens, summary]
    if classifier is not None:
        outputs.append(gr.Label(label=f"Prediction ({classifier.name})", num_top_classes=5))

    def predict(image):
        output = run(image, tokenizer, classifier)
        columns = [str(j) for j in range(len(output.image_tokens[0]))]  # 0-based like the ids (Gradio's: 1, 2, ...)
        tokens = pd.DataFrame(output.image_tokens, columns=columns)
        values = [output.reconstruction, output.token_map, output.codebook_usage, tokens, output.summary]
        return values if classifier is None else [*values, output.prediction]

    # No preprocessing: Gradio's own would fail on an undecodable upload with a bare "Error"; `load_image` explains.
    run_button.click(predict, inputs=image_input, outputs=outputs, api_name="predict", preprocess=False)


@torch.inference_mode()
def codebook_images(tokenizer: LoadedModel) -> list[Image.Image]:
    """Every code decoded on its own as a 1×1 latent (the paper's Figure 5), in code order."""
    return tokenizer.processor.postprocess_reconstruction(tokenizer.model.decode_codebook())


@torch.inference_mode()
def sample(prior, tokenizer: LoadedModel, num_images: int, temperature: float, seed: int, label=None):
    """Token grids drawn from `prior`, decoded into images with the tokenizer."""
    if prior.config.codebook_size != tokenizer.model.config.codebook_size:
        raise gr.Error("The prior was trained on another tokenizer's tokens (codebook sizes differ).")
    class_labels = None
    if prior.config.num_classes:
        names = list(prior.config.id2label.values())
        class_labels = torch.full((int(num_images),), names.index(label) if label in names else 0)
    tokens = prior.sample(int(num_images), temperature=float(temperature), seed=int(seed), class_labels=class_labels)
    images = tokenizer.model.decode_tokens(tokens.to(tokenizer.model.device))
    return tokenizer.processor.postprocess_reconstruction(images)


def build_sample_tab(prior, tokenizer: LoadedModel) -> None:
    """The "Sample" tab: new images from a token prior (Gated PixelCNN), decoded with the tokenizer."""
    with gr.Row():
        with gr.Column(scale=1):
            num_images = gr.Slider(1, 32, value=8, step=1, label="Images")
            temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
            seed = gr.Number(value=0, precision=0, label="Seed")
            label = None
            if prior.config.num_classes:
                names = list(prior.config.id2label.values())
                label = gr.Dropdown(names, value=names[0], label="Class")
            button = gr.Button("Sample", variant="primary", elem_id="sample-button")
        gallery = gr.Gallery(label="Samples", columns=8, height=320, elem_id="samples", elem_classes="pixelated")
    inputs = [num_images, temperature, seed] + ([label] if label is not None else [])
    button.click(lambda *args: sample(prior, tokenizer, *args), inputs=inputs, outputs=gallery, api_name="sample")


def build_tabs(tokenizer: LoadedModel, classifier: LoadedModel | None = None, prior=None) -> None:
    """The page's tabs, built inside an open `gr.Blocks`: Tokenize, Codebook, and Sample when a prior is given."""
    with gr.Tabs():
        with gr.Tab("Tokenize"):
            build_tokenize_tab(tokenizer, classifier)
        with gr.Tab("Codebook"):
            gr.Markdown("Each code decoded on its own, as a 1×1 latent (the paper's Figure 5).")
            gr.Gallery(codebook_images(tokenizer), columns=16, height=360, label="Codebook", elem_classes="pixelated")
        if prior is not None:
            with gr.Tab("Sample"):
                build_sample_tab(prior, tokenizer)


def build_demo(tokenizer: LoadedModel, classifier: LoadedModel | None = None, prior=None) -> gr.Blocks:
    """The Gradio page for a loaded tokenizer (and classifier, and token prior); launch it with
    `demo.launch(css=CSS)`."""
    config = tokenizer.model.config
    with gr.Blocks(title="HyperVQ image tokenizer") as demo:
        gr.Markdown(
            "# HyperVQ image tokenizer\n"
            "Hyperbolic vector quantization ([arXiv 2403.13015](https://arxiv.org/abs/2403.13015)): an image becomes "
            f"a grid of code ids. Tokenizer `{tokenizer.name}`: {config.quantizer_type} quantizer, "
            f"{config.codebook_size} codes, one token per {config.downsampling_factor}×{config.downsampling_factor} "
            "pixels."
        )
        build_tabs(tokenizer, classifier, prior)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("HYPERVQ_MODEL", DEFAULT_MODEL),
        help=f"tokenizer folder or Hub id (default: $HYPERVQ_MODEL or {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--classifier",
        default=os.environ.get("HYPERVQ_CLASSIFIER"),
        help="classifier folder or Hub id, to also show class predictions (default: $HYPERVQ_CLASSIFIER or none)",
    )
    parser.add_argument(
        "--prior",
        default=os.environ.get("HYPERVQ_PRIOR"),
        help="token prior folder or Hub id, to add a Sample tab (default: $HYPERVQ_PRIOR or none)",
    )
    parser.add_argument("--server_name", default=None, help="address to bind (default: Gradio's, 127.0.0.1)")
    parser.add_argument(
        "--server_port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)"
    )
    return parser


def message_page(line: str) -> gr.Blocks:
    """A page that says one thing: what a Space shows instead of failing to start."""
    with gr.Blocks(title="HyperVQ image tokenizer") as demo:
        gr.Markdown(f"# HyperVQ image tokenizer\n{line}")
    return demo


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    on_space = bool(os.environ.get("SPACE_ID"))  # set by the Hub in every Space
    launch = dict(server_name=args.server_name, server_port=args.server_port, css=CSS)
    if not args.model:
        line = "No model is set: set the Space variable `HYPERVQ_MODEL` to a HyperVQ tokenizer's Hub id."
        if not on_space:
            parser.error("no model is set: pass --model or set HYPERVQ_MODEL")
        return message_page(line).launch(**launch)
    try:
        tokenizer = load_tokenizer(args.model)
        classifier = load_classifier(args.classifier) if args.classifier else None
        prior = load_prior(args.prior) if args.prior else None
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if on_space:
            return message_page(f"Could not load the model `{args.model}`: {reason}").launch(**launch)
        hint = ""
        if args.model == DEFAULT_MODEL:
            hint = " (train one with `hypervq-train-vqvae --output_dir outputs/tokenizer`, then pass --model)"
        parser.error(f"could not load the model{hint}: {error}")
    build_demo(tokenizer, classifier, prior).launch(**launch)


if __name__ == "__main__":
    main()
