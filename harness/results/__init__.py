"""Using what a run produced: `harness summary` and `harness plot` (no torch), `harness evaluate`,
`harness export` and `harness.load_trial` (evaluate.py)."""
