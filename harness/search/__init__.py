"""`harness search`: PEDL's searchers (random, grid, adaptive/ASHA) over Optuna, every trial a
`harness launch` job; the trial's side (trial.py) reports to the study from inside training. Imports no
torch."""
