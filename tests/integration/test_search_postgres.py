"""`harness search --storage postgresql://...`: two workers (two search processes, as on two machines) share
one study on a real PostgreSQL server that this test starts and stops itself."""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile

import optuna
import pytest
from conftest import GOOD_DATA, write_model_def
from test_search import SEARCH_MODEL, random_config, start_search

from harness.search.study import OWNER, storage_url


def _pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 for this test only; its files and process are removed afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (make setup installs Debian's postgresql package)")
    run_as, owner = [], None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="harness-pg-")
    os.chmod(base, 0o755)
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log, port = os.path.join(base, "data"), os.path.join(base, "server.log"), _free_port()
    try:
        made = subprocess.run(
            run_as + [initdb, "-D", data, "-A", "trust", "-U", "harness", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if made.returncode != 0:
            pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run(
            run_as + [pg_ctl, "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if started.returncode != 0:
            tail = open(log).read()[-300:] if os.path.exists(log) else started.stderr[-300:]
            pytest.skip(f"the PostgreSQL server did not start: {tail.strip()}")
        yield f"postgresql://harness@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            run_as + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
        pid_file = os.path.join(data, "postmaster.pid")
        if os.path.exists(pid_file):  # stop failed: end the server by its pid
            try:
                os.kill(int(open(pid_file).readline()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_one_study_and_run_each_trial_once(postgres, model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config(4, pause=0.3))
    outs = [tmp_path / "machine1", tmp_path / "machine2"]
    workers = [start_search(model_dir, out, "--storage", postgres, "--study", "shared") for out in outs]
    for proc in workers:
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-4000:]
        assert "study 'shared' in postgresql+psycopg://harness@127.0.0.1" in stdout
    storage = optuna.storages.RDBStorage(storage_url(postgres, ""))
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # max_trials in all, none twice
    assert all(t.state.name == "COMPLETE" for t in trials)
    ran = [set(os.listdir(out / "trials")) for out in outs]
    assert ran[0] and ran[1], ran  # both machines took trials
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {"0", "1", "2", "3"}
    owners = {t.number: t.system_attrs[OWNER] for t in trials}
    assert len({owners[int(n)] for n in ran[0]}) == 1 and len({owners[int(n)] for n in ran[1]}) == 1
    assert owners[int(min(ran[0]))] != owners[int(min(ran[1]))]
