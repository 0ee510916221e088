"""The GPU image (the Dockerfile's default flavor), built as CI builds it and checked without a GPU.

It is built from the same Debian base as the CPU flavor, with PyPI's CUDA: torch's CUDA build and its
nvidia-* packages, and Horovod compiled with NCCL by PyPI's nvcc. Without a GPU, what can be checked is what
a first `docker run --gpus all` would trip over before reaching the GPU: the build itself, Horovod's NCCL
operations, every shared library resolving, one NCCL, no compiler left in the image, and the CPU path still
training. The GPU path itself is tests/gpu/smoke.sh's, on a machine with one.
"""

import os
import re
import shutil

import pytest
from imagekit import (
    DIGITS,
    ENGINE,
    ENTRYPOINT,
    VENV,
    assert_trained_digits,
    build,
    image_config,
    image_size,
    needs_engine,
    output_dir,
    run_in_image,
)

IMAGE = os.environ.get("HARNESS_TEST_GPU_IMAGE", "localhost/harness:gpu-test")
pytestmark = needs_engine
SITE = f"{VENV}/lib/python3.11/site-packages"
# Libraries that only the NVIDIA container toolkit brings, from the host's driver, at `docker run --gpus`.
DRIVER_LIBRARIES = {"libcuda.so.1", "libnvidia-ml.so.1"}


# Measured: a build's disk use peaked at 33.1 GiB (each 5.5 GB layer is written out, then unpacked), and
# 11.4 GiB stayed. Say so up front rather than as "no space left on device" deep in the build log.
DISK_NEEDED_GIB = 35


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    storage = "/var/lib/docker" if ENGINE == "docker" else "/var/lib/containers"
    storage = storage if os.path.isdir(storage) else "/"
    free = shutil.disk_usage(storage).free / 2**30
    assert free >= DISK_NEEDED_GIB, (
        f"building the GPU image needs about {DISK_NEEDED_GIB} GiB free under {storage}; {free:.0f} GiB are"
        " (HARNESS_SKIP_IMAGE_TESTS=1 skips the image tests)"
    )
    seconds = build("gpu", IMAGE, tmp_path_factory.mktemp("gpu-image") / "build.log")
    print(f"\nimage {IMAGE} built with {ENGINE} in {seconds:.0f} s, {image_size(IMAGE) / 1e9:.2f} GB")
    return IMAGE


def python_in(image, code, **kwargs):
    proc = run_in_image(image, f"{VENV}/bin/python", "-c", code, **kwargs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_torch_is_a_cuda_build_and_runs_without_a_gpu(image):
    out = python_in(
        image,
        "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(),"
        " torch.backends.cudnn.version(), torch.cuda.nccl.version())",
    )
    version, cuda, available, cudnn, nccl = out.split(maxsplit=4)
    assert version.startswith("2.13.0")
    assert re.fullmatch(r"\d+\.\d+", cuda), out
    assert available == "False"  # no GPU here, and that is no error
    assert int(cudnn) > 0 and nccl.startswith("("), out  # cuDNN and NCCL load without a GPU
    print(f"\ntorch {version}, CUDA {cuda}, cuDNN {cudnn}, NCCL {nccl.strip()}")


def test_horovod_has_nccl_operations(image):
    out = python_in(image, "import horovod.torch as hvd; print(hvd.nccl_built(), hvd.gloo_built())")
    nccl_built, gloo_built = out.split()
    assert int(nccl_built) > 0 and gloo_built == "True", out  # nccl_built() is NCCL's version
    proc = run_in_image(image, f"{VENV}/bin/horovodrun", "--check-build")
    assert proc.returncode == 0, proc.stderr
    for item in ("PyTorch", "MPI", "Gloo", "NCCL"):
        assert re.search(rf"\[X\] {item}\b", proc.stdout), proc.stdout


def test_every_shared_library_resolves(image):
    """ldd on Horovod's and torch's libraries (and so on every nvidia-* library they load): nothing missing
    but the driver's. (Some nvidia-* libraries that torch never loads, e.g. libcusolverMg, resolve only
    once torch has loaded their neighbours: not checked.)"""
    script = (
        f"find {SITE}/horovod {SITE}/torch/lib -name '*.so*' -type f"
        ' | while read -r f; do ldd "$f" | sed -n "s|^\\s*\\(\\S*\\) => not found|$f \\1|p"; done'
        f"; ldd {SITE}/horovod/torch/mpi_lib_v2.cpython-311-x86_64-linux-gnu.so"
    )
    proc = run_in_image(image, "bash", "-c", script, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    missing = [line for line in lines if " " in line and "=>" not in line and line.startswith("/")]
    assert all(line.split()[1] in DRIVER_LIBRARIES for line in missing), "\n".join(missing)
    # Horovod loads the NCCL and CUDA runtime that torch loads, from the virtualenv.
    horovod = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\S+) => (\S+)", proc.stdout, re.M)}
    assert os.path.normpath(horovod["libnccl.so.2"]) == f"{SITE}/nvidia/nccl/lib/libnccl.so.2"
    cudart = next(name for name in horovod if name.startswith("libcudart.so"))
    assert os.path.normpath(horovod[cudart]).startswith(f"{SITE}/nvidia/"), horovod[cudart]


def test_one_nccl_and_no_compiler(image):
    proc = run_in_image(
        image,
        "bash",
        "-c",
        "find / -xdev \\( -name 'libnccl*.so*' -o -name nvcc -o -name 'libnccl_static.a' \\) -print"
        "; for c in gcc cc g++ c++ nvcc cmake make; do command -v $c; done; true",
        timeout=300,
    )
    found = proc.stdout.split()
    assert [f for f in found if "nccl" in f] == [f"{SITE}/nvidia/nccl/lib/libnccl.so.2"], found
    assert [f for f in found if "nccl" not in f] == [], found  # no compiler, no nvcc, no build tools


def test_cpu_training_in_the_gpu_image(image, tmp_path):
    """No GPU visible: the entrypoint starts HARNESS_NP ranks on the CPU; digits trains as in CPU images."""
    out = output_dir(tmp_path)
    proc = run_in_image(
        image,
        ENTRYPOINT,
        env={"HARNESS_NP": "2", "HARNESS_LAUNCHER": "gloo"},
        mounts=[f"{DIGITS}:/model_def:ro", f"{out}:/output"],
    )
    assert_trained_digits(proc, out)
    assert "2 ranks (gloo)" in proc.stdout
    assert "training on cpu" in proc.stdout, proc.stdout[-2000:]


def test_image_labels_its_flavor(image):
    config = image_config(image)
    assert config["Labels"]["harness.flavor"] == "gpu"
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in config["Env"]
