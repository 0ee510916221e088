"""entrypoint.sh's decisions, on this machine, with stand-ins for harness, horovodrun and nvidia-smi.

Fast and needs no image; test_image.py runs the real thing inside the image.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRYPOINT = os.path.join(ROOT, "entrypoint.sh")

# Each stand-in prints one line, "<name> <args>", and the launcher variables it got, into $CALLS.
HARNESS = """\
#!/usr/bin/env bash
echo "harness $* rank=${HOROVOD_RANK:-}${OMPI_COMM_WORLD_RANK:-}${PMI_RANK:-}${RANK:-}" >> "$CALLS"
[ -z "${RANK:-}" ] || echo "backend=${HARNESS_BACKEND:-} threads=${OMP_NUM_THREADS:-}" >> "$CALLS.torch"
if [ -n "${RANK_SLEEPS:-}" ]; then
  trap 'echo "rank ${HOROVOD_RANK:-0} got TERM" >> "$CALLS"; kill $sleeper; exit "${EXIT_ON_TERM:-0}"' TERM
  sleep 60 &
  sleeper=$!
  echo started >> "$CALLS.started"
  wait
fi
exit "${HARNESS_EXIT:-0}"
"""

# The launcher stand-ins' end: wait for every rank and exit with the worst status.
WAIT_FOR_RANKS = """\
status=0
for p in "${pids[@]}"; do
  # A trap interrupts wait (status 128+N) even when the rank exits at that moment: wait until it is
  # gone, then once more for its own status (bash keeps it).
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  if wait "$p"; then s=0; else s=$?; fi
  [ "$s" -le "$status" ] || status=$s
done
exit "$status"
"""

# A launcher like horovodrun: runs -np copies of the command with HOROVOD_RANK set, exits with the worst.
HOROVODRUN = (
    """\
#!/usr/bin/env bash
echo "horovodrun $*" >> "$CALLS"
trap 'echo "launcher got TERM" >> "$CALLS"' TERM
np=1
while [ $# -gt 0 ]; do
  case "$1" in
    -np) np="$2"; shift 2 ;;
    -H|-p) shift 2 ;;
    --gloo|--mpi|--verbose) shift ;;
    *) break ;;
  esac
