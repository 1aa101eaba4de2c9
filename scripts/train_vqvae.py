#!/usr/bin/env python
"""Train a HyperVQ-VAE image tokenizer (any of the five quantizers) with accelerate.

A thin wrapper: the code is `hf_hypervq.commands.train_vqvae` (`python scripts/train_vqvae.py --help` lists the flags).
"""

from hf_hypervq.commands.train_vqvae import main


if __name__ == "__main__":
    main()
