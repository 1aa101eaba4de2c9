"""hf-hypervq's metrics as `evaluate` modules, shipped inside the package so that they load offline.

Each folder holds one module (the script `evaluate.load` runs) and its metric card (README.md):

- `codebook_usage`: perplexity, fraction of codes used, dead codes;
- `reconstruction`: MSE, PSNR, SSIM (scikit-image's `structural_similarity`);
- `cluster_quality`: silhouette and Davies-Bouldin of latents clustered by code (scikit-learn);
- `mean_corruption_error`: AlexNet-normalised corruption errors, mCE with the known/unknown split;
- `fid_inception_score`: FID and Inception Score from features, with the feature extractor named.

```python
from hf_hypervq import metrics

usage = metrics.load("codebook_usage")
usage.compute(predictions=[0, 1, 1, 3], codebook_size=4)   # {'perplexity': 2.83, 'codes_used': 0.75, ...}
```

The scripts and `hf_hypervq.training.evaluation` compute every number through these modules. `scripts/push_metric.py`
publishes one as a Hub metric repo, after which `evaluate.load("org/name")` works anywhere.
"""

from pathlib import Path


MODULES = ("codebook_usage", "reconstruction", "cluster_quality", "mean_corruption_error", "fid_inception_score")


def module_path(name: str) -> Path:
    """The folder of the metric module `name` (what `evaluate.load` takes)."""
    if name not in MODULES:
        raise ValueError(f"unknown metric {name!r}; hf-hypervq's metrics are {', '.join(MODULES)}")
    return Path(__file__).resolve().parent / name


def load(name: str, **kwargs):
    """`evaluate.load` of the metric module `name`, from the installed package (no network). Held in memory
    (`keep_in_memory=True`) unless told otherwise, so that several processes can compute at once."""
    try:
        import evaluate
    except ImportError:
        raise ImportError(
            "hf_hypervq.metrics needs `evaluate`, part of the training extra: pip install 'hf-hypervq[train]'"
        ) from None
    return evaluate.load(str(module_path(name)), **{"keep_in_memory": True, **kwargs})
