#!/usr/bin/env python
"""Train a Gated PixelCNN token prior on the tokens a frozen HyperVQ-VAE tokenizer gives a data set, with accelerate.

A thin wrapper: the code is `hf_hypervq.commands.train_prior` (`python scripts/train_prior.py --help` lists the flags).
"""

from hf_hypervq.commands.train_prior import main


if __name__ == "__main__":
    main()
