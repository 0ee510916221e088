"""The same training under both backends (issue 25, item 3): Horovod (`horovodrun --gloo`) and
torch.distributed (`torchrun --standalone ... -m harness`, DDP), real launchers, real data.

What is compared, and how closely:

- The same model definition, config and seed under both backends at the same number of ranks give the same
  bits: every metric of every report (training and validation) and every weight of the last checkpoint
  (`torch.equal`). Observed for every model here, at np=1 and np=2. It holds at np=2 because each backend
  averages a gradient of two ranks with one addition, which is commutative (the order of DDP's buckets and
  of Horovod's fusion buffer cannot matter), and a scale by 1/2, which is exact; the torch backend's fp16
  compression rounds in Horovod's order (fp16, sum, scale by 1/size). At np > 2 the two would add the ranks'
  gradients in different orders (Gloo's ring inside DDP, Horovod's own), and the bits may differ in the
  last place: not tested here (a 2-core machine).
- np=1 against np=2 under one backend is not the same arithmetic (the mean of one batch against the mean of
  two half-batch means): relative tolerance 1e-5, as in test_launchers.test_np1_and_np2_agree (the largest
  difference seen was ~1e-6). Validation is exact on both backends: every record evaluated once.
- A checkpoint written under one backend resumes under the other with the same bits as a run that was
  never interrupted (at the same np), in the middle of an aggregation window too.

The semantic tests of a job (a stop, a killed rank, a stall, a dead launcher, resume at another np) run here
under torchrun; their Horovod twins are in test_long_runs, test_stops and test_failures.
"""

import json
import os
import signal

import pytest
import runner
import torch
import yaml
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, SAMPLES, write_model_def
from determined_defs import CONTEXT_DEF
from test_failures import STALL_IN_LOSSES, STALL_TIMEOUT, assert_job_gone, rank_pids
from test_launchers import assert_no_rank_traceback, assert_ok, reports
from test_long_runs import RESUME_CONFIG, RESUME_MODEL, final_weights, start_and_wait_for_training
from test_stops import SLOW_FULL_DATASET
from test_training_options import BATCH_API_MODEL, DATA

from harness.output import checkpoint

TIMEOUT = 240  # per job: a hang fails the test instead of holding the suite


def job(launcher, np, model_dir, output, *args, env=None, cwd=None):
    """Run a training job to its end: `gloo` (horovodrun --gloo), `torchrun` or `local`."""
    cmd = runner.training(launcher, np, model_dir, output, *args)
    return runner.run(cmd, timeout=TIMEOUT, env=env, cwd=cwd)


def trained(launcher, np, model_dir, output, *args, env=None):
    proc = job(launcher, np, model_dir, output, *args, env=env)
    assert_ok(proc)
    return proc


def assert_same_bits(a, b):
    """Every report of runs `a` and `b` (OUTPUT folders) is the same, metric for metric, bit for bit; so is
    every weight of their last checkpoint."""
    ra, rb = reports(a), reports(b)
    assert [(e["type"], e["batches"]) for e in ra] == [(e["type"], e["batches"]) for e in rb]
    for x, y in zip(ra, rb):
        assert (x["epoch"], x["records"], x["metrics"]) == (y["epoch"], y["records"], y["metrics"]), (x, y)
    (at_a, wa), (at_b, wb) = final_weights(a), final_weights(b)
    assert at_a == at_b and list(wa) == list(wb)
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, different


def assert_close(a, b, rel=1e-5):
    """The reports of runs `a` and `b` agree to `rel` (np=1 against np=2)."""
    ra, rb = reports(a), reports(b)
    assert [(e["type"], e["batches"]) for e in ra] == [(e["type"], e["batches"]) for e in rb]
    for x, y in zip(ra, rb):
        assert set(x["metrics"]) == set(y["metrics"])
        for k, v in x["metrics"].items():
            assert y["metrics"][k] == pytest.approx(v, rel=rel, abs=1e-7), (x["type"], x["batches"], k)


