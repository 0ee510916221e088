"""`harness evaluate` under real launchers: the metrics training's final validation reported, at 2 ranks."""

import json
import shutil

import pytest
import runner
from conftest import FULL_DATASET_MODEL_DEF, GOOD_CONFIG, GOOD_MODEL_DEF, write_model_def

BIN = runner.BIN

pytestmark = pytest.mark.skipif(
    shutil.which("horovodrun", path=BIN) is None, reason="Horovod is not installed (run `make setup`)"
)

DEFINITIONS = {
    "losses": (GOOD_MODEL_DEF, GOOD_CONFIG),
    "full_dataset": (FULL_DATASET_MODEL_DEF, GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20")),
}


def run(launcher, *args, timeout=180, ok=True):
    proc = runner.run(runner.under(launcher, 2, runner.harness(*args)), timeout)
    if ok:
        runner.assert_ok(proc)
    return proc


_trained = {}


def train_once(name, tmp_path_factory):
    """A definition trained at 2 ranks (horovodrun --gloo): model dir, output, final validation metrics."""
    if name not in _trained:
        root = tmp_path_factory.mktemp(name)
        model_def, config = DEFINITIONS[name]
        model_dir = write_model_def(root / "model", model_def=model_def, config=config)
        run("gloo", model_dir, "--output", root / "out")
        with open(root / "out" / "metrics.jsonl") as f:
            final = [json.loads(line) for line in f if '"validation"' in line][-1]
        assert final["batches"] == 6
        _trained[name] = model_dir, root / "out", final["metrics"]
    return _trained[name]


@pytest.fixture(params=sorted(DEFINITIONS))
def trained(request, tmp_path_factory):
    return train_once(request.param, tmp_path_factory)


@pytest.mark.parametrize("launcher", ["gloo", "mpirun", "local"])
def test_evaluate_gives_the_final_validation(trained, launcher, tmp_path):
    model_dir, output, final = trained
    ckpt = output / "checkpoints" / "6"
    with open(ckpt / "state.json") as f:
        assert json.load(f)["validation_metrics"] == final
    before = sorted((p, p.stat().st_mtime) for p in output.rglob("*"))
    proc = run(launcher, "evaluate", model_dir, ckpt, "--output", tmp_path)
    lines = [line for line in proc.stdout.splitlines() if "[evaluation]" in line]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    assert f"checkpoint {ckpt} (batch 6)  " in lines[0]
    with open(tmp_path / "evaluations.jsonl") as f:
        (record,) = [json.loads(line) for line in f]  # written once, by rank 0
    assert record["ranks"] == (1 if launcher == "local" else 2)
    assert set(record["metrics"]) == set(final)
    for name, value in final.items():
        assert record["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert sorted((p, p.stat().st_mtime) for p in output.rglob("*")) == before  # the run is untouched


# (Plain mpirun is slower to stop the other rank, which then says the same error as "[rank 1] ...", as
# training does for an error in set-up.)
@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_errors_under_a_launcher_are_one_line(launcher, tmp_path, tmp_path_factory):
    """Before Horovod starts (every rank) and after (rank 0 alone reads the weights): one line, no hang."""
    model_dir, output, _ = train_once("losses", tmp_path_factory)
    proc = run(launcher, "evaluate", model_dir, output / "checkpoints" / "7", ok=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("harness: error:") == 1, proc.stderr
    assert f"harness: error: checkpoint {output}/checkpoints/7 does not exist" in proc.stderr

    broken = tmp_path / "6"
    shutil.copytree(output / "checkpoints" / "6", broken)
    with open(broken / "model.pt", "r+b") as f:
        f.truncate(100)
    proc = run(launcher, "evaluate", model_dir, broken, ok=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("harness: error:") == 1, proc.stderr
    assert (
        f"harness: error: checkpoint {broken} is corrupt: model.pt does not match its checksum" in proc.stderr
    )
