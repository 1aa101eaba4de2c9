"""Pictures a training run leaves in its output folder: reconstructions, the decoded codebook, samples and the
codebook-usage histogram."""

import matplotlib


matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .outputs import save_figure  # noqa: E402


def image_grid(rows: list[list[Image.Image]], pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile equally sized PIL images row by row on a white background, optionally upscaled (nearest)."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (width + pad) + pad, len(rows) * (height + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (pad + c * (width + pad), pad + r * (height + pad)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def save_reconstruction_grid(inputs: list[Image.Image], reconstructions: list[Image.Image], path) -> None:
    """`reconstructions.png`: the inputs on the top row, their reconstructions below."""
    scale = max(1, 64 // inputs[0].size[1])
    image_grid([inputs, reconstructions], scale=scale).save(path)


def save_codebook_grid(code_images: list[Image.Image], path, columns: int = 32) -> None:
    """`codebook.png`: every code decoded on its own (the paper's Figure 5), in code order, row by row."""
    rows = [code_images[i : i + columns] for i in range(0, len(code_images), columns)]
    image_grid(rows, pad=1, scale=max(1, 16 // code_images[0].size[1])).save(path)


def save_sample_grid(images: list[Image.Image], path, columns: int = 8) -> None:
    """`samples.png`: generated images, `columns` per row, enlarged to about 64 pixels high."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    image_grid(rows, scale=max(1, 64 // images[0].size[1])).save(path)


def draw_codebook_usage(axis, code_counts, title: str = "") -> None:
    """The share of tokens each code takes, codes sorted by frequency, on `axis`; the title says how many are used."""
    counts = torch.as_tensor(code_counts, dtype=torch.float64).sort(descending=True).values
    axis.bar(range(len(counts)), (counts / counts.sum()).numpy(), width=1.0, color="#4C72B0")
    axis.set_xlabel("code rank (most used first)", fontsize=8)
    axis.set_title(f"{title} {int((counts > 0).sum())}/{len(counts)} codes used".strip(), fontsize=9)


def save_codebook_usage(code_counts: list[int], path, title: str = "") -> None:
    """`codebook_usage.png` of one run."""
    figure, axis = plt.subplots(figsize=(6, 3), dpi=120)
    draw_codebook_usage(axis, code_counts, title)
    axis.set_ylabel("share of tokens")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@torch.no_grad()
def save_tokenizer_pictures(tokenizer, processor, sample_images: list[Image.Image], results: dict, args) -> None:
    """A tokenizer run's `reconstructions.png` (of `sample_images`), `codebook_usage.png` (of the last evaluation's
    `code_counts`) and `codebook.png` (every code decoded on its own), each written atomically."""
    pixel_values = processor(images=[image.convert("RGB") for image in sample_images], return_tensors="pt")
    pixel_values = pixel_values["pixel_values"].to(tokenizer.device)
    inputs = processor.postprocess_reconstruction(pixel_values)
    reconstructions = processor.postprocess_reconstruction(tokenizer(pixel_values).reconstruction)
    folder = args.output_dir
    save_figure(lambda path: save_reconstruction_grid(inputs, reconstructions, path), f"{folder}/reconstructions.png")
    save_figure(
        lambda path: save_codebook_usage(results["code_counts"], path, title=args.quantizer),
        f"{folder}/codebook_usage.png",
    )
    code_images = processor.postprocess_reconstruction(tokenizer.decode_codebook())
    save_figure(lambda path: save_codebook_grid(code_images, path), f"{folder}/codebook.png")
