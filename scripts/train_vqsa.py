#!/usr/bin/env python
"""Train VQ-SA (a ResNet with a quantized two-token self-attention head) with HyperVQ, with accelerate.

A thin wrapper: the code is `hf_hypervq.commands.train_vqsa` (`python scripts/train_vqsa.py --help` lists the flags).
"""

from hf_hypervq.commands.train_vqsa import main


if __name__ == "__main__":
    main()
