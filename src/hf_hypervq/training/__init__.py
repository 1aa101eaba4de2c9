"""Library code of the training scripts: data sets, metrics, the accelerate loop, checkpoints, corruptions, plots."""
