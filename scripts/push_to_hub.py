#!/usr/bin/env python
"""Push a trained model folder to the Hugging Face Hub with a generated model card, in one commit.

A thin wrapper: the code is `hf_hypervq.commands.push_to_hub` (`python scripts/push_to_hub.py --help` lists the flags).
"""

from hf_hypervq.commands.push_to_hub import main


if __name__ == "__main__":
    main()
