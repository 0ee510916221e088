"""Run PEDL's published PyTorch examples unchanged, each with its own config, and print a table.

    .venv/bin/python tests/conformance/pedl_examples.py --repo PATH [--np 2] [--launcher gloo|mpi|torchrun]

PATH is a clone of determined-ai/pedl-examples (a bare one will do). Each example's directory is taken
from its commit as it is (`git archive`); of its config only the training length is shortened
(`searcher.max_steps`, `batches_per_step`). The data is made local: `standin/torchvision` serves
scikit-learn's digits as MNIST and CIFAR-10 (PyPI's torchvision does not import beside the CPU torch here,
and the originals download their data), the MNIST example's download archive is put where its
download_data looks first, and randomNAS gets a small text corpus in its `data_loc`. The examples' own
third-party imports (requests, wget) are installed into WORK/deps; `--numpy 1.23.5` runs the ranks with
the NumPy of their time (the multi-output example uses `np.int`, removed in NumPy 1.24). Not part of
`make test`: it needs the examples' repository, which the project does not ship.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)

# (name, commit, directory in the repository, its config, steps, batches_per_step): the length, where
# shortened (mnist_pytorch trains its own 2 steps of 100 batches)
EXAMPLES = [
    ("mnist_pytorch, v0.10 __init__.py", "v0.10.11", "mnist_pytorch", "const.yaml", None, None),
    (
        "mnist_pytorch multi-output, v0.10 __init__.py",
        "v0.10.11",
        "mnist_pytorch",
        "const-multi-output.yaml",
        2,
        50,
    ),
    ("mnist_pytorch, v0.11 entrypoints", "v0.11.2", "mnist_pytorch", "const.yaml", None, None),
    (
        "mnist_pytorch multi-output, v0.11 entrypoints",
        "v0.11.2",
        "mnist_pytorch",
        "const-multi-output.yaml",
        2,
        50,
    ),
    ("cifar10_cnn_pytorch, v0.10", "v0.10.11", "cifar10_cnn_pytorch", "const.yaml", 2, 100),
    ("cifar10_cnn_pytorch, v0.11", "v0.11.2", "cifar10_cnn_pytorch", "const.yaml", 2, 100),
    (
        "2-pytorch/cifar10_cnn_pytorch, 3-argument data",
        "c7897e2",
        "2-pytorch/cifar10_cnn_pytorch",
        "const.yaml",
        2,
        100,
    ),
    ("nas_search (randomNAS), train_one_arch", "v0.11.1", "nas_search", "train_one_arch.yaml", 1, 20),
]


def git(repo: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "--git-dir", git_dir(repo), *args], check=True, **kw)


def git_dir(repo: str) -> str:
    return os.path.join(repo, ".git") if os.path.isdir(os.path.join(repo, ".git")) else repo


def extract(repo: str, commit: str, directory: str, dest: str) -> str:
    archive = git(repo, "archive", "--format=tar", commit, directory, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return os.path.join(dest, directory)


def shortened(config_text: str, steps: Optional[int], batches_per_step: Optional[int]) -> str:
    """The config with only its length changed (None: as it is)."""
    if steps is None:
        return config_text
    text, n = re.subn(r"(?m)^(\s+max_steps:\s*)\d+", rf"\g<1>{steps}", config_text)
    assert n == 1, "expected one searcher.max_steps"
    if re.search(r"(?m)^batches_per_step:", text):
        return re.sub(r"(?m)^batches_per_step:.*$", f"batches_per_step: {batches_per_step}", text)
    return text.rstrip("\n") + f"\nbatches_per_step: {batches_per_step}\n"


def local_data(root: str) -> None:
    """Put each example's data where its download_data finds it before reaching for the internet."""
    if os.path.join(HERE, "standin") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "standin"))
    import sklearn.datasets
    from torchvision import datasets

    # mnist_pytorch: download_data fetches data.url into /tmp/work_dir/MNIST unless the archive is there.
    mnist = "/tmp/work_dir/MNIST"
    os.makedirs(mnist, exist_ok=True)
    npz = os.path.join(root, "standin-mnist.npz")
    datasets.write_mnist(npz)
    with tarfile.open(os.path.join(mnist, "pytorch_mnist.tar.gz"), "w:gz") as tar:
        tar.add(npz, arcname="standin-mnist.npz")
    # nas_search: download_data returns data_loc ('data/', relative to the working directory) when
    # train.txt and valid.txt are there. Text: scikit-learn's data set descriptions.
    descr = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    lines = []
    for path in sorted(glob.glob(os.path.join(descr, "*.rst"))):
        with open(path, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    cut = int(len(lines) * 0.9)
    for name, part in (("train.txt", lines[:cut]), ("valid.txt", lines[cut:]), ("test.txt", lines[cut:])):
        with open(os.path.join(data, name), "w") as f:
            f.write("\n".join(part) + "\n")


def deps(work: str) -> str:
    """The examples' own imports that the harness does not need: requests (mnist), wget (randomNAS)."""
    target = os.path.join(work, "deps")
    if not os.path.exists(os.path.join(target, "wget.py")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
                target,
                "requests",
                "wget",
            ],
            check=True,
        )
    return target


