"""What a new user trips over, in one process: missing config, pipes, threads, no validation, the console."""

import json
import os
import sys

import pytest
import runner
import yaml
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, write_model_def

BIN = os.path.dirname(sys.executable)
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI"))}


def harness(*args, env=None, timeout=120, shell=None):
    cmd = ["bash", "-c", shell] if shell else runner.harness(*args)
    return runner.run(cmd, timeout, env)


def test_a_model_directory_without_a_config_is_one_line(tmp_path):
    model_dir = write_model_def(tmp_path / "m", config=None)
    proc = harness(model_dir, "--output", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"harness: error: no experiment config: {model_dir} holds no experiment.yaml or const.yaml; write "
        "one there (hyperparameters, searcher.max_length, ...) or pass --config FILE"
    )


def test_config_from_a_pipe_in_one_process(tmp_path):
    model_dir = write_model_def(tmp_path / "m", config=None)
    config = GOOD_CONFIG.replace("\n", "\\n")
    proc = harness(shell=f"harness {model_dir} --output {tmp_path}/out --config <(printf '{config}')")
    assert proc.returncode == 0, proc.stderr
    assert "6 batches" in proc.stdout


def test_harness_launch_hands_a_piped_config_to_the_ranks(tmp_path):
    model_dir = write_model_def(tmp_path / "m", config=None)
    config = GOOD_CONFIG.replace("\n", "\\n")
    cmd = f"harness launch -np 1 {model_dir} --output {tmp_path}/out --config <(printf '{config}')"
    proc = harness(shell=cmd, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 batches" in proc.stdout
    assert yaml.safe_load((tmp_path / "out" / "launch-config.yaml").read_text())["hyperparameters"] == {
        "batch": 20
    }


def test_harness_launch_with_the_word_harness_says_what_to_drop(tmp_path):
    proc = harness(shell=f"cd {tmp_path} && harness launch -np 2 harness ./m --output out")
    assert proc.returncode == 2
    assert "drop the word 'harness' after the launch options" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


THREADS_MODEL = GOOD_MODEL_DEF.replace(
    "    def build_model(self, hparams):\n",
    "    def build_model(self, hparams):\n"
    "        import os\n"
    "        open(os.environ['THREADS_FILE'], 'w').write(str(torch.get_num_threads()))\n",
)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell the choices apart")
@pytest.mark.parametrize(
    "how, expected",
    [("default", os.cpu_count()), ("OMP_NUM_THREADS", 1), ("set_num_threads", 1)],
)
def test_the_users_thread_count_wins(tmp_path, how, expected):
    model = THREADS_MODEL
    if how == "set_num_threads":
        model = model.replace("import harness\n", "import harness\ntorch.set_num_threads(1)\n", 1)
    model_dir = write_model_def(tmp_path / "m", model_def=model)
    env = {"THREADS_FILE": str(tmp_path / "threads")}
    if how == "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = "1"
    proc = harness(model_dir, "--output", tmp_path / "out", env=env)
    assert proc.returncode == 0, proc.stderr
    seen = int((tmp_path / "threads").read_text())
    assert seen == expected, (
        f"{seen} threads, expected {expected}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )


NO_VALIDATION_DATA = GOOD_DATA.replace("harness.DataLoader(val, batch_size=16)", "None")


def test_training_without_a_validation_loader(tmp_path):
    model_dir = write_model_def(tmp_path / "m", data=NO_VALIDATION_DATA)
    proc = harness(model_dir, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (
        "note: make_data_loaders() returned no validation loader: training without validation" in proc.stdout
    )
    entries = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [e["type"] for e in entries] == ["training", "training"]
    assert os.path.isdir(tmp_path / "out" / "checkpoints" / "6")  # the final checkpoint all the same


def test_searcher_metric_without_a_validation_loader_is_an_error(tmp_path):
    config = GOOD_CONFIG.replace("searcher:\n", "searcher:\n  metric: accuracy\n")
    model_dir = write_model_def(tmp_path / "m", data=NO_VALIDATION_DATA, config=config)
    proc = harness(model_dir, "--output", tmp_path / "out")
    assert proc.returncode == 2
    assert (
        "config key 'searcher.metric' names 'accuracy', but make_data_loaders() returned no " in proc.stderr
    )


def test_closing_the_consoles_reader_does_not_stop_training(tmp_path):
    model_dir = write_model_def(tmp_path / "m")
    proc = harness(
        shell=f"harness {model_dir} --output {tmp_path}/out | head -n 1; echo status ${{PIPESTATUS[0]}}"
    )
    assert proc.stdout.splitlines()[0].startswith("training on cpu, one process (no launcher)")
    assert proc.stdout.splitlines()[-1] == "status 0", proc.stdout + proc.stderr
    assert "BrokenPipeError" not in proc.stderr
    entries = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert entries[-1]["batches"] == 6


def test_console_numbers_line_up_and_the_config_keeps_unicode(tmp_path):
    config = GOOD_CONFIG + "description: Größe über alles\n"
    model_dir = write_model_def(tmp_path / "m", config=config)
    proc = harness(model_dir, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    reports = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    for line in reports:
        metrics = line.split("  (")[0]  # without the throughput: "(1,571 samples/s, ETA 3s)"
        values = metrics.split("epoch")[1].split()[2::2]  # "0.40  loss 2.2984  accuracy 0.1400": the values
        assert values and all(len(v.split(".")[1]) == 4 for v in values), line
    assert "description: Größe über alles" in (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8")
