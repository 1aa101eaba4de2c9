#!/usr/bin/env python
"""A rehearsal data set shaped like ImageNet: N JPEG photos with ImageNet's sizes and aspect ratios, in an image
folder with a subfolder per class, and the same images as Parquet shards of encoded JPEGs, as the Hub's copies of
ImageNet store them. Deterministic: the same N and seed give the same bytes.

    python benchmarks/make_rehearsal_data.py --output_dir rehearsal --num_images 20000    # the benchmarks' size
    python benchmarks/make_rehearsal_data.py --output_dir rehearsal --num_images 64       # a test's size

It writes `OUTPUT_DIR/images/train/<class>/<n>.jpg` (and `validation/`, a tenth as many) and
`OUTPUT_DIR/parquet/{train,validation}-<i>-of-<n>.parquet` with columns `image` (datasets' `Image()` feature:
JPEG bytes) and `label` (a `ClassLabel`). Both load with `datasets.load_dataset` (`imagefolder` or `parquet`), and
every training script reads either with `--dataset`.

What matters for a rehearsal is the shape of the data, not its realism:
- sizes: ImageNet-1k's train images are mostly 500 px on the long side (about three in four), the rest spread
  between 200 and 1,000 px (a few larger); landscape 4:3 is the most common shape, then 3:2, portrait 3:4 and 2:3,
  square, and a few panoramas. The photos here draw from that mix;
- content: smooth gradients, a few soft discs and bars whose colours depend on the class, and a little noise, so
  that a JPEG at quality 90 compresses to a few tens of kilobytes as a photo does, and a tokenizer has something to
  learn. Every image also carries a centred disc (the round-image check of the image rule: squashing a 2:1 picture
  would make it an ellipse).
"""

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


# (width : height, share): landscape 4:3 first, as in ImageNet-1k
ASPECTS = [((4, 3), 0.50), ((3, 2), 0.15), ((3, 4), 0.12), ((2, 3), 0.06), ((1, 1), 0.12), ((2, 1), 0.05)]
LONG_SIDE_500 = 0.75  # share of photos whose long side is 500 px
JPEG_QUALITY = 90


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one photo drawn from the ImageNet-like mix."""
    (width_ratio, height_ratio), _ = ASPECTS[rng.choice(len(ASPECTS), p=[share for _, share in ASPECTS])]
    long_side = 500 if rng.random() < LONG_SIDE_500 else int(rng.integers(200, 1001))
    if width_ratio >= height_ratio:
        return long_side, max(1, round(long_side * height_ratio / width_ratio))
    return max(1, round(long_side * width_ratio / height_ratio)), long_side


def photo(rng: np.random.Generator, label: int, num_classes: int) -> Image.Image:
    width, height = image_size(rng)
    hue = label / num_classes
    base = np.array([math.sin(2 * math.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])  # the class's colour
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (x * math.cos(angle) + y * math.sin(angle)) / max(width, height)  # a smooth gradient in a random direction
    pixels = (base[None, None, :] * 160 + ramp[..., None] * 60 + 20).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # soft shapes in the class's colours
        colour = tuple(int(c) for c in (255 * np.roll(base, int(rng.integers(3))) * rng.uniform(0.5, 1.0)))
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.rectangle([cx - 2 * r, cy - r / 3, cx + 2 * r, cy + r / 3], fill=colour)
    r = 0.2 * min(width, height)  # the centred disc: round in any correct crop
    draw.ellipse([width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r], fill=(240, 240, 240))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def class_names(num_classes: int) -> list[str]:
    return [f"n{index:08d}" for index in range(num_classes)]  # ImageNet's synset-like folder names


def make_rehearsal_data(output_dir, num_images: int, num_classes: int = 10, num_shards: int = 4, seed: int = 0):
    """Write the image folder and the Parquet shards (see the module's docstring); returns `output_dir`."""
    import datasets

    output_dir = Path(output_dir)
    names = class_names(num_classes)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, count, split_seed in (("train", num_images, seed), ("validation", max(1, num_images // 10), seed + 1)):
        rng = np.random.default_rng(split_seed)
        rows = {"image": [], "label": []}
        for index in range(count):
            label = index % num_classes
            data = jpeg_bytes(photo(rng, label, num_classes))
            path = output_dir / "images" / split / names[label] / f"{index:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows["image"].append({"bytes": data, "path": path.name})
            rows["label"].append(label)
        table = datasets.Dataset.from_dict(rows, features=features)
        shards = min(num_shards, count)
        (output_dir / "parquet").mkdir(parents=True, exist_ok=True)
        for shard in range(shards):
            part = table.shard(shards, shard, contiguous=True)
            part.to_parquet(str(output_dir / "parquet" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where to write images/ and parquet/")
    parser.add_argument("--num_images", type=int, default=20000, help="training images (default: 20000)")
    parser.add_argument("--num_classes", type=int, default=10, help="classes, one subfolder each (default: 10)")
    parser.add_argument("--num_shards", type=int, default=4, help="Parquet shards per split (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default: 0)")
    args = parser.parse_args(argv)
    for name in ("num_images", "num_classes", "num_shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    make_rehearsal_data(args.output_dir, args.num_images, args.num_classes, args.num_shards, args.seed)
    print(f"wrote {args.num_images} training images of {args.num_classes} classes to {args.output_dir}")


if __name__ == "__main__":
    main()