def run_example(command: list, cwd: str, env: dict, output: str) -> tuple:
    """Run one example to its end: (the process, seconds, its last validation's metrics, its first
    `harness: error:` line); both outputs are kept in log.txt beside its output folder."""
    start = time.monotonic()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800, env=env)
    seconds = time.monotonic() - start
    metrics = {}
    path = os.path.join(output, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            validations = [json.loads(line) for line in f if '"validation"' in line]
        metrics = validations[-1]["metrics"] if validations else {}
    errors = [line for line in proc.stderr.splitlines() if "harness: error:" in line]
    with open(os.path.join(os.path.dirname(output), "log.txt"), "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc, seconds, metrics, errors[0] if errors else ""


def run(example, repo: str, work: str, np_: int, launcher: str, pythonpath: str) -> dict:
    name, commit, directory, config, steps, per_step = example
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    root = os.path.join(work, slug)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    model_dir = extract(repo, commit, directory, os.path.join(root, "src"))
    local_data(root)
    with open(os.path.join(model_dir, config)) as f:
        config_path = os.path.join(root, config)
        with open(config_path, "w") as out:
            out.write(shortened(f.read(), steps, per_step))
    output = os.path.join(root, "output")
    harness = [os.path.join(BIN, "harness"), model_dir, "--config", config_path, "--output", output]
    command = [
        os.path.join(BIN, "horovodrun"),
        f"--{launcher}",
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        *harness,
    ]
    if launcher == "torchrun":  # the torch backend
        run_ = [
            os.path.join(BIN, "python"),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
        ]
        command = [*run_, str(np_), "--no-python", *harness]
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHONPATH=pythonpath)
    proc, seconds, metrics, error = run_example(command, root, env, output)
    errors = [error] if error else []
    commit_id = git(repo, "rev-parse", "--short", commit, capture_output=True, text=True).stdout.strip()
    return dict(
        name=name,
        commit=f"{commit} ({commit_id})",
        config=config,
        rc=proc.returncode,
        metrics=metrics,
        error=errors[0] if errors else "",
        seconds=seconds,
        log=os.path.join(root, "log.txt"),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="a clone of determined-ai/pedl-examples")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--launcher", choices=("gloo", "mpi", "torchrun"), default="gloo")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "pedl-examples-run"))
    p.add_argument("--only", help="run the examples whose name contains this")
    p.add_argument(
        "--numpy",
        metavar="VERSION",
        help="run the ranks with this NumPy (e.g. 1.23.5: PEDL-era code uses np.int, gone since NumPy 1.24)",
    )
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    paths = [os.path.join(HERE, "standin"), deps(args.work)]
    if args.numpy:
        paths.insert(0, os.path.join(args.work, f"numpy-{args.numpy}"))
        if not os.path.isdir(paths[0]):
            pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
            subprocess.run([*pip, "--target", paths[0], f"numpy=={args.numpy}"], check=True)
    pythonpath = os.pathsep.join(paths)
    rows = []
    for example in EXAMPLES:
        if args.only and args.only not in example[0]:
            continue
        row = run(example, args.repo, args.work, args.np, args.launcher, pythonpath)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| example | commit | config | ran unchanged | final validation metrics "
        f"(np={args.np}, {args.launcher}{', NumPy ' + args.numpy if args.numpy else ''}) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["metrics"].items()) if isinstance(v, float))
        outcome = "yes" if r["rc"] == 0 else f"no (exit {r['rc']}): {r['error'][:300]}"
        print(f"| {r['name']} | {r['commit']} | {r['config']} | {outcome} | {shown} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
