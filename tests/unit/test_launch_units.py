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

    def run(job, command):
        seen.update(job.env)
        return 0, {}

    monkeypatch.setattr(launcher._Job, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the test process keeps its own handlers
    args = argparse.Namespace(launcher="mpi", ssh_port=None, network_interface=None)
    source = hosts.HostSource(2, None, None, None)
    assert launcher._attempts(args, ["m"], source, str(tmp_path / "state"), "1@h", 0) == 0
    assert seen["OMPI_MCA_mpi_yield_when_idle"] == (own or "1")
