"""What every stage shares: the config, the run directory, checkpoints, the training loop, torchrun."""
