"""The commands users run, one module each, with `main(argv=None)`.

`scripts/<name>.py` calls `hf_hypervq.commands.<name>.main()`, so console entry points can expose the same code.
Every command needs the training extra (`pip install "hf-hypervq[train]"`).
"""
