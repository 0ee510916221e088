"""The `harness` command: train a model definition on every rank the launcher started."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, List, Optional, Tuple

from harness.arguments import parse_args, parse_model_use_args
from harness.errors import HarnessError, Interrupted, PeerFailure, describe, say
from harness.output import jobstate
from harness.output.lock import LockRefused, OutputLock, no_space, release_held


def run(args: argparse.Namespace) -> int:
    # Imports here so that `harness --help` is instant and argument errors need no torch.
    from harness import config as config_mod
    from harness import definition, distributed
    from harness.config import optimizations
    from harness.distributed import watchdog
    from harness.train import loop

    model_dir = args.model_def
    if not os.path.exists(model_dir):
        raise HarnessError(f"model definition directory {os.path.abspath(model_dir)} does not exist")
    cfg = config_mod.load_for_model(model_dir, args.config)
    # Horovod's tuning variables, before hvd.init() on every rank; the user's own environment wins.
    conflicts = optimizations.apply_to_horovod(cfg.optimizations)
    if distributed.env_rank() == 0:  # every rank loads the config; say it once
        for line in cfg.warnings + conflicts:
            say(f"harness: warning: {line}", sys.stderr)
    rank = distributed.env_rank()
    lock = OutputLock(args.output)
    if rank == 0:  # one run per output directory (rank 0 writes it); held until this process ends
        took_over = lock.acquire()
        if took_over:
            say(f"harness: {took_over}", sys.stderr)
    watchdog.start(
        rank,
        cfg.stall_timeout,
        model_dir,
        lambda m, c: _fail(m, 1, c, output=args.output),
        cfg.setup_timeout,
    )
    threads = distributed.torch_threads()
    os.environ["HARNESS_OUTPUT_DIR"] = os.path.abspath(args.output)  # for user code (TorchWriter)
    model_def = definition.load_for(model_dir, cfg)

    backend = distributed.init()
    distributed.set_threads(backend, threads)
    jobstate.register_rank(args.output, backend.rank)
    # Under a launcher stdout is forwarded line by line (Open MPI even gives ranks a pty, so isatty() is
    # true): a bar's carriage returns and split writes would garble the tagged lines.
    progress_bar = not args.quiet and sys.stdout.isatty() and not distributed.under_launcher()
    code = 0
    try:
        loop.train(
            model_def, cfg, args.output, backend, args.fresh, args.resume, progress_bar, args.search_trial
        )
    except Interrupted as e:  # Ctrl-C after the checkpoint, or a stop before training began
        code = e.exit_code
        if rank == 0 and "nothing trained" in str(e):
            say(str(e))
    backend.shutdown()
    lock.release()
    return code


_STARTED = time.time()  # the ranks import this module first


def _fail(message: str, code: int, consequential: bool, output: Optional[str] = None) -> None:
    """Print one line and exit at once, without Python's (or Horovod's) exit handlers.

    Errors in set-up are the same on every rank: rank 0 reports and the launcher stops the others, which
    wait a moment first so that the job shows one line, not N. An error that is a consequence of another
    rank's death (a broken collective) waits too, so the root cause is what the user sees.
    """
    from harness.distributed import env_rank, preemption, watchdog

    watchdog.current().disarm()  # this process ends now; waiting below is not a stall
    rank = env_rank()
    record = jobstate.record_failure(output, message, code, rank, consequential)
    if consequential and preemption.received:  # the launcher is already stopping us: say nothing more
        _exit(code, record)
    if threading.current_thread() is threading.main_thread():  # (the stall watchdog calls from its own)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher stopping us now is what we wait for
    if rank != 0 or consequential:
        time.sleep(2.0 if not consequential else 4.0)
    if rank != 0 and not consequential and _rank0_said(output, message):
        _exit(code, record)  # the same error: rank 0's line says it (a launcher may be slow to stop us)
    prefix = f"[rank {rank}] " if rank != 0 else ""
    say(f"harness: error: {prefix}{message}", sys.stderr)
    _exit(code, record)


def _rank0_said(output: Optional[str], message: str) -> bool:
    """Whether rank 0 recorded this very error in OUTPUT (on another machine without shared storage its
    record is not seen here, and this rank says its error itself)."""
    if not output:
        return False
    said = [f for f in jobstate.failures(jobstate.state_dir(output)) if f.get("rank") == 0]
    # This run's (the launcher starts every rank within seconds), not an earlier run's left in OUTPUT.
    return bool(said) and said[0].get("message") == message and said[0].get("time", 0) > _STARTED - 5.0


def _exit(code: int, record: dict) -> None:
    """This rank's last word for a supervising `harness launch` (the record again, on stderr: it arrives when
    the disk is full), the output lock released (an error of its own is a clean end), and exit now."""
    sys.stdout.flush()
    jobstate.announce_failure(record)
    release_held()
    os._exit(code)


def _left_early(e: SystemExit, model_dir: Optional[str]) -> Tuple[str, int]:
    """sys.exit() on a rank while the others train (they would wait for it in a collective): an error that
    names where it was called; exit status 1 for sys.exit(0) or sys.exit(None), else the status given."""
    from harness.definition import user_frame

    where = user_frame(e.__traceback__, os.path.abspath(model_dir)) if model_dir else None
    said = f"sys.exit({e.code!r})" if e.code is not None else "sys.exit()"
    code = e.code if isinstance(e.code, int) and e.code != 0 else 1
    return f"called {said}{f' at {where}' if where else ''} before the job ended", code


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, PeerFailure):
        return True
    name = type(e).__name__
    return name == "HorovodInternalError" or "Horovod has been shut down" in str(e)


def _as_peer_failure(e: BaseException) -> BaseException:
    """A torch.distributed collective that lost another rank, in any command of the ranks (training,
    `evaluate`, `export`, a Trainer script), as that PeerFailure: a consequence, which the launcher and the
    failed rank report, as Horovod's HorovodInternalError. Else `e` itself."""
    if isinstance(e, PeerFailure) or "torch.distributed" not in sys.modules:
        return e
    import torch.distributed as dist

    if not dist.is_initialized():  # set-up's rendezvous failing is this rank's own error, said as it is
        return e
    from harness.distributed import peer_failure

    return peer_failure(e) or e


