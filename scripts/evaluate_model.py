#!/usr/bin/env python
"""Evaluate a saved HyperVQ model on a data split and write `eval_results.json` next to it.

A thin wrapper: the code is `hf_hypervq.commands.evaluate_model` (`python scripts/evaluate_model.py --help` lists the flags).
"""

from hf_hypervq.commands.evaluate_model import main


if __name__ == "__main__":
    main()
