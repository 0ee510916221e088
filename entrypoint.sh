#!/usr/bin/env bash
# The image's entrypoint: trains the model definition mounted at /model_def on one Horovod rank per visible
# GPU (HARNESS_NP processes on CPU), writing to /output. `entrypoint.sh --help` says it all.
set -euo pipefail

HARNESS_VENV="${HARNESS_VENV:-/opt/harness/venv}"
export PATH="$HARNESS_VENV/bin:$PATH" # also for shells started by ssh/mpirun, which skip the image's ENV
MODEL_DEF="${HARNESS_MODEL_DEF:-/model_def}"
OUTPUT="${HARNESS_OUTPUT:-/output}"
SSHD_CONFIG="${HARNESS_SSHD_CONFIG:-/etc/ssh/harness_sshd_config}"
# How long a pod's entrypoint waits for the ranks' checkpoint after SIGTERM: below Kubernetes' default grace
# period (terminationGracePeriodSeconds: 30 s), which ends in SIGKILL; deploy/mpijob.yaml sets both.
STOP_SECONDS="${HARNESS_STOP_SECONDS:-25}"
LAUNCHER_VARS=(OMPI_COMM_WORLD_RANK HOROVOD_RANK PMI_RANK PMIX_RANK)

say() { printf 'entrypoint: %s\n' "$*" >&2; }
die() {
  printf 'entrypoint: error: %s\n' "$*" >&2
  exit 2
}

