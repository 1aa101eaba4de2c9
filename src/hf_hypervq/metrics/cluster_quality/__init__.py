"""An `evaluate` module; load it with `hf_hypervq.metrics.load`."""
