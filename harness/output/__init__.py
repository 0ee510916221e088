"""What lives in the output directory besides the reports: checkpoints, the one-run lock, and the ranks'
records that `harness launch` reads. No torch at import (checkpoint.py imports it)."""
