"""The arguments of the `harness` training command (shared by the command and `harness launch`)."""

from __future__ import annotations

import argparse
from typing import List, Optional

USAGE_EPILOG = """\
launch:
  harness ./model_def                       one process
  horovodrun -np 2 harness ./model_def      two ranks (Gloo or MPI)
  mpirun -np 2 harness ./model_def          two ranks under Open MPI
  harness launch -np 2 ./model_def          two ranks, restarted from the newest checkpoint on failure

other commands:
  harness plot OUTPUT                       OUTPUT/curves.png: training loss and validation metrics
  harness summary OUTPUT                    best and last validation metrics, checkpoints
  harness evaluate MODEL_DIR CHECKPOINT     validation metrics of a checkpoint (under a launcher too)
  harness export CHECKPOINT --format torchscript|state_dict --out FILE

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
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (also off when stdout is no terminal)"
    )
    return p.parse_args(argv)
