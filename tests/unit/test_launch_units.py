"""`harness launch` in one process: the launch-side copy of a piped config, failure markers, the lock."""

import os
import threading

import pytest

from harness.config import find_config_file, yaml12
from harness.errors import HarnessError
from harness.launch import launcher


def test_launch_config_copy_has_the_ranks_limit(tmp_path):
    """`--config /dev/zero` is refused after MAX_BYTES + 1 bytes, with the ranks' message."""
    with pytest.raises(HarnessError) as e:
        launcher._config_for_ranks(["m", "--config", "/dev/zero"], "/dev/zero", str(tmp_path))
    assert str(e.value) == yaml12._too_big("/dev/zero", None)
    assert not (tmp_path / "launch-config.yaml").exists()


def test_launch_config_copy_of_a_pipe(tmp_path):
    read, write = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write, b"name: piped\n"), os.close(write)))
    writer.start()
    try:
        path = f"/dev/fd/{read}"
        args = launcher._config_for_ranks(["m", "--config", path], path, str(tmp_path))
    finally:
        writer.join()
        os.close(read)
    copy = str(tmp_path / "launch-config.yaml")
    assert args == ["m", "--config", copy]
    assert open(copy).read() == "name: piped\n"


def test_config_that_is_a_directory_says_so(tmp_path):
    assert launcher._config_for_ranks(["m", "--config", str(tmp_path)], str(tmp_path), "o") == [
        "m",
        "--config",
        str(tmp_path),
    ]
    with pytest.raises(HarnessError) as e:
        find_config_file(str(tmp_path), str(tmp_path))
    assert str(e.value) == f"config file {tmp_path} is a directory, not a YAML file"


def test_failure_marker_round_trip(tmp_path, monkeypatch, capsys):
    """Under harness launch (HOLDER_ENV set) a rank's failure record is also one stderr line, read back from
    the launcher's tagged output and merged with the records on disk (all there is on a full disk)."""
    from harness.output import jobstate
    from harness.output.lock import HOLDER_ENV

    record = jobstate.record_failure(None, "no space left on device writing /x", 2, 1, False)
    jobstate.announce_failure(record)
    assert capsys.readouterr().err == ""  # plain launchers: nothing
    monkeypatch.setenv(HOLDER_ENV, "1@host")
    jobstate.announce_failure(record)
    line = capsys.readouterr().err
    assert line.startswith(jobstate.MARKER) and line.endswith("\n")
    assert jobstate.parse_marker("[1,1]<stderr>:" + line) == record
    assert jobstate.parse_marker("[1,1]<stderr>:harness: error: x") is None
    assert jobstate.parse_marker(jobstate.MARKER + "{not json") is None
    state = jobstate.state_dir(str(tmp_path))
    jobstate.record_failure(str(tmp_path), "HorovodInternalError", 1, 0, True)
    found = jobstate.failures(state, {1: record})
    assert [(f["rank"], f["exit_code"]) for f in found] == [(1, 2), (0, 1)]  # its own error first


def test_release_held_frees_the_lock_unclaimed(tmp_path):
    from harness.output.lock import OutputLock, release_held

    first = OutputLock(str(tmp_path))
    assert first.acquire() is None
    release_held()
    assert (tmp_path / ".lock").read_text() == ""
    second = OutputLock(str(tmp_path))
    assert second.acquire() is None  # no "took over the lock ... which no longer runs"
    second.release()
    release_held()  # nothing held: nothing to do


def test_ssh_report_and_traceback_are_left_out():
    from harness.launch.output import _SSH_FAILED, _LauncherNoise

    assert _SSH_FAILED.match("ssh not successful for host nosuchhost.invalid:\n").group("host") == (
        "nosuchhost.invalid"
    )
    quiet = _LauncherNoise()
    traceback = [
        "Traceback (most recent call last):\n",
        '  File "/x/horovodrun", line 8, in <module>\n',
        "    sys.exit(run_commandline())\n",
        "RuntimeError: could not connect to some hosts via ssh\n",
    ]
    assert [kept for line in traceback for kept in quiet.filter(line, False)] == []
    assert quiet.filter("a line of the user's\n", False) == ["a line of the user's\n"]


