#!/usr/bin/env python
"""Push one of hf-hypervq's metric modules to the Hub as an `evaluate` metric (a Space repo), in one commit.

A thin wrapper: the code is `hf_hypervq.commands.push_metric` (`python scripts/push_metric.py --help` lists the flags).
"""

from hf_hypervq.commands.push_metric import main


if __name__ == "__main__":
    main()
