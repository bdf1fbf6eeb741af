"""Measurement tools that nothing on the training path imports: benchmark configs and reports
(benchmarks.py), TPU slices to compile for without a TPU (tpu_topology.py) and plots (plots.py)."""
