"""`harness launch` (a supervisor that restarts a failed job), `harness plot` and `harness summary`."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

from harness.errors import HarnessError
from harness.outputlock import HOLDER_ENV, OutputLock
from harness.report import read_metrics

# ---------------------------------------------------------------------------------------------------------
# harness launch


def _launch_command(launcher: str, np_: int, hosts: Optional[str], harness_args: List[str]) -> List[str]:
    harness = [sys.executable, "-m", "harness", *harness_args]
    hosts = hosts or f"localhost:{np_}"
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return ["mpirun", *root, "-np", str(np_), "-H", hosts, "-x", "PATH", "-x", "PYTHONPATH", *harness]
    flag = {"gloo": ["--gloo"], "mpi": ["--mpi"], "horovodrun": []}[launcher]
    horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [horovodrun, *flag, "-np", str(np_), "-H", hosts, *harness]


def _signal_ranks(state: str, sig: int) -> int:
    """Send `sig` to this machine's ranks (they registered their pids); returns how many were signalled."""
    sent = 0
    for path in glob.glob(os.path.join(state, "pids", "rank*")):
        try:
            with open(path) as f:
                os.kill(int(f.read().strip()), sig)
            sent += 1
        except (OSError, ValueError):
            pass
    return sent


def _failures(state: str) -> List[Dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(state, "failure-rank*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            pass
    # The root cause first: an error of its own before one caused by another rank's death.
    return sorted(out, key=lambda f: (bool(f.get("consequential")), f.get("time", 0)))


def _root_cause(state: str, failures: List[Dict[str, Any]], rc: int) -> str:
    """What ended the job: a rank's own error first; else a rank that died without a word (killed: its
    pid is registered but it left no error), before the errors the others got from its absence."""
    own = [f for f in failures if not f.get("consequential")]
    if own:
        return f"[rank {own[0]['rank']}] {own[0]['message']}" if own[0].get("rank") else own[0]["message"]
    reported = {f.get("rank") for f in failures}
    silent = []
    for path in sorted(glob.glob(os.path.join(state, "pids", "rank*"))):
        rank = int(os.path.basename(path)[4:])
        if rank not in reported:
            with open(path) as f:
                silent.append(f"rank {rank} (pid {f.read().strip()})")
    if silent:
        after = f"; then: {failures[0]['message']}" if failures else ""
        return (
            f"{', '.join(silent)} died without an error of its own (killed by a signal: SIGKILL, the "
            f"out-of-memory killer, a crash?){after}"
        )
    if failures:
        return failures[0]["message"]
    return f"the launcher exited with status {rc} before any rank started"


def _without(args: List[str], flag: str, takes_value: bool) -> List[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def launch(argv: List[str]) -> int:
    p = argparse.ArgumentParser(
        prog="harness launch",
        usage="harness launch [-np N] [-H HOSTS] [--launcher L] [--max-restarts N] MODEL_DIR [options]",
        description="Run the job under a launcher and restart it from the newest checkpoint after a failure "
        "(at most max_restarts times; bad input, exit status 2, is not retried). SIGTERM is passed on to the "
        "ranks, which checkpoint and exit 0.",
    )
    p.add_argument("-np", type=int, default=1, help="number of ranks (default 1)")
    p.add_argument("-H", dest="hosts", help="hosts, e.g. a:4,b:4 (default localhost:NP)")
    p.add_argument("--launcher", choices=["horovodrun", "gloo", "mpi", "mpirun"], default="horovodrun")
    p.add_argument("--max-restarts", type=int, help="overrides the config's max_restarts")
    args, harness_args = p.parse_known_args(argv)

    from harness import cli, config

    train_args = cli.parse_args(harness_args)
    model_dir = train_args.model_def
    max_restarts = args.max_restarts
    if max_restarts is None:
        max_restarts = config.load_for_model(model_dir, train_args.config).max_restarts
    state = cli.state_dir(train_args.output)
    lock = OutputLock(train_args.output)  # held for every attempt; the ranks know it is held for them
    took_over = lock.acquire()
    if took_over:
        print(f"harness launch: {took_over}", flush=True)
    env = dict(os.environ, **{HOLDER_ENV: str(os.getpid())})
    env.setdefault("OMPI_MCA_odls_base_sigkill_timeout", "30")  # time for ranks to checkpoint on SIGTERM

    terminating: List[int] = []

    def on_term(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in terminating and proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # a second Ctrl-C: abort now
            _signal_ranks(state, signal.SIGKILL)
            print("harness launch: aborted (second Ctrl-C)", flush=True)
            os._exit(130)
        terminating.append(signum)
        # The ranks checkpoint at a batch they agree on (SIGTERM to each: the launcher would kill them).
        if not _signal_ranks(state, signal.SIGTERM) and proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # no rank running yet: stop the launcher

    proc: Optional[subprocess.Popen] = None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    restarts = 0
    while True:
        shutil.rmtree(state, ignore_errors=True)
        command = _launch_command(args.launcher, args.np, args.hosts, harness_args)
        print(f"harness launch: {' '.join(command)}", flush=True)
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if terminating and deadline is None:
                    deadline = time.monotonic() + 60
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
        if terminating:
            name = signal.Signals(terminating[0]).name
            print(f"harness launch: stopped by {name}; the job exited with status {rc}", flush=True)
            lock.release()
            return 130 if terminating[0] == signal.SIGINT else rc
        if rc == 0:
            lock.release()
            return 0
        failures = _failures(state)
        bad_input = [f for f in failures if f.get("exit_code") == HarnessError.exit_code]
        if bad_input:  # bad input, a full disk: running it again would fail the same way
            print(f"harness launch: not restarting: {bad_input[0]['message']}", flush=True)
            return HarnessError.exit_code
        cause = _root_cause(state, failures, rc)
        if restarts >= max_restarts:
            print(f"harness launch: giving up after {restarts} restarts; last failure: {cause}", flush=True)
            return rc or 1
        restarts += 1
        print(f"harness launch: restart {restarts} of {max_restarts} after failure: {cause}", flush=True)
        # Later attempts resume from the newest checkpoint in --output.
        harness_args = _without(_without(harness_args, "--fresh", False), "--resume", True)


# ---------------------------------------------------------------------------------------------------------
# harness plot / summary


def _load_run(output: str) -> List[Dict[str, Any]]:
    entries = read_metrics(os.path.join(output, "metrics.jsonl"))
    if not entries:
        raise HarnessError(f"{output}: no metrics.jsonl with reports (is this a harness output folder?)")
    return entries


def _series(entries: List[Dict[str, Any]], kind: str, name: str) -> Any:
    import numpy as np

    points = [
        (e["batches"], e["metrics"][name]) for e in entries if e["type"] == kind and name in e["metrics"]
    ]
    xs = [b for b, _ in points]
    ys = np.array([np.asarray(v, dtype=float).reshape(-1) for _, v in points])
    return xs, ys


def plot(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness plot", description="Write OUTPUT/curves.png.")
    p.add_argument("output")
    args = p.parse_args(argv)
    entries = _load_run(args.output)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation_names = sorted({n for e in entries if e["type"] == "validation" for n in e["metrics"]})
    panels = [("training", "loss")] + [("validation", n) for n in validation_names]
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (kind, name) in zip(axes.flat, panels):
        xs, ys = _series(entries, kind, name)
        if len(xs):
            if ys.shape[1] == 1:
                ax.plot(xs, ys[:, 0], marker="o" if kind == "validation" else None, markersize=3)
            else:  # a non-scalar metric: one line per element (the first 10)
                for i in range(min(ys.shape[1], 10)):
                    ax.plot(xs, ys[:, i], label=f"[{i}]", linewidth=1)
                ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{kind} {name}")
        ax.set_xlabel("batches")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.output, "curves.png")
    fig.savefig(path, dpi=100)
    print(path)
    return 0


def summary(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness summary", description="Best and last validation metrics.")
    p.add_argument("output")
    args = p.parse_args(argv)
    entries = _load_run(args.output)
    metric, smaller = None, True
    try:
        with open(os.path.join(args.output, "config.yaml")) as f:
            searcher = (yaml.safe_load(f) or {}).get("searcher", {})
        metric, smaller = searcher.get("metric"), searcher.get("smaller_is_better", True)
    except OSError:
        pass
    last = entries[-1]
    print(f"run: {os.path.abspath(args.output)}")
    print(f"trained: {last['batches']} batches, {last['epoch']:.2f} epochs, {last['records']} records")
    validations = [e for e in entries if e["type"] == "validation"]
    names = sorted({n for e in validations for n in e["metrics"]})
    rows = [("metric", "best", "at batch", "last", "at batch")]
    for name in names:
        scalar = [
            (e["metrics"][name], e["batches"])
            for e in validations
            if isinstance(e["metrics"].get(name), float)
        ]
        if not scalar:
            continue
        # The searcher metric's direction is configured; for others, guess from the name.
        lower_better = smaller if name == metric else name.endswith(("loss", "error"))
        best = (min if lower_better else max)(scalar, key=lambda vb: vb[0])
        label = name + (" *" if name == metric else "")
        rows.append((label, f"{best[0]:.5g}", str(best[1]), f"{scalar[-1][0]:.5g}", str(scalar[-1][1])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if metric:
        print(f"(* searcher.metric; best = {'smallest' if smaller else 'largest'})")
    root = os.path.join(args.output, "checkpoints")
    from harness.checkpoint import checkpoint_dirs

    batches = checkpoint_dirs(root)
    print("checkpoints:" if batches else "checkpoints: none")
    for b in batches:
        path = os.path.join(root, str(b))
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")))
        value = ""
        try:
            with open(os.path.join(path, "state.json")) as f:
                vm = json.load(f)["validation_metrics"]
            if metric in vm:
                value = f"  {metric} {vm[metric]:.5g}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        print(f"  batch {b:>7}  {size / 1e6:7.2f} MB{value}  {path}")
    return 0


def main(argv: List[str]) -> int:
    command, rest = argv[0], argv[1:]
    return {"launch": launch, "plot": plot, "summary": summary}[command](rest)
