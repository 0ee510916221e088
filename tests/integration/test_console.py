"""What the console shows under every launcher: the same lines, whole, and one line per failure under
`harness launch`."""

import os
import re
from pathlib import Path

import pytest
import runner
from conftest import GOOD_CONFIG, GOOD_MODEL_DEF, write_model_def
from test_launchers import command

TAG = re.compile(r"^\[\d+(,\d+)?\]<(stdout|stderr)>:")  # horovodrun's per-rank tags
THROUGHPUT = re.compile(r"  \([\d,]+ samples/s(, ETA \w+)?\)$")


def run(argv, timeout=180):
    return runner.run(argv, timeout)


def normalized(stdout, output):
    """The report lines without launcher tags; the controller's name and the output path made equal."""
    lines = []
    for line in stdout.splitlines():
        if line.startswith("harness launch: "):
            continue
        assert not re.search(r"\[\d+(,\d+)?\]<std(out|err)>:", TAG.sub("", line)), f"a stray tag: {line!r}"
        line = TAG.sub("", line)
        assert line.strip(), f"an empty line in {stdout!r}"
        line = THROUGHPUT.sub("", line)  # measured, so it differs from run to run
        lines.append(line.replace("(mpi)", "(CTRL)").replace("(gloo)", "(CTRL)").replace(str(output), "OUT"))
    return lines


LAUNCHERS = ["gloo", "mpi", "mpirun", "launch-gloo", "launch-mpirun"]


def test_the_same_whole_lines_under_every_launcher(tmp_path):
    model_dir = write_model_def(tmp_path / "m")
    seen = {}
    for how in LAUNCHERS:
        out = tmp_path / f"out-{how}"
        proc = run(command(how, 2, model_dir, out))
        assert proc.returncode == 0, (how, proc.stdout[-2000:], proc.stderr[-2000:])
        seen[how] = normalized(proc.stdout, out)
    reference = seen["gloo"]
    assert reference[0].startswith("training on cpu with 2 ranks (CTRL), global batch 20, 6 batches")
    assert reference[-1] == "results: OUT/metrics.jsonl"
    assert [line.split()[0] for line in reference[1:-1]] == ["[training", "[training", "[validation]"]
    for how, lines in seen.items():
        assert lines == reference, how


CRASH = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):\n",
    "    def losses(self, predictions, labels):\n"
    "        import os\n"
    "        if os.environ.get('HOROVOD_RANK', os.environ.get('OMPI_COMM_WORLD_RANK')) == '1':\n"
    "            raise ValueError('boom')\n",
)


@pytest.mark.parametrize("launcher", ["gloo", "mpi", "mpirun"])
def test_a_failure_under_harness_launch_is_the_ranks_line_and_the_verdict(tmp_path, launcher):
    model_dir = write_model_def(tmp_path / "m", model_def=CRASH, config=GOOD_CONFIG + "max_restarts: 0\n")
    proc = run(command(f"launch-{launcher}", 2, model_dir, tmp_path / "out"))
    assert proc.returncode == 1  # the failing rank's own status (ValueError: 1), not the launcher's
    err = [TAG.sub("", line) for line in proc.stderr.splitlines()]
    source = open(os.path.join(model_dir, "model_def.py")).read().splitlines()
    at = next(i for i, line in enumerate(source, 1) if "raise ValueError" in line)
    assert err == [f"harness: error: [rank 1] ValueError: boom (at {model_dir}/model_def.py:{at} in losses)"]
    verdict = proc.stdout.splitlines()[-1]
    assert verdict.startswith("harness launch: giving up after 0 restarts; last failure: [rank 1] ValueError")
    assert "Traceback" not in proc.stdout + proc.stderr and "-----" not in proc.stdout + proc.stderr


def test_bad_input_under_harness_launch_is_one_line_and_status_2(tmp_path):
    model_dir = write_model_def(
        tmp_path / "m", config=GOOD_CONFIG + "optimizations: {aggregation_frequency: 0}\n"
    )
    proc = run(command("launch-gloo", 2, model_dir, tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"harness: error: {model_dir}/experiment.yaml: config key 'optimizations.aggregation_frequency': "
        "expected an integer >= 1, got 0"
    ]


def test_the_exit_after_training_keeps_what_a_normal_exit_does(tmp_path):
    """`harness` ends with os._exit (no interpreter teardown), after joining the user's threads, running
    atexit handlers (a logger's final flush) and flushing the streams: each of these shows here."""
    user_exit = GOOD_MODEL_DEF.replace(
        "class Trial(",
        "import atexit, threading, time\n"
        "def _late(path):\n"
        "    time.sleep(1.0)\n"
        "    open(path, 'w').write('joined')\n"
        "threading.Thread(target=_late, args=(__file__ + '.thread',)).start()\n"
        "atexit.register(lambda: open(__file__ + '.atexit', 'w').write('ran'))\n\n\n"
        "class Trial(",
    )
    model_dir = Path(write_model_def(tmp_path / "m", model_def=user_exit))
    for how in ("local", "mpirun"):
        output = tmp_path / how
        proc = run(runner.training(how, 1 if how == "local" else 2, model_dir, output))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.rstrip().endswith(f"results: {output}/metrics.jsonl"), proc.stdout[-500:]
        assert (model_dir / "model_def.py.thread").read_text() == "joined"
        assert (model_dir / "model_def.py.atexit").read_text() == "ran"
        assert "finalize" not in proc.stderr.lower(), proc.stderr[-3000:]  # Open MPI: ended without it
        os.remove(model_dir / "model_def.py.thread")
        os.remove(model_dir / "model_def.py.atexit")
