# The harness as an image: mount a model definition at /model_def and an output folder at /output; the
# entrypoint starts one Horovod rank per GPU (README "Docker").
#   docker build -t harness .                                   GPU flavor: CUDA torch, NCCL + Gloo + MPI
#   docker build -t harness:cpu --build-arg FLAVOR=cpu .        CPU flavor: Gloo + MPI
#   docker run --gpus all --shm-size=8g -v $PWD/my_model:/model_def -v $PWD/out:/output harness
# Both flavors start from the same Debian 12 base and run scripts/setup.sh as `make setup` does (the same
# Horovod patches and build) in a builder stage. The GPU flavor's CUDA is PyPI's: torch's CUDA build brings
# the CUDA runtime, cuDNN and NCCL as nvidia-* packages in the virtualenv, and Horovod is compiled with the
# nvcc of PyPI's cuda-toolkit release that torch requires (scripts/cuda_toolchain.sh, in the build cache,
# not in the image) and linked to torch's NCCL. The runtime stage gets the virtualenv, the harness, Open MPI
# and ssh, and no compilers. scripts/build_image.sh (`make image`) builds it with docker or buildah.
#
# Build arguments:
#   FLAVOR          gpu (default) or cpu
#   BASE_IMAGE      both stages' base (default debian:bookworm-slim; a Debian or Ubuntu with Python >= 3.11,
#                   e.g. nvidia/cuda:13.0.2-runtime-ubuntu24.04 for NVIDIA's CUDA images: torch still
#                   loads its own CUDA libraries)
#   TORCH_VERSION   default 2.13.0; TORCH_INDEX_URL: an extra index for torch (CPU flavor: PyTorch's CPU
#                   wheels, https://download.pytorch.org/whl/cpu, unless set, even to nothing; GPU flavor:
#                   PyPI's default CUDA build unless set)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS   pip's own settings, for the build
#   PIP_CERT        a CA bundle for pip and apt behind a TLS-intercepting proxy, as a path inside the build:
#                   pass the file as a build secret (docker build / buildah bud
#                   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
#                   --build-arg PIP_CERT=/run/secrets/pip_cert); it does not end up in the image
#   HOROVOD_BUILD_CUDA_CC_LIST   GPU architectures to compile Horovod's kernels for, e.g. 80,90 (default:
#                   every one nvcc knows)
#   HARNESS_UID     the training user's uid (default 1000)

ARG FLAVOR=gpu
ARG BASE_IMAGE=debian:bookworm-slim

# The flavors' runtime stages differ here (and the builder below in the torch it installs and the NCCL
# check). Each stage has an instruction: buildah leaves a container behind for a stage with none.
FROM ${BASE_IMAGE} AS runtime-gpu
LABEL harness.flavor=gpu
# What the NVIDIA container toolkit mounts into the container: the driver's CUDA and nvidia-smi.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
FROM ${BASE_IMAGE} AS runtime-cpu
LABEL harness.flavor=cpu

# ---- builder: /opt/harness/venv with torch and the patched Horovod -------------------------------------
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS builder
ARG FLAVOR
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG HOROVOD_BUILD_CUDA_CC_LIST
# Where scripts/build_horovod.sh keeps built wheels: a cache mount here; scripts/build_image.sh mounts the
# host's cache instead where it can (buildah), so that the image reuses the wheel `make setup` built.
ARG HARNESS_WHEEL_CACHE=/root/.cache/harness-wheels
ENV DEBIAN_FRONTEND=noninteractive VENV=/opt/harness/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/ scripts/
RUN --mount=type=cache,id=harness-pip,target=/root/.cache/pip \
    --mount=type=cache,id=harness-wheels,target=/root/.cache/harness-wheels \
    --mount=type=secret,id=pip_cert \
    if [ -n "${PIP_CERT:-}" ]; then \
      printf 'Acquire::https::CAInfo "%s";\n' "$PIP_CERT" > /etc/apt/apt.conf.d/99harness-ca; \
    fi \
 && if [ "$FLAVOR" = cpu ]; then \
      export TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"; \
    fi \
 && checks="PyTorch MPI Gloo" && if [ "$FLAVOR" = gpu ]; then checks="$checks NCCL"; fi \
 && HARNESS_INSTALL=none EXTRA_APT_PACKAGES=python3-dev HARNESS_CHECK_BUILD="$checks" \
      HARNESS_TORCH_FLAVOR="$FLAVOR" bash scripts/setup.sh \
 && rm -f /etc/apt/apt.conf.d/99harness-ca

# ---- the harness itself, as a wheel: apart, so that a change to harness/ rebuilds only small layers ------
FROM builder AS harness-wheel
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
COPY README.md ./
COPY harness/ harness/
COPY pedl/ pedl/
RUN --mount=type=cache,id=harness-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    "$VENV/bin/python" -m pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime --------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM runtime-${FLAVOR}
ARG HARNESS_UID=1000
ARG PIP_CERT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3: the venv's interpreter (the same distribution as the builder's); Open MPI and ssh for mpirun and
# multi-node jobs; libnss-myhostname keeps the container's hostname resolvable whatever /etc/hosts says.
# Not pinned: the same line serves Debian and Ubuntu bases; the base image's tag pins the distribution.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=pip_cert \
    if [ -n "${PIP_CERT:-}" ]; then \
      printf 'Acquire::https::CAInfo "%s";\n' "$PIP_CERT" > /etc/apt/apt.conf.d/99harness-ca; \
    fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 openmpi-bin openssh-client openssh-server libnss-myhostname \
 && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99harness-ca /etc/ssh/ssh_host_*_key* \
 && if ! grep -q myhostname /etc/nsswitch.conf; then \
      sed -i 's/^hosts:.*/& myhostname/' /etc/nsswitch.conf; \
    fi \
 && existing="$(getent passwd "$HARNESS_UID" | cut -d: -f1 || true)" \
 && if [ -n "$existing" ]; then userdel --remove "$existing"; fi \
 && useradd --create-home --uid "$HARNESS_UID" --shell /bin/bash harness \
 && mkdir -p /model_def /output \
 && chown harness:harness /model_def /output

COPY --from=builder /opt/harness/venv /opt/harness/venv
# (COPY, not RUN --mount=from: buildah's layer cache would not notice a new wheel behind a mount.)
COPY --from=harness-wheel /wheels/ /tmp/wheels/
RUN /opt/harness/venv/bin/python -m pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && /opt/harness/venv/bin/python -m pip check \
 && /opt/harness/venv/bin/python -m harness.compat \
 && /opt/harness/venv/bin/python -c "import horovod.torch, harness, determined.pytorch" \
 && /opt/harness/venv/bin/harness --help > /dev/null
COPY deploy/ssh/sshd_config /etc/ssh/harness_sshd_config
COPY deploy/ssh/ssh_config /etc/ssh/ssh_config.d/harness.conf
COPY entrypoint.sh /usr/local/bin/entrypoint.sh

# Open MPI in containers: no CMA single-copy between ranks (it needs ptrace rights that containers lack).
ENV PATH=/opt/harness/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${HARNESS_UID}
WORKDIR /home/harness
VOLUME ["/model_def", "/output"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