usage() {
  cat <<EOF
usage: docker run [--gpus all] --shm-size=8g -v MODEL_DIR:/model_def -v OUT_DIR:/output IMAGE [HARNESS_ARGS]
       docker run ... IMAGE COMMAND [ARGS]      run a command instead (bash, harness, python, horovodrun ...)
       docker run ... IMAGE sshd [SSHD_ARGS]    be a worker of a multi-node job (sshd on port 2222)
       docker run ... IMAGE mpirun [ARGS]       be the launcher of a multi-node job (Kubeflow MPIJob)

Trains the model definition in $MODEL_DEF, writing metrics and config to $OUTPUT:
  harness $MODEL_DEF --output $OUTPUT [HARNESS_ARGS]
HARNESS_ARGS go to harness (options below); a first one that is a directory replaces $MODEL_DEF.

How many processes:
  - GPUs visible (docker run --gpus ...): one rank per GPU (CUDA_VISIBLE_DEVICES, if set, else nvidia-smi)
      horovodrun -np <gpus> -H localhost:<gpus> harness $MODEL_DEF --output $OUTPUT ...
  - no GPU: HARNESS_NP processes on CPU (default 1; one process runs without a launcher).
  - already one rank of a launcher (${LAUNCHER_VARS[*]} set: horovodrun or mpirun
    started this container's entrypoint, e.g. a Kubeflow MPIJob; or RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT: torchrun or a Kubeflow PyTorchJob): exec harness with the arguments above.
  - HARNESS_BACKEND=torch: the ranks run under torchrun on torch.distributed instead of Horovod:
      python -m torch.distributed.run --standalone --nproc-per-node <np> --no-python harness $MODEL_DEF ...

Environment:
  HARNESS_NP         number of processes (default: the visible GPUs, else 1)
  HARNESS_HOSTS      hosts for a multi-node job, horovodrun's -H (e.g. node1:4,node2:4); each one runs
                     this image as 'sshd' (--network=host); -np defaults to the sum of the slots
  HARNESS_LAUNCHER   gloo or mpi: horovodrun --gloo / --mpi (default: horovodrun's choice, MPI)
  HARNESS_BACKEND    horovod (default) or torch: torchrun on this machine (not with HARNESS_HOSTS or
                     HARNESS_LAUNCHER); OMP_NUM_THREADS defaults to the usable cores / np
  HOROVODRUN_ARGS    more horovodrun options, e.g. "--network-interface eth0 --verbose"
  HARNESS_SSH_PORT   the workers' ssh port (default 2222)
  HARNESS_MODEL_DEF, HARNESS_OUTPUT   other defaults than /model_def and /output
  HARNESS_STOP_SECONDS   sshd and mpirun modes: how long to wait for the ranks' checkpoint after SIGTERM
                     (default 25: below Kubernetes' default grace period of 30 s)
  HARNESS_SSHD_HOST_KEY  sshd mode: the host key (default \$HOME/.ssh/id_rsa, the MPI Operator's layout)

Signals: SIGTERM, SIGINT and SIGUSR1 are passed on to the ranks (docker stop -t SECONDS gives them time);
the exit status is the job's (0 success, 2 bad input, 1 other failures; 128+N when killed by signal N).
sshd mode: SIGTERM goes to the ranks on this machine; it waits for them (their checkpoint), stops sshd and
exits 0. mpirun mode: SIGTERM becomes SIGUSR1 to mpirun (passed on to every rank; a second signal or
HARNESS_STOP_SECONDS later: SIGTERM); it exits 143 when the ranks stopped before the end of training.
EOF
  if command -v harness >/dev/null; then
    printf '\nharness options:\n'
    harness --help | sed -n '/^options:/,/^$/p' | tail -n +2
  fi
}

count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids
    IFS=',' read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    # An empty value or -1 hides every GPU, as in CUDA itself.
    if [ "${#ids[@]}" -eq 0 ] || [ "${ids[0]}" = "-1" ]; then echo 0; else echo "${#ids[@]}"; fi
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# The cores this container may use (its CPU affinity, capped by a cgroup v2 CPU limit, rounded up) divided
# among N ranks, at least 1: harness.distributed.available_cores() without starting Python.
threads_per_rank() {
  local cores quota period
  cores="$(nproc 2>/dev/null || echo 1)"
  if read -r quota period 2>/dev/null </sys/fs/cgroup/cpu.max && [ "$quota" != max ] && [ "${period:-0}" -gt 0 ]; then
    quota=$(((quota + period - 1) / period))
    [ "$quota" -ge "$cores" ] || cores="$quota"
  fi
  echo $((cores / $1 > 0 ? cores / $1 : 1))
}

# The topmost processes under a pid that run the harness (the job's ranks: not their DataLoader workers, not
# the launcher's shells, which would take the job down with them). `python -c "$RANKS_PY" forward PID SIG`
# signals them, or PID itself if there are none yet; `... stop PID SIG SECONDS` signals them and waits,
# at most SECONDS, until they have exited and then until PID has no child left (the launcher's ssh session,
# whose orted tells mpirun that the ranks have ended: gone sooner, mpirun would abort the other pods' ranks).
RANKS_PY='
import os, signal, sys, time
import psutil

mode, root, sig = sys.argv[1], psutil.Process(int(sys.argv[2])), getattr(signal, "SIG" + sys.argv[3])
ranks = []

def visit(p):
    try:
        if any(os.path.basename(arg) == "harness" for arg in p.cmdline()[:2]):
            ranks.append(p)
        else:
            for c in p.children():
                visit(c)
    except psutil.Error:
        pass

def send(procs):
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass

def running(procs):
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive

def say(line):
    print("entrypoint: " + line, file=sys.stderr, flush=True)

visit(root)
if mode == "forward":
    send(ranks or [root])
    sys.exit(0)
limit, start = float(sys.argv[4]), time.monotonic()
name = "SIG" + sys.argv[3]
if not ranks:
    say(f"{name}: no harness rank on this pod; stopping sshd")
    sys.exit(0)
send(ranks)
say(
    f"{name}: passed on to the {len(ranks)} harness rank(s) on this pod (pids "
    + " ".join(str(p.pid) for p in ranks)
    + f"), which checkpoint at a batch agreed with the other pods; waiting up to {limit:g} s for them"
)
while running(ranks) and time.monotonic() - start < limit:
    time.sleep(0.1)
left, took = running(ranks), time.monotonic() - start
if left:
    say(
        f"the checkpoint did not finish in {limit:g} s (HARNESS_STOP_SECONDS): the previous checkpoint is "
        f"kept; {len(left)} rank(s) still running end with the pod"
    )
    sys.exit(1)
while running(root.children()) and time.monotonic() - start < limit:
    time.sleep(0.1)
ended = "ended" if not running(root.children()) else f"still open after {limit:g} s"
say(
    f"the {len(ranks)} rank(s) on this pod ended {took:.1f} s after {name}; the launcher session "
    f"{ended} ({time.monotonic() - start:.1f} s); stopping sshd"
)
'

# shellcheck disable=SC2329  # invoked by the traps below
# Signals the job's ranks (see RANKS_PY), or the job's first process if none yet.
forward_signal() {
  local sig="$1"
  signalled=1
  [ -n "${child:-}" ] || return 0
  say "SIG$sig: passing it on to the job"
  "$HARNESS_VENV/bin/python" -c "$RANKS_PY" forward "$child" "$sig" || kill -s "$sig" "$child" 2>/dev/null || true
}

# Runs the job in the background so that this script (PID 1 in a container, where signals without a
# handler are ignored) can pass signals on; exits with the job's status.
run_job() {
  say "running: $*"
  child=""
  local sig
  for sig in TERM INT USR1; do
    # shellcheck disable=SC2064  # expand $sig now
    trap "forward_signal $sig" "$sig"
  done
  "$@" &
  child=$!
  local status
  while :; do
    signalled=0
    if wait "$child"; then status=0; else status=$?; fi
    # A signal's trap interrupts wait (status 128+N): wait again for the job's own status.
    [ "$signalled" = 1 ] || break
  done
  exit "$status"
}

# `entrypoint.sh sshd`: a worker of a multi-node job (a pod of an MPIJob). This script stays PID 1 with sshd
# as its child: pod deletion (preemption, a drain) sends SIGTERM to PID 1 only, and sshd as PID 1 would exit
# and take the ranks down with it, without a checkpoint. Here SIGTERM goes to the harness ranks on this pod,
# which checkpoint at a batch agreed with the other pods and exit; then sshd stops and the pod exits 0.
serve_sshd() {
  local key="${HARNESS_SSHD_HOST_KEY:-$HOME/.ssh/id_rsa}" # default: the layout the MPI Operator mounts
  [ -r "$key" ] || die "sshd needs its host key $key (readable by uid $(id -u)) and, beside it," \
    "authorized_keys: the MPI Operator's Secret mounted at $HOME/.ssh, or HARNESS_SSHD_HOST_KEY"
  stop=""
  trap 'stop=TERM' TERM
  trap 'stop=INT' INT
  /usr/sbin/sshd -D -e -f "$SSHD_CONFIG" -h "$key" "$@" &
  child=$!
  local status
  if wait "$child"; then status=0; else status=$?; fi
  [ -n "$stop" ] || exit "$status" # sshd ended on its own
  trap '' TERM INT                 # kubelet sends one SIGTERM; more would only interrupt the wait below
  status=0
  "$HARNESS_VENV/bin/python" -c "$RANKS_PY" stop "$child" "$stop" "$STOP_SECONDS" || status=$?
  kill -TERM "$child" 2>/dev/null || true
  wait "$child" || true
  exit "$status"
}

# `entrypoint.sh mpirun ARGS`: the launcher of an MPIJob. A first SIGTERM (or SIGINT, SIGUSR1) becomes
# SIGUSR1 to mpirun, which passes it on to every rank without killing any (SIGTERM to mpirun kills them
# after odls_base_sigkill_timeout): the ranks agree on a batch, checkpoint and exit, and mpirun with them.
# A second signal, or HARNESS_STOP_SECONDS without an end, is SIGTERM to mpirun (its own stop).
# Exit status: mpirun's; 143 when it ended 0 but the ranks stopped before the end of training (a pod
# was deleted: rank 0 said `stopped by ...`), so that the MPIJob is not marked Succeeded.
run_mpirun() {
  local fifo scan status timer=""
  fifo="$(mktemp -u)" && mkfifo "$fifo" && scan="$(mktemp)" || die "cannot make a fifo in ${TMPDIR:-/tmp}"
  asked=""
  for sig in TERM INT USR1; do
    # shellcheck disable=SC2064  # expand $sig now
    trap "stop_mpirun $sig" "$sig"
  done
  trap 'stop_mpirun ALRM' ALRM
  # mpirun's stdout (the ranks' lines) passes through unchanged; rank 0's stop line is noted on the way.
  {
    trap '' TERM INT USR1 # it ends with mpirun's output (a terminal's Ctrl-C reaches the whole group)
    while IFS= read -r line || [ -n "$line" ]; do
      printf '%s\n' "$line"
      case "$line" in *"stopped by "*" at batch "*"; checkpoint: "* | *"stopped by "*" during download_data()"*)
        printf '%s\n' "${line#*stopped by }" >>"$scan" ;;
      esac
    done <"$fifo"
  } &
  local filter=$!
  say "running: $*"
  "$@" >"$fifo" &
  child=$!
  while :; do
    signalled=0
    if wait "$child"; then status=0; else status=$?; fi
    [ "$signalled" = 1 ] || break
    if [ "$asked" = 1 ] && [ -z "$timer" ]; then
      # The deadline: a subshell that waits in a builtin (no sleep process left behind when it is killed).
      {
        read -rt "$STOP_SECONDS" <> <(:) || true
        kill -s ALRM $$
      } &
      timer=$!
    fi
  done
  [ -z "$timer" ] || kill "$timer" 2>/dev/null || true
  # The filter ends once mpirun's output is read, unless a process left behind still holds it open.
  local tries=50
  while kill -0 "$filter" 2>/dev/null && [ $((tries -= 1)) -gt 0 ]; do sleep 0.1; done
  kill -KILL "$filter" 2>/dev/null || true
  rm -f "$fifo"
  if [ "$status" = 0 ] && [ -s "$scan" ]; then
    say "mpirun ended 0, but the ranks stopped before the end of training (stopped by $(tail -n 1 "$scan")): exit 143"
    status=143
  fi
  rm -f "$scan"
  exit "$status"
}

# shellcheck disable=SC2329  # invoked by the traps in run_mpirun
stop_mpirun() {
  signalled=1
  if [ "$1" = ALRM ]; then
    say "the checkpoint did not finish in $STOP_SECONDS s (HARNESS_STOP_SECONDS): SIGTERM to mpirun (it ends the ranks)"
    kill -TERM "$child" 2>/dev/null || true
  elif [ -z "$asked" ]; then
    asked=1
    say "SIG$1: SIGUSR1 to mpirun, which passes it on to every rank: they checkpoint at a batch they agree on" \
      "and exit; waiting up to $STOP_SECONDS s"
    kill -USR1 "$child" 2>/dev/null || true
  else
    say "SIG$1 again: SIGTERM to mpirun (it ends the ranks)"
    kill -TERM "$child" 2>/dev/null || true
  fi
}

# --- what to run ---------------------------------------------------------------------------------
case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  sshd)
    shift
    serve_sshd "$@"
    ;;
  mpirun)
    run_mpirun "$@"
    ;;
esac
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ ! -e "$1" ] && command -v "$1" >/dev/null; then
  exec "$@" # a command (bash, harness summary ..., horovodrun ...)