@pytest.mark.parametrize("own", [None, "0"])
def test_open_mpi_ranks_yield_unless_the_user_chose(own, tmp_path, monkeypatch):
    """harness launch sets OMPI_MCA_mpi_yield_when_idle=1 for the launcher (busy-polling ranks starved the
    working ones on a busy machine); the user's own setting wins."""
    import argparse
    import signal

    from harness.launch import hosts

    if own is None:
        monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    else:
        monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", own)
    seen = {}

    def run(job, command, shown=None):
        seen.update(job.env)
        return 0, {}

    monkeypatch.setattr(launcher._Job, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the test process keeps its own handlers
    args = argparse.Namespace(
        launcher="mpi", ssh_port=None, network_interface=None, backend="horovod", elastic=None
    )
    source = hosts.HostSource(2, None, None, None)
    assert launcher._attempts(args, ["m"], source, str(tmp_path / "state"), "1@h", 0) == 0
    assert seen["OMPI_MCA_mpi_yield_when_idle"] == (own or "1")


# --- --backend torch (torchrun) ------------------------------------------------------------------------

# torchrun's own report of a failed rank, as torch 2.13 prints it on stderr (rank 1 exited 1; rank 0 was
# ended by torchrun itself).
TORCHRUN_FAILURE = """\
harness: error: [rank 1] ValueError: boom (at model_def.py:21 in losses)
W1203 14:35:46.452000 20930 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 20951 \
closing signal SIGTERM
E1203 14:35:46.456000 20930 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) \
local_rank: 1 (pid: 20952) of binary: /x/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n\
============================================================
harness FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_14:35:46
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 20951)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 20951
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_14:35:46
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 20952)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
a line of the user's after it
"""


def test_torchrun_failure_report_is_left_out_and_read(monkeypatch, capsys):
    """torchrun's traceback, its box and its log lines about the failure are left out of the console (the
    harness's own line stays); the box's ranks and exit codes are read as each rank's end."""
    import io
    import types

    from harness.launch.output import Output

    proc = types.SimpleNamespace(stdout=io.BytesIO(b""), stderr=io.BytesIO(TORCHRUN_FAILURE.encode()))
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(buffer=io.BytesIO(), flush=lambda: None))
    import sys

    out = Output(proc)  # type: ignore[arg-type]
    out.join()
    shown = sys.stderr.buffer.getvalue().decode()
    assert shown == (
        "harness: error: [rank 1] ValueError: boom (at model_def.py:21 in losses)\n"
        "a line of the user's after it\n"
    )
    assert out.exits == {0: "was killed by SIGTERM", 1: "was killed by SIGKILL"}
    assert out.failed


def _placement(np, hosts_spec=None):
    from harness.launch import hosts

    return hosts.Placement(np, hosts_spec)


def test_torch_one_machine_is_torchrun_standalone(tmp_path):
    import sys

    from harness.launch import torchrun

    plan = torchrun.plan(_placement(2), ["m", "--output", "o"], False, {}, None, None, None, 0, "j")
    assert plan.command == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "harness", "m", "--output", "o",
    ]  # fmt: skip
    assert plan.join is None
    script = torchrun.plan(_placement(2), ["python", "train.py"], True, {}, None, None, None, 0, "j")
    assert script.command[-4:] == ["2", "--no-python", "python", "train.py"]


