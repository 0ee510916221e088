"""Unit tests for harness.metrics with the one-process Local backend."""

import io
import json
import math
import time

import numpy as np
import pytest
import torch

from harness.distributed import Local
from harness.errors import HarnessError
from harness.train.metrics import MetricAccumulator, first_nonfinite
from harness.train.report import Reporter

CPU = torch.device("cpu")


def accumulator(where="validation_metrics()"):
    return MetricAccumulator(CPU, where)


# MetricAccumulator


def test_weighted_mean_equals_mean_over_all_records():
    rng = np.random.default_rng(0)
    sizes = [3, 7, 1, 12, 5]
    batches = [rng.normal(size=(n, 4)) for n in sizes]
    acc = accumulator()
    for b in batches:
        acc.add(
            {"loss": torch.tensor(b[:, 0].mean()), "vec": torch.tensor(b.mean(axis=0))},
            weight=len(b),
        )
    out = acc.reduce(Local())
    data = np.concatenate(batches)
    assert out["loss"] == pytest.approx(data[:, 0].mean(), rel=1e-12, abs=1e-12)
    assert out["vec"] == pytest.approx(list(data.mean(axis=0)), rel=1e-12, abs=1e-12)
    # The unweighted mean over batches differs here, so the weights really were applied.
    assert out["loss"] != pytest.approx(np.mean([b[:, 0].mean() for b in batches]), rel=1e-6)


def test_unit_weights_give_mean_over_batches():
    acc = accumulator("training_metrics()")
    for v in (1.0, 2.0, 6.0):
        acc.add({"loss": torch.tensor(v)})
    assert acc.reduce(Local()) == {"loss": pytest.approx(3.0)}


@pytest.mark.parametrize(
    "values",
    [
        [torch.tensor(1.0), torch.tensor(4.0)],
        [np.array(1.0), np.array(4.0)],
        [np.array([1.0])[0], np.array([4.0])[0]],  # numpy float64 scalars
        [np.float32(1.0), np.float32(4.0)],
        [np.int64(1), np.int64(4)],
        [np.int32(1), np.uint8(4)],
        [1.0, 4.0],
        [1, 4],
        [torch.tensor(1), torch.tensor(4)],  # integer tensors are averaged as floats
        [np.array(1, dtype=np.int16), 4],
        [torch.tensor(1.0, requires_grad=True) * 1, torch.tensor(4.0)],
    ],
)
def test_accepts_metric_value_kinds(values):
    acc = accumulator()
    for v in values:
        acc.add({"m": v})
    out = acc.reduce(Local())
    assert isinstance(out["m"], float)
    assert out["m"] == pytest.approx(2.5)


def test_mixed_kinds_in_one_dict():
    acc = accumulator()
    acc.add({"t": torch.tensor(2.0), "a": np.array(3.0), "f": 0.5, "i": 7, "n": np.float16(1.5)}, weight=2)
    acc.add({"t": torch.tensor(4.0), "a": np.array(5.0), "f": 1.5, "i": 1, "n": np.float16(3.5)}, weight=2)
    out = acc.reduce(Local())
    assert out == pytest.approx({"t": 3.0, "a": 4.0, "f": 1.0, "i": 4.0, "n": 2.5})


def test_non_scalar_metrics_are_averaged_elementwise_as_nested_lists():
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([[3.0, 0.0, 1.0], [0.0, 1.0, 10.0]])
    acc = accumulator()
    acc.add({"matrix": torch.tensor(a), "row": a[0], "scalar": 1.0}, weight=1)
    acc.add({"matrix": torch.tensor(b), "row": b[0], "scalar": 3.0}, weight=3)
    out = acc.reduce(Local())
    expected = (a * 1 + b * 3) / 4
    assert isinstance(out["matrix"], list) and isinstance(out["matrix"][0], list)
    assert np.asarray(out["matrix"]).shape == (2, 3)
    assert np.allclose(out["matrix"], expected)
    assert isinstance(out["row"], list) and np.allclose(out["row"], expected[0])
    assert out["scalar"] == pytest.approx(2.5)


@pytest.mark.parametrize("bad", ["0.5", None, [1.0, 2.0], {"x": 1}, True, np.array(["a"])])
def test_non_numeric_metric_raises_naming_the_metric(bad):
    acc = accumulator("validation_metrics()")
    with pytest.raises(HarnessError) as e:
        acc.add({"ok": 1.0, "accuracy": bad})
    msg = str(e.value)
    assert "'accuracy'" in msg
    assert "validation_metrics()" in msg
    assert type(bad).__name__ in msg


