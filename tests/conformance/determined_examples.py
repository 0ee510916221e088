"""Run Determined's published PyTorch examples unchanged, each with its own config, and print a table.

    .venv/bin/python tests/conformance/determined_examples.py --repo PATH [--np 2] \
        [--launcher gloo|mpi|torchrun]

PATH is a clone of determined-ai/determined (a bare one will do). Each example's directory is taken from its
release tag as it is (`git archive`); of its config only the training length is shortened where it is long
(`searcher.max_length` or `max_steps`); the Trainer script (0.21+) runs as `python train.py` under the
launcher, its own local branch choosing the length. The data is made local as in pedl_examples.py:
`standin/torchvision` serves scikit-learn's digits as MNIST and CIFAR-10, and the MNIST archive that the
0.12-0.20 examples download is put where they look first (/tmp/data-rank<r>/MNIST). Not part of `make test`:
it needs Determined's repository, which the project does not ship.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Any, Dict, Optional

from pedl_examples import BIN, HERE, deps, extract, git, run_example

# (name, tag, directory, config or the script to run, the length to train: {unit: n} or None for its own)
EXAMPLES = [
    ("mnist_pytorch (wrap_model)", "0.12.13", "examples/official/trial/mnist_pytorch", "const.yaml",
     {"max_steps": 2}),
    ("cifar10_pytorch", "0.15.6", "examples/computer_vision/cifar10_pytorch", "const.yaml", {"epochs": 2}),
    ("custom_reducers_mnist_pytorch (MetricReducer)", "0.17.15",
     "examples/features/custom_reducers_mnist_pytorch", "const.yaml", {"batches": 200}),
    ("gan_mnist_pytorch (two models, two optimizers)", "0.20.1", "examples/gan/gan_mnist_pytorch",
     "const.yaml", {"batches": 200}),
    ("mnist_pytorch tutorial (trial)", "0.20.1", "examples/tutorials/mnist_pytorch", "const.yaml",
     {"batches": 200}),
    ("mnist_pytorch tutorial (Trainer script)", "0.37.0", "examples/tutorials/mnist_pytorch", "train.py",
     None),
]  # fmt: skip


def local_data(np_: int) -> None:
    """The MNIST archive where the 0.12-0.20 examples' download_dataset finds it (one folder per rank)."""
    sys.path.insert(0, os.path.join(HERE, "standin"))
    from torchvision import datasets

    npz = os.path.join(tempfile.mkdtemp(), "standin-mnist.npz")
    datasets.write_mnist(npz)
    for rank in range(np_):
        folder = f"/tmp/data-rank{rank}/MNIST"
        os.makedirs(folder, exist_ok=True)
        with tarfile.open(os.path.join(folder, "pytorch_mnist.tar.gz"), "w:gz") as tar:
            tar.add(npz, arcname="standin-mnist.npz")


def shortened(path: str, length: Optional[Dict[str, int]], out: str) -> None:
    """The config with only its training length changed."""
    from harness.config.yaml12 import dump_yaml, load_yaml_file

    raw = load_yaml_file(path)
    if length and "max_steps" in length:
        raw["searcher"]["max_steps"] = length["max_steps"]
    elif length:
        raw["searcher"]["max_length"] = dict(length)
    with open(out, "w") as f:
        dump_yaml(raw, f)


def run(example: Any, repo: str, work: str, np_: int, launcher: str, pythonpath: str) -> dict:
    name, tag, directory, config, length = example
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name} {tag}".lower()).strip("-")
    root = os.path.join(work, slug)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    model_dir = extract(repo, tag, directory, os.path.join(root, "src"))
    output = os.path.join(root, "output")
    if config.endswith(".py"):  # a Trainer script: python train.py, in its folder
        command = [os.path.join(BIN, "python"), config]
        cwd = model_dir
    else:
        config_path = os.path.join(root, config)
        shortened(os.path.join(model_dir, config), length, config_path)
        command = [os.path.join(BIN, "harness"), model_dir, "--config", config_path, "--output", output]
        cwd = root
    if launcher == "torchrun":  # the torch backend
        command = [os.path.join(BIN, "python"), "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(np_), "--no-python", *command]  # fmt: skip
    elif np_ > 1 or launcher != "gloo":
        hosts = f"localhost:{np_}"
        command = [os.path.join(BIN, "horovodrun"), f"--{launcher}", "-np", str(np_), "-H", hosts, *command]
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHONPATH=pythonpath)
    env["HARNESS_OUTPUT_DIR"] = output
    proc, seconds, metrics, error = run_example(command, cwd, env, output)
    commit = git(
        repo, "rev-parse", "--short", f"{tag}^{{commit}}", capture_output=True, text=True
    ).stdout.strip()
    return dict(name=name, tag=f"{tag} ({commit})", config=config, length=length, rc=proc.returncode,
                metrics=metrics, error=error, seconds=round(seconds),
                log=os.path.join(root, "log.txt"))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="a clone of determined-ai/determined")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--launcher", choices=("gloo", "mpi", "torchrun"), default="gloo")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "determined-examples-run"))
    p.add_argument("--only", help="run the examples whose name contains this")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    local_data(args.np)
    pythonpath = os.pathsep.join([os.path.join(HERE, "standin"), deps(args.work)])
    rows = []
    for example in EXAMPLES:
        if args.only and args.only not in example[0]:
            continue
        row = run(example, args.repo, args.work, args.np, args.launcher, pythonpath)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| example | tag | config | length | ran unchanged | final validation metrics (np={args.np}, "
          f"{args.launcher}) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["metrics"].items())[:4] if isinstance(v, float))
        outcome = "yes" if r["rc"] == 0 else f"no (exit {r['rc']}): {r['error'][:300]}"
        length = "its own" if r["length"] is None else json.dumps(r["length"])
        print(f"| {r['name']} | {r['tag']} | {r['config']} | {length} | {outcome} | {shown} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
