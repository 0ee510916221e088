"""`harness search`: PEDL's searchers over Horovod trials, on Optuna.

Every trial is a `harness launch` job of N ranks in OUTPUT/trials/<number>/ (its own config.yaml, metrics,
TensorBoard files, checkpoints); K run at a time on this machine. The study (SQLite in OUTPUT, or a shared
PostgreSQL server) is the search's memory: run the same command again after a crash and it resumes the
trials that were running and ends with exactly the configured number of trials.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from harness.errors import INVALID_HP, HarnessError, check_model_path, describe, say
from harness.search import child
from harness.search import results as search_results
from harness.search import study as search_study
from harness.search.space import SearchSpec, parse_search
from harness.search.trial import STOPPED_EARLY

FAILURES_TO_STOP = 3
# How long a resumed trial waits for the run of a killed search to let go of its folder: that run stops on
# its own (SIGTERM: a checkpoint at an agreed batch, within harness launch's 60 s, then its ranks are killed).
PREVIOUS_RUN_SECONDS = 120.0


def parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="harness search",
        usage="harness search MODEL_DIR --config FILE --output OUT [-np N] [--parallel K] [--storage URL]",
        description="Search hyperparameters: every trial is a Horovod job of N ranks, K trials at a time. "
        "Run the same command again to continue an interrupted search.",
    )
    p.add_argument("model_def", help="model definition directory")
    p.add_argument("--config", help="search config (default: experiment.yaml or const.yaml in MODEL_DIR)")
    p.add_argument("--output", default="search", help="output directory (default: ./search)")
    p.add_argument("-np", type=int, default=1, help="ranks per trial (default 1)")
    p.add_argument(
        "--parallel",
        type=int,
        help="trials at a time on this machine (default: searcher.max_concurrent_trials, else 1)",
    )
    p.add_argument("--storage", help="study database URL, e.g. postgresql://user@host/db (default SQLite)")
    p.add_argument("--study", help="study name (default: the config's name, else 'search')")
    p.add_argument("--launcher", choices=["horovodrun", "gloo", "mpi", "mpirun"], help="as harness launch's")
    p.add_argument("--backend", choices=["horovod", "torch"], help="as harness launch's")
    p.add_argument("-H", dest="hosts", help="hosts for every trial's ranks (default localhost:NP)")
    p.add_argument("--max-restarts", type=int, help="restarts per trial (default: the config's max_restarts)")
    args = p.parse_args(argv)
    if args.np < 1 or (args.parallel is not None and args.parallel < 1):
        raise HarnessError("-np and --parallel take a positive number")
    if args.backend == "torch" and args.launcher:
        raise HarnessError(f"--launcher {args.launcher} is horovodrun's; --backend torch runs torchrun")
    return args


def _load(args: argparse.Namespace) -> SearchSpec:
    """The search config, checked, and the model definition imported once: bad input stops here."""
    from harness import config as config_mod
    from harness import definition
    from harness.config.yaml12 import load_yaml_file

    check_model_path(args.model_def)
    if not os.path.isdir(args.model_def):
        raise HarnessError(f"model definition directory {os.path.abspath(args.model_def)} does not exist")
    path = config_mod.find_config_file(args.model_def, args.config)
    if path is None:
        raise HarnessError(f"no search config: pass --config FILE (e.g. {args.model_def}/adaptive.yaml)")
    raw = load_yaml_file(path)
    spec = parse_search(raw, path)
    for line in spec.warnings:
        say(f"harness: warning: {path}: {line}", sys.stderr)
    spec.source = json.dumps(raw, sort_keys=True, default=str)
    example = spec.trial_config({p.name: p.example() for p in spec.params}, 0)
    cfg = config_mod.parse_config(example, path)  # the rest of the config, as every trial will read it
    definition.load_for(args.model_def, cfg)
    return spec


@dataclass
class Claim:
    number: int
    values: Dict[str, Any]
    resumed: bool
    claim_seconds: float = 0.0  # the study's bookkeeping: waiting for the lock, asking, sampling


class Search:
    def __init__(self, args: argparse.Namespace, spec: SearchSpec):
        self.args, self.spec = args, spec
        self.output = os.path.abspath(args.output)
        self.url = search_study.storage_url(args.storage, self.output)
        self.name = args.study or spec.raw.get("name") or "search"
        self.total = spec.total_trials()
        self.stopping: List[int] = []  # the signal that stops the search
        self.fatal: Optional[str] = None  # bad input found by a trial: the search ends
        self.procs: Dict[int, subprocess.Popen] = {}
        self.failures: List[str] = []
        self.lock = threading.Lock()

    # -- the study -----------------------------------------------------------------------------------------

    def study(self) -> Any:
        """Each worker thread its own study object: its own sampler, seeded per trial."""
        import optuna

        direction: Literal["minimize", "maximize"] = "minimize" if self.spec.smaller_is_better else "maximize"
        if self.spec.name == "grid":
            sampler: Any = optuna.samplers.GridSampler(self.spec.grid_space(), seed=self.spec.seed)
        else:
            sampler = optuna.samplers.RandomSampler(seed=self.spec.seed)
        return search_study.load(self.url, self.name, sampler=sampler, direction=direction)

    def _reseed(self, study: Any, number: int) -> None:
        """The values of trial N depend only on the seed and N: the same after a crash, in any order."""
        import optuna

        if self.spec.name != "grid" and self.spec.seed is not None:
            study.sampler = optuna.samplers.RandomSampler(seed=derived_seed(self.spec.seed, number, "sample"))

    def claim(self, study: Any) -> Optional[Claim]:
        """Under the study's lock: a trial whose search process died, else a new one, else None."""
        start = time.monotonic()
        with search_study.claim_lock(self.url, self.name):
            orphans = search_study.orphans(study)
            if orphans:
                number, resumed = orphans[0].number, True
            elif len(study.get_trials(deepcopy=False)) < self.total:
                number, resumed = study.ask().number, False
            else:
                return None
            search_study.set_owner(study, number)
            if resumed:
                search_study.set_user_attr(study, number, search_study.INTERRUPTED, None)
            self._reseed(study, number)
            trial = search_study.trial(study, number)
            values = self.spec.trial_hparams(trial)
            trial.set_user_attr(search_study.HPARAMS, values)
        return Claim(number, values, resumed, time.monotonic() - start)

    def worker(self) -> None:
        try:
            study = self.study()
            while not self.stopping and self.fatal is None:
                claim = self.claim(study)
                if claim is None:
                    return
                self.run_trial(study, claim)
        except Exception as e:  # noqa: BLE001 - the study's database failing, say: one line, the search ends
            self.fatal = describe(e)

    # -- one trial -----------------------------------------------------------------------------------------

    def _trial_files(self, claim: Claim) -> str:
        from harness.config.yaml12 import dump_yaml

        folder = os.path.join(self.output, "trials", str(claim.number))
        os.makedirs(folder, exist_ok=True)
        # Each trial's own seed, from the search's seed and its number; without one, the trial draws its own
        # (and keeps it in its checkpoints, so a resumed trial goes on with it).
        seed = None if self.spec.seed is None else derived_seed(self.spec.seed, claim.number, "train")
        with open(os.path.join(folder, "trial-config.yaml"), "w", encoding="utf-8") as f:
            dump_yaml(self.spec.trial_config(claim.values, seed), f)
        info = {
            "storage": self.url,
            "study": self.name,
            "number": claim.number,
            "metric": self.spec.metric,
            "pruning": self.spec.pruning(),
        }
        with open(os.path.join(folder, "search-trial.json"), "w", encoding="utf-8") as f:
            json.dump(info, f)
        return folder

    def _command(self, folder: str) -> List[str]:
        a = self.args
        command = [sys.executable, "-m", "harness", "launch", "-np", str(a.np)]
        command += ["--launcher", a.launcher] if a.launcher else []
        command += ["--backend", a.backend] if a.backend else []  # else HARNESS_BACKEND, inherited
        command += ["-H", a.hosts] if a.hosts else []
        command += ["--max-restarts", str(a.max_restarts)] if a.max_restarts is not None else []
        return command + [
            a.model_def,
            "--config",
            os.path.join(folder, "trial-config.yaml"),
            "--output",
            folder,
            "--search-trial",
            os.path.join(folder, "search-trial.json"),
        ]

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env:  # the machine's cores, split among the trials' ranks
            cores = os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // (self.workers * self.args.np)))
        return env

    def say(self, number: int, text: str) -> None:
        with self.lock:
            print(f"trial {number}: {text}", flush=True)

    def run_trial(self, study: Any, claim: Claim) -> None:
        if claim.resumed and STOPPED_EARLY in search_study.trial(study, claim.number).user_attrs:
            # It stopped early, and the search died before recording that: record it, do not train on.
            self._finish(study, claim.number, os.path.join(self.output, "trials", str(claim.number)), 0, "")
            return
        folder = self._trial_files(claim)
        if claim.resumed and not self._previous_run_gone(claim.number, folder):
            return  # (left running in the study: the next run resumes it)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in claim.values.items()) or "no searched values"
        self.say(claim.number, ("resumed" if claim.resumed else "started") + f" ({shown})")
        launched = time.time()
        log_path = os.path.join(folder, "console.log")
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        proc = child.start(self._command(folder), self._env(), log_path)
        with self.lock:
            self.procs[claim.number] = proc
        last_error = child.follow(proc, log_path, offset, lambda text: self.say(claim.number, text))
        rc = proc.wait()
        with self.lock:
            self.procs.pop(claim.number, None)
        if self.stopping:
            # Recorded as interrupted (resumable), not as running: `harness summary` says so.
            search_study.set_user_attr(study, claim.number, search_study.INTERRUPTED, time.time())
            self.say(claim.number, "stopped with the search (checkpointed; it resumes on the next run)")
            return  # left running in the study: the next run resumes it
        timing = {"launched": launched, "ended": time.time(), "claim_s": claim.claim_seconds}
        search_study.set_user_attr(study, claim.number, search_study.TIMING, timing)  # (before it ends)
        self._finish(study, claim.number, folder, rc, last_error)

    def _previous_run_gone(self, number: int, folder: str) -> bool:
        """A trial of a killed search may still be stopping (it checkpoints first): wait for it to let go of
        its folder. If it does not, the search ends with one line and the trial stays resumable."""
        still = child.wait_until_free(
            folder,
            PREVIOUS_RUN_SECONDS,
            lambda who: self.say(number, f"waiting for its previous run ({who}) to stop"),
        )
        if still is None:
            return True
        with self.lock:
            self.fatal = self.fatal or (
                f"trial {number}: {folder} is still in use by {still} after {PREVIOUS_RUN_SECONDS:.0f} s; "
                "end that run, then run the same command again"
            )
        return False

    def _finish(self, study: Any, number: int, folder: str, rc: int, error: str) -> None:
        from optuna.trial import TrialState

        trial = study._storage.get_trial(
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        )
        if rc == 0 and STOPPED_EARLY in trial.user_attrs:
            _tell(study, number, state=TrialState.PRUNED)
            self.say(number, f"stopped early at batch {trial.user_attrs[STOPPED_EARLY]} (behind its rung)")
            return
        best = _best(folder, self.spec) if rc == 0 else None
        if rc == 0 and best is not None:
            _tell(study, number, values=best[0])
            self.say(number, f"completed: best {self.spec.metric} {best[0]:.5g} at batch {best[1]}")
            return
        if rc == 0:
            error = f"no validation reported searcher.metric '{self.spec.metric}'"
        error = error or f"exited with status {rc}"
        search_study.set_user_attr(study, number, search_study.ERROR, error)
        invalid = INVALID_HP in error  # det.InvalidHP: these hyperparameters cannot work; the search goes on
        if invalid:
            search_study.set_user_attr(study, number, "invalid", True)
        _tell(study, number, state=TrialState.FAIL)
        if invalid:
            self.say(number, f"invalid hyperparameters: {error}")
            return
        self.say(number, f"failed: {error}")
        # A failure can be the hyperparameters' (the search goes on); the same one in the first trials,
        # before any trial got through, is the model definition's: the search stops.
        with self.lock:
            self.failures.append(error)
            completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if not completed and self.failures == [error] * FAILURES_TO_STOP:
                self.fatal = f"the first {FAILURES_TO_STOP} trials failed the same way: {error}"

    # -- the whole search ----------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.stopping:  # a second Ctrl-C: now
            for proc in list(self.procs.values()):
                os.killpg(proc.pid, signal.SIGKILL)
            os._exit(130)
        self.stopping.append(signum)
        for proc in list(self.procs.values()):
            proc.send_signal(signal.SIGTERM)  # harness launch: the ranks checkpoint and exit

    def run(self) -> int:
        os.makedirs(self.output, exist_ok=True)
        study = self.study()  # created (or found) before the workers, one process at a time
        with search_study.claim_lock(self.url, self.name):  # other machines may check it too
            self._check_same_search(study)
        with open(os.path.join(self.output, search_results.SEARCH_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "storage": self.url,
                    "study": self.name,
                    "metric": self.spec.metric,
                    "smaller_is_better": self.spec.smaller_is_better,
                    "searcher": self.spec.name,
                    "trials": self.total,
                },
                f,
            )
        # --parallel, else the config's max_concurrent_trials (Determined's), else 1; never above the
        # config's max_concurrent_trials nor the number of trials.
        concurrent = self.spec.max_concurrent_trials
        wanted = self.args.parallel or concurrent or 1
        self.workers = max(1, min(wanted, concurrent or wanted, self.total))
        print(
            f"harness search: {self.spec.name} searcher, {self.total} trials of {self.args.np} rank(s), "
            f"{self.workers} at a time; study '{self.name}' in {_safe(self.url)}",
            flush=True,
        )
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        threads = [threading.Thread(target=self.worker, name=f"search-{i}") for i in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.result()

    def _check_same_search(self, study: Any) -> None:
        """Running the same command continues a search; another config in the same study is refused."""
        known = study.user_attrs.get(search_study.CONFIG)
        if known is None:
            study.set_user_attr(search_study.CONFIG, self.spec.source)
        elif known != self.spec.source:
            raise HarnessError(
                f"study '{self.name}' in {_safe(self.url)} is a search with another config; to continue "
                "it, pass the same config; for a new search, use another --output (or --study)"
            )

    def result(self) -> int:
        if self.stopping:
            name = signal.Signals(self.stopping[0]).name
            print(f"harness search: stopped by {name}; run the same command to continue", flush=True)
            return 130 if self.stopping[0] == signal.SIGINT else 0
        if self.fatal:
            print(f"harness search: error: {self.fatal}", file=sys.stderr, flush=True)
            return HarnessError.exit_code
        return search_results.print_table(self.output)


def derived_seed(seed: int, number: int, purpose: str) -> int:
    """A seed for trial `number`, well mixed: NumPy's generators seeded with neighbouring integers start with
    nearly the same numbers (seeds 100003..100005 drew 0.303, 0.312, 0.305)."""
    import numpy as np

    words = [seed % 2**32, number, sum(purpose.encode())]
    return int(np.random.SeedSequence(words).generate_state(1)[0] % 2**31)


def _tell(study: Any, number: int, **outcome: Any) -> None:
    """Record a trial's end. Optuna's grid sampler then calls study.stop(), which is only allowed inside
    study.optimize(); the trial's state is stored before that, and the workers stop on their own."""
    try:
        study.tell(number, **outcome)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _best(folder: str, spec: SearchSpec) -> Optional[tuple]:
    """(best value of the searcher metric, its batch) from the trial's metrics.jsonl."""
    from harness.output import reports

    found = reports.best(reports.points(reports.read_reports(folder), spec.metric), spec.smaller_is_better)
    return (found[1], found[0]) if found else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_safe = search_study.safe_url


def main(argv: List[str]) -> int:
    args = parse(argv)
    try:
        search_study.storage_url(args.storage, args.output)  # a URL that cannot work: before the model loads
        spec = _load(args)
        return Search(args, spec).run()
    except search_study.StorageUnreachable as e:  # not status 2: the same command may work later
        say(f"harness: error: {e}", sys.stderr)
        return e.exit_code
