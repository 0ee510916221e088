"""The Optuna study of a search: its storage (SQLite in OUTPUT, or a PostgreSQL URL shared by several
machines), a lock under which one worker at a time claims the next trial, and who runs which trial."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import zlib
from typing import Any, Iterator, List, Literal, Optional

from harness.errors import HarnessError

OWNER = "harness:owner"  # system attribute: "host:pid" of the search process running the trial
HPARAMS = "harness:hparams"  # user attribute: the trial's searched hyperparameters, as its config has them
ERROR = "harness:error"  # user attribute: a failed trial's one-line error
CONFIG = "harness:config"  # study user attribute: the search config (JSON), the same on every run
TIMING = "harness:timing"  # user attribute: launched / ended (epoch seconds), the study's bookkeeping time


def storage_url(storage: Optional[str], output: str) -> str:
    """SQLite in OUTPUT by default; `postgresql://` uses psycopg (3), the driver this project installs."""
    if not storage:
        return "sqlite:///" + os.path.abspath(os.path.join(output, "search.db"))
    if storage.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    return storage


def _storage(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own lines
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: one line
        raise HarnessError(f"search storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def load(
    url: str,
    name: str,
    pruner: Any = None,
    sampler: Any = None,
    direction: Optional[Literal["minimize", "maximize"]] = None,
) -> Any:
    """The study `name` in `url` (created when `direction` is given and it does not exist)."""
    import optuna

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


def _alive(owner: str) -> bool:
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
        if owner is None or not _alive(owner):
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
def claim_lock(url: str, output: str, name: str) -> Iterator[None]:
    """One worker at a time claims a trial: a file lock for SQLite (one machine), a PostgreSQL advisory lock
    for a shared server (every machine)."""
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"harness-search:{name}".encode())
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "search.lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
