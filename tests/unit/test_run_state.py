"""The run state's owner and the schedule, in one process: what is due when, each piece's state_dict round
trip, a checkpoint written by RunState.save and read back by RunState.restore, and the throughput that
every training report carries."""

import json
import os

import pytest
import torch
from conftest import GOOD_CONFIG, write_model_def

from harness import config, definition, distributed
from harness.config import Length
from harness.train import loop
from harness.train.schedule import Schedule
from harness.train.state import Progress, TrainingMetrics, Validations


def test_schedule_says_what_is_due():
    s = Schedule(total=10, report_every=4, validate_every=3, checkpoint_every=5, rungs=frozenset({2}))
    assert [b for b in range(1, 11) if s.report_due(b)] == [4, 8, 10]
    assert [b for b in range(1, 11) if s.validation_due(b)] == [2, 3, 6, 9, 10]
    assert [b for b in range(1, 11) if s.checkpoint_due(b)] == [5, 10]
    assert [s.until_report(b) for b in (0, 3, 4)] == [4, 1, 4]
    assert not s.done(9) and s.done(10) and s.done(11)
    bare = Schedule(total=3, report_every=100)
    assert [b for b in range(1, 4) if bare.validation_due(b) or bare.checkpoint_due(b)] == [3]


def test_next_due_is_the_first_batch_with_any_duty():
    """The loop checks nothing between `next_due`s: it must never skip a batch where something is due."""
    schedules = [
        Schedule(total=10, report_every=4, validate_every=3, checkpoint_every=5, rungs=frozenset({2})),
        Schedule(total=3, report_every=100),
        Schedule(total=50, report_every=7, checkpoint_every=11, rungs=frozenset({5, 23, 49})),
        Schedule(total=12, report_every=1),
    ]
    for s in schedules:
        due_at = [
            b
            for b in range(1, s.total + 1)
            if s.report_due(b) or s.validation_due(b) or s.checkpoint_due(b) or s.done(b)
        ]
        # From every batch (a resumed run starts anywhere), the next duty is the one next_due names.
        for start in range(0, s.total):
            assert s.next_due(start) == min(b for b in due_at if b > start), (s, start)
    assert Schedule(total=10, report_every=4).next_due(10) == 10  # at the end: nothing later


def test_schedule_of_a_config_converts_lengths():
    cfg = config.parse_config(
        {
            "searcher": {"max_length": {"epochs": 2}},
            "min_validation_period": {"records": 100},
            "min_checkpoint_period": {"epochs": 1},
            "scheduling_unit": 7,
        }
    )
    s = Schedule.of(cfg, batches_per_epoch=15, global_batch=20, rungs=[3])
    assert (s.total, s.report_every, s.validate_every, s.checkpoint_every, s.rungs) == (30, 7, 5, 15, {3})


def test_progress_and_validations_round_trip():
    p = Progress(batches_per_epoch=4)
    for _ in range(6):
        p.advance(20)
        if p.batch_in_epoch == 4:
            p.end_epoch()
    q = Progress(batches_per_epoch=4)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert (q.batches, q.records, q.epoch_index, q.batch_in_epoch, q.epoch) == (6, 120, 1, 2, 1.5)

    cfg = config.parse_config({"searcher": {"metric": "loss"}})
    v = Validations(cfg)
    assert v.record({"loss": 0.5}) and not v.record({"loss": 0.7}) and v.record({"loss": 0.4})
    w = Validations(cfg)
    w.load_state_dict(v.state_dict())
    assert (w.last, w.best) == ({"loss": 0.4}, 0.4)
    assert not w.record({"loss": 0.45})  # the best carries over: not better than 0.4
    with pytest.raises(Exception, match="'loss' is not a validation metric"):
        w.record({"accuracy": 1.0})


