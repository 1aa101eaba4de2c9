#!/usr/bin/env python
"""Sample images from a trained token prior through its tokenizer; optionally measure FID and Inception Score.

A thin wrapper: the code is `hf_hypervq.commands.sample` (`python scripts/sample.py --help` lists the flags).
"""

from hf_hypervq.commands.sample import main


if __name__ == "__main__":
    main()
