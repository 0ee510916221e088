"""The benchmark: the harness (on Horovod, and on its torch backend under torchrun) against a hand-written
Horovod loop, torchrun + DDP and Lightning.

Same model, data, seed, global batch, number of ranks, threads per rank (cores / ranks) and number of
training batches for every contender; each configuration is launched fresh, the contenders interleaved
(A B C D E, then the next repetition in a rotated order), and medians reported. The training options
(gradient aggregation, fp16 gradient compression, bf16 autocast: VARIANTS) are measured at np=2 for the
harness and the hand-written Horovod loop, each with the same option. See bench/README.md.

    .venv/bin/python bench/run.py                # the full benchmark: bench/RESULTS.md, bench/results.json
    .venv/bin/python bench/run.py --quick --out /tmp/b   # a tiny end-to-end run (the test's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(os.path.abspath(sys.executable))
sys.path.insert(0, os.path.join(HERE, "workloads"))
import common  # noqa: E402

# In this order, rotated every repetition: each harness backend runs next to its hand-written counterpart.
CONTENDERS = ("harness", "horovod", "torch", "ddp", "lightning")
LABELS = {
    "harness": "harness (horovodrun)",
    "horovod": "hand-written Horovod (horovodrun)",
    "torch": "harness, torch backend (torchrun)",
    "ddp": "torchrun + DDP (Gloo)",
    "lightning": "Lightning Trainer (torchrun, DDP)",
}
HARNESS = ("harness", "torch")  # the harness's contenders: a model definition run by `harness`
# Each harness contender's hand-written counterpart: the same launcher and collectives, written by hand.
HANDWRITTEN = {"harness": "horovod", "torch": "ddp"}
LOG_EVERY = 100  # the harness's scheduling_unit; the loops print the loss as often

# Training batches per run (global batches; optimizer steps too, except under gradient aggregation, which
# steps once every k batches) and the untimed warm-up at the start of them. Sized so that the timed part
# takes a few seconds per run. The batches must be a multiple of every aggregation factor in VARIANTS; under
# aggregation the warm-up is rounded up to whole optimizer steps (conv: 13 steps of 4 = 52 batches).
FULL_BATCHES = {"conv": (1200, 50), "mlp": (5000, 300)}  # long enough to average over short bursts
QUICK_BATCHES = {"conv": (12, 4), "mlp": (32, 10)}

TARGETS = {"conv": 0.97, "mlp": 0.90}  # harness / hand-written Horovod, training samples/s
TORCH_TARGET = 0.97  # the torch backend / hand-written torchrun + DDP, training samples/s (issue 25)
FIRST_BATCH_SLACK_S = 5.0
VALIDATION_OVERHEAD_MAX = 0.01


@dataclass(frozen=True)
class Variant:
    """A setting of the training options, given to the harness as `optimizations:` in its config and to the
    hand-written Horovod loop as flags (bench/hvd_loop.py does them the way Horovod documents them)."""

    name: str
    what: str
    aggregation: int = 1  # optimizations.aggregation_frequency / --aggregation
    compression: str = "none"  # "fp16": optimizations.gradient_compression / --compression fp16
    precision: str = "fp32"  # "bf16": optimizations.mixed_precision / --precision bf16
    target: Optional[float] = None  # harness / hand-written Horovod with the same option; None: reported only

    def loop_args(self) -> List[str]:
        args = []
        if self.aggregation != 1:
            args += ["--aggregation", str(self.aggregation)]
        if self.compression != "none":
            args += ["--compression", self.compression]
        if self.precision != "fp32":
            args += ["--precision", self.precision]
        return args

    def option_keys(self) -> List[Tuple[str, str]]:
        """The harness's `optimizations:` keys and values (YAML)."""
        keys = []
        if self.aggregation != 1:
            keys.append(("aggregation_frequency", str(self.aggregation)))
        if self.compression == "fp16":
            keys.append(("gradient_compression", "true"))
        if self.precision != "fp32":
            keys.append(("mixed_precision", self.precision))
        return keys

    def optimizations(self) -> str:
        """The config's `optimizations:` block ('' for none)."""
        keys = self.option_keys()
        return "optimizations:\n" + "".join(f"  {k}: {v}\n" for k, v in keys) if keys else ""

    def optimizations_inline(self) -> str:
        return "optimizations: {" + ", ".join(f"{k}: {v}" for k, v in self.option_keys()) + "}"


BASELINE = "fp32"
VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(BASELINE, "no training options"),
        Variant(
            "agg4", "gradient aggregation: an optimizer step every 4 batches", aggregation=4, target=0.95
        ),
        Variant(
            "fp16comp", "fp16 gradient compression (hvd.Compression.fp16)", compression="fp16", target=0.95
        ),
        Variant("bf16", "bf16 autocast of the forward pass and loss (CPU)", precision="bf16"),
    )
}
# The options are compared between these contenders only (the others have no such flags).
OPTION_CONTENDERS = ("harness", "horovod")
# Where each option runs in the full benchmark (at OPTION_NP): the communication options on the
# overhead-bound MLP, where per-batch communication and Python overhead show; bf16 on the compute-bound CNN,
# where the arithmetic's precision matters. `--variants` runs the named ones on every `--workloads` instead.
OPTION_NP = 2
FULL_OPTIONS = {"agg4": ("mlp",), "fp16comp": ("mlp",), "bf16": ("conv",)}
# ... in the first 4 repetitions only (6 runs of ~15 s each: about 6 minutes of `make bench`).
FULL_OPTION_REPS = 4
QUICK_OPTIONS = {"agg4": ("mlp",)}


