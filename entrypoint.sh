#!/usr/bin/env bash
# The image's entrypoint: trains the model definition mounted at /model_def on one Horovod rank per visible
# GPU (HARNESS_NP processes on CPU), writing to /output. `entrypoint.sh --help` says it all.
set -euo pipefail

HARNESS_VENV="${HARNESS_VENV:-/opt/harness/venv}"
export PATH="$HARNESS_VENV/bin:$PATH" # also for shells started by ssh/mpirun, which skip the image's ENV
MODEL_DEF="${HARNESS_MODEL_DEF:-/model_def}"
OUTPUT="${HARNESS_OUTPUT:-/output}"
SSHD_CONFIG="${HARNESS_SSHD_CONFIG:-/etc/ssh/harness_sshd_config}"
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

Trains the model definition in $MODEL_DEF, writing metrics and config to $OUTPUT:
  harness $MODEL_DEF --output $OUTPUT [HARNESS_ARGS]
HARNESS_ARGS go to harness (options below); a first one that is a directory replaces $MODEL_DEF.

How many processes:
  - GPUs visible (docker run --gpus ...): one rank per GPU (CUDA_VISIBLE_DEVICES, if set, else nvidia-smi)
      horovodrun -np <gpus> -H localhost:<gpus> harness $MODEL_DEF --output $OUTPUT ...
  - no GPU: HARNESS_NP processes on CPU (default 1; one process runs without a launcher).
  - already one rank of a launcher (${LAUNCHER_VARS[*]} set: horovodrun or mpirun
    started this container's entrypoint, e.g. a Kubeflow MPIJob): exec harness with the arguments above.

Environment:
  HARNESS_NP         number of processes (default: the visible GPUs, else 1)
  HARNESS_HOSTS      hosts for a multi-node job, horovodrun's -H (e.g. node1:4,node2:4); each one runs
                     this image as 'sshd' (--network=host); -np defaults to the sum of the slots
  HARNESS_LAUNCHER   gloo or mpi: horovodrun --gloo / --mpi (default: horovodrun's choice, MPI)
  HOROVODRUN_ARGS    more horovodrun options, e.g. "--network-interface eth0 --verbose"
  HARNESS_SSH_PORT   the workers' ssh port (default 2222)
  HARNESS_MODEL_DEF, HARNESS_OUTPUT   other defaults than /model_def and /output

Signals: SIGTERM, SIGINT and SIGUSR1 are passed on to the ranks (docker stop -t SECONDS gives them time);
the exit status is the job's (0 success, 2 bad input, 1 other failures; 128+N when killed by signal N).
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

# shellcheck disable=SC2329  # invoked by the traps below
# The topmost processes of the job that run the harness (its ranks: not their DataLoader workers, not the
# launcher's shells, which would take the job down with them), or the job's first process if none yet.
forward_signal() {
  local sig="$1"
  signalled=1
  [ -n "${child:-}" ] || return 0
  say "SIG$sig: passing it on to the job"
  "$HARNESS_VENV/bin/python" - "$child" "$sig" <<'PY' || kill -s "$sig" "$child" 2>/dev/null || true
import os, signal, sys
import psutil

root, sig = psutil.Process(int(sys.argv[1])), getattr(signal, "SIG" + sys.argv[2])
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

visit(root)
for p in ranks or [root]:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass
PY
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

# --- what to run ---------------------------------------------------------------------------------
case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  sshd)
    shift
    key="$HOME/.ssh/id_rsa" # also the host key: the layout the MPI Operator mounts from its Secret
    [ -r "$key" ] || die "sshd needs in $HOME/.ssh: id_rsa (readable by uid $(id -u)), authorized_keys"
    exec /usr/sbin/sshd -D -e -f "$SSHD_CONFIG" -h "$key" "$@"
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
