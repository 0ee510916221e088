"""The arguments of the `harness` training command (shared by the command and `harness launch`), and of
`harness evaluate` / `harness export`."""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

USAGE_EPILOG = """\
launch:
  harness ./model_def                       one process
  horovodrun -np 2 harness ./model_def      two ranks (Gloo or MPI)
  mpirun -np 2 harness ./model_def          two ranks under Open MPI
  harness launch -np 2 ./model_def          two ranks (recommended): restarts, one line per failure

other commands:
  harness search MODEL_DIR --config adaptive.yaml --output OUT [-np N] [--parallel K] [--storage URL]
                                            PEDL's searches (random, grid, adaptive_asha) on Optuna
  harness plot OUTPUT                       OUTPUT/curves.png: training loss and validation metrics
  harness summary OUTPUT                    last, min, max of validation metrics; checkpoints (a search:
                                            its trials, best first)
  harness evaluate MODEL_DIR CHECKPOINT     validation metrics of a checkpoint (under a launcher too)
  harness export CHECKPOINT --format torchscript|state_dict --out FILE [--force]

exit status: 0 success, 2 bad input (model definition, config, data), 1 any other failure.
Set HARNESS_TRACEBACK=1 to see full tracebacks.
"""


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="harness",
        description="Train a PEDL-style PyTorchTrial model definition with data-parallel Horovod.",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_def", help="model definition directory (holding model_def.py)")
    p.add_argument(
        "--config", help="experiment config YAML (default: experiment.yaml or const.yaml in model_def)"
    )
    p.add_argument("--output", default="output", help="output directory (default: ./output)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in --output; start over")
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint folder")
    p.add_argument("--search-trial", metavar="FILE", help=argparse.SUPPRESS)  # set by `harness search`
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (also off when stdout is no terminal)"
    )
    args = p.parse_args(argv)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        # torchrun's agent restarted the ranks (a failure, a machine that left or joined): they go on from
        # the newest checkpoint, as after a restart by harness launch, not from --fresh or --resume again.
        args.fresh, args.resume = False, None
    return args


def parse_model_use_args(argv: List[str]) -> argparse.Namespace:
    """`harness evaluate` and `harness export` (harness/evaluate.py); `argv[0]` is the command."""
    command, rest = argv[0], argv[1:]
    where = "a checkpoint folder (OUTPUT/checkpoints/<batches>), OUTPUT/checkpoints/latest, or OUTPUT itself"
    if command == "evaluate":
        p = argparse.ArgumentParser(
            prog="harness evaluate",
            description="Evaluate a checkpoint on the validation set, exactly as training validates "
            "(under horovodrun or mpirun on N ranks, or in one process).",
        )
        p.add_argument("model_dir", help="model definition directory (holding model_def.py)")
        p.add_argument("checkpoint", help=where + " (its newest checkpoint)")
        p.add_argument("--config", help="config for the data and precision (default: the checkpoint's)")
        p.add_argument("--output", help="append the result to OUTPUT/evaluations.jsonl")
    else:
        p = argparse.ArgumentParser(
            prog="harness export", description="Write a checkpoint's model to a file."
        )
        p.add_argument("checkpoint", help=where)
        p.add_argument("--format", required=True, choices=("torchscript", "state_dict"))
        p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
        p.add_argument(
            "--model-dir", help="model definition directory (default: the one the checkpoint names)"
        )
        p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    args = p.parse_args(rest)
    args.command = command
    return args
