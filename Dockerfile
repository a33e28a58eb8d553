# Images of the VAE server. Targets:
#   runtime (the default: last stage)  CPU server: onnxruntime, no torch, no compiler, non-root
#   gpu                                the same server on CUDA: onnxruntime-gpu, VAE_DEVICE=cuda
#   train                              torch (CPU build) and the train extra: `vae train|export`
#   batch                              `vae score` on Ray (the batch extra): the KubeRay image
#
#   docker build -t vae-server .
#   docker build --target gpu -t vae-server:gpu .
#   docker build --target train -t vae-server:train .
#   docker build --target batch -t vae-server-batch:0.1.0 .   # deploy/kuberay/rayjob.yaml's
#   docker build --target train --build-arg TORCH_INDEX_URL=https://mirror.example/whl/cpu \
#       -t vae-server:train .
#   podman build --format docker -t vae-server .       # likewise buildah build --format docker
#
# podman and buildah write OCI images by default, which have no HEALTHCHECK: build with
# `--format docker` to keep it. There is no `# syntax=` line: nothing here needs a newer Dockerfile
# frontend than the builder's own, and the line makes BuildKit fetch a frontend image even offline.
#
# Dependencies come from the lock files in requirements/, hashes checked (requirements/lock.sh
# writes them). The serving install is .ci/install-serving.sh, which tests/test_container_recipe.py
# also runs into a fresh venv and serves from; .ci/container builds the runtime and train targets
# with podman and checks the running server.
# Every image bakes the default bundle (package data: service/bundles/mnist) into /models/mnist;
# /models is a volume for other bundles
# (Docker fills a new named volume from the image, so /models/mnist is there too).

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-trixie AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# uid/gid 10001: above any a base image or host is likely to assign.
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --no-log-init --create-home --home-dir /home/vae \
        --shell /usr/sbin/nologin vae \
    && install -d -o vae -g vae /models /runs /data

# ---------------------------------------------------------------------------------------------
FROM base AS build

WORKDIR /src
COPY .ci/install-serving.sh .ci/
COPY requirements/serving.txt requirements/
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
RUN bash .ci/install-serving.sh /opt/venv

# ---------------------------------------------------------------------------------------------
FROM base AS train

# The lock pins torch's CPU build (torch==X+cpu): PyPI's Linux torch bundles CUDA (gigabytes), the
# CPU build is on PyTorch's own index, or on a mirror of it given as TORCH_INDEX_URL. Only torch
# is there; everything else comes from the default index, every file checked against the lock.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY requirements/train.txt requirements/
# The dependencies first, in a layer of their own: a change to the source alone reuses it.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --extra-index-url "$TORCH_INDEX_URL" \
        -r requirements/train.txt
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
# pip builds in the source tree (build/, *.egg-info): the tree goes in the same layer.
WORKDIR /
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/pip check \
    && rm -rf /src
COPY service/bundles/mnist/ /models/mnist/

ENV PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg
VOLUME ["/models", "/runs", "/data"]
# `vae train --data mnist` downloads into ./data and writes runs/ by default: /data and /runs here.
USER 10001:10001
ENTRYPOINT ["vae"]
CMD ["train", "--help"]

# ---------------------------------------------------------------------------------------------
# GPU: onnxruntime-gpu 1.31.1 on PyPI is built for CUDA 13 and cuDNN 9 (its `cuda` extra wants
# nvidia-cuda-runtime~=13.0; 1.26.0's wanted CUDA 12), so move this base and ORT_GPU_VERSION
# together. Ubuntu 24.04's python3 is 3.12, which the project supports (requires-python >= 3.11).
FROM nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04 AS gpu-base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The pinned base tag fixes the Ubuntu release; apt versions inside it move with security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --no-log-init --create-home --home-dir /home/vae \
        --shell /usr/sbin/nologin vae \
    && install -d -o vae -g vae /models

FROM gpu-base AS gpu-build

ARG ORT_GPU_VERSION=1.31.1
WORKDIR /src
COPY .ci/install-serving.sh .ci/
COPY requirements/serving.txt requirements/
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
RUN ONNXRUNTIME="onnxruntime-gpu==${ORT_GPU_VERSION}" bash .ci/install-serving.sh /opt/venv

FROM gpu-base AS gpu

COPY --from=gpu-build /opt/venv /opt/venv
COPY service/bundles/mnist/ /models/mnist/
ENV PATH=/opt/venv/bin:$PATH \
    VAE_BUNDLE=/models/mnist \
    VAE_DEVICE=cuda
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["vae", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# `vae score` on a Ray cluster: the image deploy/kuberay/rayjob.yaml runs as head, workers and job
# submitter. The serving install plus the batch extra (Ray Data) and Ray's dashboard, through whose
# job API KubeRay submits the job, all from requirements/batch.txt. KubeRay replaces the command
# with its `ray start`; run alone, the image is `vae score`.
FROM base AS batch

# Older KubeRay operators probe a Ray pod's health with wget (newer ones over HTTP).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/batch.txt requirements/
# The dependencies first, in a layer of their own: a change to the source alone reuses it.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements/batch.txt
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
WORKDIR /
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/pip check \
    && rm -rf /src
COPY service/bundles/mnist/ /models/mnist/

ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
ENTRYPOINT ["vae"]
CMD ["score", "--help"]

# ---------------------------------------------------------------------------------------------
FROM base AS runtime

COPY --from=build /opt/venv /opt/venv
COPY service/bundles/mnist/ /models/mnist/
ENV PATH=/opt/venv/bin:$PATH \
    VAE_BUNDLE=/models/mnist \
    VAE_DEVICE=cpu
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
# /readyz answers 503 until the bundle is loaded; urlopen raises on it, so python exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["vae", "serve", "--host", "0.0.0.0", "--port", "8000"]