def shortened(sample, tmp_path, batches):
    """A copy of a sample's config that trains `batches` batches and validates halfway and at the end."""
    name = "experiment.yaml" if os.path.exists(os.path.join(sample, "experiment.yaml")) else "const.yaml"
    with open(os.path.join(sample, name)) as f:
        cfg = yaml.safe_load(f)
    if "max_steps" in cfg["searcher"]:  # PEDL's steps of batches_per_step
        cfg["searcher"]["max_steps"], cfg["batches_per_step"], cfg["min_validation_period"] = (
            2,
            batches // 2,
            1,
        )
    else:
        cfg["searcher"]["max_length"] = {"batches": batches}
        cfg["min_validation_period"] = {"batches": batches // 2}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# The same numbers


# The samples whose trial API the deterministic models below do not already cover (train_batch and the
# context API are there): dropout and the losses API, two models, evaluate_full_dataset.
SAMPLE_NAMES = ["digits", "determined_gan", "pedl_full_dataset"]


@pytest.mark.parametrize("sample", SAMPLE_NAMES)
def test_a_sample_trains_to_the_same_bits_under_both_backends(sample, tmp_path):
    """The losses API with dropout (digits), Determined's context API with two models and two optimizers
    (determined_gan; the discriminator is called three times per batch), evaluate_full_dataset
    (pedl_full_dataset: rank 0 alone, run_on_chief's heartbeats on the torch backend's Gloo group).
    Per-rank randomness (dropout, the GAN's noise) is seeded alike by both backends, so these compare at
    np=2; np=1 against np=2 is compared on deterministic models below."""
    directory = os.path.join(SAMPLES, sample)
    config = shortened(directory, tmp_path, 30)
    horovod = trained("gloo", 2, directory, tmp_path / "horovod", "--config", config)
    torch_run = trained("torchrun", 2, directory, tmp_path / "torch", "--config", config)
    assert "with 2 ranks (gloo)" in horovod.stdout and "with 2 ranks (gloo)" in torch_run.stdout
    assert_same_bits(tmp_path / "horovod", tmp_path / "torch")
    assert reports(tmp_path / "torch", "validation")[-1]["batches"] == 30


CONTEXT_CONFIG = RESUME_CONFIG.replace("batch: 20", "global_batch_size: 20").replace(
    "{batches: 30}", "{batches: 12}"
)
API_MODELS = {  # deterministic models (no dropout, no per-rank noise): np=1 and np=2 can agree
    "losses": (GOOD_MODEL_DEF, GOOD_DATA, GOOD_CONFIG.replace("{batches: 6}", "{batches: 12}")),
    "train_batch": (BATCH_API_MODEL, DATA, GOOD_CONFIG.replace("batch: 20", "global_batch_size: 32")),
    "context": (CONTEXT_DEF, None, CONTEXT_CONFIG),
}


@pytest.mark.parametrize("api", list(API_MODELS))
def test_each_trial_api_at_np1_and_np2_under_both_backends(api, tmp_path):
    """np=2: the same bits under both backends; np=1 (torchrun's single rank runs as one process, as
    horovodrun's does: the same bits, compared once, for the losses API) to rel 1e-5 of np=2."""
    model, data, config = API_MODELS[api]
    model_dir = write_model_def(tmp_path / "model", model_def=model, data=data, config=config)
    runs = [("gloo", 2), ("torchrun", 2), ("torchrun", 1)] + ([("gloo", 1)] if api == "losses" else [])
    for launcher, np in runs:
        trained(launcher, np, model_dir, tmp_path / f"{launcher}{np}")
    assert_same_bits(tmp_path / "gloo2", tmp_path / "torchrun2")
    assert_close(tmp_path / "torchrun1", tmp_path / "torchrun2")
    if api == "losses":
        assert_same_bits(tmp_path / "gloo1", tmp_path / "torchrun1")


OPTIONS = {
    # DDP's no_sync for the window's first batches, clipping after the window's allreduce, bf16 autocast
    "aggregation-clip-bf16": "{aggregation_frequency: 3, clip_grad_l2_norm: 0.2, mixed_precision: bf16}",
    # the fp16 compression hook, with no_sync and bf16 (DDP's own bf16 hook needs NCCL)
    "compression-aggregation-bf16": (
        "{gradient_compression: true, aggregation_frequency: 2, mixed_precision: bf16}"
    ),
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_training_options_give_the_same_bits_under_both_backends(options, tmp_path):
    config = GOOD_CONFIG.replace("batch: 20", "global_batch_size: 16").replace(
        "{batches: 6}", "{batches: 18}"
    )
    config += f"optimizations: {OPTIONS[options]}\n"
    model_dir = write_model_def(tmp_path / "model", model_def=BATCH_API_MODEL, data=DATA, config=config)
    for launcher in ("gloo", "torchrun"):
        trained(launcher, 2, model_dir, tmp_path / launcher)
    # Bits equal to Horovod's also say the options acted: test_training_options shows that they change
    # Horovod's training (aggregation, clipping, bf16, compression).
    assert_same_bits(tmp_path / "gloo", tmp_path / "torchrun")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints across backends, a killed rank, another number of ranks

# RESUME_MODEL (dropout, momentum, shuffled data; KILL_AT=n: rank 1 SIGKILLs itself at its n-th batch) in
# windows of 7 batches with bf16 and clipping: the checkpoint of batch 8 lies inside a window.
CROSS_CONFIG = (
    RESUME_CONFIG + "optimizations: {aggregation_frequency: 7, mixed_precision: bf16, clip_grad_val: 0.05}\n"
)
KILL_AT = 11  # checkpoints every 4 batches: the run resumes from batch 8, the second window's first


def killed_then_resumed(first, then, model_dir, output, marker):
    """Run under `first` until rank 1 is SIGKILLed at batch KILL_AT, then resume under `then` to the end;
    returns the killed run's process."""
    env = {"KILL_AT": str(KILL_AT), "MARKER": str(marker)}
    killed = job(first, 2, model_dir, output, env=env)
    assert killed.returncode != 0 and os.path.exists(marker), killed.stdout[-2000:] + killed.stderr[-2000:]
    resumed = trained(then, 2, model_dir, output, env=env)
    assert f"resuming from {output}/checkpoints/8 at batch 8" in resumed.stdout, resumed.stdout[-2000:]
    return killed


def test_a_checkpoint_resumes_under_the_other_backend_exactly(tmp_path):
    """Horovod's checkpoint resumed by torchrun, and torchrun's by Horovod, each in mid-window: the same bits
    as a run never interrupted. Under torchrun the killed rank is named by torchrun's report (root cause:
    rank 1, SIGKILL); rank 0, whose collective broke, adds no error line of its own."""
    model_dir = write_model_def(tmp_path / "model", model_def=RESUME_MODEL, config=CROSS_CONFIG)
    trained("torchrun", 2, model_dir, tmp_path / "straight")
    killed_then_resumed("gloo", "torchrun", model_dir, tmp_path / "horovod-then-torch", tmp_path / "m1")
    assert_same_bits(tmp_path / "straight", tmp_path / "horovod-then-torch")

    killed = killed_then_resumed(
        "torchrun", "gloo", model_dir, tmp_path / "torch-then-horovod", tmp_path / "m2"
    )
    assert_same_bits(tmp_path / "straight", tmp_path / "torch-then-horovod")
    root_cause = killed.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "(SIGKILL)" in root_cause, killed.stderr[-3000:]
    assert "harness: error:" not in killed.stderr, killed.stderr[-3000:]


NO_DROPOUT = RESUME_MODEL.replace("nn.Dropout(0.2), ", "")  # np=1 and np=2 draw different dropout masks


def test_resume_at_another_number_of_ranks_under_torch(tmp_path):
    """2 ranks then 1, and 1 then 2, under torchrun: the same reports as one process that ran straight (to
    rel 1e-5: np=1 and np=2 differ in rounding)."""
    assert NO_DROPOUT != RESUME_MODEL
    config = RESUME_CONFIG.replace("{batches: 30}", "{batches: 20}")
    model_dir = write_model_def(tmp_path / "model", model_def=NO_DROPOUT, config=config)
    trained("local", 1, model_dir, tmp_path / "straight")
    short = write_model_def(
        tmp_path / "short", model_def=NO_DROPOUT, config=config.replace("{batches: 20}", "{batches: 12}")
    )
    for first, then in [(2, 1), (1, 2)]:
        output = tmp_path / f"np{first}-then-np{then}"
        trained("torchrun", first, short, output)
        proc = trained("torchrun", then, model_dir, output)
        assert f"resuming from {output}/checkpoints/12 at batch 12" in proc.stdout, proc.stdout[-2000:]
        assert f"the checkpoint was written by {first} rank" in proc.stdout, proc.stdout[-2000:]
        # The first run validated at its end (12) too; otherwise the same reports.
        straight = [e for e in reports(tmp_path / "straight")]
        resumed = [e for e in reports(output) if not (e["type"] == "validation" and e["batches"] == 12)]
        assert [(e["type"], e["batches"]) for e in resumed] == [(e["type"], e["batches"]) for e in straight]
        for x, y in zip(straight, resumed):
            for k, v in x["metrics"].items():
                assert y["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (output, x["batches"], k)


# ----------------------------------------------------------------------------------------------------------
# Stops, a stall, a dead launcher

LONG = RESUME_CONFIG.replace("{batches: 30}", "{batches: 3000}")


def test_sigterm_to_torchrun_checkpoints_at_one_batch(tmp_path):
    """SIGTERM to torchrun, which passes it on to every rank: the ranks agree on a batch, checkpoint it and
    exit 0 (torchrun itself exits 1, its own SignalException). The checkpoint resumes under Horovod."""
    model_dir = write_model_def(tmp_path / "model", model_def=RESUME_MODEL, config=LONG)
    output = tmp_path / "out"
    cmd = runner.training("torchrun", 2, model_dir, output)
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    pids = rank_pids(output)
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-3000:]
    assert "Sending process" in stderr and "closing signal SIGTERM" in stderr  # torchrun passed it on
    lines = [line for line in stdout.splitlines() if "stopped by SIGTERM at batch" in line]
    assert len(lines) == 1, stdout[-2000:]
    path = lines[0].split("checkpoint: ")[1].strip()
    assert checkpoint.verify(path) is None
    batches = json.load(open(os.path.join(path, "state.json")))["progress"]["batches"]
    assert batches == int(os.path.basename(path))
    assert "harness: error:" not in stderr, stderr[-3000:]
    assert_job_gone(output, pids)
    write_model_def(
        model_dir,
        model_def=RESUME_MODEL,
        config=LONG.replace("{batches: 3000}", f"{{batches: {batches + 2}}}"),
    )
    proc = trained("gloo", 2, model_dir, output)
    assert f"resuming from {path} at batch {batches}" in proc.stdout


def test_sigkill_of_torchrun_stops_its_ranks_with_a_checkpoint(tmp_path):
    """torchrun's agent is a launcher the ranks watch (preemption.launcher_ancestors): when it dies they
    agree on a stop and checkpoint instead of training on as orphans."""
    model_dir = write_model_def(tmp_path / "model", model_def=RESUME_MODEL, config=LONG)
    output = tmp_path / "out"
    cmd = runner.training("torchrun", 2, model_dir, output)
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    pids = rank_pids(output)
    proc.kill()
    stdout, _ = proc.communicate(timeout=60)  # the ranks hold its stdout until they end
    assert_job_gone(output, pids)
    newest = checkpoint.checkpoint_dirs(str(output / "checkpoints"))
    assert newest, "the ranks left no checkpoint"
    assert "stopped by the exit of its launcher (torchrun" in stdout or "stopped by a stop request" in stdout


# test_stops.py's trial, whose evaluate_full_dataset sleeps 120 s for a SIGTERM, evaluating for 4.5 s instead
FULL_DATASET_HEARTBEATS = SLOW_FULL_DATASET.replace(
    """        open(os.environ["MARKER"], "a").close()
        time.sleep(120)
        return {"x": 1.0}""",
    """        time.sleep(4.5)  # run_on_chief's heartbeat (every 2 s) allreduces twice meanwhile
        return {"records": float(sum(len(y) for _, y in data_loader))}""",
)


def test_a_long_evaluate_full_dataset_under_torchrun_keeps_the_ranks_waiting(tmp_path):
    """Rank 0 evaluates alone for 4.5 s while a thread of its own allreduces heartbeats with rank 1's main
    thread (run_on_chief, on the harness's Gloo group): both validations end, rank 0 having seen every one
    of the 100 validation records, and no rank waits for a collective that never comes."""
    assert "time.sleep(4.5)" in FULL_DATASET_HEARTBEATS
    config = GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20")
    config += "min_validation_period: {batches: 3}\n"
    model_dir = write_model_def(tmp_path / "model", model_def=FULL_DATASET_HEARTBEATS, config=config)
    trained("torchrun", 2, model_dir, tmp_path / "out")
    validations = reports(tmp_path / "out", "validation")
    assert [(e["batches"], e["metrics"]["records"]) for e in validations] == [(3, 100.0), (6, 100.0)]


STALL_CONFIG = GOOD_CONFIG + f"stall_timeout: {STALL_TIMEOUT}\nsetup_timeout: 120\n"


def test_a_stalled_rank_under_torchrun_is_named_with_its_user_code(tmp_path):
    """Rank 1 sleeps in losses(); rank 0 waits for it inside DDP's backward (autograd's engine): the one
    error line is rank 1's, naming losses() and its line; torchrun names rank 1 as the root cause."""
    model_dir = write_model_def(tmp_path / "model", model_def=STALL_IN_LOSSES, config=STALL_CONFIG)
    output = tmp_path / "out"
    proc = job("torchrun", 2, model_dir, output)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "harness: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "[rank 1] no progress for" in errors[0] and "in training: stuck in losses() at " in errors[0]
    assert f"{model_dir}/model_def.py:" in errors[0] and f"(stall_timeout {STALL_TIMEOUT} s)" in errors[0]
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, proc.stderr[-3000:]
    assert_no_rank_traceback(proc.stderr)
    assert_job_gone(output, rank_pids(output))


# ----------------------------------------------------------------------------------------------------------
# The trial's own use of torch.distributed, and what DDP cannot do

UNUSED_PARAMETER = GOOD_MODEL_DEF.replace(
    "        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))",
    """        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
                self.spare = nn.Linear(10, 10)  # never used

            def forward(self, x):
                return self.body(x)

        return Net()""",
)


def test_a_parameter_without_gradient_is_one_line_under_torch(tmp_path):
    """Horovod averages a zero gradient for a parameter the loss does not use; DDP (find_unused_parameters
    off: it would cost a graph traversal per batch) fails the next batch with a multi-line error. The harness
    says it in one line naming the parameters, status 2 (the model definition's problem)."""
    assert UNUSED_PARAMETER != GOOD_MODEL_DEF
    model_dir = write_model_def(tmp_path / "model", model_def=UNUSED_PARAMETER)
    proc = job("torchrun", 2, model_dir, tmp_path / "out")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "harness: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Net's parameter(s) spare.weight, spare.bias got no gradient" in errors[0], errors[0]
    assert "requires_grad=False" in errors[0]
    assert "exitcode  : 2" in proc.stderr  # torchrun's report: the rank's own status


OWN_ALLREDUCE = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):\n",
    """    def losses(self, predictions, labels):
        import torch.distributed as dist
        if dist.is_initialized():  # the trial's own collective, on the default group, beside DDP's
            ones = torch.ones(1)
            dist.all_reduce(ones)
            self.world = int(ones.item())
""",
).replace(
    '        return {"loss": losses,',
    '        return {"world": torch.tensor(float(getattr(self, \'world\', 1))), "loss": losses,',
)


def test_the_trials_own_torch_distributed_calls_work(tmp_path):
    assert OWN_ALLREDUCE.count("all_reduce") == 1 and '"world"' in OWN_ALLREDUCE
    model_dir = write_model_def(tmp_path / "model", model_def=OWN_ALLREDUCE)
    trained("torchrun", 2, model_dir, tmp_path / "out")
    assert reports(tmp_path / "out", "validation")[-1]["metrics"]["world"] == 2


# ----------------------------------------------------------------------------------------------------------
# A Determined Trainer script under torchrun


def test_a_trainer_script_runs_under_torchrun_as_under_horovodrun(tmp_path):
    """`torchrun --nproc-per-node 2 train.py` (the script unchanged): the same bits as horovodrun's."""
    from test_determined_launchers import run_script, trainer_script

    script = trainer_script(tmp_path, "max_length = pytorch.Epoch(3)", "max_length = pytorch.Batch(45)")
    for launcher in ("gloo", "torchrun"):
        proc = run_script(launcher, 2, script, tmp_path / launcher)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "with 2 ranks (gloo)" in proc.stdout
    assert_same_bits(tmp_path / "gloo", tmp_path / "torchrun")