@dataclass
class Plan:
    workloads: List[str]
    nps: List[int]
    contenders: List[str]
    reps: int
    batches: Dict[str, Tuple[int, int]]
    work: str
    timeout: float
    # (workload, np, variant) in the order they run; None: every workload x np with the baseline only
    configs: Optional[List[Tuple[str, int, str]]] = None
    quiet_wait_s: float = 0.0
    harness_src: Optional[str] = None  # import the harness from here instead of the installed one
    retries: int = 0  # runs disturbed by other processes are repeated up to this many times
    option_reps: Optional[int] = None  # the options run in the first this many repetitions (None: all)


def configurations(
    workloads: List[str], nps: List[int], variants: Optional[List[str]], options: Dict[str, Tuple[str, ...]]
) -> List[Tuple[str, int, str]]:
    """(workload, np, variant) to run. `variants` None: the baseline everywhere and each option of `options`
    on its workloads at OPTION_NP; else every named variant on every workload at every np."""
    configs = []
    for w in workloads:
        for np in nps:
            for v in VARIANTS:
                if variants is None:
                    wanted = v == BASELINE or (np == OPTION_NP and w in options.get(v, ()))
                else:
                    wanted = v in variants
                if wanted:
                    configs.append((w, np, v))
    return configs


def plan_configs(plan: Plan) -> List[Tuple[str, int, str]]:
    if plan.configs is not None:
        return plan.configs
    return [(w, np, BASELINE) for w in plan.workloads for np in plan.nps]


def contenders_for(plan: Plan, variant: str) -> List[str]:
    if variant == BASELINE:
        return list(plan.contenders)
    return [c for c in plan.contenders if c in OPTION_CONTENDERS]


def lightning_available() -> Optional[str]:
    for name in ("lightning", "pytorch_lightning"):
        try:
            mod = __import__(name)
            return f"{name} {mod.__version__}"
        except ImportError:
            continue
    return None


def _cpu_times() -> Tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / hz, sum(fields) / hz


def cpu_busy(seconds: float = 0.5) -> float:
    """The fraction of the machine's CPU time that was busy over `seconds` (0 where /proc/stat is missing)."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(seconds)
        b1, t1 = _cpu_times()
    except OSError:
        return 0.0
    return (b1 - b0) / max(1e-9, t1 - t0)


class ForeignLoad:
    """How much of the machine other processes used while a run was going: busy CPU time of the whole machine
    minus the CPU time of our own (waited-for) child processes, as a fraction of the machine's capacity."""

    def __enter__(self) -> ForeignLoad:
        self.fraction = 0.0
        try:
            self.busy0, self.total0 = _cpu_times()
        except OSError:
            self.busy0 = None
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.ours0 = ru.ru_utime + ru.ru_stime
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.busy0 is None:
            return
        busy1, total1 = _cpu_times()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = ru.ru_utime + ru.ru_stime - self.ours0
        self.fraction = max(0.0, (busy1 - self.busy0 - ours) / max(1e-9, total1 - self.total0))


BUSY_THRESHOLD = 0.25
FOREIGN_LOAD_MAX = 0.05  # a run during which other processes used more of the machine than this is repeated


def wait_until_quiet(limit_s: float, threshold: float = BUSY_THRESHOLD) -> float:
    """Wait (at most `limit_s`) until other work leaves the CPUs nearly idle; returns the last busy fraction.

    The machine is shared (tests of other work may be running); a run that starts on a busy machine
    measures the other work too, so the driver waits for a quiet moment and records what it found.
    """
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def command(
    contender: str, workload: str, np: int, batches: int, run_dir: str, variant: str = BASELINE
) -> List[str]:
    v = VARIANTS[variant]
    horovodrun = [os.path.join(BIN, "horovodrun"), "-np", str(np), "-H", f"localhost:{np}"]
    torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(np)]
    loop_args = ["--workload", workload, "--batches", str(batches), "--log-every", str(LOG_EVERY)]
    if contender in HARNESS:
        config = os.path.join(run_dir, "experiment.yaml")
        with open(config, "w") as f:
            f.write(
                common.harness_config(
                    batches, LOG_EVERY, f"description: bench {workload} {variant}\n" + v.optimizations()
                )
            )
        model_dir = os.path.join(HERE, "workloads", workload)
        args = [model_dir, "--config", config, "--output", os.path.join(run_dir, "output")]
        if contender == "torch":  # torchrun's environment picks the torch backend (DDP, Gloo)
            return torchrun + ["-m", "harness", *args]
        return horovodrun + [os.path.join(BIN, "harness"), *args]
    if contender == "horovod":
        return horovodrun + [sys.executable, os.path.join(HERE, "hvd_loop.py"), *loop_args, *v.loop_args()]
    if variant != BASELINE:
        raise ValueError(f"{contender} has no training options (variant {variant})")
    script = "ddp_loop.py" if contender == "ddp" else "lightning_loop.py"
    return torchrun + [os.path.join(HERE, script), *loop_args]


