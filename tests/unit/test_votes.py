"""The stop votes of the training loop (harness/distributed/preemption.py): spaced by the interval the ranks
agree on, timed by the batches."""

from harness.distributed import Local, preemption


class Recorder:
    """A backend whose vote returns a fixed agreement; records every vote started."""

    def __init__(self, stop=False, interval=5):
        self.agreed = (stop, interval)
        self.started = []

    def start_vote(self, stop, interval):
        self.started.append((stop, interval))
        return len(self.started)

    def finish_vote(self, handle):
        return self.agreed


def run(votes, batches, stop=False, start=0):
    """Drive `votes` as the loop does: (batches that carried a vote, batches whose vote said stop)."""
    said_stop, carried = [], []
    for done in range(start, batches):
        handle = votes.start(done, stop)
        if handle is not None:
            carried.append(done + 1)
        if votes.finish(handle, done + 1):
            said_stop.append(done + 1)
    return carried, said_stop


def test_votes_are_spaced_by_the_agreed_interval():
    backend = Recorder(interval=5)
    carried, said_stop = run(preemption.StopVotes(backend, 0), 20)
    assert carried == [1, 6, 11, 16] and said_stop == []


def test_a_resumed_run_votes_at_its_next_batch():
    carried, _ = run(preemption.StopVotes(Recorder(interval=3), 40), 48, start=40)
    assert carried == [41, 44, 47]


def test_proposed_interval_is_vote_seconds_over_the_step_time(monkeypatch):
    clock = iter(i * 0.002 for i in range(1000))  # every call 2 ms later: one batch takes 2 ms here
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: next(clock))
    backend = Recorder(interval=1)
    run(preemption.StopVotes(backend, 0), 3)
    first, second = backend.started[0][1], backend.started[1][1]
    assert first == 1  # nothing timed yet
    assert second == round(preemption.StopVotes.VOTE_SECONDS / 0.002)


def test_stop_is_agreed_at_the_vote():
    carried, said_stop = run(preemption.StopVotes(Recorder(stop=True, interval=4), 0), 10)
    assert said_stop == carried == [1, 5, 9]


def test_one_process_votes_every_batch():
    carried, said_stop = run(preemption.StopVotes(Local(), 0), 6, stop=True)
    assert carried == said_stop == [1, 2, 3, 4, 5, 6]


def test_under_aggregation_a_vote_waits_for_the_end_of_the_window():
    from harness import distributed
    from harness.distributed.preemption import StopVotes

    votes = StopVotes(distributed.Local(), 0)
    assert votes.start(0, True, window_end=False) is None  # due, but inside a window: postponed
    handle = votes.start(0, True, window_end=True)
    assert handle is not None and votes.finish(handle, 1) is True
