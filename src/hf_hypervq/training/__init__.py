"""Library code of the training scripts: data sets, the accelerate loop, checkpoints, evaluation, corruptions, plots.

It needs the training extra (`pip install "hf-hypervq[train]"`); using a published model does not."""

import importlib.util


# import name -> what pip installs
_TRAINING_PACKAGES = {
    "datasets": "datasets",
    "accelerate": "accelerate",
    "evaluate": "evaluate",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
}
_missing = [package for name, package in _TRAINING_PACKAGES.items() if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"hf_hypervq.training needs {', '.join(_missing)}, part of the training extra: pip install 'hf-hypervq[train]'"
    )
