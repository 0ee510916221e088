"""Issue 26's findings on `harness search`: a killed search's trials stop with it and resume on the next
run; two workers create one new SQLite study at once; storage URLs that cannot work are one line."""

import os
import signal
import socket
import time

import runner
from conftest import GOOD_DATA, write_model_def
from test_search import SEARCH_MODEL, assert_ok, random_config, search, start_search, study_trials


def _processes_of(out):
    """The pids of processes whose command line names `out` (the search, its trials' launchers and ranks)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _wait_until_gone(out, seconds):
    deadline = time.monotonic() + seconds
    while _processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _processes_of(out)


def _newest_checkpoint(out):
    return max((int(p.parent.name) for p in out.glob("trials/0/checkpoints/*/state.json")), default=0)


def _wait_for_checkpoint_after(out, proc, batch, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _newest_checkpoint(out) > batch:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint after batch {batch} in time")


def _summary_row(out):
    summary = runner.run(runner.harness("summary", out), timeout=60)
    lines = summary.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    return lines[header], lines[header + 1], summary


def test_a_killed_search_stops_its_two_rank_trial_and_the_rerun_resumes_it(model_dir, tmp_path):
    """SIGKILL of the search alone: its trial (harness launch, horovodrun, 2 ranks) checkpoints and ends
    instead of training on as an orphan; `harness summary` says interrupted, not running; the same command
    resumes it from its checkpoint (not "failed: in use by another run"). Then SIGTERM: interrupted too."""
    begin = time.monotonic()
    config = random_config(1, pause=0.25, length=24)
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=config)
    out = tmp_path / "out"
    two_ranks = ("-np", "2", "--launcher", "gloo")
    proc = start_search(model_dir, out, *two_ranks)
    _wait_for_checkpoint_after(out, proc, 0)
    os.kill(proc.pid, signal.SIGKILL)  # the search only: not its trial's processes
    proc.wait(timeout=30)
    assert _wait_until_gone(out, 90) == []  # the trial and its ranks stopped by themselves
    console = (out / "trials" / "0" / "console.log").read_text()
    assert "stopped by SIGTERM at batch" in console and "harness launch: stopped by SIGTERM" in console
    header, row, _ = _summary_row(out)
    assert header.split()[:2] == ["trial", "state"] and "best accuracy  at batch  batches" in header
    assert row.split()[:2] == ["0", "interrupted"], row
    stopped_at = _newest_checkpoint(out)

    rerun = start_search(model_dir, out, *two_ranks)  # resumed; stopped again, by SIGTERM this time
    _wait_for_checkpoint_after(out, rerun, stopped_at)
    rerun.send_signal(signal.SIGTERM)
    stdout, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout
    assert "trial 0: resumed" in stdout and "failed" not in stdout
    assert [t.state.name for t in study_trials(out)] == ["RUNNING"]  # in the study: resumable
    _, row, summary = _summary_row(out)
    assert row.split()[:2] == ["0", "interrupted"], row
    assert "interrupted: trial(s) 0; the same harness search command resumes them" in summary.stdout

    last = search(model_dir, out, *two_ranks)
    assert_ok(last)
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE"]
    console = (out / "trials" / "0" / "console.log").read_text()
    assert console.count("resuming from") == 2, console[-3000:]
    assert time.monotonic() - begin < 240
    assert _processes_of(out) == []


def test_workers_create_one_new_sqlite_study_at_once(model_dir, tmp_path):
    """Three workers start on a new SQLite file at the same moment: the tables and the study are created
    once, and all end well (before: one died with 'table trials already exists' or 'UNIQUE constraint failed:
    alembic_version.version_num'). One trial of 3 batches: the first worker to claim it runs it, the others
    find nothing left to claim and end with the table (0: a trial is still running elsewhere)."""
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config(1, length=3))
    for attempt in range(2):  # (before the fix, it failed in the first)
        begin = time.monotonic()
        db = tmp_path / f"study{attempt}.db"
        outs = [tmp_path / f"w{attempt}-{i}" for i in range(3)]
        storage = ("--storage", f"sqlite:///{db}", "--study", "shared")
        workers = [start_search(model_dir, out, *storage) for out in outs]
        for proc in workers:
            stdout, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, stdout[-4000:]
            assert "harness search: random searcher, 1 trials" in stdout and "Traceback" not in stdout
        assert time.monotonic() - begin < 180
        trials = study_trials(outs[0])
        assert [t.state.name for t in trials] == ["COMPLETE"]
        assert all(_processes_of(out) == [] for out in outs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_storage_urls_that_cannot_work_are_one_line(model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config(1, length=3))
    unreachable = f"postgresql://harness:secret@127.0.0.1:{_free_port()}/db"
    cases = [
        ("sqlite:///:memory:", 2, "--storage sqlite:///:memory: is an in-memory database, which the trials "),
        ("mysql+nodriver://x/db", 2, "--storage mysql+nodriver://x/db: unknown kind of database"),
        (f"sqlite:///{tmp_path}/missing/s.db", 2, f"--storage sqlite:///{tmp_path}/missing/s.db: directory "),
        (unreachable, 1, "search storage postgresql+psycopg://harness:***@127.0.0.1:"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((f"sqlite:///{locked}/s.db", 2, f"directory {locked} is not writable"))
    for url, status, message in cases:
        out = tmp_path / "out"
        proc, seconds = runner.timed(
            runner.harness("search", model_dir, "--output", out, "--storage", url), timeout=120
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == status and len(lines) == 1, (url, proc.returncode, proc.stderr[-3000:])
        assert lines[0].startswith("harness: error: ") and message in lines[0], lines[0]
        assert "secret" not in proc.stderr + proc.stdout
        assert seconds < 60
        assert not (out / "trials").exists() and _processes_of(out) == []
    assert "cannot connect: " in lines[0] and "Connection refused" in lines[0]
