"""Mixed precision on one GPU: the harness against a hand-written Horovod + torch.amp loop, and the harness's
torch backend (torchrun, DDP, NCCL) against the same loop on torchrun + DDP.

Both train ResNet-18 (11.2 M parameters) on synthetic 3x64x64 images, 10 classes, global batch 256, SGD with
momentum, from the same generated experiment config (tests/gpu/amp_model: model definition, network, data;
tests/gpu/amp_loop.py: the hand-written loop), in fp32, fp16 (``mixed_precision: O1``: autocast + GradScaler)
and bf16 (autocast, no scaler). Each run is a fresh process, the two contenders back to back in alternating
order, ``--reps`` times; one GPU, so each contender is one plain process and neither initialises Horovod (the
harness's one-rank mode leaves Horovod out, and amp_loop.py does the same: see there). Measured inside each
process by the probe of amp_model/amp_common.py: training samples/s between the end of the warm-up and the
last batch (CUDA events at every training forward pass, no extra synchronisation), and the peak GPU memory of
training after the warm-up (``torch.cuda.max_memory_allocated``).

The torch pair (``--backends torch``): the harness run by ``torchrun --standalone --nproc_per_node N -m
harness`` (its torch backend: DDP's reducer, NCCL on CUDA, Gloo on the CPU) against amp_loop.py under the
same torchrun (DDP, the canonical AMP step), ``--nproc`` ranks (default: every GPU; 2 on the CPU), one GPU
each, ``OMP_NUM_THREADS`` = cores / ranks for both. With one rank neither makes a process group (the
harness's one-rank mode; amp_loop.py does the same), so NCCL is exercised only on a machine with 2+ GPUs. Its
samples/s are rank 0's times the ranks (every rank trains the same number of batches of global / N records).

    python tests/gpu/amp_bench.py                          # on a GPU machine: the numbers (a few minutes)
    python tests/gpu/amp_bench.py --quick                  # tiny sizes, one repetition (a plumbing check)
    python tests/gpu/amp_bench.py --device cpu --quick     # fp32 and bf16 on the CPU (the harness refuses
                                                           # fp16 there), tiny sizes: the test's run
    python tests/gpu/amp_bench.py --backends torch --precisions fp16   # the torch pair alone, fp16

Writes OUT/amp_bench.json (machine, settings, every run, the summary) and OUT/amp_bench.md (the table and the
machine, for bench/RESULTS.md), and prints the table. Exit status 1 if a run failed, a contender did not
train in the precision asked for (the first forward pass's autocast state and output dtype), a loss did not
fall, or (on CUDA) the harness's fp16 samples/s is below --target (0.97) of its hand-written loop's (each
backend against its own); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL_DIR = os.path.join(HERE, "amp_model")
LOOP = os.path.join(HERE, "amp_loop.py")

# Each harness contender and its hand-written counterpart: one process (Horovod's pair), torchrun (torch's).
CONTENDERS = ("harness", "hand-written", "harness-torch", "hand-written-ddp")
BASE = {"harness": "hand-written", "harness-torch": "hand-written-ddp"}
BACKENDS = {"horovod": ("harness", "hand-written"), "torch": ("harness-torch", "hand-written-ddp")}
TORCHRUN = ("harness-torch", "hand-written-ddp")
LABELS = {
    "harness": "harness",
    "hand-written": "hand-written Horovod + torch.amp",
    "harness-torch": "harness, torch backend (torchrun)",
    "hand-written-ddp": "hand-written torchrun + DDP + torch.amp",
}
SPELLING = {"fp32": "O0", "fp16": "O1", "bf16": "bf16"}  # optimizations.mixed_precision
AUTOCAST = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}  # what the first forward pass must see

# Sizes. full (CUDA): ResNet-18 at width 64 on 64x64 images, batch 256: a real GPU workload (some tens of
# GFLOP per image and step). quick: the same code on a toy size. cpu: tiny, so that a test runs it all.
PRESETS: Dict[str, Dict[str, Any]] = {
    "full": dict(
        image_size=64,
        batch=256,
        width=64,
        train_records=16384,
        val_records=2048,
        warmup=30,
        batches=230,
        report_every=50,
        workers=4,
        reps=2,
        timeout=300,
    ),
    "quick": dict(
        image_size=32,
        batch=64,
        width=16,
        train_records=2048,
        val_records=256,
        warmup=5,
        batches=30,
        report_every=10,
        workers=2,
        reps=1,
        timeout=300,
    ),
    "cpu": dict(
        image_size=16,
        batch=32,
        width=8,
        train_records=512,
        val_records=64,
        warmup=5,
        batches=25,
        report_every=5,
        workers=0,
        reps=1,
        timeout=300,
    ),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition")
    p.add_argument("--precisions", default=None, help="comma-separated: fp32,fp16,bf16 (CPU: fp32,bf16)")
    p.add_argument(
        "--backends",
        default="horovod,torch",
        help="comma-separated pairs: horovod (the harness and the hand-written loop, one process), torch "
        "(the harness's torch backend and the loop on DDP, both under torchrun)",
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="ranks of the torch pair (default: every GPU; CPU: 2)"
    )
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "amp_bench"))
    p.add_argument("--reps", type=int, default=None, help="repetitions (full: 2, quick and CPU: 1)")
    p.add_argument("--target", type=float, default=0.97, help="harness / hand-written fp16 samples/s (CUDA)")
    for name in ("image_size", "batch", "width", "train_records", "val_records", "warmup", "batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override the preset")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (both contenders)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    args = p.parse_args(argv)
    preset = PRESETS["cpu" if args.device == "cpu" else "quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    default = "fp32,bf16" if args.device == "cpu" else "fp32,fp16,bf16"
    args.precisions = [x.strip() for x in (args.precisions or default).split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in SPELLING]
    if bad:
        p.error(f"unknown precision(s) {bad}; choose from fp32, fp16, bf16")
    if args.device == "cpu" and "fp16" in args.precisions:
        p.error("fp16 needs CUDA: the harness refuses fp16 on the CPU (use fp32,bf16)")
    args.backends = [x.strip() for x in args.backends.split(",") if x.strip()]
    bad = [x for x in args.backends if x not in BACKENDS]
    if bad or not args.backends:
        p.error(f"unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    args.contenders = [c for c in CONTENDERS if any(c in BACKENDS[b] for b in args.backends)]
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.warmup < 1 or args.batches < args.warmup + 3:
        p.error("need --warmup >= 1 and --batches >= warmup + 3 (the timed batches)")
    return args


def experiment_config(args: argparse.Namespace, precision: str) -> Dict[str, Any]:
    """The one config both contenders read (the harness as its experiment config, the loop with --config)."""
    return {
        "description": f"amp_bench: ResNet-18, synthetic {args.image_size}x{args.image_size}, {precision}",
        "hyperparameters": {"global_batch_size": args.batch, "learning_rate": 0.05, "width": args.width},
        "searcher": {"max_length": {"batches": args.batches}},
        "scheduling_unit": args.report_every,
        "reproducibility": {"experiment_seed": 42},
        "optimizations": {"mixed_precision": SPELLING[precision]},
        "data": {
            "image_size": args.image_size,
            "train_records": args.train_records,
            "validation_records": args.val_records,
            "validation_batch": 512,
            "noise": 0.5,
            "seed": 0,
            "num_workers": args.workers,
        },
    }


def run_one(
    args: argparse.Namespace, contender: str, precision: str, rep: int, config_path: str
) -> Dict[str, Any]:
    work = os.path.join(args.out, "runs", f"{precision}-{contender}-{rep}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ, AMP_BENCH_OUT=os.path.join(work, "probe"), AMP_BENCH_WARMUP=str(args.warmup))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the harness takes the GPU whenever there is one
    ranks = args.nproc if contender in TORCHRUN else 1
    launcher = [sys.executable, "-m", "harness"]
    loop = [sys.executable, LOOP]
    if contender in TORCHRUN:
        # torchrun would set OMP_NUM_THREADS=1 for several ranks; both get cores / ranks instead, as the
        # one-process pair does (the harness's own rule, and amp_loop.py's without OMP_NUM_THREADS).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        env["HARNESS_BACKEND"] = "torch"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += ["--nproc_per_node", str(ranks)]
        launcher, loop = torchrun + ["-m", "harness"], torchrun + [LOOP]
    if contender in BASE:  # the harness
        cmd = launcher + [MODEL_DIR, "--config", config_path]
        cmd += ["--output", os.path.join(work, "output"), "--fresh", "--quiet"]
    else:
        cmd = loop + ["--config", config_path, "--device", args.device]
    row: Dict[str, Any] = {
        "precision": precision,
        "contender": contender,
        "ranks": ranks,
        "rep": rep,
        "log": work + "/log.txt",
    }
    start = time.monotonic()
    try:
        with open(row["log"], "w") as log:
            proc = subprocess.run(
                cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
        row["returncode"] = proc.returncode
    except subprocess.TimeoutExpired:
        row["returncode"] = None
        row["error"] = f"timed out after {args.timeout:.0f} s"
    row["wall_s"] = round(time.monotonic() - start, 2)
    probe_path = os.path.join(work, "probe", "probe.json")
    probe = json.load(open(probe_path)) if os.path.exists(probe_path) else {}
    if row["returncode"] != 0 or not probe.get("samples_per_s"):
        with open(row["log"]) as f:
            tail = f.read()[-2500:]
        row.setdefault("error", f"exit status {row['returncode']}" + ("" if probe else ", no probe file"))
        row["log_tail"] = tail
        return row
    reports = probe.pop("reports", None)
    if contender in BASE:  # the harness reports in its metrics.jsonl
        with open(os.path.join(work, "output", "metrics.jsonl")) as f:
            entries = [json.loads(line) for line in f]
        reports = [dict(batches=e["batches"], **e["metrics"]) for e in entries if e["type"] == "training"]
        val = [e["metrics"] for e in entries if e["type"] == "validation"]
        probe["validation"] = val[-1] if val else None
    first = probe.get("first_forward", {})
    row.update(
        samples_per_s=probe["samples_per_s"] * ranks,  # rank 0's records x ranks: the global rate
        train_seconds=probe["train_seconds"],
        timed_batches=probe["timed_batches"],
        peak_train_allocated_mib=probe.get("peak_train_allocated_mib"),
        peak_train_reserved_mib=probe.get("peak_train_reserved_mib"),
        peak_allocated_mib=probe.get("peak_allocated_mib"),
        max_rss_mib=probe.get("max_rss_mib"),
        device=first.get("input_device"),
        device_name=probe.get("device_name"),
        autocast_dtype=first.get("autocast_dtype"),
        output_dtype=first.get("output_dtype"),
        losses=[r.get("loss") for r in reports or []],
        loss_scale=(reports or [{}])[-1].get("loss_scale"),
        skipped_steps=sum(int(r.get("skipped_steps") or 0) for r in reports or []),
        validation=probe.get("validation"),
        torch=probe.get("torch"),
        cuda=probe.get("cuda"),
        cudnn=probe.get("cudnn"),
    )
    return row


def check_row(row: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """What is wrong with one run, as sentences (none: fine)."""
    what = f"{row['contender']} {row['precision']} (rep {row['rep']})"
    if "error" in row:
        return [f"{what} failed: {row['error']}; log {row['log']}"]
    problems = []
    want = AUTOCAST[row["precision"]]
    if row["autocast_dtype"] != want:
        problems.append(f"{what} trained with autocast {row['autocast_dtype']}, expected {want}")
    out_dtype = want or "float32"
    if row["output_dtype"] != out_dtype:
        problems.append(f"{what}: the network's output was {row['output_dtype']}, expected {out_dtype}")
    if not row["device"] or not row["device"].startswith(args.device):
        problems.append(f"{what} trained on {row['device']}, not {args.device}")
    losses = [x for x in row["losses"] if x is not None]
    if len(losses) < 2 or not losses[-1] < losses[0]:
        problems.append(f"{what}: the training loss did not fall ({losses})")
    if row["precision"] == "fp16" and row["loss_scale"] is None:
        problems.append(f"{what}: no loss_scale in its training reports")
    return problems


def summarize(rows: List[Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Per precision and contender: median samples/s, peak memory; the ratio to the contender's hand-written
    loop (the harness: amp_loop.py in one process; the torch backend: amp_loop.py on DDP under torchrun) is
    the median over repetitions of the ratio within each repetition (runs back to back)."""
    out = []
    for precision in args.precisions:
        for contender in args.contenders:
            base_name = BASE.get(contender, contender)
            base = {r["rep"]: r for r in rows if ok(r, precision, base_name)}
            mine = [r for r in rows if ok(r, precision, contender)]
            if not mine:
                out.append({"precision": precision, "contender": contender, "samples_per_s": None})
                continue
            ratios = [r["samples_per_s"] / base[r["rep"]]["samples_per_s"] for r in mine if r["rep"] in base]
            peaks = [r["peak_train_allocated_mib"] for r in mine if r["peak_train_allocated_mib"] is not None]
            reserved = [
                r["peak_train_reserved_mib"] for r in mine if r["peak_train_reserved_mib"] is not None
            ]
            out.append(
                {
                    "precision": precision,
                    "contender": contender,
                    "ranks": mine[0]["ranks"],
                    "vs": base_name,
                    "runs": len(mine),
                    "samples_per_s": statistics.median(r["samples_per_s"] for r in mine),
                    "samples_per_s_all": [round(r["samples_per_s"], 1) for r in mine],
                    "vs_hand_written": statistics.median(ratios) if ratios else None,
                    "ratios": [round(x, 4) for x in ratios],
                    "peak_train_allocated_mib": max(peaks) if peaks else None,
                    "peak_train_reserved_mib": max(reserved) if reserved else None,
                    "max_rss_mib": max(r["max_rss_mib"] for r in mine),
                    "loss_first": mine[0]["losses"][0],
                    "loss_last": mine[0]["losses"][-1],
                    "loss_scale": mine[0]["loss_scale"],
                    "skipped_steps": mine[0]["skipped_steps"],
                    "validation": mine[0]["validation"],
                    # The same model, data and batch order: the loss curves agree (exactly on the CPU).
                    "loss_gap_vs_hand_written": loss_gap(mine[0], base.get(mine[0]["rep"])),
                }
            )
    return out


