"""The one way tests start the harness as other processes: a launcher's command line, the environment (the
virtualenv's bin first on PATH, none of the test process's own launcher variables), and running it."""

import os
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

BIN = os.path.dirname(sys.executable)
HARNESS = os.path.join(BIN, "harness")
# and the user's own switch; torchrun's (a test run under torchrun itself)
_LAUNCHER_VARS = ("HOROVOD_", "OMPI_", "PMI", "HARNESS_TRACEBACK", "HARNESS_BACKEND", "TORCHELASTIC_")


def environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def under(launcher: str, np: int, argv: Sequence[str], forward: Iterable[str] = ()) -> List[str]:
    """`argv` (a harness command) started by `launcher`: `local` (as it is), `mpirun`, `gloo` or `mpi`
    (horovodrun), `torchrun` (`torchrun --standalone`: the torch.distributed backend), or
    `launch-<gloo|mpi|mpirun|horovodrun>` (`harness launch` with that launcher; `argv` is then a training
    command). `forward`: variables mpirun must pass on (horovodrun and torchrun pass all)."""
    argv = [str(a) for a in argv]
    if launcher.startswith("launch-"):
        return [HARNESS, "launch", "-np", str(np), "--launcher", launcher[len("launch-") :], *argv[1:]]
    if launcher == "local":
        return argv
    if launcher == "torchrun":  # `-m harness ARGS` as the docs say; a Python script as `torchrun train.py`
        torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(np)]
        if argv[0] == HARNESS:
            return [*torchrun, "-m", "harness", *argv[1:]]
        if argv[0] == sys.executable or os.path.basename(argv[0]).startswith("python"):
            return [*torchrun, *argv[1:]]
        return [*torchrun, "--no-python", *argv]
    if launcher == "mpirun":
        passed = [arg for name in ("PATH", *forward) for arg in ("-x", name)]
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np), *passed, *argv]
    return [os.path.join(BIN, "horovodrun"), f"--{launcher}", "-np", str(np), "-H", f"localhost:{np}", *argv]


def training(
    launcher: str, np: int, model_dir: object, output: object, *args: object, forward=()
) -> List[str]:
    """The command line of a training job: `harness MODEL_DIR --output OUTPUT ARGS` under `launcher`."""
    return under(launcher, np, [HARNESS, str(model_dir), "--output", str(output), *map(str, args)], forward)


def harness(*args: object) -> List[str]:
    """`harness ARGS` in one process."""
    return [HARNESS, *map(str, args)]


def run(
    argv: Sequence[str], timeout: float = 180, env: Optional[Dict[str, str]] = None, **kw
) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr captured as text."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=environment(env), **kw
    )


def timed(
    argv: Sequence[str], timeout: float = 180, env: Optional[Dict[str, str]] = None
) -> Tuple[subprocess.CompletedProcess, float]:
    """`run`, and how many seconds it took."""
    begin = time.monotonic()
    proc = run(argv, timeout, env)
    return proc, time.monotonic() - begin


def start(argv: Sequence[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.Popen:
    """Start it and return at once (text mode); `kw` as for Popen (stdout=..., start_new_session=...)."""
    return subprocess.Popen(list(argv), text=True, env=environment(env), **kw)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
