"""Training: state and step (step.py), optimizer (optim.py), checkpoints (checkpoint.py saves,
checkpoint_format.py, checkpoint_reader.py), metrics output (report.py; Weights & Biases:
wandb_run.py), the workdir lock (workdir.py), stop signals (signals.py) and the loop (loop.py).
Entry point: `train.py`.

    from flash_jax.train import loop
    summary = loop.train_and_evaluate(config, workdir)
"""
