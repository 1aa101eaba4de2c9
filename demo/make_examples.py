"""Writes the demo's example images: four of scikit-learn's handwritten digits, as 64×64 RGB PNGs.

python demo/make_examples.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


EXAMPLES_DIR = Path(__file__).parent / "examples"
DIGITS = (0, 3, 7, 9)


def main() -> None:
    digits = load_digits()
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for digit in DIGITS:
        index = int(np.flatnonzero(digits.target == digit)[0])
        pixels = np.clip(digits.images[index] * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255, as in training
        # bilinear, as the tokenizer's image processor resizes the 8×8 digits it trains on
        image = Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).convert("RGB")
        image.save(EXAMPLES_DIR / f"digit_{digit}.png", optimize=True)


if __name__ == "__main__":
    main()
