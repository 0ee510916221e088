"""Several machines, one process: host lists, the discovery script, which machine each rank is on, and how
harness launch names a lost machine."""

import json
import os
import stat

import pytest

from harness.errors import HarnessError
from harness.launch import hosts
from harness.launch import launcher as launch
from harness.output import jobstate
from harness.train import data as train_data


def test_host_lines_in_horovod_and_open_mpi_forms():
    text = "# cluster\na:4\nb slots=2\nc\n\n  d:1  # spare\n"
    assert hosts.parse(text, "f") == [("a", 4), ("b", 2), ("c", 1), ("d", 1)]
    assert hosts.parse_list("10.0.0.1:2,10.0.0.2:2") == [("10.0.0.1", 2), ("10.0.0.2", 2)]


@pytest.mark.parametrize("bad", ["a:x", "a b", "a slots=", "a:0"])
def test_a_bad_host_line_is_named(bad):
    with pytest.raises(HarnessError, match=rf"f, line 2: '{bad}'"):
        hosts.parse(f"ok:1\n{bad}\n", "f")


def test_np_defaults_to_every_slot_and_one_source_only(tmp_path):
    assert hosts.HostSource(None, None, None, None).placement() == hosts.Placement(1, None)
    assert hosts.HostSource(None, "a:2,b:2", None, None).placement() == hosts.Placement(4, "a:2,b:2")
    assert hosts.HostSource(2, "a:2,b:2", None, None).placement().np == 2
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=3\nb slots=3\n")
    assert hosts.HostSource(None, None, str(hostfile), None).placement() == hosts.Placement(6, "a:3,b:3")
    with pytest.raises(HarnessError, match="one of -H, --hostfile and --host-discovery-script"):
        hosts.HostSource(None, "a:1", str(hostfile), None)
    with pytest.raises(HarnessError, match="--hostfile .*nope: No such file"):
        hosts.HostSource(None, None, str(tmp_path / "nope"), None)


def script(tmp_path, body):
    path = tmp_path / "discover.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.integration  # starts the harness (or a script) as its own process
def test_discovery_is_asked_before_every_attempt_and_caps_np(tmp_path):
    live = tmp_path / "live"
    live.write_text("a:2\nb:2\n")
    source = hosts.HostSource(None, None, None, script(tmp_path, f"cat {live}"))
    assert source.placement().np == 4
    live.write_text("a:2\n")  # b is lost
    after = source.placement()
    assert (after.np, after.hosts) == (2, "a:2")
    capped = hosts.HostSource(3, None, None, script(tmp_path, f"cat {live}")).placement()
    assert capped.np == 2 and "2 ranks instead of -np 3" in capped.note


@pytest.mark.integration  # starts the harness (or a script) as its own process
def test_discovery_failures_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match="exited with status 3: inventory down"):
        hosts.HostSource(None, None, None, script(tmp_path, "echo inventory down >&2; exit 3")).placement()
    with pytest.raises(HarnessError, match="lists no live host"):
        hosts.HostSource(None, None, None, script(tmp_path, "exit 0")).placement()


def test_launcher_options_for_other_machines():
    two, one = hosts.Placement(4, "a:2,b:2"), hosts.Placement(2, "a:2")
    assert hosts.launcher_options("gloo", two, 2222, "eth0") == ["-p", "2222", "--network-interface", "eth0"]
    assert hosts.launcher_options("gloo", one, 2222, "eth0") == ["-p", "2222"]  # horovodrun refuses it there
    mpirun = hosts.launcher_options("mpirun", two, 2222, "eth0")
    assert mpirun[:3] == ["-mca", "plm_rsh_args", "-p 2222"] and "btl_tcp_if_include" in mpirun


# (local rank, local size, cross rank, hostname) of each rank
def test_machines_by_cross_rank_when_every_machine_runs_as_many_ranks():
    same_name = [(0, 2, 0, "node"), (1, 2, 0, "node"), (0, 2, 1, "node"), (1, 2, 1, "node")]
    assert train_data.machines(same_name) == [0, 0, 1, 1]
    round_robin = [(0, 2, 0, "node"), (0, 2, 1, "node"), (1, 2, 0, "node"), (1, 2, 1, "node")]
    assert train_data.machines(round_robin) == [0, 1, 0, 1]  # mpirun --map-by node


def test_machines_by_blocks_when_machines_differ_in_size():
    # b:1 before a:2 -- cross ranks would put rank 2 (a's local rank 1) with rank 0 (b)
    ranks = [(0, 1, 0, "node"), (0, 2, 1, "node"), (1, 2, 0, "node")]
    assert train_data.machines(ranks) == [0, 1, 1]


def test_machines_fall_back_to_hostnames_only_when_neither_fits():
    scattered = [(0, 2, 0, "a"), (0, 1, 1, "b"), (1, 2, 0, "a")]
    assert train_data.machines(scattered) == ["a", "b", "a"]


def register(state, rank, pid, host, pid_space):
    os.makedirs(os.path.join(state, "pids"), exist_ok=True)
    with open(os.path.join(state, "pids", f"rank{rank}"), "w") as f:
        json.dump({"pid": pid, "host": host, "pid_space": pid_space}, f)


def test_only_this_machines_ranks_are_signalled(tmp_path):
    jobstate.register_rank(str(tmp_path), 0)  # this process, in this machine's pid space
    state = jobstate.state_dir(str(tmp_path))
    register(state, 1, os.getpid(), "elsewhere", "another-boot/1")  # the same number on another machine
    assert sorted(jobstate.ranks(state)) == [0, 1]
    assert sorted(jobstate.ranks_here(state)) == [0]


def test_root_cause_names_the_lost_machine(tmp_path):
    state = str(tmp_path)
    for rank, host in enumerate(["hosta", "hosta", "hostb (10.0.0.2)", "hostb (10.0.0.2)"]):
        register(state, rank, 100 + rank, host, f"boot/{host}")
    broken = "HorovodInternalError: Horovod has been shut down. This was caused by"
    consequential = [{"rank": r, "message": broken, "consequential": True} for r in (0, 1)]
    cause = launch._root_cause(state, consequential, 1, {})
    assert cause.startswith("lost hostb (10.0.0.2): rank 2 (pid 102), rank 3 (pid 103) died without")
    assert cause.endswith("then: HorovodInternalError: Horovod has been shut down")
    # one rank of a machine killed, the other reporting: a rank, not a machine, is lost
    cause = launch._root_cause(
        state, consequential + [{"rank": 3, "message": "x", "consequential": True}], 1, {}
    )
    assert cause.startswith("rank 2 (pid 102) on hostb (10.0.0.2) died without an error of its own")