def launch(cmd: List[str], env: Dict[str, str], cwd: str, log: Any, timeout: float) -> subprocess.Popen:
    """Run a launcher to its end. Stopped early (a timeout, Ctrl-C, SIGTERM), it gets SIGTERM first, so that
    it ends its ranks (torchrun starts each in a session of its own: a SIGKILL to torchrun would leave them
    running), and SIGKILL 15 s later."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return proc


def run_one(
    plan: Plan, contender: str, workload: str, np: int, rep: int, variant: str = BASELINE
) -> Dict[str, Any]:
    """Launch one configuration, wait for it, and read what its ranks wrote."""
    batches, warmup = plan.batches[workload]
    # The probe counts optimizer steps; under aggregation one is k batches (k x the global batch's samples).
    k = VARIANTS[variant].aggregation
    if batches % k:
        raise ValueError(f"{workload}: {batches} batches is not a multiple of {variant}'s aggregation {k}")
    warmup_steps = -(-warmup // k)  # whole optimizer steps
    run_dir = os.path.join(plan.work, f"{workload}-np{np}-{variant}-{contender}-rep{rep}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    probe_dir = os.path.join(run_dir, "probe")
    cmd = command(contender, workload, np, batches, run_dir, variant)
    env = dict(os.environ)
    env.update(
        PATH=BIN + os.pathsep + env.get("PATH", ""),
        OMP_NUM_THREADS=str(common.threads_per_rank(np)),
        BENCH_OUT=probe_dir,
        BENCH_WARMUP=str(warmup_steps),
        PYTHONUNBUFFERED="1",
    )
    if contender in HARNESS:  # the backend each is measured on, whatever the caller's environment says
        env["HARNESS_BACKEND"] = "torch" if contender == "torch" else "horovod"
    if plan.harness_src and contender in HARNESS:
        env["PYTHONPATH"] = os.pathsep.join([plan.harness_src] + [p for p in [env.get("PYTHONPATH")] if p])
    busy_before = wait_until_quiet(plan.quiet_wait_s) if plan.quiet_wait_s > 0 else None
    log_path = os.path.join(run_dir, "log.txt")
    with open(log_path, "w") as log, ForeignLoad() as foreign:
        launched = time.time()
        env["BENCH_LAUNCH_WALL"] = repr(launched)
        proc = launch(cmd, env, run_dir, log, plan.timeout)
        wall = time.time() - launched
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(
            f"{contender} {workload} np={np} {variant} exited {proc.returncode}:\n{' '.join(cmd)}\n{tail}"
        )
    ranks = []
    for r in range(np):
        with open(os.path.join(probe_dir, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    for r in ranks:  # also checks that the harness steps once every k batches, and counts batches
        if r["steps"] != batches // k:
            raise RuntimeError(
                f"{contender} {workload} np={np} {variant}: rank {r['rank']} made {r['steps']} optimizer "
                f"steps in {batches} batches (expected {batches // k})"
            )
    zero = ranks[0]
    if contender in HARNESS:
        # The harness is measured from outside: its validation ends when rank 0 writes the report.
        with open(os.path.join(run_dir, "output", "metrics.jsonl")) as f:
            val = [e for e in map(json.loads, f) if e["type"] == "validation"][-1]
        val_end, val_metrics = val["time"], val["metrics"]
    else:
        val_end, val_metrics = zero["val_end_wall"], zero["validation"]
    global_batch = common.WORKLOADS[workload].global_batch
    return {
        "contender": contender,
        "workload": workload,
        "np": np,
        "variant": variant,
        "rep": rep,
        "batches_per_step": k,
        "optimizer_steps": zero["steps"],
        "samples_per_s": zero["timed_steps"] * k * global_batch / zero["train_seconds"],
        # per batch: the median time between optimizer steps / k
        "step_ms_median": zero["step_ms_median"] / k,
        "step_ms_p90": zero["step_ms_p90"] / k,
        "validation_s": val_end - zero["val_start_wall"],
        "first_batch_s": max(r["first_step_wall"] for r in ranks) - launched,
        "peak_rss_mib": max(r["max_rss_mib"] for r in ranks),
        "peak_rss_mib_per_rank": [round(r["max_rss_mib"], 1) for r in ranks],
        "torch_threads": zero["torch_threads"],
        "wall_s": wall,
        "cpu_busy_before": None if busy_before is None else round(busy_before, 3),
        "foreign_load": round(foreign.fraction, 3),
        "validation_metrics": {k: round(v, 6) for k, v in val_metrics.items() if isinstance(v, float)},
    }


def describe(r: Dict[str, Any]) -> str:
    return (
        f"{r['workload']:<4} np={r['np']}  {r.get('variant', BASELINE):<8}  {r['contender']:<9}  "
        f"{r['samples_per_s']:9.0f} samples/s  "
        f"validation {r['validation_s'] * 1e3:6.1f} ms  first batch {r['first_batch_s']:5.2f} s  "
        f"rss {r['peak_rss_mib']:5.0f} MiB  (wall {r['wall_s']:.1f} s, other load {r['foreign_load']:.0%})"
    )


def run_all(plan: Plan, progress=print) -> List[Dict[str, Any]]:
    """Every repetition runs every configuration with the contenders back to back, in a rotated order."""
    results = []
    for rep in range(plan.reps):
        order = plan.contenders[rep % len(plan.contenders) :] + plan.contenders[: rep % len(plan.contenders)]
        for workload, np, variant in plan_configs(plan):
            if variant != BASELINE and plan.option_reps is not None and rep >= plan.option_reps:
                continue
            for contender in [c for c in order if c in contenders_for(plan, variant)]:
                for attempt in range(1 + plan.retries):
                    try:
                        r = run_one(plan, contender, workload, np, rep, variant)
                    except RuntimeError as e:  # a crash (e.g. in a launcher's teardown): once more
                        if attempt == plan.retries:
                            raise
                        progress(f"rep {rep + 1}/{plan.reps}  {str(e).splitlines()[0]}; again")
                        continue
                    r["attempts"] = attempt + 1
                    disturbed = r["foreign_load"] > FOREIGN_LOAD_MAX
                    again = "  disturbed: again" if disturbed and attempt < plan.retries else ""
                    progress(f"rep {rep + 1}/{plan.reps}  {describe(r)}{again}")
                    if not disturbed:
                        break
                results.append(r)
    return results


# ----------------------------------------------------------------------------------------------------------
# Summary.

METRICS = ("samples_per_s", "step_ms_median", "validation_s", "first_batch_s", "peak_rss_mib", "wall_s")


def summarize(plan: Plan, results: List[Dict[str, Any]], val_overhead: Optional[Dict[str, Any]]) -> Dict:
    def runs(c, w, np, v=BASELINE):
        return sorted(
            (
                r
                for r in results
                if (r["contender"], r["workload"], r["np"], r.get("variant", BASELINE)) == (c, w, np, v)
            ),
            key=lambda r: r["rep"],
        )

    rows = []
    for w, np, v in plan_configs(plan):
        for c in plan.contenders:
            rs = runs(c, w, np, v)
            if not rs:
                continue
            row = {"workload": w, "np": np, "variant": v, "contender": c, "reps": len(rs)}
            for m in METRICS:
                row[m] = statistics.median(r[m] for r in rs)
                row[m + "_all"] = [round(r[m], 4) for r in rs]
            row["torch_threads"] = rs[0]["torch_threads"]
            row["validation_metrics"] = rs[0]["validation_metrics"]
            row["peak_rss_mib_per_rank"] = rs[0]["peak_rss_mib_per_rank"]
            rows.append(row)

    def paired(a, b, metric, combine):
        """combine(a's run, b's run) for every repetition that has both; their median and all of them.
        a and b are (contender, workload, np, variant).

        The contenders of a repetition run back to back, so pairing them cancels the machine's drift between
        repetitions (on a shared VM whole minutes run 20% slower), which ratios of medians would not.
        """
        by_rep = {r["rep"]: r for r in runs(*b)}
        values = [combine(r[metric], by_rep[r["rep"]][metric]) for r in runs(*a) if r["rep"] in by_rep]
        return (statistics.median(values), [round(v, 4) for v in values]) if values else (None, [])

    def ratio(x, y):
        return x / y

    def inverse_ratio(x, y):
        return y / x

    def minus(x, y):
        return x - y

    for row in rows:  # against the hand-written loop of the same configuration, repetition by repetition
        w, np, c, v = row["workload"], row["np"], row["contender"], row["variant"]
        if runs("horovod", w, np, v):
            for key, metric, combine in (
                ("throughput_vs_handwritten", "samples_per_s", ratio),
                ("validation_vs_handwritten", "validation_s", ratio),
                ("first_batch_minus_handwritten_s", "first_batch_s", minus),
            ):
                row[key], row[key + "_all"] = paired((c, w, np, v), ("horovod", w, np, v), metric, combine)
        if runs("ddp", w, np, v):  # and against torchrun + DDP (the torch backend's hand-written counterpart)
            for key, metric, combine in (
                ("throughput_vs_ddp", "samples_per_s", ratio),
                ("step_speed_vs_ddp", "step_ms_median", inverse_ratio),  # DDP's step ms / this one's
                ("first_batch_minus_ddp_s", "first_batch_s", minus),
            ):
                row[key], row[key + "_all"] = paired((c, w, np, v), ("ddp", w, np, v), metric, combine)
        if v != BASELINE and runs(c, w, np, BASELINE):  # the option's effect: against itself without options
            row["throughput_vs_fp32"], row["throughput_vs_fp32_all"] = paired(
                (c, w, np, v), (c, w, np, BASELINE), "samples_per_s", ratio
            )

    def row_of(w, np, c, v=BASELINE):
        return next(
            (r for r in rows if (r["workload"], r["np"], r["contender"], r["variant"]) == (w, np, c, v)), None
        )

    targets = []

    def target(name, value, ok, detail):
        targets.append({"target": name, "value": value, "ok": ok, "detail": detail})

    for w, np, v in plan_configs(plan):
        h = row_of(w, np, "harness", v)
        if h is None:
            continue
        if v != BASELINE:
            r, goal = h.get("throughput_vs_handwritten"), VARIANTS[v].target
            if r is not None and goal is not None:
                target(
                    f"{w} np={np} {v}: harness / hand-written Horovod, same option, >= {goal:.2f}",
                    round(r, 4),
                    r >= goal,
                    f"{VARIANTS[v].what}: median over repetitions of the ratio of training samples/s",
                )
            continue
        r = h.get("throughput_vs_handwritten")
        if r is not None:
            target(
                f"{w} np={np}: harness / hand-written Horovod >= {TARGETS[w]:.2f}",
                round(r, 4),
                r >= TARGETS[w],
                "median over repetitions of the ratio of training samples/s",
            )
        for other in ("ddp", "lightning"):
            r, _ = paired(("harness", w, np, v), (other, w, np, v), "samples_per_s", ratio)
            if r is not None:
                target(
                    f"{w} np={np}: harness >= {LABELS[other]}",
                    round(r, 4),
                    r >= 1.0,
                    "median over repetitions of the ratio of training samples/s",
                )
        d = h.get("first_batch_minus_handwritten_s")
        if d is not None:
            target(
                f"{w} np={np}: launch-to-first-batch <= hand-written + {FIRST_BATCH_SLACK_S:.0f} s",
                round(d, 2),
                d <= FIRST_BATCH_SLACK_S,
                "median over repetitions of the seconds more than the hand-written loop",
            )
    if val_overhead is not None:
        for w, v in val_overhead["workloads"].items():
            target(
                f"{w}: exact validation adds < {VALIDATION_OVERHEAD_MAX:.0%} to validation time",
                round(v["overhead"], 4),
                v["overhead"] < VALIDATION_OVERHEAD_MAX,
                "weighted vs unweighted MetricAccumulator in TrialAdapter.evaluate (in-process A/B)",
            )

    for w, np, v in plan_configs(plan):  # the torch backend against hand-written torchrun + DDP
        t = row_of(w, np, "torch", v)
        if t is None or v != BASELINE:
            continue
        r = t.get("throughput_vs_ddp")
        if r is not None:
            target(
                f"{w} np={np}: torch backend / torchrun + DDP >= {TORCH_TARGET:.2f}",
                round(r, 4),
                r >= TORCH_TARGET,
                "median over repetitions of the ratio of training samples/s",
            )
        r, _ = paired(("torch", w, np, v), ("lightning", w, np, v), "samples_per_s", ratio)
        if r is not None:
            target(
                f"{w} np={np}: torch backend >= {LABELS['lightning']}",
                round(r, 4),
                r >= 1.0,
                "median over repetitions of the ratio of training samples/s",
            )
        d = t.get("first_batch_minus_ddp_s")
        if d is not None:
            target(
                f"{w} np={np}: torch backend's launch-to-first-batch <= torchrun + DDP + "
                f"{FIRST_BATCH_SLACK_S:.0f} s",
                round(d, 2),
                d <= FIRST_BATCH_SLACK_S,
                "median over repetitions of the seconds more than the hand-written DDP loop",
            )

    scaling = {}
    for w in plan.workloads:
        for c in ("harness", "horovod", "torch", "ddp"):
            one, two = row_of(w, 1, c), row_of(w, 2, c)
            if one and two:
                speedup = two["samples_per_s"] / one["samples_per_s"]
                scaling.setdefault(w, {})[c] = {
                    "speedup": round(speedup, 3),
                    "efficiency": round(speedup / 2, 3),
                }
    return {"rows": rows, "targets": targets, "scaling": scaling, "validation_overhead": val_overhead}


def harness_version(plan: Plan) -> str:
    """Which harness was measured: its folder, git commit, and whether harness/ had uncommitted changes."""
    src = plan.harness_src or ROOT

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", src, *a], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "harness")
    except (OSError, subprocess.CalledProcessError):
        return src
    return f"{src} at {head}" + (" with uncommitted changes in harness/" if dirty else "")


def environment(plan: Plan) -> Dict[str, Any]:
    import horovod
    import torch

    controller = "unknown"
    try:
        import horovod.torch as hvd

        controller = "MPI (horovodrun's default here)" if hvd.mpi_built() else "Gloo"
    except Exception:  # noqa: BLE001
        pass
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "horovod": horovod.__version__,
        "horovod_controller": controller,
        "lightning": lightning_available(),
        "harness": harness_version(plan),
        "machine": platform.machine(),
        "batches": {w: {"total": b, "warmup": wu} for w, (b, wu) in plan.batches.items()},
        "reps": plan.reps,
        "option_reps": plan.option_reps,
        "workloads": {w: common.WORKLOADS[w].what for w in plan.workloads},
        "variants": {
            v: VARIANTS[v].what
            for v in sorted({v for _, _, v in plan_configs(plan)}, key=list(VARIANTS).index)
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def load_sentence(load: Optional[Dict[str, List[float]]]) -> str:
    """The machine's load averages (as `uptime` prints them) before and after the runs."""
    if not load:
        return ""
    fmt = ", ".join
    return (
        f" Load average (1, 5, 15 min) before the runs {fmt(f'{x:.2f}' for x in load['start'])}, "
        f"after {fmt(f'{x:.2f}' for x in load['end'])}."
    )


