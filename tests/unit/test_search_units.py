"""`harness search`'s storage URLs and its hold on trial processes, in one process (issue 26)."""

import fcntl
import os
import threading
import time

import pytest

from harness.errors import HarnessError
from harness.search import child
from harness.search.study import StorageUnreachable, safe_url, storage_error, storage_url


def test_the_default_storage_is_sqlite_in_the_output(tmp_path):
    assert storage_url(None, str(tmp_path / "out")) == f"sqlite:///{tmp_path}/out/search.db"


def test_a_relative_sqlite_path_is_made_absolute_for_the_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_url("sqlite:///s.db?timeout=5", "out") == f"sqlite:///{tmp_path}/s.db?timeout=5"
    assert storage_url("postgres://u@h/db", "out") == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite:///:memory:", "--storage sqlite:///:memory: is an in-memory database, which the trials"),
        ("sqlite://", "--storage sqlite:// is an in-memory database"),
        ("sqlite:///file:x?mode=memory&uri=true", "is an in-memory database"),
        (
            "foo://x",
            "--storage foo://x: unknown kind of database foo://; use sqlite:///PATH or postgresql://",
        ),
        ("search.db", "--storage search.db: unknown kind of database (no scheme://)"),
        (
            "sqlite:////no/such/dir/s.db",
            "--storage sqlite:////no/such/dir/s.db: directory /no/such/dir does not",
        ),
        ("postgresql://u:secret@h:port/db", "--storage postgresql://u:***@h:port/db: ValueError: "),
    ],
)
def test_storage_urls_that_cannot_work_are_refused_in_one_line(url, message):
    with pytest.raises(HarnessError) as e:
        storage_url(url, "out")
    assert message in str(e.value) and "\n" not in str(e.value) and "secret" not in str(e.value)


def test_a_sqlite_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(HarnessError, match="is a directory, not a database file"):
        storage_url(f"sqlite:///{tmp_path}", "out")


def test_the_password_is_hidden():
    assert safe_url("postgresql+psycopg://me:s3cr:et@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert safe_url("postgresql://me@db/x") == "postgresql://me@db/x"


def test_an_unreachable_server_is_status_1_other_errors_2():
    url = "postgresql+psycopg://me:pw@db:1/x"
    refused = storage_error(url, OSError('connection to server at "db", port 1 failed: Connection refused\n'))
    assert isinstance(refused, StorageUnreachable) and refused.exit_code == 1
    assert str(refused).startswith("search storage postgresql+psycopg://me:***@db:1/x: cannot connect: ")
    assert "\n" not in str(refused)
    denied = storage_error(url, OSError('FATAL:  password authentication failed for user "me"'))
    assert type(denied) is HarnessError and denied.exit_code == 2 and "password authentication" in str(denied)


def _hold(folder):
    """Hold the folder's run lock as a running trial's `harness launch` does (its pid in the file)."""
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b'{"pid": 4242, "host": "here"}', 0)
    return fd


def test_a_resumed_trial_waits_for_its_previous_run_to_let_go(tmp_path):
    assert child.holder(str(tmp_path)) is None  # no lock file yet
    fd = _hold(tmp_path)
    assert child.holder(str(tmp_path)) == "pid 4242 on here"
    said = []
    threading.Timer(0.5, os.close, [fd]).start()  # the previous run ends
    begin = time.monotonic()
    assert child.wait_until_free(str(tmp_path), 30, said.append) is None
    assert said == ["pid 4242 on here"] and time.monotonic() - begin < 10


def test_a_previous_run_that_does_not_let_go_is_named(tmp_path):
    fd = _hold(tmp_path)
    try:
        assert child.wait_until_free(str(tmp_path), 0.3, lambda who: None) == "pid 4242 on here"
    finally:
        os.close(fd)


class _Proc:
    """A trial process that ends when told."""

    def __init__(self):
        self.ended = threading.Event()

    def poll(self):
        return 0 if self.ended.is_set() else None


def test_the_search_follows_the_trial_console_log_to_its_end(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"[validation] batch 3  epoch 0.2  accuracy 0.1 (an earlier run's)\n")
    offset = log.stat().st_size
    proc = _Proc()

    def trial():
        with open(log, "ab") as f:
            for text in (b"[1,0]<stdout>:[validation] batch 6  epoch 0.4  accuracy 0.5  loss 1.2\n", b"har"):
                f.write(text)
                f.flush()
                time.sleep(0.3)
            f.write(b"ness: error: ValueError: boom")  # its last line, without a newline
        proc.ended.set()

    threading.Thread(target=trial).start()
    said = []
    assert child.follow(proc, str(log), offset, said.append) == "ValueError: boom"
    assert said == ["validation at batch 6: accuracy 0.5 loss 1.2"]
