"""The optional parts a few tests need, and what those tests do without them.

Without a part (a pip extra, a Debian package, transformers' fetched tests) its tests are skipped, each with the
reason and the command that installs the part, never a collection error. CI sets `HF_HYPERVQ_STRICT_SKIPS=1`, which
turns every such skip into a failure, so that nothing is skipped there for want of a part.
"""

import importlib.util
import os
from pathlib import Path

import pytest


def env_flag(name: str) -> bool:
    """Whether an environment variable is set to a true value, read as transformers reads `RUN_SLOW`."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "t", "yes", "y", "on"}


STRICT = env_flag("HF_HYPERVQ_STRICT_SKIPS")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")  # fmt: skip


def missing(reason: str, module_level: bool = False):
    """Skip the calling test (or, at a module's top, the module) because an optional part is missing; fail under
    HF_HYPERVQ_STRICT_SKIPS."""
    if STRICT:
        pytest.fail(f"{reason} (HF_HYPERVQ_STRICT_SKIPS is set: a missing optional part fails)", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_modules(*names: str, install: str):
    """At a test module's top, before importing them: skip the module unless every module in `names` imports."""
    absent = [name for name in names if importlib.util.find_spec(name) is None]
    if absent:
        missing(f"needs {', '.join(absent)}: {install}", module_level=True)


def require_fashion_mnist():
    """Skip the calling test unless Debian's `dataset-fashion-mnist` has put its IDX files in place."""
    from hf_hypervq.training.data import FASHION_MNIST_FOLDER

    if not all((Path(FASHION_MNIST_FOLDER) / name).is_file() for name in FASHION_MNIST_FILES):
        missing(f"needs Fashion-MNIST in {FASHION_MNIST_FOLDER}: `apt-get install dataset-fashion-mnist` (Debian)")


def require_executables(*paths: str, install: str):
    """Skip the calling test unless every path in `paths` is an executable."""
    absent = [path for path in paths if not os.access(path, os.X_OK)]
    if absent:
        missing(f"needs {', '.join(absent)}: {install}")