def test_non_dict_metrics_raise():
    with pytest.raises(HarnessError, match="validation_metrics\\(\\) returned a Tensor"):
        accumulator().add(torch.tensor(1.0))


@pytest.mark.parametrize(
    "first,second",
    [
        (torch.tensor(1.0), torch.zeros(2)),
        (torch.zeros(2), torch.zeros(3)),
        (torch.zeros(2, 3), torch.zeros(3, 2)),
        (np.zeros(4), 1.0),
    ],
)
def test_metric_changing_shape_raises(first, second):
    acc = accumulator()
    acc.add({"m": first})
    with pytest.raises(HarnessError) as e:
        acc.add({"m": second})
    msg = str(e.value)
    assert "'m'" in msg
    assert str(tuple(np.shape(first))) in msg
    assert str(tuple(np.shape(second))) in msg


def test_add_values_sums_a_list_of_batch_scalars():
    acc = accumulator("losses()")
    acc.add_values("loss", [torch.tensor(1.0), torch.tensor(2.0)])
    acc.add_values("loss", [])
    acc.add_values("loss", [torch.tensor(6.0, dtype=torch.float16)])
    acc.add({"other": 4.0}, weight=1)
    sums, weights = acc.totals(Local())
    assert sums["loss"].dtype == torch.float64 and float(sums["loss"]) == 9.0
    assert weights == {"loss": 3.0, "other": 1.0}


def test_each_metric_has_its_own_weight():
    # A metric reported in fewer batches (a dict of losses with an extra entry now and then) is the mean
    # over the batches that reported it.
    acc = accumulator("training_metrics()")
    acc.add({"loss": 1.0, "rare": 10.0})
    acc.add({"loss": 3.0})
    assert acc.reduce(Local()) == {"loss": pytest.approx(2.0), "rare": pytest.approx(10.0)}


def test_load_accepts_one_weight_for_all_metrics():
    # Checkpoints written before per-metric weights saved [sums, weight].
    acc = accumulator("training_metrics()")
    acc.load({"loss": torch.tensor(6.0, dtype=torch.float64), "acc": torch.tensor(1.5)}, 3.0)
    acc.add({"loss": 2.0, "acc": 0.5})
    assert acc.reduce(Local()) == {"loss": pytest.approx(2.0), "acc": pytest.approx(0.5)}


def test_reduce_clears_state():
    acc = accumulator()
    acc.add({"a": 10.0, "b": 1.0}, weight=5)
    assert acc.reduce(Local()) == pytest.approx({"a": 10.0, "b": 1.0})
    assert acc.sums == {}
    assert acc.weights == {}
    acc.add({"a": 2.0}, weight=1)
    acc.add({"a": 4.0}, weight=1)
    assert acc.reduce(Local()) == pytest.approx({"a": 3.0})  # no trace of the first window, nor of 'b'


def test_add_does_not_alias_the_callers_tensor():
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    acc = accumulator()
    acc.add({"m": t})
    acc.add({"m": t})
    assert t.tolist() == [1.0, 2.0]
    assert acc.reduce(Local())["m"] == pytest.approx([1.0, 2.0])


def test_reduce_uses_the_backend_sum():
    class Doubling(Local):
        """Stands for two ranks that saw the same data: sums double, means stay the same."""

        calls = 0

        def allreduce_sum(self, t):
            self.calls += 1
            return t * 2

    backend = Doubling()
    acc = accumulator()
    acc.add({"x": 1.0, "y": torch.tensor([2.0, 4.0])}, weight=3)
    acc.add({"x": 3.0, "y": torch.tensor([0.0, 0.0])}, weight=1)
    out = acc.reduce(backend)
    assert backend.calls == 1  # one allreduce for all metrics
    assert out["x"] == pytest.approx((3 * 1.0 + 3.0) / 4)
    assert out["y"] == pytest.approx([6.0 / 4, 12.0 / 4])


# Reporter