def test_training_metrics_window_is_counted_once_after_a_restore():
    backend = distributed.Local()
    m = TrainingMetrics(torch.device("cpu"), "train_batch()")
    for loss in (1.0, 3.0):
        m.add(torch.tensor(loss), {"acc": torch.tensor(loss / 10)})
    window = m.state_dict(backend, batches=2)  # what a checkpoint keeps; counted once, on rank 0
    restored = TrainingMetrics(torch.device("cpu"), "train_batch()")
    restored.load_state_dict(window, backend, batches=2)
    for metrics in (m, restored):
        metrics.add(torch.tensor(5.0), {"acc": torch.tensor(0.5)})
        assert metrics.report(backend, batches=3) == pytest.approx({"loss": 3.0, "acc": 0.3})
    m.add(torch.tensor(float("nan")), None)
    with pytest.raises(Exception, match="not finite .* at training batch 4"):
        m.report(backend, batches=4)


def test_a_started_report_is_its_own_window_while_the_next_one_fills():
    """The loop starts a report's allreduce and writes the report a batch later: the batch trained meanwhile
    belongs to the next window, and a non-finite loss is still named by its batch when the report ends."""

    class Delayed(distributed.Local):
        """Two ranks that saw the same data, whose sum arrives only when waited for."""

        def start_sum(self, t):
            return lambda: t * 2

    backend = Delayed()
    m = TrainingMetrics(torch.device("cpu"), "losses()")
    for loss in (1.0, 3.0):
        m.add(torch.tensor(loss), None)
    finish = m.start_report(backend, batches=2)
    m.add(torch.tensor(100.0), None)  # batch 3, trained while the allreduce is under way
    assert finish() == pytest.approx({"loss": 2.0})
    assert m.report(backend, batches=3) == pytest.approx({"loss": 100.0})
    m.add(torch.tensor(1.0), None)
    m.add(torch.tensor(float("inf")), None)
    finish = m.start_report(backend, batches=5)
    m.add(torch.tensor(float("nan")), None)  # batch 6: not this report's
    with pytest.raises(Exception, match="not finite .* at training batch 5;"):
        finish()


def run(model_dir, output, **changes):
    cfg = config.load_config(os.path.join(model_dir, "experiment.yaml"))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return loop.train(definition.load(str(model_dir)), cfg, str(output), distributed.Local())


def test_a_resumed_run_ends_where_a_straight_one_does(model_dir, tmp_path):
    """RunState.save then RunState.restore: training 6 batches, then 6 more, equals 12 straight (weights,
    optimizer, metric window, RNG and sampler position all restored)."""
    write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 12}"))
    straight = run(model_dir, tmp_path / "straight")
    half = config.load_config(os.path.join(model_dir, "experiment.yaml"))
    half.searcher.max_length = Length("batches", 6)  # ends mid-epoch (15 batches per epoch)
    loop.train(definition.load(str(model_dir)), half, str(tmp_path / "halves"), distributed.Local())
    resumed = run(model_dir, tmp_path / "halves")
    assert resumed == straight

    def training(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [(e["batches"], e["metrics"]) for e in map(json.loads, f) if e["type"] == "training"]

    assert training(tmp_path / "halves") == training(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "12" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "checkpoints" / "12" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_reports_carry_throughput(model_dir, tmp_path, capsys):
    write_model_def(model_dir)
    run(model_dir, tmp_path / "out")
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        entries = [json.loads(line) for line in f]
    training = [e for e in entries if e["type"] == "training"]
    assert len(training) == 2 and all("throughput" not in e for e in entries if e["type"] == "validation")
    for e in training:
        rates = e["throughput"]
        assert rates["samples_per_second"] > 0
        # every batch of this run is a global batch of 20 records
        assert rates["samples_per_second"] / rates["batches_per_second"] == pytest.approx(20)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[training")]
    assert "samples/s, ETA " in lines[0]  # batch 3 of 6: time left
    assert lines[1].endswith(" samples/s)")  # the last report: nothing left