fi

# A HOME and a user name for an arbitrary --user (ssh, Open MPI and torch want them).
if [ ! -w "${HOME:-/nonexistent}" ]; then
  export HOME=/tmp/harness-home
  mkdir -p "$HOME"
fi
export USER="${USER:-$(id -un 2>/dev/null || echo harness)}"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

model="$MODEL_DEF"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  model="$1"
  shift
fi
args=("$model" --output "$OUTPUT" "$@")
if [ "$model" = "$MODEL_DEF" ] && [ -d "$model" ] && [ -z "$(ls -A "$model")" ]; then
  die "nothing in $model: mount your model definition there (docker run -v \$PWD/my_model:$MODEL_DEF ...)"
fi
if [ -d "$OUTPUT" ] && [ ! -w "$OUTPUT" ]; then
  die "$OUTPUT is not writable by uid $(id -u): make the mounted folder writable for it," \
    "or run with --user \$(id -u):\$(id -g)"
fi

for v in "${LAUNCHER_VARS[@]}"; do
  if [ -n "${!v:-}" ]; then
    say "inside a launcher ($v=${!v}): exec harness ${args[*]}"
    exec harness "${args[@]}"
  fi
done

if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ] && [ -n "${MASTER_ADDR:-}" ] && [ -n "${MASTER_PORT:-}" ]; then
  say "inside a launcher (RANK=$RANK of WORLD_SIZE=$WORLD_SIZE: torchrun or a PyTorchJob): exec harness ${args[*]}"
  exec harness "${args[@]}"