def test_reporter_writes_one_json_line_per_report_and_prints_one_line(tmp_path):
    out_dir = tmp_path / "out"
    stream = io.StringIO()
    reporter = Reporter(str(out_dir), enabled=True, stream=stream)
    before = time.time()
    reporter.report("training", 10, 0.5, 200, {"loss": 0.25})
    reporter.report("validation", 20, 1 / 3, 400, {"loss": 0.125, "per_class": [0.5, 1.0]})
    after = time.time()
    reporter.close()

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    entries = [json.loads(line) for line in lines]
    keys = {"type", "batches", "epoch", "records", "metrics", "time"}
    assert all(set(e) == keys for e in entries)
    assert entries[0]["type"] == "training"
    assert entries[0]["batches"] == 10
    assert entries[0]["epoch"] == 0.5
    assert entries[0]["records"] == 200
    assert entries[0]["metrics"] == {"loss": 0.25}
    assert entries[1]["type"] == "validation"
    assert entries[1]["batches"] == 20
    assert abs(entries[1]["epoch"] - 1 / 3) < 1e-6
    assert entries[1]["records"] == 400
    assert entries[1]["metrics"] == {"loss": 0.125, "per_class": [0.5, 1.0]}
    assert all(before <= e["time"] <= after for e in entries)

    printed = stream.getvalue().splitlines()
    assert len(printed) == 2
    assert "training" in printed[0] and "loss" in printed[0] and "10" in printed[0]
    assert "validation" in printed[1] and "per_class" in printed[1]


def test_reporter_flushes_each_line(tmp_path):
    reporter = Reporter(str(tmp_path), enabled=True, stream=io.StringIO())
    reporter.report("training", 1, 0.1, 8, {"loss": 1.0})
    # Readable before close: a crash later must not lose what was reported.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    reporter.close()
    reporter.close()  # closing twice is harmless


def test_disabled_reporter_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    stream = io.StringIO()
    reporter = Reporter(str(out_dir), enabled=False, stream=stream)
    reporter.report("training", 10, 0.5, 200, {"loss": 0.25})
    reporter.close()
    assert not (out_dir / "metrics.jsonl").exists()
    assert not out_dir.exists()
    assert stream.getvalue() == ""


def test_reporter_prints_non_finite_values(tmp_path):
    stream = io.StringIO()
    reporter = Reporter(str(tmp_path), enabled=True, stream=stream)
    reporter.report("training", 1, 0.0, 1, {"loss": math.nan, "big": math.inf})
    reporter.close()
    assert "nan" in stream.getvalue() and "inf" in stream.getvalue()
    entry = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert math.isnan(entry["metrics"]["loss"])
    assert entry["metrics"]["big"] == math.inf


# first_nonfinite


@pytest.mark.parametrize(
    "values,expected",
    [
        ([1.0, 2.0, math.nan], 2),
        ([math.nan, 2.0, math.nan], 0),
        ([0.0, math.inf, math.nan], 1),
        ([0.0, 1.0, -math.inf, 3.0], 2),
        ([0.0, 1.0, 2.0], None),
        ([5.0], None),
        ([math.inf], 0),
    ],
)
def test_first_nonfinite(values, expected):
    tensors = [torch.tensor(v) for v in values]
    truth = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    assert truth == expected  # the table agrees with a plain Python scan
    assert first_nonfinite(tensors) == expected


def test_first_nonfinite_empty_and_long():
    assert first_nonfinite([]) is None
    values = [torch.tensor(float(i)) for i in range(1000)]
    assert first_nonfinite(values) is None
    values[637] = torch.tensor(float("nan"))
    values[900] = torch.tensor(float("inf"))
    assert first_nonfinite(values) == 637


def test_progress_bar_shows_records_per_second_and_last_loss(tmp_path):
    stream = io.StringIO()
    reporter = Reporter(str(tmp_path), enabled=True, progress_bar=True, stream=stream)
    reporter.report("training", 3, 0.5, 60, {"loss": 0.25})
    reporter.start_period(3, 20)
    reporter.advance(20)
    time.sleep(0.15)  # tqdm redraws at most every 0.1 s
    reporter.advance(20)
    shown = stream.getvalue()
    reporter.close()
    assert "train:" in shown and "40.0/60.0" in shown and "rec/s, loss=0.25]" in shown


def test_no_progress_bar_when_not_asked(tmp_path):
    stream = io.StringIO()
    reporter = Reporter(str(tmp_path), enabled=True, progress_bar=False, stream=stream)
    reporter.start_period(3, 20)
    reporter.advance(20)
    reporter.close()
    assert stream.getvalue() == ""
