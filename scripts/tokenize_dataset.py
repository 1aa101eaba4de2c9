#!/usr/bin/env python
"""Tokenize an image data set once with a frozen tokenizer, and keep its tokens as a `datasets` data set to train

A thin wrapper: the code is `hf_hypervq.commands.tokenize_dataset` (`python scripts/tokenize_dataset.py --help` lists the flags).
"""

from hf_hypervq.commands.tokenize_dataset import main


if __name__ == "__main__":
    main()
