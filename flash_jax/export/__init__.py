"""Weights out of JAX: a run's parameters as a safetensors file with its config (weights.py), and
every model again as a float64 numpy forward pass that reads those files (numpy_model.py)."""
