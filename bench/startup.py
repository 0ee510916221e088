"""Start-up time: from the command to the harness's first console line and to the end of a tiny run, under
each launcher, for one or two harness source trees (before/after a change), interleaved.

    .venv/bin/python bench/startup.py --reps 5
    .venv/bin/python bench/startup.py --src before=/tmp/old-checkout --src after=. --reps 5

The model is tests/conftest.py's small MLP on scikit-learn's digits (6 batches), so what is measured is
start-up: interpreters, imports, the launcher, hvd.init, the data barrier, the model's set-up. Medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(os.path.abspath(sys.executable))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import write_model_def  # noqa: E402

LAUNCHERS = {
    "one process": [],
    "horovodrun --gloo": ["{bin}/horovodrun", "--gloo", "-np", "2", "-H", "localhost:2"],
    "horovodrun --mpi": ["{bin}/horovodrun", "--mpi", "-np", "2", "-H", "localhost:2"],
    "mpirun": [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "PATH",
        "-x",
        "PYTHONPATH",
    ],
    "harness launch (gloo)": None,
}


def command(launcher: str, model_dir: str, output: str) -> List[str]:
    harness = [f"{BIN}/harness", model_dir, "--output", output, "--fresh"]
    if launcher == "harness launch (gloo)":
        return [f"{BIN}/harness", "launch", "--launcher", "gloo", "-np", "2", *harness[1:]]
    return [a.format(bin=BIN) for a in LAUNCHERS[launcher]] + harness


def once(argv: List[str], src: str) -> Tuple[float, float]:
    """Seconds to the first "training on" line and to the process's end."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHONPATH=src)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    first = float("nan")
    assert proc.stdout is not None
    for line in proc.stdout:
        if "training on" in line and first != first:
            first = time.monotonic() - start
    if proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return first, time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", action="append", default=[], help="NAME=PATH of a harness source tree")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--launchers", nargs="*", default=list(LAUNCHERS))
    args = p.parse_args()
    sources = dict(s.split("=", 1) for s in args.src) or {"this": ROOT}
    work = tempfile.mkdtemp(prefix="startup-")
    model_dir = write_model_def(os.path.join(work, "m"))
    times: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
    for rep in range(args.reps):
        for launcher in args.launchers:
            names = list(sources) if rep % 2 == 0 else list(reversed(sources))
            for name in names:
                out = os.path.join(work, "out")
                times.setdefault((launcher, name), []).append(
                    once(command(launcher, model_dir, out), sources[name])
                )
    print(f"| launcher | {' | '.join(f'{n}: first line s / total s' for n in sources)} |")
    print(f"|---|{'---|' * len(sources)}")
    for launcher in args.launchers:
        cells = []
        for name in sources:
            firsts, totals = zip(*times[(launcher, name)])
            cells.append(f"{statistics.median(firsts):.2f} / {statistics.median(totals):.2f}")
        print(f"| {launcher} | {' | '.join(cells)} |")
    print(f"({args.reps} runs each, medians; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