SUBCOMMANDS = ("launch", "search", "plot", "summary", "evaluate", "export")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("evaluate", "export"):  # on every rank like training, with its one-line errors
        from harness.results import evaluate

        ev_args = parse_model_use_args(argv)
        return _guarded(lambda: evaluate.run(ev_args, _fail), ev_args.model_dir, None)
    if argv and argv[0] in SUBCOMMANDS:
        try:
            if argv[0] == "launch":
                from harness.launch import launcher as launch

                return launch.launch(argv[1:])
            if argv[0] == "search":
                from harness.search import command as search

                return search.main(argv[1:])
            from harness.results import summary as tools

            return tools.main(argv)
        except HarnessError as e:
            say(f"harness: error: {e}", sys.stderr)
            return HarnessError.exit_code
    args = parse_args(argv)
    return _guarded(lambda: run(args), args.model_def, args.output)


def _disarmed_on_error(command: Callable[[], int]) -> int:
    """The stall watchdog stops as soon as an error leaves the command: formatting and reporting it (reading
    source lines for the user's frame, on a loaded machine) is not a stall of this rank (seen: rank 0's own
    "stuck in open() at tokenize.py" line after rank 1's stall had broken its collective)."""
    from harness.distributed import watchdog

    try:
        return command()
    except BaseException:
        watchdog.current().disarm()
        raise


def _guarded(command: Callable[[], int], model_dir: Optional[str], output: Optional[str]) -> int:
    """Run a command of the ranks; any error ends this process with one line (`_fail`)."""
    show_tb = os.environ.get("HARNESS_TRACEBACK") == "1"
    try:
        return _disarmed_on_error(command)
    except HarnessError as e:
        if show_tb:
            traceback.print_exc()
        # A run refused by another run's lock must not write into that run's bookkeeping.
        output = None if isinstance(e, LockRefused) else output
        _fail(str(e), HarnessError.exit_code, consequential=False, output=output)
    except KeyboardInterrupt:
        _fail("interrupted", 130, consequential=False)
    except SystemExit as e:  # the user's code left this rank alone: the others would wait for it
        message, code = _left_early(e, model_dir)
        _fail(message, code, consequential=False, output=output)
    except Exception as caught:  # noqa: BLE001 - the user's code may raise anything; report it in one line
        err = _as_peer_failure(caught)
        if show_tb:
            traceback.print_exc()
        full = no_space(err, output) if isinstance(err, OSError) else None
        if full is not None:  # a full disk is not emptied by a restart: status 2, one line naming the path
            _fail(str(full), full.exit_code, consequential=False, output=output)
        from harness.definition import user_frame

        where = user_frame(caught.__traceback__, os.path.abspath(model_dir)) if model_dir else None
        message = describe(err) + (f" (at {where})" if where else "")
        _fail(message, 1, _is_collective_failure(err), output=output)
    return 1


def console() -> None:
    """The `harness` command: `main`, then an exit that skips the interpreter's teardown.

    Once the results are written, tearing down torch, NumPy and the model definition's modules took 1.3 s
    of CPU in one process (more with several ranks on a busy machine). (A rank's crash after training under
    Open MPI, status 139, was not this teardown but MPI finalized under a late broadcast: Horovod.shutdown.)
    What a normal exit does that matters still happens: other threads are joined, atexit handlers run (the
    user's too: a logger's final flush), the streams are flushed.
    """
    code = main()
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