def loss_gap(row: Dict[str, Any], base: Optional[Dict[str, Any]]) -> Optional[float]:
    """The largest relative difference between two runs' reported training losses (None: not comparable)."""
    if base is None or len(row["losses"]) != len(base["losses"]) or not row["losses"]:
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], base["losses"]))


def ok(row: Dict[str, Any], precision: str, contender: str) -> bool:
    return row["precision"] == precision and row["contender"] == contender and "error" not in row


def machine(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        pass
    done = [r for r in rows if "error" not in r]
    for key in ("device_name", "torch", "cuda", "cudnn"):
        info[key] = next((r[key] for r in done if r.get(key)), None)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        if q.returncode == 0:
            info["nvidia_smi"] = q.stdout.strip().splitlines()
    return info


def fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def table(summary: List[Dict[str, Any]], args: argparse.Namespace, info: Dict[str, Any]) -> str:
    what = info.get("device_name") or info.get("cpu") or args.device
    lines = [
        f"ResNet-18 (width {args.width}), synthetic {args.image_size}x{args.image_size}, global batch "
        f"{args.batch}, SGD; {args.batches} batches of which {args.warmup} warm-up; "
        f"{args.reps} repetition(s); "
        f"on {what} (torch {info.get('torch')}, CUDA {info.get('cuda')})",
        "",
    ]
    if "harness" in args.contenders:
        lines.append("- harness, hand-written: one process each (`python -m harness`, `amp_loop.py`)")
    if "harness-torch" in args.contenders:
        comm = "NCCL" if args.device == "cuda" else "Gloo"
        lines.append(
            f"- harness-torch, hand-written-ddp: `torchrun --nproc_per_node {args.nproc}` (the harness's "
            f"torch backend; `amp_loop.py` on DDP), {comm}"
            + (" between the ranks" if args.nproc > 1 else "; one rank: no process group, so no " + comm)
            + "; samples/s of all ranks; vs hand-written: against hand-written-ddp"
        )
    lines += [
        "",
        "| precision | contender | samples/s | vs hand-written | ranks | peak GPU MiB (training, allocated) "
        "| peak RSS MiB | loss first → last | loss scale | skipped steps |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in summary:
        if s["samples_per_s"] is None:
            lines.append(f"| {s['precision']} | {s['contender']} | failed | | | | | | | |")
            continue
        lines.append(
            f"| {s['precision']} | {s['contender']} | {fmt(s['samples_per_s'])} | "
            f"{fmt(s['vs_hand_written'], '.3f')} | {s['ranks']} | {fmt(s['peak_train_allocated_mib'])} | "
            f"{fmt(s['max_rss_mib'])} | "
            f"{s['loss_first']:.3f} → {s['loss_last']:.3f} | {fmt(s['loss_scale'], 'g')} | "
            f"{s['skipped_steps'] if s['precision'] == 'fp16' else '-'} |"
        )
    return "\n".join(lines)


def torch_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("amp_bench: no CUDA device (use --device cpu for the CPU check)", file=sys.stderr)
            return 2
    if args.nproc is None:
        args.nproc = 2 if args.device == "cpu" else max(1, torch_cuda_devices())
    if "torch" in args.backends and args.batch % args.nproc:
        print(
            f"amp_bench: the global batch {args.batch} is not a multiple of --nproc {args.nproc}",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    problems: List[str] = []
    started = time.monotonic()
    for rep in range(args.reps):
        for i, precision in enumerate(args.precisions):
            config_path = os.path.join(args.out, f"config-{precision}.yaml")
            with open(config_path, "w") as f:
                yaml.safe_dump(experiment_config(args, precision), f, sort_keys=False)
            # Each pair back to back, in alternating order: A B C D, then D C B A.
            order = args.contenders if (rep + i) % 2 == 0 else args.contenders[::-1]
            for contender in order:
                row = run_one(args, contender, precision, rep, config_path)
                rows.append(row)
                found = check_row(row, args)
                problems += found
                rate = fmt(row.get("samples_per_s"))
                print(
                    f"rep {rep} {precision:4s} {contender:12s} {rate:>8s} samples/s  "
                    f"peak {fmt(row.get('peak_train_allocated_mib'))} MiB  {row['wall_s']:.0f} s"
                    + (f"  PROBLEM: {'; '.join(found)}" if found else ""),
                    flush=True,
                )
                if "log_tail" in row:
                    print(row["log_tail"], file=sys.stderr)

    summary = summarize(rows, args)
    info = machine(rows)
    targets = []
    for contender in [c for c in args.contenders if c in BASE]:
        if args.device != "cuda" or "fp16" not in args.precisions:
            break
        s = next(s for s in summary if s["precision"] == "fp16" and s["contender"] == contender)
        ratio = s.get("vs_hand_written")
        passed = ratio is not None and ratio >= args.target
        targets.append(
            {
                "target": f"{LABELS[contender]} fp16 samples/s >= {args.target} x {LABELS[BASE[contender]]}",
                "value": ratio,
                "passed": passed,
            }
        )
        if not passed:
            problems.append(
                f"{LABELS[contender]} fp16 samples/s is {fmt(ratio, '.3f')} of "
                f"{LABELS[BASE[contender]]}'s (target {args.target})"
            )
    md = table(summary, args, info)
    md += "\n\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v) + "\n"
    for t in targets:
        md += f"\nTarget: {t['target']}: {fmt(t['value'], '.3f')} ({'met' if t['passed'] else 'MISSED'})\n"
    result = {
        "what": "tests/gpu/amp_bench.py: the harness vs a hand-written Horovod + torch.amp loop, one process",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "targets": targets,
        "problems": problems,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    json_path = os.path.join(args.out, "amp_bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "amp_bench.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    for problem in problems:
        print(f"amp_bench: PROBLEM: {problem}", file=sys.stderr)
    print(f"amp_bench: results in {json_path} and {os.path.join(args.out, 'amp_bench.md')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