def spread(values: List[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}" if values else ""


def torch_backend_markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """The torch backend against hand-written torchrun + DDP: medians, the spread over repetitions, and the
    ratio of each repetition (the two run back to back in every repetition)."""

    def row_of(w: str, np: int, c: str) -> Optional[Dict[str, Any]]:
        return next(
            (
                r
                for r in rows
                if (r["workload"], r["np"], r["contender"], r.get("variant", BASELINE))
                == (w, np, c, BASELINE)
            ),
            None,
        )

    pairs = [
        (r, d)
        for r in rows
        if r["contender"] == "torch" and r.get("variant", BASELINE) == BASELINE
        for d in [row_of(r["workload"], r["np"], "ddp")]
        if d is not None
    ]
    if not pairs:
        return []
    out = [
        "## The torch backend against torchrun + DDP",
        "",
        "Both launched by `torchrun --standalone --nproc_per_node N`, Gloo, the same threads per rank "
        "(`OMP_NUM_THREADS` = cores / ranks, which torchrun keeps), the same data, batches and validation. "
        "At np=1 the harness runs as one process (no process group: `WORLD_SIZE=1`) and the DDP loop wraps "
        "its model in a one-rank DDP. Medians over repetitions, min–max beside them; the ratio is taken in "
        "each repetition (they run back to back) and listed in repetition order. Samples/s divide the "
        "timed batches by their whole time, so a burst of other work on the machine lowers them; the median "
        "step time is what a typical batch took, and its ratio (DDP's / the torch backend's: above 1 is "
        "faster) moves less with such bursts.",
        "",
        "| workload | np | torch backend samples/s | torchrun + DDP samples/s | ratio (median) | ratio per "
        "repetition | median step ms, torch backend | torchrun + DDP | step ratio | launch→first batch s, "
        "torch backend | torchrun + DDP |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t, d in pairs:
        step = t.get("step_speed_vs_ddp")
        out.append(
            f"| {t['workload']} | {t['np']} | {t['samples_per_s']:,.0f} ({spread(t['samples_per_s_all'])}) | "
            f"{d['samples_per_s']:,.0f} ({spread(d['samples_per_s_all'])}) | "
            f"{t['throughput_vs_ddp']:.3f} | {', '.join(f'{x:.3f}' for x in t['throughput_vs_ddp_all'])} | "
            f"{t['step_ms_median']:.3f} | {d['step_ms_median']:.3f} | "
            f"{'' if step is None else f'{step:.3f}'} | "
            f"{t['first_batch_s']:.2f} ({spread(t['first_batch_s_all'], '{:.2f}')}) | "
            f"{d['first_batch_s']:.2f} ({spread(d['first_batch_s_all'], '{:.2f}')}) |"
        )
    out.append("")
    return out


def options_markdown(rows: List[Dict[str, Any]], env: Dict[str, Any]) -> List[str]:
    """The training options' table: each option for the harness and the hand-written loop."""

    def f3(x: Optional[float]) -> str:
        return "" if x is None else f"{x:.3f}"

    out = [
        "## Training options",
        "",
        "The harness with `optimizations:` in its config against the hand-written Horovod loop "
        "(`bench/hvd_loop.py`) with the same option, and each against itself without options (the fp32 rows "
        "above, same repetition). Under aggregation a batch is still one global batch of records and the "
        "optimizer steps once every 4 of them: samples/s count every batch, and ms per batch is the median "
        "time between optimizer steps / 4. The harness's targets are under Targets; bf16 / fp32 has none "
        "(it depends on the CPU: bf16 matrix units or not)."
        + (
            f" The options ran in the first {env['option_reps']} of the {env['reps']} repetitions."
            if env.get("option_reps") is not None and env["option_reps"] < env["reps"]
            else ""
        ),
        "",
    ]
    for v in env.get("variants", {}):
        if v != BASELINE:
            out.append(
                f"- **{v}**: {VARIANTS[v].what}; the harness's config: "
                f"`{VARIANTS[v].optimizations_inline()}`, the hand-written loop's flags: "
                f"`{' '.join(VARIANTS[v].loop_args())}`"
            )
    out += [
        "",
        "| workload | np | option | contender | train samples/s | vs hand-written, same option "
        "| vs fp32, same contender | median ms per batch | validation ms | val loss | val accuracy |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["validation_metrics"]
        out.append(
            f"| {r['workload']} | {r['np']} | {r['variant']} | {LABELS[r['contender']]} | "
            f"{r['samples_per_s']:,.0f} | {f3(r.get('throughput_vs_handwritten'))} | "
            f"{f3(r.get('throughput_vs_fp32'))} | {r['step_ms_median']:.3f} | "
            f"{r['validation_s'] * 1e3:.1f} | "
            f"{m.get('loss', float('nan')):.4f} | {m.get('accuracy', float('nan')):.4f} |"
        )
    out.append("")
    return out


def markdown(summary: Dict[str, Any], env: Dict[str, Any], notes: List[str], findings: str) -> str:
    out = ["# Benchmark results", ""]
    out.append(
        "Generated by `make bench` (`bench/run.py`); do not edit by hand: the analysis comes from "
        "`bench/findings.md`. Numbers are medians over the repetitions of one run on one machine. The "
        'contenders of a repetition run back to back, so ratios ("vs hand-written", the targets) are '
        "taken within each repetition and their median is shown: the machine's speed drifts between "
        "repetitions more than the contenders differ. How it is measured: [README.md](README.md)."
    )
    out.append("")
    out.append(
        f"Machine: {env['cpus']} CPUs ({env['machine']}), Python {env['python']}, torch {env['torch']}, "
        f"Horovod {env['horovod']} (controller: {env['horovod_controller']}), "
        f"{env['lightning'] or 'no Lightning'}. "
        f"{env['reps']} repetitions, {env['date']}. Harness measured: {env['harness']}."
        + load_sentence(env.get("load_average"))
    )
    out.append("")
    for w, what in env["workloads"].items():
        b = env["batches"][w]
        out.append(
            f"- **{w}**: {what}; {b['total']} training batches per run, the first {b['warmup']} untimed; "
            f"validation on {common.VAL_RECORDS} records, {common.VAL_BATCH} per batch and rank."
        )
    out.append("")
    out += [
        "| workload | np | contender | train samples/s | vs hand-written Horovod | vs torchrun + DDP "
        "| median step ms | validation ms | launch→first batch s | peak RSS / rank MiB | val accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        if r.get("variant", BASELINE) != BASELINE:
            continue
        ratio, vs_ddp = r.get("throughput_vs_handwritten"), r.get("throughput_vs_ddp")
        acc = r["validation_metrics"].get("accuracy")
        out.append(
            f"| {r['workload']} | {r['np']} | {LABELS[r['contender']]} | {r['samples_per_s']:,.0f} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | {'' if vs_ddp is None else f'{vs_ddp:.3f}'} | "
            f"{r['step_ms_median']:.3f} | "
            f"{r['validation_s'] * 1e3:.1f} | "
            f"{r['first_batch_s']:.2f} | {r['peak_rss_mib']:.0f} | {'' if acc is None else f'{acc:.4f}'} |"
        )
    out.append("")
    out += torch_backend_markdown(summary["rows"])
    options = [r for r in summary["rows"] if r.get("variant", BASELINE) != BASELINE]
    if options:
        out += options_markdown(options, env)
    out += ["## Targets", "", "| target | value | holds |", "|---|---:|---|"]
    for t in summary["targets"]:
        out.append(f"| {t['target']} | {t['value']} | {'yes' if t['ok'] else '**no**'} |")
    out.append("")
    if summary["scaling"]:
        out += [
            "## Scaling np=1 → np=2",
            "",
            "Speed-up = samples/s at np=2 / samples/s at np=1; efficiency = speed-up / 2. On this machine "
            "np=1 already has every core (threads = cores / ranks), so the ideal speed-up is about 1, not 2: "
            "compare each harness backend's with its hand-written loop's (Horovod's, DDP's).",
            "",
            "| workload | contender | speed-up | efficiency |",
            "|---|---|---:|---:|",
        ]
        for w, per in summary["scaling"].items():
            for c, s in per.items():
                out.append(f"| {w} | {LABELS[c]} | {s['speedup']:.3f} | {s['efficiency']:.3f} |")
        out.append("")
    vo = summary.get("validation_overhead")
    if vo:
        out += [
            "## Cost of exact validation",
            "",
            "The harness's validation (`TrialAdapter.evaluate`) on one process (its one allreduce is "
            "the same either way), the real "
            "`MetricAccumulator` weighted by each batch's records against the same loop with weight 1 per "
            f"batch (a plain mean of batch means), interleaved, {vo['pairs']} pairs; and the weighting's own "
            "work (`batch_records` + the weight in `MetricAccumulator.add`) timed alone, per validation "
            "pass.",
            "",
            "| workload | validation ms (weighted) | plain mean ms | overhead (A/B median) "
            "| weighting work alone |",
            "|---|---:|---:|---:|---:|",
        ]
        for w, v in vo["workloads"].items():
            out.append(
                f"| {w} | {v['weighted_ms']:.3f} | {v['plain_ms']:.3f} | {v['overhead']:+.2%} | "
                f"{v['direct_overhead']:+.3%} |"
            )
        out.append("")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if findings:
        out += [findings.rstrip(), ""]
    return "\n".join(out)


def measure_validation_overhead(plan: Plan, quick: bool) -> Dict[str, Any]:
    """Run bench/val_overhead.py in a fresh process (threads = cores, like np=1)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(common.threads_per_rank(1)))
    if plan.harness_src:
        env["PYTHONPATH"] = os.pathsep.join([plan.harness_src] + [p for p in [env.get("PYTHONPATH")] if p])
    if plan.quiet_wait_s > 0:
        wait_until_quiet(plan.quiet_wait_s)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "val_overhead.py"), "--pairs", "10" if quick else "200"]
        + ["--workloads", *plan.workloads],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout)


def merge_results(paths: List[str]) -> Dict[str, Any]:
    """Earlier results.json files as one: the first's environment and validation cost, every file's runs
    (their repetitions numbered on from the previous file's), notes and load averages."""
    merged: Dict[str, Any] = {}
    runs: List[Dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        offset = merged["environment"]["reps"] if merged else 0
        runs += [{**r, "rep": r["rep"] + offset} for r in saved["runs"]]
        if not merged:
            merged = saved
            continue
        env, more = merged["environment"], saved["environment"]
        env["reps"] += more["reps"]
        env["date"] += f"; {more['date']}"
        if env.get("load_average") and more.get("load_average"):
            env["load_average"]["end"] = more["load_average"]["end"]
        merged["notes"] += [n for n in saved["notes"] if n not in merged["notes"]]
    if len(paths) > 1:
        merged["environment"]["merged_from"] = list(paths)
    merged["runs"] = runs
    return merged


def read_findings() -> str:
    path = os.path.join(HERE, "findings.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny setting (seconds): the end-to-end test's")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick: 1)")
    p.add_argument("--workloads", nargs="+", choices=sorted(common.WORKLOADS), default=None)
    p.add_argument("--np", nargs="+", type=int, default=None, dest="nps")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="training options to run, each on every --workloads at every --np (the options for the harness "
        "and the hand-written Horovod loop only; their 'vs fp32' needs fp32 too). Default: fp32 everywhere, "
        + ", ".join(f"{v} on {'/'.join(ws)}" for v, ws in FULL_OPTIONS.items())
        + f" at np={OPTION_NP} (--quick: "
        + ", ".join(f"{v} on {'/'.join(ws)}" for v, ws in QUICK_OPTIONS.items())
        + ")",
    )
    p.add_argument("--out", default=HERE, help="where RESULTS.md and results.json go (default: bench/)")
    p.add_argument("--work", default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument(
        "--harness-src",
        default=None,
        help="import the harness from this folder (e.g. a `git worktree` of another version) for an A/B",
    )
    p.add_argument(
        "--option-reps",
        type=int,
        default=None,
        help="run the training options in the first this many repetitions only (default: "
        f"{FULL_OPTION_REPS} for the full benchmark's options, every repetition with --variants or --quick)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each run wait up to this many seconds for the CPUs to be idle (default 60; --quick: 0)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help=f"repeat a run during which other processes used > {100 * FOREIGN_LOAD_MAX:.0f}%% of the CPUs, "
        "up to this many times (default 2; --quick: 0)",
    )
    p.add_argument(
        "--skip-validation-cost",
        action="store_true",
        help="leave out the in-process measurement of exact validation's cost (val_overhead.py), e.g. in "
        "runs of a few contenders",
    )
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        nargs="+",
        help="only recompute the summary and rewrite RESULTS.md and results.json (in --out) from the runs "
        "in an earlier results.json (e.g. after editing findings.md); several: their runs as the "
        "repetitions of one run, in the order given (e.g. one-repetition runs made one after another)",
    )
    args = p.parse_args(argv)
    if args.render:
        saved = merge_results(args.render)
        env = saved["environment"]
        plan = Plan(
            workloads=list(env["workloads"]),
            nps=sorted({r["np"] for r in saved["runs"]}),
            contenders=[c for c in CONTENDERS if any(r["contender"] == c for r in saved["runs"])],
            reps=env["reps"],
            batches={w: (b["total"], b["warmup"]) for w, b in env["batches"].items()},
            work="",
            timeout=0.0,
        )
        seen = {(r["workload"], r["np"], r.get("variant", BASELINE)) for r in saved["runs"]}
        plan.configs = [c for c in configurations(plan.workloads, plan.nps, list(VARIANTS), {}) if c in seen]
        summary = summarize(plan, saved["runs"], saved.get("validation_overhead"))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({**saved, **summary}, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
            f.write(markdown(summary, env, saved["notes"], read_findings()))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the runs' folder is removed

    notes = []
    contenders = list(args.contenders)
    if "lightning" in contenders and lightning_available() is None:
        contenders.remove("lightning")
        notes.append("Lightning is not installed (`pip install -e '.[bench]'`): its contender was skipped.")
        print("bench: Lightning is not installed; skipping that contender", file=sys.stderr)
    plan = Plan(
        workloads=args.workloads or (["mlp"] if args.quick else ["conv", "mlp"]),
        nps=args.nps or ([2] if args.quick else [1, 2]),
        contenders=contenders,
        reps=args.reps or (1 if args.quick else 5),
        batches=QUICK_BATCHES if args.quick else FULL_BATCHES,
        work=args.work or tempfile.mkdtemp(prefix="harness-bench-"),
        timeout=300.0,
        quiet_wait_s=args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 60.0),
        harness_src=os.path.abspath(args.harness_src) if args.harness_src else None,
        retries=args.retries if args.retries is not None else (0 if args.quick else 2),
    )
    plan.batches = {w: plan.batches[w] for w in plan.workloads}
    plan.configs = configurations(
        plan.workloads, plan.nps, args.variants, QUICK_OPTIONS if args.quick else FULL_OPTIONS
    )
    plan.option_reps = args.option_reps
    if plan.option_reps is None and args.variants is None and not args.quick:
        plan.option_reps = FULL_OPTION_REPS
    start = time.time()
    load_start = list(os.getloadavg())
    print(
        f"bench: {plan.reps} repetition(s) of {plan.workloads} x np {plan.nps} x {plan.contenders}; options "
        f"{[f'{w} np={np} {v}' for w, np, v in plan.configs if v != BASELINE] or 'none'}"
        f"{'' if plan.option_reps is None else f' in the first {plan.option_reps} repetition(s)'}; "
        f"runs in {plan.work}"
    )
    try:
        results = run_all(plan)
    finally:
        if args.work is None:
            shutil.rmtree(plan.work, ignore_errors=True)
    disturbed = [r for r in results if r["foreign_load"] > FOREIGN_LOAD_MAX]
    retried = sum(r["attempts"] - 1 for r in results)
    if retried or disturbed:
        notes.append(
            f"Other processes shared the machine: {retried} runs were repeated because other work used more "
            f"than {FOREIGN_LOAD_MAX:.0%} of the CPUs during them; {len(disturbed)} of the {len(results)} "
            "runs kept still had such interference (up to "
            f"{max([r['foreign_load'] for r in disturbed] or [0]):.0%}; `foreign_load` in results.json)."
        )
    val_overhead = None if args.skip_validation_cost else measure_validation_overhead(plan, args.quick)
    summary = summarize(plan, results, val_overhead)
    env = environment(plan)
    env["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    findings = "" if args.quick else read_findings()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "notes": notes, **summary, "runs": results}, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(markdown(summary, env, notes, findings))
    failed = [t for t in summary["targets"] if not t["ok"]]
    for t in summary["targets"]:
        print(f"{'ok  ' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}")
    print(
        f"bench: {len(results)} runs in {time.time() - start:.0f} s; "
        f"{len(summary['targets']) - len(failed)}/{len(summary['targets'])} targets hold; "
        f"{os.path.join(args.out, 'RESULTS.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