fi

backend="${HARNESS_BACKEND:-horovod}"
case "$backend" in
  horovod | torch) ;;
  *) die "HARNESS_BACKEND=$backend: use horovod or torch" ;;
esac

gpus="$(count_gpus)"
if [ -n "${HARNESS_NP:-}" ]; then
  np="$HARNESS_NP"
elif [ -n "${HARNESS_HOSTS:-}" ]; then
  np=0
  IFS=',' read -ra host_list <<<"$HARNESS_HOSTS"
  for h in "${host_list[@]}"; do
    slots="${h##*:}"
    [ "$slots" != "$h" ] || slots=1
    np=$((np + slots))
  done
elif [ "$gpus" -gt 0 ]; then
  np="$gpus"
else
  np=1
fi
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "HARNESS_NP=$np: a positive number of processes, please"
if [ "$gpus" -gt 0 ]; then device="$gpus GPU(s)"; else device="CPU"; fi

if [ "$np" = 1 ] && [ -z "${HARNESS_HOSTS:-}" ]; then
  say "1 process on $device"
  run_job harness "${args[@]}"
fi

if [ "$backend" = torch ]; then
  [ -z "${HARNESS_HOSTS:-}" ] || die "HARNESS_HOSTS is horovodrun's; with HARNESS_BACKEND=torch on several" \
    "machines use a PyTorchJob or harness launch --backend torch -H (docs/docker-and-kubernetes.md)"
  [ -z "${HARNESS_LAUNCHER:-}" ] || die "HARNESS_LAUNCHER=$HARNESS_LAUNCHER is horovodrun's; HARNESS_BACKEND=torch runs torchrun"
  # torchrun gives each rank 1 thread when it starts several; the harness's split instead (as harness launch).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(threads_per_rank "$np")}"
  say "$np processes on $device (torchrun, $OMP_NUM_THREADS thread(s) each)"
  run_job "$HARNESS_VENV/bin/python" -m torch.distributed.run --standalone --nproc-per-node "$np" \
    --no-python "$HARNESS_VENV/bin/harness" "${args[@]}"
fi

launcher=()
case "${HARNESS_LAUNCHER:-}" in
  "") ;;
  gloo | mpi) launcher=("--$HARNESS_LAUNCHER") ;;
  *) die "HARNESS_LAUNCHER=$HARNESS_LAUNCHER: use gloo or mpi" ;;
esac
read -ra extra <<<"${HOROVODRUN_ARGS:-}"
hosts="${HARNESS_HOSTS:-localhost:$np}"
[ -z "${HARNESS_HOSTS:-}" ] || extra+=(-p "${HARNESS_SSH_PORT:-2222}")
say "$np processes on $device${HARNESS_HOSTS:+ (hosts $HARNESS_HOSTS)}"
run_job horovodrun -np "$np" -H "$hosts" "${launcher[@]}" "${extra[@]}" \
  "$HARNESS_VENV/bin/harness" "${args[@]}"