done
pids=()
for ((r = 0; r < np; r++)); do HOROVOD_RANK=$r "$@" & pids+=($!); done
"""
    + WAIT_FOR_RANKS
)

NVIDIA_SMI = """\
#!/usr/bin/env bash
for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done
"""


def write_script(path, text):
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)


@pytest.fixture
def env(tmp_path):
    """A fake venv (harness, horovodrun; python = this one, for psutil), a model directory, an output."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_script(venv_bin / "harness", HARNESS)
    write_script(venv_bin / "horovodrun", HOROVODRUN)
    write_script(venv_bin / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    gpu_bin = tmp_path / "gpu-bin"
    gpu_bin.mkdir()
    write_script(gpu_bin / "nvidia-smi", NVIDIA_SMI)
    model = tmp_path / "model_def"
    model.mkdir()
    (model / "model_def.py").write_text("")
    (tmp_path / "output").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HARNESS_", "HOROVOD", "OMPI_", "PMI"))}
    clean.update(
        CUDA_VISIBLE_DEVICES="",  # no GPU, even on a machine with some; with_gpus() brings fake ones
        HARNESS_VENV=str(tmp_path / "venv"),
        HARNESS_MODEL_DEF=str(model),
        HARNESS_OUTPUT=str(tmp_path / "output"),
        CALLS=str(tmp_path / "calls"),
        PATH="/usr/local/bin:/usr/bin:/bin",  # with_gpus() puts a fake nvidia-smi first
    )
    return {"env": clean, "tmp": tmp_path, "gpu_bin": str(gpu_bin), "model": str(model)}


def run(env, *args, timeout=30, **extra):
    """entrypoint.sh ARGS with the fixture's environment, changed by `extra` (None: unset)."""
    e = {k: v for k, v in dict(env["env"], **extra).items() if v is not None}
    proc = subprocess.run(["bash", ENTRYPOINT, *args], env=e, capture_output=True, text=True, timeout=timeout)
    calls_file = env["tmp"] / "calls"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return proc, calls


def with_gpus(env, n):
    return {
        "PATH": env["gpu_bin"] + ":/usr/local/bin:/usr/bin:/bin",
        "FAKE_GPUS": str(n),
        "CUDA_VISIBLE_DEVICES": None,
    }


def test_help_explains_the_modes(env):
    proc, calls = run(env, "--help")
    assert proc.returncode == 0 and calls == ["harness --help rank="]  # harness's own options follow
    words = ("--gpus", "HARNESS_NP", "horovodrun -np", "OMPI_COMM_WORLD_RANK", "sshd", "SIGTERM", "shm")
    for word in words:
        assert word in proc.stdout, word


def test_no_gpu_one_process_without_launcher(env):
    proc, calls = run(env)
    assert proc.returncode == 0, proc.stderr
    out = env["env"]["HARNESS_OUTPUT"]
    assert calls == [f"harness {env['model']} --output {out} rank="]


def test_harness_np_on_cpu_uses_horovodrun_and_passes_arguments_through(env):
    proc, calls = run(env, "--config", "/x.yaml", HARNESS_NP="2")
    assert proc.returncode == 0, proc.stderr
    venv_harness = os.path.join(env["env"]["HARNESS_VENV"], "bin", "harness")
    harness_args = f"{env['model']} --output {env['env']['HARNESS_OUTPUT']} --config /x.yaml"
    assert calls[0] == f"horovodrun -np 2 -H localhost:2 {venv_harness} {harness_args}"
    assert sorted(calls[1:]) == [f"harness {harness_args} rank={r}" for r in "01"]
    assert "2 processes on CPU" in proc.stderr


@pytest.mark.parametrize(
    "visible, expected",
    [(None, 4), ("0,1", 2), ("3", 1), ("", 0), ("-1", 0)],
)
def test_one_rank_per_visible_gpu(env, visible, expected):
    extra = dict(with_gpus(env, 4), CUDA_VISIBLE_DEVICES=visible)
    proc, calls = run(env, **extra)
    assert proc.returncode == 0, proc.stderr
    if expected > 1:
        assert calls[0].startswith(f"horovodrun -np {expected} -H localhost:{expected} ")
        assert f"{expected} processes on {expected} GPU(s)" in proc.stderr
    else:
        assert calls[0].startswith("harness ")  # one process: no launcher
        assert len(calls) == 1


def test_harness_np_overrides_the_gpu_count(env):
    proc, calls = run(env, HARNESS_NP="3", **with_gpus(env, 8))
    assert calls[0].startswith("horovodrun -np 3 -H localhost:3 ")


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK"])
def test_inside_a_launcher_execs_harness(env, var):
    """Started as one rank by mpirun/horovodrun (or a Kubeflow MPIJob): no second launcher."""
    proc, calls = run(env, "--quiet", HARNESS_NP="4", **{var: "1"}, **with_gpus(env, 4))
    assert proc.returncode == 0, proc.stderr
    out = env["env"]["HARNESS_OUTPUT"]
    assert calls == [f"harness {env['model']} --output {out} --quiet rank=1"]
    assert f"inside a launcher ({var}=1)" in proc.stderr


def test_launcher_choice_and_horovodrun_options(env):
    proc, calls = run(env, HARNESS_NP="2", HARNESS_LAUNCHER="mpi", HOROVODRUN_ARGS="--verbose")
    assert calls[0].startswith("horovodrun -np 2 -H localhost:2 --mpi --verbose ")
    proc, _ = run(env, HARNESS_NP="2", HARNESS_LAUNCHER="nccl")
    assert proc.returncode == 2 and "HARNESS_LAUNCHER=nccl" in proc.stderr


def test_hosts_for_multi_node(env):
    proc, calls = run(env, HARNESS_HOSTS="node1:2,node2:3")
    assert calls[0].startswith("horovodrun -np 5 -H node1:2,node2:3 -p 2222 ")


def test_first_argument_directory_or_command(env, tmp_path):
    other = tmp_path / "other_def"
    other.mkdir()
    proc, calls = run(env, str(other), "--fresh")
    assert calls == [f"harness {other} --output {env['env']['HARNESS_OUTPUT']} --fresh rank="]
    proc, _ = run(env, "echo", "hello")
    assert proc.returncode == 0 and proc.stdout == "hello\n"


def test_bad_input_is_one_line_and_status_2(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, calls = run(env, HARNESS_MODEL_DEF=str(empty))
    assert proc.returncode == 2 and not calls
    assert proc.stderr.startswith("entrypoint: error: nothing in ") and proc.stderr.count("\n") == 1
    proc, _ = run(env, HARNESS_NP="zero")
    assert proc.returncode == 2 and "HARNESS_NP=zero" in proc.stderr


@pytest.mark.parametrize("np", ["1", "2"])
def test_exit_status_is_the_jobs(env, np):
    proc, _ = run(env, HARNESS_NP=np, HARNESS_EXIT="3")
    assert proc.returncode == 3


@pytest.mark.parametrize("np, exit_on_term", [("2", 0), ("2", 7), ("1", 0)])
def test_sigterm_goes_to_the_ranks_not_the_launcher(env, np, exit_on_term):
    """The ranks get SIGTERM (to checkpoint), not the launcher (it would kill them). Status: the job's."""
    e = dict(env["env"], HARNESS_NP=np, RANK_SLEEPS="1", EXIT_ON_TERM=str(exit_on_term))
    proc = subprocess.Popen(["bash", ENTRYPOINT], env=e, stderr=subprocess.PIPE, text=True)
    started = env["tmp"] / "calls.started"
    deadline = time.monotonic() + 20
    while not (started.exists() and len(started.read_text().split()) == int(np)):
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    calls = (env["tmp"] / "calls").read_text().splitlines()
    assert proc.returncode == exit_on_term, stderr
    assert "SIGTERM: passing it on to the job" in stderr
    assert len([c for c in calls if c.endswith("got TERM") and c.startswith("rank")]) == int(np)
    assert "launcher got TERM" not in calls


def _sigterm_to(env, np, **extra):
    e = dict(env["env"], HARNESS_NP=np, RANK_SLEEPS="1", **extra)
    proc = subprocess.Popen(["bash", ENTRYPOINT], env=e, stderr=subprocess.PIPE, text=True)
    started = env["tmp"] / "calls.started"
    deadline = time.monotonic() + 60
    while not (started.exists() and len(started.read_text().split()) == int(np)):
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    return proc, stderr, (env["tmp"] / "calls").read_text().splitlines()


# HARNESS_BACKEND=torch: the real torchrun (the fixture's python is this one) runs the stand-in harness.


def test_torch_backend_runs_torchrun_with_the_harness_split_of_threads(env):
    proc, calls = run(env, "--quiet", HARNESS_NP="2", HARNESS_BACKEND="torch", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out, venv = env["env"]["HARNESS_OUTPUT"], env["env"]["HARNESS_VENV"]
    assert sorted(calls) == [f"harness {env['model']} --output {out} --quiet rank={r}" for r in "01"]
    assert (
        f"running: {venv}/bin/python -m torch.distributed.run --standalone --nproc-per-node 2" in proc.stderr
    )
    from harness.distributed import available_cores  # the same count, in Python (harness launch's)

    threads = str(max(1, available_cores() // 2))
    torch_lines = (env["tmp"] / "calls.torch").read_text().splitlines()
    assert torch_lines == [f"backend=torch threads={threads}"] * 2
    # The user's own OMP_NUM_THREADS wins; one rank per GPU as with Horovod.
    (env["tmp"] / "calls.torch").unlink()
    proc, _ = run(env, HARNESS_BACKEND="torch", OMP_NUM_THREADS="3", timeout=60, **with_gpus(env, 2))
    assert proc.returncode == 0, proc.stderr
    assert "2 processes on 2 GPU(s) (torchrun, 3 thread(s) each)" in proc.stderr
    assert (env["tmp"] / "calls.torch").read_text().splitlines() == ["backend=torch threads=3"] * 2


def test_torch_backend_one_process_and_bad_input(env):
    proc, calls = run(env, HARNESS_BACKEND="torch")
    assert proc.returncode == 0 and calls == [
        f"harness {env['model']} --output {env['env']['HARNESS_OUTPUT']} rank="
    ]
    for extra, said in [
        (dict(HARNESS_BACKEND="tensorflow"), "HARNESS_BACKEND=tensorflow: use horovod or torch"),
        (dict(HARNESS_BACKEND="torch", HARNESS_HOSTS="a:2,b:2"), "HARNESS_HOSTS is horovodrun's"),
        (dict(HARNESS_BACKEND="torch", HARNESS_NP="2", HARNESS_LAUNCHER="gloo"), "HARNESS_LAUNCHER=gloo"),
    ]:
        proc, _ = run(env, **extra)
        assert proc.returncode == 2 and said in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_inside_torchrun_or_a_pytorchjob_execs_harness(env):
    """A PyTorchJob's pod (or torchrun) sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: the harness picks
    the torch backend by them; no launcher of the entrypoint's own."""
    job = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="job-master-0", MASTER_PORT="23456")
    proc, calls = run(env, HARNESS_NP="4", **job)
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"harness {env['model']} --output {env['env']['HARNESS_OUTPUT']} rank=1"]
    assert "inside a launcher (RANK=1 of WORLD_SIZE=2" in proc.stderr


def test_sigterm_under_torchrun_goes_to_the_ranks(env):
    """As with horovodrun: SIGTERM to the ranks (torchrun's agent would give them 30 s, then SIGKILL)."""
    proc, stderr, calls = _sigterm_to(env, "2", HARNESS_BACKEND="torch")
    assert proc.returncode == 0, stderr
    assert len([c for c in calls if c.endswith("got TERM") and c.startswith("rank")]) == 2


# A launcher like mpirun: -np copies of the command with OMPI_COMM_WORLD_RANK; SIGUSR1 is passed on to the
# ranks (Open MPI's mpirun does so), SIGTERM kills them (mpirun's own stop).
MPIRUN = (
    """\
#!/usr/bin/env bash
echo "mpirun $*" >> "$CALLS"
np=1
while [ $# -gt 0 ]; do
  case "$1" in
    -np) np="$2"; shift 2 ;;
    --allow-run-as-root) shift ;;
    *) break ;;
  esac
done
pids=()
for ((r = 0; r < np; r++)); do OMPI_COMM_WORLD_RANK=$r "$@" & pids+=($!); done
trap 'echo "mpirun got USR1" >> "$CALLS"; kill -USR1 "${pids[@]}"' USR1
trap 'echo "mpirun got TERM" >> "$CALLS"; kill -KILL "${pids[@]}"; exit 1' TERM
"""
    + WAIT_FOR_RANKS
)

# A rank: on SIGUSR1 (unless IGNORE_USR1) it says the harness's stop line, as rank 0 does, and exits 0.
RANK = """\
#!/usr/bin/env bash
trap 'echo "stopped by SIGUSR1 at batch 7; checkpoint: /output/checkpoints/7"; kill $sleeper; exit 0' USR1
echo "rank $OMPI_COMM_WORLD_RANK training"
if [ -n "${IGNORE_USR1:-}" ]; then
  trap '' USR1
  echo started >> "$CALLS.started"
  exec sleep 60
fi
sleep "${RANK_SECONDS:-60}" &
sleeper=$!
echo started >> "$CALLS.started"
wait
"""


@pytest.fixture
def launched():
    """The launchers a test started: whatever of them is left at its end is killed (the whole tree)."""
    procs = []
    yield procs
    for proc in procs:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass


def ranks_of(proc, rank_script):
    """The stand-in ranks under a launcher."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.cmdline()[1:2] == [str(rank_script)]:
                found.append(p)
        except psutil.Error:  # a short-lived process, gone meanwhile
            pass
    return found


def start_launcher(env, launched, **extra):
    """`entrypoint.sh mpirun -np 2 RANK` with stand-ins, once both ranks run."""
    bin_dir = env["tmp"] / "venv" / "bin"
    write_script(bin_dir / "mpirun", MPIRUN)
    write_script(env["tmp"] / "rank", RANK)
    e = {k: v for k, v in dict(env["env"], **extra).items() if v is not None}
    proc = subprocess.Popen(
        ["bash", ENTRYPOINT, "mpirun", "--allow-run-as-root", "-np", "2", str(env["tmp"] / "rank")],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    launched.append(proc)
    started = env["tmp"] / "calls.started"
    deadline = time.monotonic() + 20
    while not (started.exists() and len(started.read_text().split()) == 2):
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.1)
    return proc


def test_launcher_passes_sigterm_to_the_ranks_as_sigusr1_and_says_they_stopped_early(env, launched):
    """An MPIJob's launcher pod deleted: mpirun gets SIGUSR1 (passed on to the ranks, which checkpoint), not
    SIGTERM (it would kill them); the ranks' lines pass through; status 143: training did not finish."""
    proc = start_launcher(env, launched)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    calls = (env["tmp"] / "calls").read_text().splitlines()
    assert "mpirun got USR1" in calls and "mpirun got TERM" not in calls, (calls, err)
    assert "rank 0 training" in out and out.count("stopped by SIGUSR1 at batch 7") == 2, out
    assert "SIGTERM: SIGUSR1 to mpirun" in err
    assert "the ranks stopped before the end of training (stopped by SIGUSR1 at batch 7;" in err
    assert proc.returncode == 143, err


def test_launcher_that_finishes_exits_0_and_a_stop_elsewhere_is_143(env, launched):
    proc = start_launcher(env, launched, RANK_SECONDS="0.5")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.count("training") == 2, err
    # a worker pod deleted alone: its ranks stop (rank 0 says so), mpirun ends 0, the launcher got no signal
    (env["tmp"] / "calls.started").unlink()
    proc = start_launcher(env, launched)
    ranks = ranks_of(proc, env["tmp"] / "rank")
    assert len(ranks) == 2, ranks
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "stopped before the end of training" in err, err
    assert "SIGTERM" not in err


@pytest.mark.parametrize("second_signal", [False, True])
def test_launcher_falls_back_to_sigterm_after_the_deadline_or_a_second_signal(env, launched, second_signal):
    proc = start_launcher(env, launched, IGNORE_USR1="1", HARNESS_STOP_SECONDS="30" if second_signal else "1")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    if second_signal:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    calls = (env["tmp"] / "calls").read_text().splitlines()
    assert calls.index("mpirun got USR1") < calls.index("mpirun got TERM"), calls
    assert proc.returncode == 1 and time.monotonic() - started < 10, err
    said = "SIGTERM again: SIGTERM to mpirun" if second_signal else "the checkpoint did not finish in 1 s"
    assert said in err
