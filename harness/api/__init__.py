"""What model definitions use: PyTorchTrial and the run's context (hyperparameters, data config, seed),
LRScheduler, and the DataLoader drop-in. `harness/__init__.py` exports them; `pedl/` maps PEDL's names
onto them."""