def test_torch_several_machines_one_agent_each_by_ssh(monkeypatch):
    """Another machine's agent is an ssh command with horovodrun's ssh options and port, in this directory,
    with the environment its ranks need, watched so that it ends with the connection."""
    import json
    import os
    import shlex

    from harness.launch import torchrun

    monkeypatch.setattr(torchrun, "is_this_machine", lambda host: host == "a")
    env = {"PATH": "/v/bin", "HARNESS_OUTPUT_LOCK_HOLDER": "7@a", "OMP_NUM_THREADS": "4", "SECRET": "x"}
    env[torchrun.BACKEND_ENV] = "torch"
    plan = torchrun.plan(_placement(4, "a:2,b:2"), ["m"], False, env, 2222, "eth0", None, 0, "j")
    assert plan.command[1:3] == ["-m", "harness.launch.agents"] and "--elastic" not in plan.command
    first, second = json.loads(plan.command[-1])
    assert "--node-rank=0" in first and "--nnodes=2" in first and "--master-addr=a" in first
    assert second[:6] == ["ssh", "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no", "-p"]
    assert second[6:8] == ["2222", "b"]
    remote = shlex.split(second[8])
    assert remote[:3] == ["cd", os.getcwd(), "&&"]
    assert "HARNESS_OUTPUT_LOCK_HOLDER=7@a" in remote and "OMP_NUM_THREADS=4" in remote
    assert "HARNESS_BACKEND=torch" in remote and "GLOO_SOCKET_IFNAME=eth0" in remote
    assert not any(a.startswith("SECRET") for a in remote)
    agent = json.loads(remote[remote.index("--watch-stdin") + 1])[0]
    assert "--node-rank=1" in agent and "--master-addr=a" in agent


def test_torch_elastic_counts_machines():
    from harness.launch import torchrun

    assert torchrun.elastic_nodes(2, 8, 2) == torchrun.Elastic(1, 4, None)
    odd = torchrun.elastic_nodes(3, 7, 2)
    assert (odd.min_nodes, odd.max_nodes) == (2, 3)
    assert odd.note is not None and "2 to 3 machines (4 to 6 ranks)" in odd.note
    with pytest.raises(HarnessError, match="no number of machines fits"):
        torchrun.elastic_nodes(3, 3, 2)
    with pytest.raises(HarnessError, match="min-np <= max-np"):
        torchrun.elastic_nodes(4, 2, 1)


def test_torch_elastic_command_and_the_join_line(monkeypatch):
    import json
    import socket

    from harness.launch import torchrun

    monkeypatch.setattr(torchrun, "is_this_machine", lambda host: True)
    plan = torchrun.plan(_placement(2, "localhost:2"), ["m"], False, {}, None, None, (2, 6), 3, "job7")
    assert "--elastic" in plan.command
    (agent,) = json.loads(plan.command[-1])
    endpoint = next(a for a in agent if a.startswith("--rdzv-endpoint="))
    assert endpoint.startswith(f"--rdzv-endpoint={socket.gethostname()}:")  # reachable from elsewhere
    assert "--nnodes=1:3" in agent and "--rdzv-backend=c10d" in agent and "--max-restarts=3" in agent
    assert "--rdzv-id=job7" in agent
    assert f"--local-addr={socket.gethostname()}" in agent and "--rdzv-conf=is_host=1" in agent
    assert "--rdzv-conf=is_host=0" in plan.join and "--local-addr" not in plan.join  # the joiner's own
    assert plan.join is not None and endpoint in plan.join and "--nnodes=1:3" in plan.join
    # The rendezvous store of its own: with the shared one a machine's join hung both agents (torch 2.13).
    assert plan.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in plan.join


@pytest.mark.parametrize(
    "spec, np, message",
    [
        ("a:2,b:1", 3, "the same number of ranks on every machine"),
        ("a:2,b:2", 3, "a multiple of 2, at most 4"),
    ],
)
def test_torch_placements_torchrun_cannot_run(spec, np, message):
    from harness.launch import torchrun

    with pytest.raises(HarnessError, match=message):
        torchrun.plan(_placement(np, spec), ["m"], False, {}, None, None, None, 0, "j")


@pytest.mark.parametrize(
    "backend, launcher, np, low, high, message",
    [
        ("torch", "gloo", None, None, None, "--launcher gloo is horovodrun's"),
        ("horovod", None, None, 2, 4, "need --backend torch"),
        ("torch", None, None, 2, None, "give both --min-np and --max-np"),
        ("torch", None, 2, 2, 4, "-np with --min-np/--max-np"),
        ("tensorflow", None, None, None, None, "HARNESS_BACKEND='tensorflow'"),
        ("torch", None, None, 2, 4, "--fresh with --min-np/--max-np: torchrun restarts the ranks"),
    ],
)
def test_backend_options_refused_in_one_line(backend, launcher, np, low, high, message):
    from harness.launch import torchrun

    again = "--fresh" if "--fresh" in message else None
    with pytest.raises(HarnessError) as e:
        torchrun.check_options(backend, launcher, np, low, high, again)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_horovod_names_the_torch_backend(monkeypatch):
    import sys

    from harness.launch import torchrun

    torchrun.check_horovod(None)  # installed here
    monkeypatch.setitem(sys.modules, "horovod", None)  # `import horovod` fails
    with pytest.raises(HarnessError) as e:
        torchrun.check_horovod(None)
    assert "Horovod cannot be imported" in str(e.value) and "harness launch --backend torch" in str(e.value)


