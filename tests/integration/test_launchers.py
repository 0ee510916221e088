"""End to end under real launchers: horovodrun (Gloo and MPI) and mpirun, two ranks, real data."""

import json
import os
import shutil
import sys

import pytest
import runner
import yaml
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, SAMPLES, write_model_def

BIN = runner.BIN
LAUNCHERS = ["gloo", "mpi"]

pytestmark = pytest.mark.skipif(
    shutil.which("horovodrun", path=BIN) is None, reason="Horovod is not installed (run `make setup`)"
)


def command(launcher, np, model_dir, output, *args):
    """The job's command line (runner.training): `local`, `mpirun`, `gloo`/`mpi`, `launch-<launcher>`."""
    return runner.training(launcher, np, model_dir, output, *args)


def launch(launcher, np, model_dir, output, *args, timeout=180, env=None):
    """Run the job (`env`: extra variables); returns (CompletedProcess, seconds)."""
    return runner.timed(command(launcher, np, model_dir, output, *args), timeout, env)


def reports(output, kind=None):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    return [e for e in entries if kind is None or e["type"] == kind]


def config_from(sample, tmp_path, **changes):
    """A copy of a sample's config with top-level keys replaced."""
    name = "experiment.yaml" if os.path.exists(os.path.join(sample, "experiment.yaml")) else "const.yaml"
    with open(os.path.join(sample, name)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def assert_no_rank_traceback(stderr):
    """No traceback from the ranks (horovodrun's own report of a failed job is its business)."""
    bad = [line for line in stderr.splitlines() if line.endswith("Traceback (most recent call last):")]
    bad = [line for line in bad if line.startswith("[")]  # ranks' lines carry the launcher's [rank] tag
    assert not bad, stderr[-3000:]


assert_ok = runner.assert_ok


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_digits_sample_reaches_95_percent(launcher, tmp_path):
    proc, seconds = launch(launcher, 2, os.path.join(SAMPLES, "digits"), tmp_path / "out")
    assert_ok(proc)
    validation = reports(tmp_path / "out", "validation")
    assert validation[-1]["metrics"]["accuracy"] >= 0.95
    assert validation[-1]["epoch"] == pytest.approx(8.0)
    training = reports(tmp_path / "out", "training")
    assert [e["batches"] for e in training] == sorted({e["batches"] for e in training})  # no duplicates
    assert "results:" in proc.stdout
    assert os.path.isfile(tmp_path / "out" / "config.yaml")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_multi_output_sample(launcher, tmp_path):
    sample = os.path.join(SAMPLES, "multi_output")
    cfg = config_from(sample, tmp_path, searcher={"metric": "loss", "max_length": {"batches": 40}})
    proc, _ = launch(launcher, 2, sample, tmp_path / "out", "--config", cfg)
    assert_ok(proc)
    training = reports(tmp_path / "out", "training")
    assert set(training[-1]["metrics"]) == {"loss", "digit_loss", "odd_loss", "digit_accuracy"}
    last = reports(tmp_path / "out", "validation")[-1]["metrics"]
    assert len(last["accuracy"]) == 2 and len(last["error_share"]) == 10
    # Exact validation: the shares of errors by class add up to the digit error rate over the whole set.
    assert sum(last["error_share"]) == pytest.approx(1 - last["accuracy"][0], rel=1e-6)


def test_pedl_definition_under_mpirun(tmp_path):
    proc, _ = launch("mpirun", 2, os.path.join(SAMPLES, "pedl_compat"), tmp_path / "out")
    assert_ok(proc)
    assert reports(tmp_path / "out", "validation")[-1]["metrics"]["error"] < 0.5


# The end of a job under the MPI controller: rank 1 reaches the last broadcast (mpi4py, outside Horovod)
# after rank 0, the broadcast's root, has left it and shut Horovod down. Every rank's background thread
# finalizes MPI on the first rank's shutdown, so without a barrier first rank 1's broadcast ran on a
# finalized MPI (signal 11 at the end of 3 runs in 28 when it was a race; an abort every time here).
LATE_LAST_BROADCAST = """
import time
from harness.distributed.horovod import Horovod

backend = Horovod()
assert backend.controller == "mpi", backend.controller
if backend.rank == 1:
    time.sleep(1.0)
said = backend.broadcast_object("from rank 0" if backend.rank == 0 else None)
backend.shutdown()
print(f"rank {backend.rank} got {said!r} and shut down", flush=True)
"""


@pytest.mark.parametrize("launcher", ["mpi", "mpirun"])
def test_a_rank_late_to_the_last_broadcast_still_ends_cleanly(launcher, tmp_path):
    script = tmp_path / "late.py"
    script.write_text(LATE_LAST_BROADCAST)
    proc = runner.run(runner.under(launcher, 2, [sys.executable, str(script)]), timeout=120)
    assert_ok(proc)
    for rank in (0, 1):
        assert f"rank {rank} got 'from rank 0' and shut down" in proc.stdout, proc.stdout


# The other side of that meeting: rank 1 never comes to it (a Trainer script's sys.exit() on one rank), and
# leaves later without shutting Horovod down. Rank 0 waits PEERS_WAIT seconds, not forever, then ends.
NEVER_AT_THE_END = """
import os
import time
from harness.distributed.horovod import Horovod

Horovod.PEERS_WAIT = 3.0
backend = Horovod()
if backend.rank == 1:
    time.sleep(15.0)
    print("rank 1 leaves", flush=True)
    os._exit(0)
backend.shutdown()
print("rank 0 shut down", flush=True)
"""


def test_a_rank_that_never_comes_to_the_end_does_not_hold_the_others(tmp_path):
    script = tmp_path / "never.py"
    script.write_text(NEVER_AT_THE_END)
    proc = runner.run(runner.under("mpi", 2, [sys.executable, str(script)]), timeout=120)
    assert_ok(proc)
    lines = [line.split(":", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[1,")]
    assert lines == ["rank 0 shut down", "rank 1 leaves"], proc.stdout


def test_np1_and_np2_agree(model_dir, tmp_path):
    """Same deterministic model, same global batch: the same optimisation and the same validation numbers."""
    write_model_def(model_dir)
    results = {}
    for name, launcher, np in [
        ("local", "local", 1),
        ("np1", "gloo", 1),
        ("np2", "gloo", 2),
        ("mpi2", "mpi", 2),
    ]:
        proc, _ = launch(launcher, np, model_dir, tmp_path / name)
        assert_ok(proc)
        results[name] = reports(tmp_path / name, "validation")[-1]["metrics"]
    for name in ("np1", "np2", "mpi2"):
        for metric, value in results["local"].items():
            assert results[name][metric] == pytest.approx(value, rel=1e-5), (name, metric)


DOWNLOAD_DATA = (
    GOOD_DATA
    + """

def download_data(config, hparams):
    import os
    log = config["data"]["log"]
    with open(os.path.join(log, "downloads"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    if config["data"].get("fail"):
        raise RuntimeError("the mirror is down")
    os.makedirs(os.path.join(log, "dataset"), exist_ok=True)
    return os.path.join(log, "dataset")


_make = make_data_loaders


def make_data_loaders(config, hparams):
    import os
    with open(os.path.join(config["data"]["log"], f"seen-{os.getpid()}"), "w") as f:
        f.write(harness.get_download_data_dir())
    return _make(config, hparams)
"""
)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_download_once_per_machine(launcher, model_dir, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    write_model_def(model_dir, data=DOWNLOAD_DATA, config=GOOD_CONFIG + f"data:\n  log: {log}\n")
    proc, _ = launch(launcher, 2, model_dir, tmp_path / "out")
    assert_ok(proc)
    assert len((log / "downloads").read_text().split()) == 1
    seen = sorted(p for p in os.listdir(log) if p.startswith("seen-"))
    assert len(seen) == 2
    assert {(log / s).read_text() for s in seen} == {str(log / "dataset")}


@pytest.mark.parametrize("launcher", LAUNCHERS + ["mpirun"])
def test_raising_download_ends_every_rank(launcher, model_dir, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    write_model_def(
        model_dir, data=DOWNLOAD_DATA, config=GOOD_CONFIG + f"data:\n  log: {log}\n  fail: true\n"
    )
    proc, seconds = launch(launcher, 2, model_dir, tmp_path / "out", timeout=60)
    assert proc.returncode != 0
    assert seconds < 30
    assert "download_data() raised RuntimeError: the mirror is down" in proc.stderr
    assert_no_rank_traceback(proc.stderr)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_batch_size_not_divisible(launcher, model_dir, tmp_path):
    write_model_def(model_dir, config=GOOD_CONFIG.replace("batch: 20", "batch: 21"))
    proc, seconds = launch(launcher, 2, model_dir, tmp_path / "out", timeout=60)
    assert proc.returncode != 0 and seconds < 30
    assert "batch_size() is 21, not divisible by the 2 ranks" in proc.stderr
    assert proc.stderr.count("harness: error:") == 1
    assert_no_rank_traceback(proc.stderr)


@pytest.mark.parametrize("launcher", LAUNCHERS + ["mpirun"])
def test_error_on_one_rank_does_not_hang_the_other(launcher, model_dir, tmp_path):
    """Rank 1 fails mid-training while rank 0 waits in the gradient allreduce: the job still ends."""
    model = GOOD_MODEL_DEF.replace(
        "return nn.functional.cross_entropy(predictions, labels)",
        "import os\n"
        "        if os.environ.get('HOROVOD_RANK', os.environ.get('OMPI_COMM_WORLD_RANK')) == '1':\n"
        "            raise ValueError('bad record on rank 1')\n"
        "        return nn.functional.cross_entropy(predictions, labels)",
    )
    write_model_def(model_dir, model_def=model)
    proc, seconds = launch(launcher, 2, model_dir, tmp_path / "out", timeout=90)
    assert proc.returncode != 0
    assert seconds < 30
    assert "[rank 1] ValueError: bad record on rank 1 (at " in proc.stderr
    assert "model_def.py:" in proc.stderr


def test_bad_config_single_line(model_dir, tmp_path):
    write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{steps: 3}"))
    proc, seconds = launch("gloo", 2, model_dir, tmp_path / "out", timeout=60)
    assert proc.returncode != 0 and seconds < 30
    assert "config key 'searcher.max_length.steps': unknown unit" in proc.stderr
    assert proc.stderr.count("harness: error:") == 1


def test_missing_model_directory_exit_status(tmp_path):
    proc, _ = launch("local", 1, tmp_path / "missing", tmp_path / "out", timeout=60)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"harness: error: model definition directory {tmp_path / 'missing'} does not exist"
    )


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_multi_line_error_in_user_code_is_one_line_naming_the_file(launcher, model_dir, tmp_path):
    """As PEDL's multi-output example on NumPy >= 1.24 (`np.int`): the error comes from a dataset while
    batches are drawn, and NumPy's message spans several lines."""
    data = GOOD_DATA.replace(
        "    return harness.DataLoader(train,",
        "    class Old(torch.utils.data.Dataset):\n"
        "        def __len__(self):\n"
        "            return 300\n\n"
        "        def __getitem__(self, i):\n"
        "            raise AttributeError('no attribute int.\\n`np.int` was an alias.\\n  see the notes')\n\n"
        "    train = Old()\n"
        "    return harness.DataLoader(train,",
    )
    write_model_def(model_dir, data=data)
    proc, _ = launch(launcher, 2, model_dir, tmp_path / "out", timeout=60)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "harness: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "AttributeError: no attribute int. `np.int` was an alias. see the notes" in errors[0]
    assert f"(at {os.path.abspath(model_dir)}/data.py:" in errors[0] and "in __getitem__)" in errors[0]
    assert "see the notes" not in proc.stderr.replace(errors[0], "")
    assert_no_rank_traceback(proc.stderr)
