"""The Optuna study of a search: its storage (SQLite in OUTPUT, or a PostgreSQL URL shared by several
machines), a lock under which one worker at a time claims the next trial, and who runs which trial."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import zlib
from typing import Any, Dict, Iterator, List, Literal, Optional

from harness.errors import HarnessError, describe

OWNER = "harness:owner"  # system attribute: "host:pid" of the search process running the trial
HPARAMS = "harness:hparams"  # user attribute: the trial's searched hyperparameters, as its config has them
ERROR = "harness:error"  # user attribute: a failed trial's one-line error
CONFIG = "harness:config"  # study user attribute: the search config (JSON), the same on every run
INTERRUPTED = "harness:interrupted"  # user attribute: when the search stopped it (SIGTERM); None once resumed
TIMING = "harness:timing"  # user attribute: launched / ended (epoch seconds), the study's bookkeeping time


def storage_url(storage: Optional[str], output: str) -> str:
    """The study's SQLAlchemy URL: SQLite in OUTPUT by default; `postgresql://` uses psycopg (3), the driver
    this project installs. A URL that cannot work is refused here, in one line (HarnessError)."""
    if not storage:
        return "sqlite:///" + os.path.abspath(os.path.join(output, "search.db"))
    given, scheme = storage, storage.split("://", 1)[0].lower() if "://" in storage else ""
    if scheme in ("postgresql", "postgres"):
        storage = "postgresql+psycopg://" + storage.split("://", 1)[1]
    elif scheme == "sqlite":
        return _sqlite_url(storage)
    elif not scheme.startswith("postgresql+"):
        raise HarnessError(
            f"--storage {safe_url(storage)}: unknown kind of database "
            f"{scheme + '://' if scheme else '(no scheme://)'}; use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    try:
        from sqlalchemy.engine import make_url

        make_url(storage)
    except Exception as e:  # noqa: BLE001 - a malformed URL (a port that is no number, say): one line
        raise HarnessError(f"--storage {safe_url(given)}: {describe(e)}") from None
    return storage


def _sqlite_url(storage: str) -> str:
    """An SQLite file's URL with an absolute path (the trials run it from their own processes)."""
    rest, _, query = storage.split("://", 1)[1].partition("?")
    path = rest[1:] if rest.startswith("/") else ""  # sqlite:///x.db is "x.db", sqlite:////x.db "/x.db"
    if path in ("", ":memory:") or "mode=memory" in query:
        raise HarnessError(
            f"--storage {storage} is an in-memory database, which the trials cannot share (they run in "
            "processes of their own); use a file (sqlite:///PATH; the default is OUT/search.db) or PostgreSQL"
        )
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise HarnessError(f"--storage {storage}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HarnessError(f"--storage {storage}: directory {folder} is not writable")
    if os.path.isdir(path):
        raise HarnessError(f"--storage {storage}: {path} is a directory, not a database file")
    return "sqlite:///" + path + (f"?{query}" if query else "")


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class StorageUnreachable(HarnessError):
    """The database server cannot be reached now: perhaps a transient state, so not exit status 2 (which
    means that running the same command again will not help)."""

    exit_code = 1


# In a driver's connection error: the server is down or out of reach (rather than refusing these settings).
_TRANSIENT = (
    "connection refused",
    "timeout expired",
    "timed out",
    "could not translate host name",
    "name or service not known",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
)


def storage_error(url: str, e: BaseException) -> HarnessError:
    """One line for a database that failed to open: the URL without its password, and the driver's reason
    (SQLAlchemy's own wrapping and its background link left out)."""
    reason = str(getattr(e, "orig", None) or e)
    lines = [line.strip() for line in reason.splitlines() if line.strip() and "sqlalche.me" not in line]
    reason = " ".join(lines)
    reason = re.sub(r"^\((\w+\.)*\w+\) ", "", reason)
    if any(mark in reason.lower() for mark in _TRANSIENT):
        return StorageUnreachable(
            f"search storage {safe_url(url)}: cannot connect: {reason} (if the server is only down for now, "
            "run the same command again when it is up)"
        )
    return HarnessError(f"search storage {safe_url(url)}: {reason or type(e).__name__}")


def _storage(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own lines
    if url.startswith("sqlite"):
        kwargs: Dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:  # a server out of reach fails in 10 s, rather than after the system's TCP timeout (minutes)
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: one line
        raise storage_error(url, e) from None


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Creating the tables and the study is not safe when two processes do it at once (SQLite: "table trials
    already exists", "UNIQUE constraint failed: alembic_version"): one at a time, under a file lock next to
    the SQLite file, or a PostgreSQL advisory lock."""
    if url.startswith("sqlite"):
        with _file_lock(url):
            yield
    else:
        with _advisory_lock(url, "harness-search:schema"):
            yield


@contextlib.contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """An flock on DB.lock beside the SQLite file DB: every process that uses the file shares it."""
    path = url.split("://", 1)[1][1:].partition("?")[0]
    try:
        f = open(path + ".lock", "a+")
    except OSError:  # a folder only readable (someone else's results): nothing is created or claimed there
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock, held on a connection of its own."""
    import sqlalchemy

    key = zlib.crc32(name.encode())
    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
    )
    try:
        try:
            conn = engine.connect()
        except Exception as e:  # noqa: BLE001 - the server out of reach, a bad password: one line
            raise storage_error(url, e) from None
        with conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def load(
    url: str,
    name: str,
    pruner: Any = None,
    sampler: Any = None,
    direction: Optional[Literal["minimize", "maximize"]] = None,
) -> Any:
    """The study `name` in `url` (created when `direction` is given and it does not exist)."""
    import optuna

    with _schema_lock(url):
        storage = _storage(url)
        if direction:
            return optuna.create_study(
                storage=storage,
                study_name=name,
                direction=direction,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def trial(study: Any, number: int) -> Any:
    """The Optuna trial object of trial `number`, to report to and suggest values in."""
    import optuna

    return optuna.trial.Trial(study, _trial_id(study, number))


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(owner: str) -> bool:
    """Whether the search process `owner` (host:pid) still runs; another host's processes count as alive."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return b"search" in f.read()
    except (OSError, ValueError):
        return False


def orphans(study: Any) -> List[Any]:
    """Running trials whose search process is gone (killed): the next worker on their host resumes them."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER)
        if owner is None or not alive(owner):
            out.append(t)
    return out


def _trial_id(study: Any, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def set_owner(study: Any, number: int) -> None:
    study._storage.set_trial_system_attr(_trial_id(study, number), OWNER, me())


def set_user_attr(study: Any, number: int, key: str, value: Any) -> None:
    """On a running trial, by number (Optuna refuses attributes on finished trials)."""
    study._storage.set_trial_user_attr(_trial_id(study, number), key, value)


@contextlib.contextmanager
def claim_lock(url: str, name: str) -> Iterator[None]:
    """One worker at a time claims a trial (between Optuna's ask and the owner's mark, another worker would
    take the new trial for an orphan): for SQLite the file lock beside its file, shared by the searches of
    any --output that use it; for a shared server a PostgreSQL advisory lock (every machine)."""
    if url.startswith("postgresql"):
        with _advisory_lock(url, f"harness-search:{name}"):
            yield
    else:
        with _file_lock(url):
            yield
