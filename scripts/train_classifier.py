#!/usr/bin/env python
"""Train the paper's frozen-feature classifier on a trained HyperVQ-VAE tokenizer, with accelerate.

A thin wrapper: the code is `hf_hypervq.commands.train_classifier` (`python scripts/train_classifier.py --help` lists the flags).
"""

from hf_hypervq.commands.train_classifier import main


if __name__ == "__main__":
    main()