def test_torch_ranks_threads_unless_the_user_chose(monkeypatch):
    from harness.distributed import available_cores
    from harness.launch import torchrun

    assert torchrun.threads_for_ranks({"OMP_NUM_THREADS": "3"}, 2) == {"OMP_NUM_THREADS": "3"}
    assert torchrun.threads_for_ranks({}, 2) == {"OMP_NUM_THREADS": str(max(1, available_cores() // 2))}
    assert torchrun.threads_for_ranks({}, 10**6) == {"OMP_NUM_THREADS": "1"}


def test_torch_backend_attempt_sets_the_ranks_environment(tmp_path, monkeypatch):
    """--backend torch: torchrun, with HARNESS_BACKEND=torch and OMP_NUM_THREADS for its ranks."""
    import argparse
    import signal

    from harness.launch import hosts

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = {}

    def run(job, command, shown=None):
        seen.update(env=dict(job.env), command=command)
        return 0, {}

    monkeypatch.setattr(launcher._Job, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    args = argparse.Namespace(
        launcher=None, ssh_port=None, network_interface=None, backend="torch", elastic=None
    )
    source = hosts.HostSource(2, None, None, None)
    assert launcher._attempts(args, ["m"], source, str(tmp_path / "state"), "1@h", 0) == 0
    assert seen["env"]["HARNESS_BACKEND"] == "torch" and int(seen["env"]["OMP_NUM_THREADS"]) >= 1
    assert seen["command"][2:5] == ["torch.distributed.run", "--standalone", "--nproc-per-node"]


def test_a_restart_by_torchrun_resumes(monkeypatch):
    from harness.arguments import parse_args

    assert parse_args(["m", "--fresh"]).fresh
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = parse_args(["m", "--fresh", "--resume", "x"])
    assert not again.fresh and again.resume is None


def test_ssh_cannot_reach_is_one_host_and_why(monkeypatch):
    """ssh's own words for a machine harness launch --backend torch cannot reach: left out, noted for the
    one line of harness launch (`cannot reach host X (ssh: ...)`)."""
    import io
    import types

    from harness.launch.output import Output

    said = b"ssh: Could not resolve hostname nosuchhost.invalid: Name or service not known\n"
    said += b"ssh: connect to host 10.9.9.9 port 2222: Connection refused\n"
    proc = types.SimpleNamespace(stdout=io.BytesIO(b""), stderr=io.BytesIO(said))
    shown = io.BytesIO()
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(buffer=shown, flush=lambda: None))
    out = Output(proc)  # type: ignore[arg-type]
    out.join()
    assert shown.getvalue() == b""
    assert sorted(out.unreachable) == ["10.9.9.9", "nosuchhost.invalid"]
    assert out.unreachable["10.9.9.9"] == "ssh: connect to host 10.9.9.9 port 2222: Connection refused"


def test_search_passes_the_backend_to_each_trials_launch(tmp_path):
    import types

    from harness.search import command

    args = command.parse(
        ["m", "--config", "c.yaml", "--output", str(tmp_path), "-np", "2", "--backend", "torch"]
    )
    trial = command.Search._command(types.SimpleNamespace(args=args), str(tmp_path / "1"))  # type: ignore[arg-type]
    assert trial[3:8] == ["launch", "-np", "2", "--backend", "torch"]
    with pytest.raises(HarnessError, match="--launcher gloo is horovodrun's"):
        command.parse(["m", "--config", "c.yaml", "--backend", "torch", "--launcher", "gloo"])
