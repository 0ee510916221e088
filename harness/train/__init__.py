"""Training: set-up (trial, data, model, optimizer), the loop, the trial adapters, the optimizer step, the
run state that checkpoints hold, metric accumulation and the report sinks. Imports torch (but report.py)."""
